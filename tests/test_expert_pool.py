"""The fused per-expert kernel on worker threads (expert_pool.py) vs its twins: forward and every gradient to
1e-5 against permute -> experts_loop -> unpermute, on random shapes with empty experts, dropped slots, T=1,
biases, frozen weights and 1-3 workers; the thread counts it leaves behind; errors raised in a worker."""
import subprocess
import sys

import pytest
import torch

from moelab.dispatch import permute, sort_plan, unpermute
from moelab.expert_kernels import ExpertTensors, experts_loop
from moelab.expert_pool import Gather, assign, experts_fused, routed_fused, run_on_workers
from moelab.experts import Experts, ExpertsPath, RoutedExperts

TOL = {"atol": 1e-5, "rtol": 1e-5}


class _Biased(Experts):
    """moelab's experts plus per-expert biases (as transformers' GPT-OSS has)."""

    def __init__(self, E, D, F, activation="swiglu"):
        super().__init__(E, D, F, activation)
        self.b_up_EG = torch.nn.Parameter(torch.randn(E, self.w_up_EDG.shape[2]))
        self.b_down_ED = torch.nn.Parameter(torch.randn(E, D))

    def stacked(self):
        return ExpertTensors(self.w_up_EDG, self.w_down_EFD, self.b_up_EG, self.b_down_ED)

    def expert(self, e):
        return ExpertTensors(self.w_up_EDG[e], self.w_down_EFD[e], self.b_up_EG[e], self.b_down_ED[e])


def _routing(T, E, K, gen, n_empty=0, drop=0.0):
    live = torch.randperm(E, generator=gen)[: max(E - n_empty, K)]
    idx_TK = torch.stack([live[torch.randperm(len(live), generator=gen)[:K]] for _ in range(T)])
    if drop:
        idx_TK = idx_TK.masked_fill(torch.rand(T, K, generator=gen) < drop, -1)
    w_TK = torch.rand(T, K, generator=gen).masked_fill(idx_TK < 0, 0.0).requires_grad_()
    return idx_TK, w_TK


def _reference(x_TD, idx_TK, w_TK, experts):
    plan = sort_plan(idx_TK, w_TK, experts.n_experts)
    return unpermute(experts_loop(permute(x_TD, plan), plan.counts_E, experts), plan)


def _fused(x_TD, idx_TK, w_TK, experts, n_workers):
    plan = sort_plan(idx_TK, w_TK, experts.n_experts)
    gather = Gather(plan.token_R, plan.row_TK, plan.weight_R.detach())
    return routed_fused(x_TD, w_TK, plan.counts_E, experts, gather, n_workers)


def _assert_same(got, want, inputs):
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(5))
    for a, b in zip(torch.autograd.grad(got, inputs, g, allow_unused=True),
                    torch.autograd.grad(want, inputs, g, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL)


# (T, E, K, D, F, n_empty, drop, activation, bias)
CASES = [(37, 8, 2, 16, 12, 3, 0.0, "swiglu", False), (1, 6, 2, 8, 4, 0, 0.0, "swiglu", True),
         (24, 8, 3, 12, 20, 2, 0.3, "gelu", True), (13, 5, 5, 7, 9, 0, 0.2, "swiglu", False),
         (9, 16, 1, 8, 4, 10, 0.0, "swiglu", True), (6, 4, 2, 8, 8, 0, 1.0, "swiglu", False),
         (300, 6, 2, 16, 12, 1, 0.1, "swiglu", True), (160, 4, 3, 8, 8, 0, 0.0, "gelu", False)]


@pytest.mark.parametrize("n_workers", [1, 2, 3])
@pytest.mark.parametrize("T,E,K,D,F,n_empty,drop,act,bias", CASES)
def test_routed_fused_matches_dispatch_loop_combine(n_workers, T, E, K, D, F, n_empty, drop, act, bias):
    """drop=1.0: every slot dropped (no rows at all)."""
    gen = torch.Generator().manual_seed(T * 7 + E)
    experts = (_Biased if bias else Experts)(E, D, F, act)
    idx_TK, w_TK = _routing(T, E, K, gen, n_empty, drop)
    x_TD = torch.randn(T, D, generator=gen, requires_grad=True)
    inputs = [x_TD, w_TK, *experts.parameters()]
    _assert_same(_fused(x_TD, idx_TK, w_TK, experts, n_workers), _reference(x_TD, idx_TK, w_TK, experts), inputs)


@pytest.mark.parametrize("frozen", ["weights", "input"])
def test_rows_variant_with_frozen_parts_matches_loop(frozen):
    """On dispatched rows (what expert parallelism hands over): frozen weights (LoRA on a frozen model) or a
    frozen input give the gradients that exist and no others."""
    gen = torch.Generator().manual_seed(3)
    experts = _Biased(6, 16, 8)
    counts_E = torch.tensor([5, 0, 9, 1, 0, 7])
    x_RD = torch.randn(int(counts_E.sum()), 16, generator=gen, requires_grad=frozen == "weights")
    for p in experts.parameters():
        p.requires_grad_(frozen == "input")
    inputs = [x_RD] if frozen == "weights" else list(experts.parameters())
    _assert_same(experts_fused(x_RD, counts_E, experts, 2), experts_loop(x_RD, counts_E, experts), inputs)


def test_custom_gate_function_is_differentiated_per_expert():
    """A provider's own gate (not SwiGLU's formula) is recomputed and differentiated by autograd per expert."""

    class ClampedGate(Experts):
        def act(self, h_RG):
            gate, up = h_RG.chunk(2, dim=-1)
            return gate.clamp(max=0.5) * torch.sigmoid(1.7 * gate) * (up.clamp(-1, 1) + 1)

    gen = torch.Generator().manual_seed(4)
    experts = ClampedGate(5, 8, 6)
    idx_TK, w_TK = _routing(20, 5, 2, gen)
    x_TD = torch.randn(20, 8, generator=gen, requires_grad=True)
    _assert_same(_fused(x_TD, idx_TK, w_TK, experts, 2), _reference(x_TD, idx_TK, w_TK, experts),
                 [x_TD, w_TK, *experts.parameters()])


@pytest.mark.parametrize("T", [30, 300])
def test_inference_mode_and_no_grad_run_on_workers(T):
    """Without grad the kernel scales the activations by the weights instead of the outputs."""
    gen = torch.Generator().manual_seed(5)
    experts = Experts(8, 16, 8)
    idx_TK, w_TK = _routing(T, 8, 2, gen)
    x_TD = torch.randn(T, 16, generator=gen)
    want = _reference(x_TD, idx_TK, w_TK, experts).detach()
    with torch.inference_mode():
        torch.testing.assert_close(_fused(x_TD, idx_TK, w_TK, experts, 2), want, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(_fused(x_TD, idx_TK, w_TK, experts, 2), want, **TOL)


WORKER_THREADS = """
import threading, torch
from moelab.expert_pool import run_on_workers
torch.set_num_threads(2)
seen = []
def work(i, w):
    torch.nn.functional.silu(torch.randn(512, 512))  # big enough for a parallel region on two threads
    seen.append(torch.get_num_threads())
run_on_workers([[0, 1], [2, 3]], work)
later = []
t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
t.start(); t.join()
print(seen, torch.get_num_threads(), later)
"""


def test_workers_stay_on_one_thread_and_the_caller_keeps_its_count():
    """In a fresh process on two threads: every worker runs on one intra-op thread even after ops that open a
    parallel region (torch's once-per-thread setup would reset them to the default, and two-thread workers
    start OpenMP teams that slow every parallel op in the process); the caller's count and the default a new
    thread gets are unchanged."""
    out = subprocess.run([sys.executable, "-c", WORKER_THREADS], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "[1, 1, 1, 1] 2 [2]"


def test_error_in_a_worker_reaches_the_caller():
    def work(i, w):
        if i == 3:
            raise ValueError("expert 3 failed")

    with pytest.raises(ValueError, match="expert 3 failed"):
        run_on_workers([[0, 1, 2], [3, 4, 5]], work)
    done = []
    run_on_workers([[0, 2], [1, 3, 4]], lambda i, w: done.append((i, w)))  # the pool still works
    assert sorted(done) == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 1)]


def test_assignment_is_longest_first_to_the_least_loaded():
    """LPT by hand: sizes 5 4 3 3 1 (items 1 3 0 4 2) on two workers: 5 | 4, the first 3 to the 4 (7), the
    second to the 5 (8), the 1 to the 7 -> {5, 3} and {4, 3, 1}, 8 rows each; never more groups than items;
    the same sizes always give the same groups (the sums run in a fixed order)."""
    assert assign([3, 5, 1, 4, 3], 2) == [[1, 4], [3, 0, 2]]
    assert assign([2, 2], 4) == [[0], [1]] and assign([], 3) == [[]]
    assert assign([7, 1, 1, 7], 3) == assign([7, 1, 1, 7], 3)


def test_same_result_whatever_the_timing():
    """Bitwise equal outputs and gradients over repeated calls (the fixed assignment and summation order)."""
    gen = torch.Generator().manual_seed(9)
    experts = Experts(8, 16, 8)
    idx_TK, w_TK = _routing(50, 8, 3, gen)
    x_TD = torch.randn(50, 16, generator=gen, requires_grad=True)
    runs = []
    for _ in range(4):
        y = _fused(x_TD, idx_TK, w_TK, experts, 2)
        runs.append([y, *torch.autograd.grad(y.square().sum(), [x_TD, w_TK, *experts.parameters()])])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_auto_path_fuses_big_experts_on_cpu_outside_autocast():
    """Auto fuses when the mean expert's up GEMM (slots/E x D x G) reaches fuse_macs: 64 slots over 4 experts of
    8 x 8 make 16 x 8 x 8 = 1024 multiply-adds; impl fused always fuses, grouped_mm never."""
    experts = Experts(4, 8, 4)
    x_TD = torch.randn(32, 8)
    assert ExpertsPath("grouped", fuse_macs=1024).fuses(x_TD, 64, experts)
    assert not ExpertsPath("grouped", fuse_macs=1025).fuses(x_TD, 64, experts)
    assert ExpertsPath("fused").fuses(x_TD, 1, experts) and not ExpertsPath("grouped_mm").fuses(x_TD, 64, experts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ExpertsPath("grouped", fuse_macs=0).fuses(x_TD, 64, experts)
    idx_TK, w_TK = _routing(32, 4, 2, torch.Generator().manual_seed(0))
    want = RoutedExperts(experts, ExpertsPath("loop"))(x_TD, idx_TK, w_TK).y_TD
    for path in (ExpertsPath("grouped", fuse_macs=0), ExpertsPath("grouped")):  # fused / not fused
        torch.testing.assert_close(RoutedExperts(experts, path)(x_TD, idx_TK, w_TK).y_TD, want, **TOL)
