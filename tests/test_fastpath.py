"""Fast paths vs their loop twins: forward and every gradient to 1e-5 (fp32), on random shapes incl. experts
with zero tokens, k=1, k=E, T=1 and shapes that force the grouped-GEMM fallback. Plus transformers itself."""
import pytest
import torch

from moelab import bench
from moelab.config import MoEConfig
from moelab.dispatch import (
    LocalDispatcher,
    block_layout,
    experts_reference_forward,
    permute,
    sort_plan,
    unpermute,
    unpermute_scatter,
)
from moelab.expert_kernels import (
    EXPERT_IMPLS,
    activate,
    experts_blocked,
    experts_loop,
    experts_padded,
    grouped_mm_available,
    swiglu_reference,
)
from moelab.experts import Experts, ExpertsPath, RoutedExperts
from moelab.moe import MoELayer
from moelab.routers import Routing, apply_capacity

FAST = [name for name in ("grouped", "fused", *EXPERT_IMPLS) if name != "loop"]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _grads(out, tensors, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, tensors, g, allow_unused=True)


def _counts(R, E, n_empty, gen):
    """Random split of R rows over E experts with at least n_empty experts receiving none."""
    live = torch.randperm(E, generator=gen)[: max(E - n_empty, 1)]
    owner = live[torch.randint(len(live), (R,), generator=gen)]
    return torch.bincount(owner, minlength=E)


# (E, D, F, R, n_empty, activation): aligned shapes use torch._grouped_mm, odd ones force the loop fallback
EXPERT_CASES = [(8, 16, 12, 40, 3, "swiglu"), (4, 8, 8, 4, 3, "gelu"), (6, 12, 20, 24, 0, "swiglu"),
                (5, 7, 9, 13, 2, "swiglu"), (3, 16, 16, 9, 1, "gelu"), (16, 8, 4, 1, 15, "swiglu")]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("E,D,F,R,n_empty,act", EXPERT_CASES)
def test_expert_impls_match_loop(impl, E, D, F, R, n_empty, act):
    gen = torch.Generator().manual_seed(E * 100 + R)
    counts_E = _counts(R, E, n_empty, gen)
    assert int(counts_E.sum()) == R and (counts_E == 0).sum() >= min(n_empty, E - 1)
    experts = Experts(E, D, F, act)
    x_RD = torch.randn(R, D, generator=gen, requires_grad=True)
    params = [x_RD, experts.w_up_EDG, experts.w_down_EFD]
    want = experts_loop(x_RD, counts_E, experts)
    got = ExpertsPath(impl).run(x_RD, counts_E, experts)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(_grads(got, params), _grads(want, params)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("C_of", ["min", "median", "max", "one"])
@pytest.mark.parametrize("E,D,F,R,n_empty,act", EXPERT_CASES)
def test_blocked_equal_part_and_tail_match_loop(C_of, E, D, F, R, n_empty, act):
    """Equal part of C rows per expert (padded) + ragged tail, from compact rows and from the dispatcher's
    blocked layout: forward and every gradient equal the loop."""
    gen = torch.Generator().manual_seed(E * 10 + R)
    counts_E = _counts(R, E, n_empty, gen)
    C = {"min": int(counts_E.min()), "median": int(counts_E.median()), "max": int(counts_E.max()), "one": 1}[C_of]
    if C == 0:
        C = 1
    experts = Experts(E, D, F, act)
    x_RD = torch.randn(R, D, generator=gen, requires_grad=True)
    params = [x_RD, experts.w_up_EDG, experts.w_down_EFD]
    want = experts_loop(x_RD, counts_E, experts)
    got = experts_blocked(x_RD, counts_E, experts, C, compact=True)
    pos_R, n_rows = block_layout(torch.repeat_interleave(torch.arange(E), counts_E), counts_E, C)
    assert n_rows == E * C + int((counts_E - C).clamp_min(0).sum()) and len(set(pos_R.tolist())) == R
    x_blocked = x_RD.new_zeros(n_rows, D).index_copy(0, pos_R, x_RD)  # what the dispatcher hands over
    got_blocked = experts_blocked(x_blocked, counts_E, experts, C).index_select(0, pos_R)
    want_grads = _grads(want, params)
    for y in (got, got_blocked):
        torch.testing.assert_close(y, want, **TOL)
        for a, b in zip(_grads(y, params), want_grads):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("block_bytes", [0, 1 << 40])
def test_padded_equal_blocks_expert_by_expert_or_batched(block_bytes):
    """Equal blocks (a padded dispatch) run as one bmm (huge block_bytes) or expert by expert (0): both = loop."""
    E, C, D, F = 4, 6, 8, 12
    experts = Experts(E, D, F)
    counts_E = torch.full((E,), C)
    x_RD = torch.randn(E * C, D, requires_grad=True)
    params = [x_RD, experts.w_up_EDG, experts.w_down_EFD]
    got = experts_padded(x_RD, counts_E, experts, block_bytes=block_bytes)
    want = experts_loop(x_RD, counts_E, experts)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(_grads(got, params), _grads(want, params)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("block_bytes", [0, 1 << 40])
def test_grouped_big_blocks_and_dispatcher_row_limit(block_bytes):
    """block_bytes 0: every expert block counts as big -> the dispatcher does not pad and the path runs expert
    by expert; huge: padded batched GEMM (32 rows per expert: more than the 24 below which blocks never pay).
    Both equal the reference, forward and gradients."""
    gen = torch.Generator().manual_seed(5)
    T, E, K, D, F = 96, 6, 2, 8, 12
    routing = _random_routing(T, E, K, gen)
    experts = Experts(E, D, F)
    x_TD = torch.randn(T, D, generator=gen, requires_grad=True)
    params = [x_TD, routing.weight_TK, experts.w_up_EDG, experts.w_down_EFD]
    path = ExpertsPath("grouped", max_padding=10.0, block_bytes=block_bytes)
    routed = RoutedExperts(experts, path)
    disp = LocalDispatcher(E)
    x_RD, counts_E, plan = disp.dispatch(x_TD, routing.expert_idx_TK, routing.weight_TK,
                                         lambda c: path.block_rows(c, G=2 * F, itemsize=4))
    assert (x_RD.shape[0] == T * K) == (block_bytes == 0)  # padded only when blocks are small
    assert (plan.block_rows == 0) == (block_bytes == 0)
    compact_RD = torch.zeros(T * K, D)
    assert path.kernel(compact_RD, counts_E, experts) == ("sparse" if block_bytes == 0 else "blocked")
    assert path.block_rows(torch.full((E,), 23), G=2 * F, itemsize=4) == 0  # a few rows per expert: compact
    got = routed(x_TD, routing.expert_idx_TK, routing.weight_TK).y_TD
    want = experts_reference_forward(x_TD, routing.expert_idx_TK, routing.weight_TK, routed.expert_fn, E)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(_grads(got, params), _grads(want, params)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_padding", [0.0, 0.05, 0.3])
def test_best_block_rows_is_the_brute_force_argmin(seed, max_padding):
    """The rule's C minimises E*C + 1.5 * tail rows + 24 * experts with a tail over every integer C, within the
    padding budget (loads from uniform to Zipf-like, empty experts included)."""
    gen = torch.Generator().manual_seed(seed)
    E = int(torch.randint(2, 40, (1,), generator=gen))
    probs = torch.arange(1, E + 1, dtype=torch.float64) ** -(seed / 4)
    counts_E = torch.bincount(torch.multinomial(probs, 50 * E, replacement=True, generator=gen), minlength=E)
    path = ExpertsPath("grouped", max_padding=max_padding)
    got = path.block_rows(counts_E, G=8, itemsize=4)
    c = counts_E.tolist()

    def cost(C):
        over = [max(x - C, 0) for x in c]
        return E * C + 1.5 * sum(over) + 24 * sum(o > 0 for o in over)

    feasible = [C for C in range(max(c) + 1) if sum(max(C - x, 0) for x in c) <= max_padding * sum(c)]
    assert got in feasible and cost(got) == min(cost(C) for C in feasible)


def test_alignment_rule_decides_fallback():
    """Odd D (7 floats = 28 bytes) breaks the 16-byte rule; D=16, F=12, R=40 satisfies it."""
    w = Experts(4, 7, 9)
    assert not grouped_mm_available(torch.zeros(8, 7), w.stacked())
    w = Experts(4, 16, 12)
    assert grouped_mm_available(torch.zeros(40, 16), w.stacked()) == hasattr(torch, "_grouped_mm")


def test_expert_impl_per_row_equals_expert_method():
    """Independent of the loop helper: each sorted block equals the routed experts' per-expert function."""
    experts = Experts(3, 8, 8)
    routed = RoutedExperts(experts)
    counts_E = torch.tensor([2, 0, 5])
    x_RD = torch.randn(7, 8)
    for impl in FAST:
        y_RD = ExpertsPath(impl).run(x_RD, counts_E, experts)
        torch.testing.assert_close(y_RD[:2], routed.expert_fn(0, x_RD[:2]), **TOL)
        torch.testing.assert_close(y_RD[2:], routed.expert_fn(2, x_RD[2:]), **TOL)


class _Transposed:
    """A provider over transformers-style weights: gate_up (E, 2F, D) and down (E, D, F), biases, read as views."""

    resident = True

    def __init__(self, experts: Experts, bias: bool):
        self.gate_up_EGD = experts.w_up_EDG.detach().transpose(1, 2).contiguous().requires_grad_()
        self.down_EDF = experts.w_down_EFD.detach().transpose(1, 2).contiguous().requires_grad_()
        E, G, D = self.gate_up_EGD.shape
        self.b_up_EG = torch.randn(E, G).requires_grad_() if bias else None
        self.b_down_ED = torch.randn(E, D).requires_grad_() if bias else None
        self.n_experts = E

    def act(self, h_RG):
        return activate(h_RG, "swiglu")

    def stacked(self):
        from moelab.expert_kernels import ExpertTensors
        return ExpertTensors(self.gate_up_EGD.transpose(1, 2), self.down_EDF.transpose(1, 2), self.b_up_EG,
                             self.b_down_ED)

    def expert(self, e):
        from moelab.expert_kernels import ExpertTensors
        w = self.stacked()
        return ExpertTensors(*(None if t is None else t[e] for t in w))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("impl", FAST)
def test_provider_with_transposed_views_and_biases_matches_loop(impl, bias):
    """Another weights provider (transformers' (E, 2F, D) layout, read as views, with biases) through
    RoutedExperts: every path equals the loop twin, forward and gradients of weights and biases."""
    gen = torch.Generator().manual_seed(11)
    T, E, K, D, F = 19, 6, 2, 16, 8
    routing = _random_routing(T, E, K, gen, drop_frac=0.2)
    prov = _Transposed(Experts(E, D, F), bias)
    x_TD = torch.randn(T, D, generator=gen, requires_grad=True)
    params = [x_TD, routing.weight_TK, prov.gate_up_EGD, prov.down_EDF] + ([prov.b_up_EG, prov.b_down_ED] if bias
                                                                            else [])
    got = RoutedExperts(prov, ExpertsPath(impl)).forward(x_TD, routing.expert_idx_TK, routing.weight_TK)
    want = RoutedExperts(prov, ExpertsPath("loop")).forward(x_TD, routing.expert_idx_TK, routing.weight_TK)
    assert torch.equal(got.counts_E, want.counts_E)
    torch.testing.assert_close(got.y_TD, want.y_TD, **TOL)
    for a, b in zip(_grads(got.y_TD, params), _grads(want.y_TD, params)):
        torch.testing.assert_close(a, b, **TOL)


def _random_routing(T, E, K, gen, drop_frac=0.0):
    idx_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if drop_frac:
        idx_TK = idx_TK.masked_fill(torch.rand(T, K, generator=gen) < drop_frac, -1)
    w_TK = torch.rand(T, K, generator=gen).masked_fill(idx_TK < 0, 0.0).requires_grad_()
    return Routing(idx_TK, w_TK, torch.zeros(T, E), torch.zeros(T, E))


# (T, E, K, D, F, drop_frac): k=1, k=E, T=1, dropped slots, unaligned D
DISPATCH_CASES = [(32, 8, 2, 16, 12, 0.0), (17, 4, 1, 8, 8, 0.0), (9, 4, 4, 16, 8, 0.0), (1, 6, 2, 16, 12, 0.0),
                  (24, 8, 3, 12, 20, 0.3), (13, 5, 5, 7, 9, 0.2), (1, 16, 16, 8, 4, 0.0)]


@pytest.mark.parametrize("impl,max_padding", [(impl, 0.0) for impl in FAST] + [("grouped", 10.0)])
@pytest.mark.parametrize("T,E,K,D,F,drop", DISPATCH_CASES)
def test_dispatch_experts_combine_match_reference(impl, max_padding, T, E, K, D, F, drop):
    """max_padding 0: compact rows; 10: every expert padded to the largest count (equal blocks)."""
    gen = torch.Generator().manual_seed(T * 10 + E)
    routing = _random_routing(T, E, K, gen, drop)
    experts = Experts(E, D, F)
    x_TD = torch.randn(T, D, generator=gen, requires_grad=True)
    params = [x_TD, routing.weight_TK, experts.w_up_EDG, experts.w_down_EFD]
    routed = RoutedExperts(experts, ExpertsPath(impl, max_padding=max_padding))
    want = experts_reference_forward(x_TD, routing.expert_idx_TK, routing.weight_TK, routed.expert_fn, E)
    path = ExpertsPath("grouped", max_padding=max_padding)
    x_RD, counts_E, plan = LocalDispatcher(E).dispatch(
        x_TD, routing.expert_idx_TK, routing.weight_TK, lambda c: path.block_rows(c, G=2 * F, itemsize=4))
    n_kept = int((routing.expert_idx_TK >= 0).sum())
    C = plan.block_rows
    assert x_RD.shape[0] == E * C + int((counts_E - C).clamp_min(0).sum()) and int(counts_E.sum()) == n_kept
    n_pad = x_RD.shape[0] - n_kept
    assert n_pad <= max_padding * n_kept  # the padding budget holds (0: no padding row at all)
    assert plan.tokens_E.tolist() == torch.bincount(routing.expert_idx_TK[routing.expert_idx_TK >= 0],
                                                    minlength=E).tolist()
    out = routed(x_TD, routing.expert_idx_TK, routing.weight_TK)
    assert torch.equal(out.counts_E, plan.tokens_E)
    got = out.y_TD
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(_grads(got, params), _grads(want, params)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("shape", [(7, 12), (0, 8), (1, 2)])
@pytest.mark.parametrize("transposed", [False, True])
def test_swiglu_function_matches_autograd_formula(shape, transposed):
    h = torch.randn(shape[::-1]).t() if transposed else torch.randn(shape)
    h.requires_grad_()
    g = torch.randn(shape[0], shape[1] // 2)
    got, want = activate(h, "swiglu"), swiglu_reference(h)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got, h, g)[0], torch.autograd.grad(want, h, g)[0], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(activate(h, "swiglu"), want, **TOL)


BLOCK_RULES = {"compact": None, "pad_to_max": lambda c: int(c.max()),
               "split_at_median": lambda c: int(c.float().median()), "one_row": lambda c: 1}


@pytest.mark.parametrize("rule", BLOCK_RULES)
@pytest.mark.parametrize("T,E,K,drop", [(20, 6, 2, 0.0), (11, 4, 3, 0.4), (1, 3, 3, 0.0), (4, 4, 1, 1.0)])
def test_gather_unpermute_matches_scatter_twin(rule, T, E, K, drop):
    """The gather + batched-GEMM combine and its backward equal the weighted scatter-add (index_add) twin,
    in every layout (compact, padded to the largest count, equal part + tail), including everything dropped."""
    gen = torch.Generator().manual_seed(T + K)
    routing = _random_routing(T, E, K, gen, drop)
    plan = sort_plan(routing.expert_idx_TK, routing.weight_TK, E, BLOCK_RULES[rule])
    x_TD = torch.randn(T, 5, generator=gen, requires_grad=True)
    got = unpermute(permute(x_TD, plan) * 2.0 + 1.0, plan)
    want = unpermute_scatter(permute(x_TD, plan) * 2.0 + 1.0, plan)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(_grads(got, [x_TD, routing.weight_TK]), _grads(want, [x_TD, routing.weight_TK])):
        torch.testing.assert_close(a, b, **TOL)


def test_permute_unpermute_by_hand():
    """3 tokens, k=2, worked by hand: expert order (stable), weighted scatter back."""
    idx_TK = torch.tensor([[1, 0], [1, -1], [0, 2]])
    w_TK = torch.tensor([[0.5, 0.25], [1.0, 0.0], [2.0, 3.0]])
    plan = sort_plan(idx_TK, w_TK, 3)
    assert plan.token_R.tolist() == [0, 2, 0, 1, 2] and plan.counts_E.tolist() == [2, 2, 1]
    assert plan.weight_R.tolist() == [0.25, 2.0, 0.5, 1.0, 3.0]
    x_TD = torch.tensor([[1.0], [10.0], [100.0]])
    assert permute(x_TD, plan).squeeze(1).tolist() == [1.0, 100.0, 1.0, 10.0, 100.0]
    y = unpermute(torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]]), plan).squeeze(1).tolist()
    assert y == [0.25 * 1 + 0.5 * 3, 1.0 * 4, 2.0 * 2 + 3.0 * 5]


def _layers(cfg):
    fast = MoELayer(cfg)  # cfg.expert_impl: a fast path
    slow = MoELayer(cfg.replace(expert_impl="loop"))
    slow.load_state_dict(fast.state_dict())
    return fast, slow


@pytest.mark.parametrize("kw", [{"n_experts": 8, "top_k": 2}, {"n_experts": 4, "top_k": 1}, {"n_experts": 4, "top_k": 4},
                                {"n_experts": 8, "top_k": 2, "capacity_factor": 0.5},
                                {"n_experts": 6, "top_k": 2, "d_model": 12, "d_expert": 10, "n_shared": 1}])
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("impl", FAST)
def test_layer_fast_equals_loop(kw, T, impl):
    cfg = MoEConfig(**{"d_model": 16, "d_expert": 12, "expert_impl": impl, **kw})
    fast, slow = _layers(cfg)
    x = torch.randn(T, cfg.d_model, requires_grad=True)
    outs = []
    for layer in (fast, slow):
        r = layer(x)
        loss = (r.y * torch.randn(r.y.shape, generator=torch.Generator().manual_seed(3))).sum() + r.aux_loss
        grads = torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True)
        outs.append((r.y, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], **TOL)
    for a, b in zip(outs[0][1], outs[1][1]):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, **TOL)


def test_capacity_drops_are_the_lowest_weights():
    idx_TK = torch.tensor([[0, 1], [0, 1], [0, 1]])
    w_TK = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    r, n = apply_capacity(Routing(idx_TK, w_TK, torch.zeros(3, 2), torch.zeros(3, 2)), 2, 2)
    assert int(n) == 2
    assert r.expert_idx_TK.tolist() == [[0, -1], [-1, 1], [0, 1]]


def test_matches_transformers_qwen3_moe_block():
    """The same weights in a transformers Qwen3-MoE sparse block give the same output (eager + grouped_mm)."""
    pytest.importorskip("transformers")
    s = bench.Shape("t", E=8, k=2, D=16, F=12, T=20)
    layer = bench.moelab_layer(s, "grouped")
    x_TD = torch.randn(s.T, s.D)
    with torch.no_grad():
        want = layer(x_TD).y
        for impl in ("eager", "grouped_mm"):
            got = bench.hf_block(s, layer, impl)(x_TD.unsqueeze(0))[0]
            torch.testing.assert_close(got, want, **TOL)


def test_bench_quick_writes_json(tmp_path):
    """Smoke test of the harness on tiny shapes (no timing asserted): every ratio is present and positive."""
    res = bench.run(quick=True, rounds=2, budget_s=1.0, out=str(tmp_path / "b.json"), hf=False)
    assert (tmp_path / "b.json").exists()
    for s in res["shapes"]:
        assert s["fwd"]["moelab_over_dense"] > 0 and s["fwd_bwd"]["moelab_over_dense"] > 0
        assert s["peak_mem_fwd_bwd_bytes"]["moelab"] > 0
    assert res["decode"]["floor_ms"] > 0 and res["decode"]["experts_touched"] >= 1


@pytest.mark.parametrize("regather", [True, False])
def test_regathered_rows_give_the_same_gradients(regather):
    """Backward that gathers the dispatched rows again from x_TD (nothing R x D kept) equals the reference;
    the hook really replaces the saved rows (the packed objects are views' descriptions, not tensors)."""
    from moelab.experts import regather_saved_rows
    gen = torch.Generator().manual_seed(11)
    T, E, K, D, F = 40, 6, 2, 16, 12
    routing = _random_routing(T, E, K, gen)
    experts = Experts(E, D, F)
    x_TD = torch.randn(T, D, generator=gen, requires_grad=True)
    params = [x_TD, routing.weight_TK, experts.w_up_EDG, experts.w_down_EFD]
    routed = RoutedExperts(experts, ExpertsPath("grouped_mm", regather=regather))  # not fused: dispatched rows
    got = routed(x_TD, routing.expert_idx_TK, routing.weight_TK).y_TD
    want = experts_reference_forward(x_TD, routing.expert_idx_TK, routing.weight_TK, routed.expert_fn, E)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(_grads(got, params), _grads(want, params)):
        torch.testing.assert_close(a, b, **TOL)
    x_RD = x_TD.detach().mul(2.0)  # not x_TD[token_R]: the gradient shows which rows backward read
    with regather_saved_rows(x_TD, torch.arange(T), x_RD):
        y = x_RD[:8] @ experts.w_up_EDG[0]
    torch.testing.assert_close(torch.autograd.grad(y.sum(), experts.w_up_EDG)[0][0],
                               x_TD[:8].sum(0, keepdim=True).t().expand(D, 2 * F).detach(), **TOL)
