"""Core MoE layer: fast path == loop reference, routers on hand-worked examples, config errors."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelab.config import MoEConfig
from moelab.moe import MoELayer
from moelab.routers import ROUTERS, RouteContext


def _twin_layers(cfg: MoEConfig):
    fast = MoELayer(cfg.replace(expert_impl="grouped"))
    loop = MoELayer(cfg.replace(expert_impl="loop"))
    loop.load_state_dict(fast.state_dict())
    return fast, loop


SHAPES = [  # (T, E, K, D, F, n_shared, activation, capacity_factor)
    (24, 8, 2, 16, 8, 0, "swiglu", None),
    (17, 6, 1, 12, 20, 1, "gelu", None),      # k=1, odd T (grouped-GEMM alignment fallback)
    (16, 4, 4, 8, 8, 2, "swiglu", None),      # k=E
    (1, 8, 2, 16, 12, 0, "swiglu", None),     # T=1: most experts get zero tokens
    (40, 8, 2, 16, 8, 1, "swiglu", 1.0),      # capacity drops
    (13, 5, 3, 10, 6, 0, "gelu", 0.5),        # uneven everything, heavy drops
]


@pytest.mark.parametrize("T,E,K,D,F,n_shared,act,cf", SHAPES)
def test_fast_path_equals_loop_reference_forward_and_grads(T, E, K, D, F, n_shared, act, cf):
    cfg = MoEConfig(d_model=D, d_expert=F, n_experts=E, top_k=K, n_shared=n_shared, activation=act,
                    capacity_factor=cf, balance="aux", z_loss_coef=1e-3)
    fast, loop = _twin_layers(cfg)
    x = torch.randn(T, D)
    outs = []
    for layer in (fast, loop):
        xi = x.clone().requires_grad_(True)
        r = layer(xi)
        (r.y.pow(2).sum() + r.aux_loss).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        outs.append((r.y.detach(), xi.grad, grads))
    (y1, gx1, g1), (y2, gx2, g2) = outs
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-5, msg=n)


def test_fast_path_with_experts_that_get_no_tokens():
    cfg = MoEConfig(d_model=16, d_expert=8, n_experts=8, top_k=2, balance="loss_free")
    fast, loop = _twin_layers(cfg)
    for layer in (fast, loop):  # experts 1, 4, 5 can never be chosen
        layer.state["loss_free"].bias_E[[1, 4, 5]] = -100.0
    x = torch.randn(32, 16)
    ys, gs = [], []
    for layer in (fast, loop):
        r = layer(x)
        assert r.stats.dead == 3
        r.y.sum().backward()
        ys.append(r.y.detach())
        gs.append(layer.experts.weights.w_up_EDG.grad.clone())
    torch.testing.assert_close(ys[0], ys[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gs[0], gs[1], atol=1e-5, rtol=1e-5)
    assert gs[0][[1, 4, 5]].abs().max() == 0


def test_one_expert_top1_equals_dense_ffn():
    layer = MoELayer(MoEConfig(d_model=16, d_expert=32, n_experts=1, top_k=1))
    x = torch.randn(10, 16)
    w_up, w_down = layer.experts.weights.w_up_EDG[0], layer.experts.weights.w_down_EFD[0]
    gate, up = (x @ w_up).chunk(2, dim=-1)
    dense = (torch.nn.functional.silu(gate) * up) @ w_down
    torch.testing.assert_close(layer(x).y, dense, atol=1e-6, rtol=1e-5)


def test_shared_experts_are_added_to_every_token():
    cfg = MoEConfig(d_model=8, d_expert=4, n_experts=4, top_k=1, n_shared=2, d_shared=4)
    layer = MoELayer(cfg)
    x = torch.randn(5, 8)
    r = layer.route(x, None, None)
    routed = layer.experts(x, r.expert_idx_TK, r.weight_TK).y_TD
    w_up, w_down = layer.shared.up.weight.t(), layer.shared.down.weight.t()
    assert w_up.shape == (8, 2 * 8)  # two shared experts of width 4, fused
    gate, up = (x @ w_up).chunk(2, dim=-1)
    torch.testing.assert_close(layer(x).y, routed + (torch.nn.functional.silu(gate) * up) @ w_down)


# ---- routers on hand-worked 4-token examples -------------------------------------------------

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                       [0.0, 3.0, 1.0, 0.5],
                       [1.0, 1.5, 2.0, 0.0],
                       [-2.0, 0.5, 0.0, 4.0]])


def _softmax_row(row):
    ex = [math.exp(v) for v in row]
    return [v / sum(ex) for v in ex]


@pytest.mark.parametrize("order,renorm", [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", True)])
def test_topk_router_hand_example(order, renorm):
    cfg = MoEConfig(d_model=4, n_experts=4, top_k=2, score_order=order, renormalize=renorm)
    r = ROUTERS["topk"](LOGITS, cfg, RouteContext())
    want_idx = [[0, 1], [1, 2], [2, 1], [3, 1]]
    for t, row in enumerate(LOGITS.tolist()):
        assert sorted(r.expert_idx_TK[t].tolist()) == sorted(want_idx[t])
        p = _softmax_row(row)
        picked = [p[e] for e in r.expert_idx_TK[t].tolist()]
        if renorm or order == "topk_softmax":
            picked = [v / sum(picked) for v in picked]
        assert r.weight_TK[t].tolist() == pytest.approx(picked, abs=1e-6)
        assert r.probs_TE[t].tolist() == pytest.approx(p, abs=1e-6)


def _deepseek_v3_literal(logits, bias, n_group, topk_group, top_k, scale):
    """Token-by-token transcription of DeepSeek-V3's gate (inference/model.py, Gate.forward)."""
    out_idx, out_w = [], []
    for t in range(len(logits)):
        s = [1 / (1 + math.exp(-v)) for v in logits[t]]
        sb = [a + b for a, b in zip(s, bias)]
        per = len(s) // n_group
        gscore = [sum(sorted(sb[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        cand = [(sb[e], e) for g in keep for e in range(g * per, (g + 1) * per)]
        chosen = [e for _, e in sorted(cand, key=lambda c: -c[0])[:top_k]]
        w = [s[e] for e in chosen]
        out_idx.append(chosen)
        out_w.append([v / sum(w) * scale for v in w])
    return out_idx, out_w


def test_sigmoid_group_matches_literal_deepseek_v3_rule():
    cfg = MoEConfig(d_model=4, n_experts=16, top_k=4, router="sigmoid_group", n_group=4, topk_group=2,
                    routed_scaling_factor=2.5)
    logits = torch.randn(20, 16)
    bias = torch.randn(16) * 0.3
    r = ROUTERS["sigmoid_group"](logits, cfg, RouteContext(bias_E=bias))
    want_idx, want_w = _deepseek_v3_literal(logits.tolist(), bias.tolist(), 4, 2, 4, 2.5)
    for t in range(20):
        got = dict(zip(r.expert_idx_TK[t].tolist(), r.weight_TK[t].tolist()))
        want = dict(zip(want_idx[t], want_w[t]))
        assert got.keys() == want.keys()
        for e in want:
            assert got[e] == pytest.approx(want[e], abs=1e-5)
        groups = {e // 4 for e in got}
        assert len(groups) <= 2


def test_bias_changes_selection_never_weights():
    cfg = MoEConfig(d_model=4, n_experts=4, top_k=2)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # force expert 3 into every token's top-2
    r0 = ROUTERS["topk"](LOGITS, cfg, RouteContext())
    r1 = ROUTERS["topk"](LOGITS, cfg, RouteContext(bias_E=bias))
    assert bool((r1.expert_idx_TK == 3).any(-1).all())
    assert not torch.equal(r0.expert_idx_TK, r1.expert_idx_TK)
    for t in range(4):  # weights are the unbiased probabilities of the chosen experts, renormalised
        p = r1.probs_TE[t, r1.expert_idx_TK[t]]
        torch.testing.assert_close(r1.weight_TK[t], p / p.sum())
    torch.testing.assert_close(r0.probs_TE, r1.probs_TE)


def test_capacity_drops_lowest_weight_slots_first():
    cfg = MoEConfig(d_model=4, n_experts=4, top_k=1, renormalize=False, capacity_factor=0.5)  # cap = ceil(0.5*4*1/4) = 1
    layer = MoELayer(cfg)
    logits = torch.tensor([[3.0, 0, 0, 0], [1.0, 0, 0, 0], [5.0, 0, 0, 0], [0, 0, 2.0, 0]])
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(4))
    r = layer(logits)
    # tokens 0,1,2 all want expert 0; only the highest-weight one (token 2) keeps it
    assert r.routing.expert_idx_TK[:, 0].tolist() == [-1, -1, 0, 2]
    assert float(r.stats.drop_rate) == pytest.approx(2 / 4)


def test_router_runs_in_fp32_for_low_precision_models():
    layer = MoELayer(MoEConfig(d_model=8, d_expert=8, n_experts=4, top_k=2)).to(torch.bfloat16)
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    r = layer(x)
    assert r.routing.logits_TE.dtype == torch.float32 and r.routing.weight_TK.dtype == torch.float32
    assert r.y.dtype == torch.bfloat16
    want = torch.nn.functional.linear(x.float(), layer.gate.weight.float())
    torch.testing.assert_close(r.routing.logits_TE, want)


# ---- state, padding, counters -----------------------------------------------------------------

def test_padding_changes_neither_losses_nor_counters():
    cfg = MoEConfig(d_model=8, d_expert=8, n_experts=4, top_k=2, balance="loss_free", z_loss_coef=1.0)
    for bal in ("aux", "seq", "loss_free"):
        a = MoELayer(cfg.replace(balance=bal)).train()
        b = MoELayer(cfg.replace(balance=bal)).train()
        b.load_state_dict(a.state_dict())
        x = torch.randn(2, 5, 8)
        pad = torch.randn(2, 3, 8) * 10
        valid = torch.cat([torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)], 1)
        ra = a(x)
        rb = b(torch.cat([x, pad], 1), valid=valid)
        assert ra.losses.keys() == rb.losses.keys() and len(ra.losses) >= 1
        for k in ra.losses:
            torch.testing.assert_close(ra.losses[k], rb.losses[k], msg=f"{bal}:{k}")
        if bal == "loss_free":
            torch.testing.assert_close(a.state["loss_free"].load_E, b.state["loss_free"].load_E)
        torch.testing.assert_close(ra.stats.load_E, rb.stats.load_E)
        torch.testing.assert_close(ra.y, rb.y[:, :5])
        assert bool((rb.routing.expert_idx_TK.view(2, 8, 2)[:, 5:] == -1).all())


def test_eval_and_no_grad_forwards_never_touch_bias_counters():
    layer = MoELayer(MoEConfig(d_model=8, d_expert=8, n_experts=4, top_k=2, balance="loss_free"))
    x = torch.randn(10, 8)
    layer.eval()
    layer(x)
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.state["loss_free"].load_E.sum() == 0
    layer(x)
    assert layer.state["loss_free"].load_E.sum() == 10 * 2


def test_bias_survives_safetensors_save_and_load(tmp_path):
    cfg = MoEConfig(d_model=8, d_expert=8, n_experts=4, top_k=2, balance="loss_free", bias_update_rate=0.1)
    layer = MoELayer(cfg).train()
    layer(torch.randn(16, 8) + 2.0)
    layer.step()
    assert layer.state["loss_free"].bias_E.abs().sum() > 0 and layer.state["loss_free"].load_E.sum() == 0
    save_file(layer.state_dict(), tmp_path / "m.safetensors")
    fresh = MoELayer(cfg)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    torch.testing.assert_close(fresh.state["loss_free"].bias_E, layer.state["loss_free"].bias_E)
    assert "state.loss_free.bias_E" in layer.state_dict()


# ---- config errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(top_k=9, n_experts=8), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(n_experts=0), "n_experts"),
    (dict(d_model=-1), "d_model"),
    (dict(activation="relu6"), "activation"),
    (dict(router="nope"), "router"),
    (dict(balance="magic"), "balance"),
    (dict(score_order="x"), "score_order"),
    (dict(n_group=3, n_experts=8), "n_group"),
    (dict(n_group=2, topk_group=3, n_experts=8), "topk_group"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(jitter_eps=1.5), "jitter_eps"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    (dict(n_shared=-1), "n_shared"),
    (dict(expert_impl="cuda"), "expert_impl"),
    (dict(router="sigmoid_group", n_experts=8, n_group=4, topk_group=1, top_k=3), "top_k"),
])
def test_bad_config_values_raise_clear_errors(kwargs, field):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}="):
        MoEConfig(**kwargs)


def test_config_replace_rejects_unknown_fields_and_bad_input_shape():
    with pytest.raises(ValueError, match="unknown MoEConfig field"):
        MoEConfig().replace(n_expert=4)
    layer = MoELayer(MoEConfig(d_model=8, d_expert=8, n_experts=4, top_k=2))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(3, 7))
