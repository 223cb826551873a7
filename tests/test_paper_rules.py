"""Each paper's rule computed by hand (a loop over tokens / experts) against moelab's implementation."""
import math

import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.model import MoELM
from moelab.moe import MoELayer, moe_layers, step_routers
from moelab.routers import ROUTERS, RouteContext, route_expert_choice


def cfg_(**kw) -> MoEConfig:
    return MoEConfig(**{"d_model": 8, "d_expert": 16, "n_experts": 4, "top_k": 2, **kw})


def test_expert_choice_capacity_counts_real_tokens_only():
    """Zhou et al. 2022 sec. 3: C = ceil(T * cf / E) with T the real tokens: 48 real of 96 rows, cf=2, E=8 -> C=12,
    i.e. 2 experts per real token on average (counting padding gave C=24, ~4 per real token)."""
    cfg = cfg_(n_experts=8, router="expert_choice", ec_capacity_factor=2.0)
    logits = torch.randn(96, 8)
    valid = torch.zeros(96, dtype=torch.bool)
    valid[torch.randperm(96)[:48]] = True
    r = route_expert_choice(logits, cfg, RouteContext(training=True, valid_T=valid))
    per_expert = [int((r.expert_idx_TK == e).sum()) for e in range(8)]
    assert per_expert == [12] * 8
    assert not (r.expert_idx_TK[~valid] >= 0).any()
    assert (r.expert_idx_TK >= 0).sum() / valid.sum() == 2.0
    probs = torch.softmax(logits, -1)
    for e in range(8):  # each expert takes its 12 highest-scoring real tokens
        real = torch.nonzero(valid).flatten()
        want = set(real[probs[real, e].topk(12).indices].tolist())
        assert set(torch.nonzero((r.expert_idx_TK == e).any(1)).flatten().tolist()) == want


def _loop_counts(idx_TK, n):
    c = [0.0] * n
    for row in idx_TK.tolist():
        for e in row:
            if 0 <= e < n:
                c[e] += 1
    return c


def test_capacity_drops_are_not_seen_by_any_balance_rule():
    """Switch/GShard compute f before the capacity mask, DeepSeek-V3 eq. 18 counts the top-K selection: the Switch
    loss, the sequence-wise loss and the loss-free counter all count the router's choice before drops."""
    x = torch.randn(2, 6, 8)
    for balance in ("aux", "seq", "loss_free"):
        torch.manual_seed(1)
        layer = MoELayer(cfg_(capacity_factor=0.5, balance=balance, bias_update_rate=0.1)).train()
        out = layer(x)
        logits = x.reshape(-1, 8) @ layer.gate.weight.T
        chosen = ROUTERS["topk"](logits, layer.cfg, RouteContext(training=True)).expert_idx_TK
        assert float(out.stats.drop_rate) > 0  # drops happened, so the rule matters
        probs = torch.softmax(logits, -1).detach()
        if balance == "aux":
            c = _loop_counts(chosen, 4)
            want = 4 * sum(c[e] / sum(c) * float(probs[:, e].mean()) for e in range(4))
            assert abs(float(out.losses["aux"].detach()) - want) < 1e-5
        if balance == "seq":
            per_seq = []
            for b in range(2):
                rows = slice(6 * b, 6 * b + 6)
                c = _loop_counts(chosen[rows], 4)
                per_seq.append(sum(4 / (2 * 6) * c[e] * float(probs[rows, e].mean()) for e in range(4)))
            assert abs(float(out.losses["seq_aux"].detach()) - sum(per_seq) / 2) < 1e-5
        if balance == "loss_free":
            assert layer.state["loss_free"].load_E.tolist() == _loop_counts(chosen, 4)


def test_adamoe_renormalises_over_the_true_experts_chosen():
    """AdaMoE (arXiv 2406.13233), authors' code: softmax over E + n_null, top-k, true experts' weights divided by
    the sum of the chosen true experts' probabilities; nulls take no weight mass."""
    cfg = cfg_(router="adamoe", n_null=4, top_k=3)
    logits = torch.randn(50, 8) * 2
    r = ROUTERS["adamoe"](logits, cfg, RouteContext())
    p = torch.softmax(logits, -1)
    n_only_null = 0
    for t in range(50):
        chosen = p[t].topk(3).indices.tolist()
        true = [e for e in chosen if e < 4]
        mass = sum(float(p[t, e]) for e in true)
        got = {int(e): float(w) for e, w in zip(r.expert_idx_TK[t], r.weight_TK[t]) if int(e) < 4}
        assert set(got) == set(true)
        for e in true:
            assert abs(got[e] - float(p[t, e]) / mass) < 1e-6
        if true:
            assert abs(sum(got.values()) - 1.0) < 1e-5
        n_only_null += not true
    assert n_only_null < 50


def test_adamoe_balance_loss_treats_null_experts_as_one_group():
    """AdaMoE's balance loss: Switch over N = E + n_null outputs with each null expert's load replaced by the mean
    null load (so routing among the nulls is not balanced, only true vs null)."""
    layer = MoELayer(cfg_(router="adamoe", n_null=4, top_k=2)).train()
    x = torch.randn(30, 8)
    out = layer(x)
    logits = x @ layer.gate.weight.T
    p = torch.softmax(logits, -1)
    idx = p.topk(2, dim=-1).indices
    c = _loop_counts(idx, 8)
    null_mean = sum(c[4:]) / 4
    f = [ci / sum(c) for ci in c[:4]] + [null_mean / sum(c)] * 4
    want = 8 * sum(f[e] * float(p[:, e].detach().mean()) for e in range(8))
    assert abs(float(out.losses["aux"].detach()) - want) < 1e-5


def test_remoe_l1_is_load_balanced_and_replaces_the_switch_loss():
    """ReMoE (arXiv 2412.14711) eq. 8 / authors' code: L1 = sum_e f_e * mean_t relu(logit_te), f_e = E/(kT) * tokens
    on e; with the default balance='aux' there is no Switch loss beside it."""
    layer = MoELayer(cfg_(router="relu")).train()
    x = torch.randn(3, 5, 8)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[2, 3:] = False
    out = layer(x, valid=valid)
    g = torch.relu(x.reshape(-1, 8) @ layer.gate.weight.detach().T)[valid.reshape(-1)]
    T = g.shape[0]
    want = sum(4 / (2 * T) * float((g[:, e] > 0).sum()) * float(g[:, e].sum()) / T for e in range(4))
    assert abs(float(out.losses["relu_l1"].detach()) - want) < 1e-5
    assert "aux" not in out.losses


def test_remoe_keeps_one_global_lambda_from_all_layers():
    """The authors keep one coefficient, stepped once per optimizer step from the sparsity averaged over all
    layers (and micro-batches): every layer ends with the same lambda, moved by the mean sparsity's sign."""
    moe = cfg_(router="relu", d_model=16, relu_l1_init=1e-3)
    model = MoELM(ModelConfig(moe=moe, d_model=16, n_layers=3, n_heads=2, d_dense=16, max_seq_len=16)).train()
    layers = moe_layers(model)
    out = model(torch.randint(0, 256, (2, 8)))  # one real micro-batch ...
    seen = [[float(r.router_stats["gate_sparsity"]) for r in out.moe.values()]]
    seen.append([0.95, 0.1, 0.1])  # ... and one where layer 0 alone is sparser than the target, the rest denser
    for m, s in zip(layers, seen[1]):
        m.state["relu_l1"].observe(counts_E=torch.zeros(4), sparsity=torch.tensor(s))
    mean = sum(sum(s) for s in seen) / (len(seen) * len(layers))
    own0 = sum(s[0] for s in seen) / len(seen)
    assert math.copysign(1, 0.5 - own0) != math.copysign(1, 0.5 - mean)  # a per-layer lambda would differ
    step_routers(model)
    want = 1e-3 * 1.2 ** math.copysign(1, (1 - 2 / 4) - mean)
    for m in layers:
        assert abs(float(m.state["relu_l1"].coef) / want - 1) < 1e-6
