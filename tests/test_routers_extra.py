"""Issue 4 routers: expert_choice, top_p, relu (ReMoE), hash, random, base (S-BASE), null / zero / copy /
constant experts (AdaMoE, MoE++) with the gating residual. Hand-worked examples, loop vs grouped through the
layer, balance metrics with -1 / variable slots, and clear errors."""
import itertools
import math

import pytest
import torch

from moelab.config import MoEConfig
from moelab.moe import MoELayer
from moelab.routers import ROUTERS, RouteContext, Routing, route_topk, sinkhorn_plan
from moelab.special_experts import SpecialExperts, relu_l1_coef_step, special_aux_loss

NEW = ("expert_choice", "top_p", "relu", "hash", "random", "base", "adamoe", "moepp")
TRAIN = RouteContext(training=True)
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # float(loss)


def cfg_(**kw) -> MoEConfig:
    base = dict(d_model=8, d_expert=16, n_experts=4, top_k=2)
    return MoEConfig(**{**base, **kw})


def slots(r: Routing, t: int) -> dict[int, float]:
    """{expert: weight} of token t, unused slots left out."""
    return {int(e): float(w) for e, w in zip(r.expert_idx_TK[t], r.weight_TK[t]) if int(e) >= 0}


def test_registry_lists_all_new_routers():
    assert set(NEW) <= set(sorted(ROUTERS))
    for name in NEW:
        extra = {"adamoe": dict(n_null=2), "moepp": dict(n_zero=1, n_copy=1, n_const=1)}.get(name, {})
        assert cfg_(router=name, **extra).router == name


# ---- expert choice --------------------------------------------------------------------------------------
def _ec_logits():
    # softmax rows: t0 [.5,.5], t1 [.75,.25], t2 [.25,.75], t3 [.9,.1]
    return torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [0.0, math.log(3)], [math.log(9), 0.0]])


def test_expert_choice_hand_worked():
    cfg = cfg_(n_experts=2, top_k=1, router="expert_choice", ec_capacity_factor=1.0)  # C = 4*1/2 = 2
    r = ROUTERS["expert_choice"](_ec_logits(), cfg, TRAIN)
    # expert 0 takes its two highest p0: t3 (.9), t1 (.75); expert 1 its two highest p1: t2 (.75), t0 (.5)
    want = [{1: 0.5}, {0: 0.75}, {1: 0.75}, {0: 0.9}]
    for t in range(4):
        assert slots(r, t) == pytest.approx(want[t])
    # t3 is padding: expert 0 now takes t1 (.75) and t0 (.5); t0 gets two experts
    r = ROUTERS["expert_choice"](_ec_logits(), cfg, RouteContext(training=True, valid_T=torch.tensor([1, 1, 1, 0]).bool()))
    assert slots(r, 0) == pytest.approx({0: 0.5, 1: 0.5})
    assert 3 not in torch.where(r.expert_idx_TK[:, 0] == 0)[0].tolist()


def test_expert_choice_falls_back_to_topk_at_eval():
    logits = torch.randn(6, 4)
    cfg = cfg_(router="expert_choice")
    r_eval = ROUTERS["expert_choice"](logits, cfg, RouteContext(training=False))
    r_topk = route_topk(logits, cfg, RouteContext())
    assert torch.equal(r_eval.expert_idx_TK, r_topk.expert_idx_TK)
    r_ec = ROUTERS["expert_choice"](logits, cfg.replace(ec_eval="expert_choice"), RouteContext(training=False))
    assert r_ec.expert_idx_TK.shape == (6, 4)  # stays expert choice when asked to


# ---- top-p ----------------------------------------------------------------------------------------------
def test_top_p_hand_worked_and_entropy_loss():
    probs = torch.tensor([[0.1, 0.3, 0.2, 0.4], [0.7, 0.1, 0.1, 0.1]])
    cfg = cfg_(router="top_p", top_p=0.6)
    r = ROUTERS["top_p"](probs.log(), cfg, TRAIN)
    # t0: sorted .4 (e3), .3 (e1): .4 < .6, .7 >= .6 -> {3, 1}; t1: .7 >= .6 -> {0}; weights not renormalised
    assert slots(r, 0) == pytest.approx({3: 0.4, 1: 0.3})
    assert slots(r, 1) == pytest.approx({0: 0.7})
    layer = MoELayer(cfg_(router="top_p", top_p=0.6, top_p_entropy_coef=0.5))
    out = layer(torch.randn(3, 8))
    p = torch.softmax(out.routing.logits_TE, -1)
    ent = sum(-sum(float(p[t, e]) * math.log(float(p[t, e])) for e in range(4)) for t in range(3)) / 3
    assert float(out.losses["top_p_entropy"]) == pytest.approx(ent, rel=1e-5)
    ept = sum(int((out.routing.expert_idx_TK[t] >= 0).sum()) for t in range(3)) / 3
    assert float(out.stats.experts_per_token) == pytest.approx(ept)
    assert float(out.aux_loss) == pytest.approx(0.5 * ent + 1e-2 * float(out.losses["aux"]), rel=1e-5)


# ---- ReMoE ----------------------------------------------------------------------------------------------
def test_relu_hand_worked_and_l1():
    logits = torch.tensor([[1.0, -2.0, 0.5], [-1.0, -1.0, -1.0]])
    r = ROUTERS["relu"](logits, cfg_(n_experts=3, router="relu"), TRAIN)
    assert slots(r, 0) == pytest.approx({0: 1.0, 2: 0.5})
    assert slots(r, 1) == {}
    # sparsity 4/6 > target 1 - 2/3: lambda /= 1.2; denser than target: *= 1.2; equal: unchanged
    c = torch.tensor(1e-3)
    assert float(relu_l1_coef_step(coef=c, sparsity=torch.tensor(4 / 6), target=1 / 3, rate=1.2)) == pytest.approx(1e-3 / 1.2)
    assert float(relu_l1_coef_step(coef=c, sparsity=torch.tensor(0.1), target=1 / 3, rate=1.2)) == pytest.approx(1.2e-3)


def test_relu_coefficient_steps_once_per_optimizer_step():
    """ReMoE's lambda moves once per optimizer step (MoELayer.step), from the gate sparsity averaged over the
    step's training forwards (here two micro-batches); eval and no_grad forwards are not counted."""
    layer = MoELayer(cfg_(router="relu", relu_l1_init=1e-3))
    coef = layer.state["relu_l1"].coef
    sparsities = []
    for x in (torch.randn(5, 8), torch.randn(7, 8) + 0.5):  # two micro-batches of one step
        out = layer(x)
        sparsities.append(1 - float((out.routing.expert_idx_TK >= 0).sum()) / (x.shape[0] * 4))
        assert float(coef) == pytest.approx(1e-3)  # unchanged inside the step
        g = torch.relu(out.routing.logits_TE)  # ReMoE's load-balanced L1 (paper eq. 8), by a loop
        T, k = g.shape[0], 2
        l1 = sum(4 / (k * T) * float((g[:, e] > 0).sum()) * float(g[:, e].mean()) for e in range(4))
        assert float(out.losses["relu_l1"]) == pytest.approx(l1, rel=1e-5)
        assert "aux" not in out.losses  # the balanced L1 replaces the Switch loss (balance='aux')
        assert float(out.aux_loss) == pytest.approx(1e-3 * l1 + sum(
            1e-3 * float(v) for n, v in out.losses.items() if n == "z"), rel=1e-5)
    with torch.no_grad():
        layer(torch.randn(5, 8) * 10)
    layer.eval()
    layer(torch.randn(5, 8) * 10)
    layer.train()
    layer.step()
    mean = sum(sparsities) / 2
    want = 1e-3 * 1.2 ** math.copysign(1, (1 - 2 / 4) - mean) if mean != 0.5 else 1e-3
    assert float(coef) == pytest.approx(want)
    before = coef.clone()
    layer.step()  # nothing observed since: unchanged
    assert torch.equal(coef, before)
    assert "state.relu_l1.coef" in layer.state_dict()


# ---- hash and random ------------------------------------------------------------------------------------
def _py_hash(v: int, seed: int) -> int:
    P = 2 ** 31 - 1
    h = (v % P + seed * 1000003 + 12345) % P
    for a, b in ((48271, 11), (69621, 7)):
        h = (h * a + b) % P
        h ^= h >> 13
    return h


def test_hash_hand_worked_and_missing_ids():
    ids = torch.tensor([5, 17, 5, 123456789])
    cfg = cfg_(n_experts=4, router="hash", router_seed=3)
    r = ROUTERS["hash"](torch.randn(4, 4), cfg, RouteContext(token_ids_T=ids))
    assert r.expert_idx_TK[:, 0].tolist() == [_py_hash(int(i), 3) % 4 for i in ids]
    assert r.weight_TK.eq(1.0).all()
    layer = MoELayer(cfg)
    with pytest.raises(ValueError, match="token_ids"):
        layer(torch.randn(4, 8))
    out = layer(torch.randn(2, 2, 8), token_ids=ids.view(2, 2))
    assert out.routing.expert_idx_TK[0, 0] == out.routing.expert_idx_TK[2, 0]  # same id, same expert


def test_random_is_fixed_seed_and_hand_worked():
    cfg = cfg_(n_experts=6, top_k=2, router="random", router_seed=7)
    torch.manual_seed(1)
    r1 = ROUTERS["random"](torch.randn(50, 6), cfg, RouteContext())
    torch.manual_seed(2)
    r2 = ROUTERS["random"](torch.randn(50, 6), cfg, RouteContext())
    assert torch.equal(r1.expert_idx_TK, r2.expert_idx_TK)  # independent of x and of the global RNG
    r3 = ROUTERS["random"](torch.randn(50, 6), cfg.replace(router_seed=8), RouteContext())
    assert not torch.equal(r1.expert_idx_TK, r3.expert_idx_TK)
    for t in (0, 13, 49):  # the two experts with the highest hash scores of (position, expert)
        key = _py_hash(t, 7)
        scores = [_py_hash(key * 6 + e, 7) for e in range(6)]
        assert sorted(r1.expert_idx_TK[t].tolist()) == sorted(sorted(range(6), key=lambda e: -scores[e])[:2])
    assert r1.weight_TK.eq(0.5).all()
    big = ROUTERS["random"](torch.zeros(6000, 6), cfg, RouteContext())
    counts = torch.bincount(big.expert_idx_TK.reshape(-1), minlength=6).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1  # roughly uniform


# ---- BASE -----------------------------------------------------------------------------------------------
def test_base_sinkhorn_hand_worked_2x2():
    # both tokens prefer expert 0 (greedy sends both there); the balanced plan P = [[a,1-a],[1-a,a]] has
    # a^2/(1-a)^2 = K00 K11 / (K01 K10) = e^2 / e^4, so a = 1/(1+e): token 0 -> expert 1, token 1 -> expert 0
    logits = torch.tensor([[2.0, 1.0], [3.0, 0.0]])
    plan = sinkhorn_plan(logits, 50).exp()
    a = 1 / (1 + math.e)
    assert plan.reshape(-1).tolist() == pytest.approx([a, 1 - a, 1 - a, a], abs=1e-5)
    cfg = cfg_(n_experts=2, top_k=1, router="base")
    r = ROUTERS["base"](logits, cfg, TRAIN)
    assert r.expert_idx_TK[:, 0].tolist() == [1, 0]
    assert r.weight_TK[:, 0].tolist() == pytest.approx([1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-3.0))])
    assert ROUTERS["base"](logits, cfg, RouteContext()).expert_idx_TK[:, 0].tolist() == [0, 0]  # greedy


def test_base_matches_brute_force_assignment():
    logits = torch.tensor([[3.0, 0.0], [2.5, 0.5], [2.0, 1.5], [0.2, 0.1]])
    best = max((a for a in itertools.product((0, 1), repeat=4) if sum(a) == 2),
               key=lambda a: sum(float(logits[t, e]) for t, e in enumerate(a)))
    r = ROUTERS["base"](logits, cfg_(n_experts=2, top_k=1, router="base", sinkhorn_iters=30), TRAIN)
    assert tuple(r.expert_idx_TK[:, 0].tolist()) == best


# ---- null / zero / copy / constant experts --------------------------------------------------------------
def test_special_experts_hand_worked():
    cfg = cfg_(n_experts=2, d_model=3, n_null=1, n_zero=1, n_copy=1, n_const=1)  # outputs: 0 1 | null zero copy const
    sp = SpecialExperts(cfg)
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    idx = torch.tensor([[4, 5], [0, 2]])
    w = torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    probs = torch.softmax(torch.randn(2, 6), -1)
    out = sp(x, Routing(idx, w, probs.log(), probs))
    z = [sum(float(x[0, d]) * float(sp.w_alpha_JD2[0, d, j]) for d in range(3)) for j in range(2)]
    a1 = math.exp(z[0]) / (math.exp(z[0]) + math.exp(z[1]))
    const = [a1 * float(x[0, d]) + (1 - a1) * float(sp.v_JD[0, d]) for d in range(3)]
    want0 = [0.3 * float(x[0, d]) + 0.7 * const[d] for d in range(3)]
    assert out.y_TD[0].tolist() == pytest.approx(want0, rel=1e-5)
    assert out.y_TD[1].tolist() == [0.0, 0.0, 0.0]  # expert 0 is real (dispatched later), null adds 0
    assert out.routing.expert_idx_TK.tolist() == [[-1, -1], [0, -1]]
    assert out.routing.weight_TK.reshape(-1).tolist() == pytest.approx([0.0, 0.0, 0.6, 0.0])
    assert out.routing.probs_TE.shape == (2, 2) and out.routing.logits_TE.shape == (2, 6)


def test_special_aux_loss_hand_worked():
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]])
    idx = torch.tensor([[0, 2], [1, -1]])  # counts 1,1,1 -> f = 1/3 each; P = (.3, .4, .3)
    got = special_aux_loss(probs_TA=probs, expert_idx_TK=idx, n_experts=2, tau=0.5)
    assert float(got) == pytest.approx(3 * (0.3 / 3 + 0.4 / 3 + 0.5 * 0.3 / 3))


def test_null_experts_through_layer_report_flops_saved():
    cfg = cfg_(router="adamoe", n_null=4, top_k=3)
    out = MoELayer(cfg)(torch.randn(16, 8))
    full_idx = out.routing.expert_idx_TK
    assert full_idx.max() < 4 and full_idx.shape == (16, 3)  # only real experts reach dispatch
    assert out.routing.logits_TE.shape == (16, 8)
    real_per_tok = float((full_idx >= 0).sum()) / 16
    assert float(out.router_stats["experts_per_token"]) == pytest.approx(real_per_tok)
    assert float(out.router_stats["special_per_token"]) == pytest.approx(3 - real_per_tok)
    assert float(out.router_stats["flops_saved"]) == pytest.approx(1 - real_per_tok / 3)
    assert float(out.stats.experts_per_token) == pytest.approx(real_per_tok)
    assert out.stats.load_E.shape == (4,)


def test_gating_residual_adds_projected_previous_logits():
    cfg = cfg_(router="moepp", n_zero=1, n_copy=1, n_const=1, gating_residual=True)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.prev_gate.weight.copy_(torch.randn(7, 7))
    x, prev = torch.randn(2, 3, 8), torch.randn(6, 7)
    out = layer(x, prev_logits=prev)
    want = x.reshape(6, 8) @ layer.gate.weight.T + prev @ layer.prev_gate.weight.T
    assert torch.allclose(out.routing.logits_TE, want, atol=1e-5)
    out2 = MoELayer(cfg)(x, prev_logits=out.routing.logits_TE)  # chains layer to layer
    assert out2.routing.logits_TE.shape == (6, 7)


# ---- through the full layer: loop reference vs grouped fast path ----------------------------------------
LAYER_CASES = {
    "expert_choice": dict(router="expert_choice"),
    "expert_choice_eval": dict(router="expert_choice", ec_eval="expert_choice"),
    "top_p": dict(router="top_p", top_p=0.5),
    "relu": dict(router="relu"),
    "hash": dict(router="hash"),
    "random": dict(router="random"),
    "base": dict(router="base"),
    "adamoe": dict(router="adamoe", n_null=2, top_k=3),
    "moepp": dict(router="moepp", n_zero=1, n_copy=1, n_const=2, gating_residual=True),
    "top_p_null_capacity": dict(router="top_p", n_null=2, capacity_factor=1.0),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_loop_vs_grouped(case):
    kw = LAYER_CASES[case]
    cfgs = [cfg_(d_model=16, d_expert=32, n_experts=4, expert_impl=impl, **kw) for impl in ("loop", "grouped")]
    torch.manual_seed(0)
    ref = MoELayer(cfgs[0])
    fast = MoELayer(cfgs[1])
    fast.load_state_dict(ref.state_dict())
    if ref.prev_gate is not None:
        with torch.no_grad():
            ref.prev_gate.weight.normal_()
            fast.prev_gate.weight.copy_(ref.prev_gate.weight)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 8:] = False
    for seed in range(50):  # inputs whose routed slot count S suits torch._grouped_mm (S*4 bytes % 16 == 0)
        torch.manual_seed(seed)
        x, ids, prev = torch.randn(2, 12, 16), torch.randint(0, 50, (2, 12)), torch.randn(24, 4 + cfgs[0].n_special)
        with torch.no_grad():
            S = int((ref(x, valid=valid, token_ids=ids, prev_logits=prev).routing.expert_idx_TK >= 0).sum())
        if S % 4 == 0:
            break
    assert S % 4 == 0, "no input found that exercises the grouped GEMM path"
    outs, grads = [], []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_(True)
        out = layer(xi, valid=valid, token_ids=ids, prev_logits=prev)
        (out.y.pow(2).sum() + out.aux_loss).backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    assert torch.equal(outs[0].routing.expert_idx_TK, outs[1].routing.expert_idx_TK)
    torch.testing.assert_close(outs[0].y, outs[1].y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0].aux_loss, outs[1].aux_loss, atol=1e-5, rtol=1e-5)
    for g0, g1 in zip(*grads):
        if g0 is None:
            assert g1 is None
        else:
            torch.testing.assert_close(g0, g1, atol=1e-5, rtol=1e-5)
    assert (outs[0].routing.expert_idx_TK[valid.reshape(-1).logical_not()] == -1).all()  # padding: no expert


def test_layer_output_matches_per_token_loop():
    """Independent per-token evaluation of the layer: sum of weight * expert(x) over real slots + specials."""
    cfg = cfg_(router="moepp", n_zero=1, n_copy=1, n_const=1, expert_impl="grouped")
    layer = MoELayer(cfg)
    x = torch.randn(6, 8)
    out = layer(x)
    r = layer.route(x, None, None)
    for t in range(6):
        want = torch.zeros(8)
        for e, w in zip(r.expert_idx_TK[t].tolist(), r.weight_TK[t].tolist()):
            if e < 4:
                want += w * layer.experts.expert_fn(e, x[t:t + 1])[0]
            elif e == 5:  # copy
                want += w * x[t]
            elif e == 6:  # const
                a = torch.softmax(x[t] @ layer.special.w_alpha_JD2[0], -1)
                want += w * (a[0] * x[t] + a[1] * layer.special.v_JD[0])
        torch.testing.assert_close(out.y[t], want, atol=1e-5, rtol=1e-5)


# ---- balance metrics and losses with -1 / variable slots ------------------------------------------------
def test_balance_with_variable_slots_and_padding():
    cfg = cfg_(router="expert_choice", ec_eval="expert_choice", z_loss_coef=1e-3)
    layer = MoELayer(cfg).eval()
    x = torch.randn(2, 5, 8)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    out = layer(x, valid=valid)
    idx = out.routing.expert_idx_TK
    counts = [int((idx == e).sum()) for e in range(4)]
    assert out.stats.load_E.tolist() == pytest.approx([c / sum(counts) for c in counts])
    assert float(out.stats.experts_per_token) == pytest.approx(sum(counts) / 8)
    v = valid.reshape(-1)
    P = out.routing.probs_TE[v].mean(0)
    want = 4 * sum(counts[e] / sum(counts) * float(P[e]) for e in range(4))
    assert float(out.losses["aux"]) == pytest.approx(want, rel=1e-5)
    x2 = x.clone()
    x2[1, 3:] = 100.0  # padding content changes nothing
    out2 = layer(x2, valid=valid)
    assert torch.equal(out2.routing.expert_idx_TK, idx)
    assert float(out2.losses["aux"]) == pytest.approx(float(out.losses["aux"]))


def test_seq_balance_with_variable_slots():
    """DeepSeek-V3 sequence-wise loss with top_p's -1 slots: per sequence sum_i f_i P_i,
    f_i = E/(k S) * count_i, averaged over sequences, worked out with plain loops."""
    cfg = cfg_(router="top_p", top_p=0.5, balance="seq")
    out = MoELayer(cfg)(torch.randn(3, 5, 8))
    idx, probs = out.routing.expert_idx_TK.view(3, 5, -1), out.routing.probs_TE.detach().view(3, 5, 4)
    want = 0.0
    for b in range(3):
        for e in range(4):
            f = 4 / (2 * 5) * int((idx[b] == e).sum())
            want += f * float(probs[b, :, e].mean()) / 3
    assert float(out.losses["seq_aux"]) == pytest.approx(want, rel=1e-5)


def test_loss_free_bias_with_null_experts_counts_real_only():
    cfg = cfg_(router="topk", n_null=2, balance="loss_free")
    layer = MoELayer(cfg).train()
    out = layer(torch.randn(10, 8))
    counts = torch.bincount(out.routing.expert_idx_TK[out.routing.expert_idx_TK >= 0], minlength=4).float()
    assert torch.equal(layer.state["loss_free"].load_E, counts)
    layer.step()
    assert layer.state["loss_free"].bias_E.shape == (4,)


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(router="top_p", top_p=0.0), "top_p"),
    (dict(router="expert_choice", ec_eval="causal"), "ec_eval"),
    (dict(ec_capacity_factor=0.0), "ec_capacity_factor"),
    (dict(n_null=-1), "n_null"),
    (dict(router="adamoe"), "n_null"),
    (dict(router="moepp"), "n_zero"),
    (dict(n_null=1, balance="seq"), "balance"),
    (dict(router="relu", balance="loss_free"), "balance"),
    (dict(router="expert_choice", balance="loss_free"), "balance"),
    (dict(relu_l1_rate=1.0), "relu_l1_rate"),
    (dict(sinkhorn_iters=0), "sinkhorn_iters"),
    (dict(router="nope"), "router"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}="):
        cfg_(**kw)
