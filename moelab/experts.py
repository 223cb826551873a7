"""Routed experts: expert weights, the one padding/path policy, and `RoutedExperts`, the seam every caller
uses: (x_TD, expert_idx_TK, weight_TK) -> (y_TD, counts_E). The kernels live in expert_kernels.py.

R=dispatched rows (sorted by expert), D=d_model, F=expert hidden, G=fused gate|up width (2F for SwiGLU, F
for GELU), E=experts, C=rows per expert after padding, T=tokens, K=slots per token.

An expert-weights provider is any object with
  n_experts                    experts it holds (local ones under expert parallelism)
  resident                     True when `stacked()` is cheap (all weights in memory); False = per expert
  stacked() -> ExpertTensors   (E, D, G) / (E, F, D) views in moelab's layout, optional (E, G) / (E, D) biases
  expert(e) -> ExpertTensors   one expert's (D, G) / (F, D) views (what a per-expert or offloaded path reads)
  act(h_RG) -> a_RF            the gate function
`Experts` (moelab's own nn.Parameters) is the default provider; transformers' fused weights (hf.py) or an
offloaded store are others. Kernels (EXPERT_IMPLS) all equal the reference `experts_loop` (one matmul pair
per expert): `experts_padded` (all padded to the largest count -> two bmm), `experts_grouped_mm`
(torch._grouped_mm, 16-byte alignment rule), `experts_sparse` (only experts with rows), and the auto path's
`experts_blocked` (an equal part of C rows per expert as bmm + a ragged tail, <= 5% padding rows), and
`expert_pool.experts_fused` (per expert on worker threads; auto's choice for big experts on a CPU, where it
also gathers and combines the rows itself); `ExpertsPath` picks among them and decides the dispatch layout
(block rows C), with one set of constants.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moelab.config import EXPERT_IMPLS as IMPLS  # grouped = auto (ExpertsPath.kernel)
from moelab.dispatch import LocalDispatcher, experts_reference_forward, sort_plan
from moelab.expert_kernels import (
    EXPERT_IMPLS,
    ExpertTensors,
    activate,
    experts_blocked,
    experts_padded,
    grouped_mm_available,
    mlp,
)
from moelab.expert_pool import Gather, experts_fused, routed_fused


@contextmanager
def scoped_threads(n: int) -> Iterator[None]:
    """Runs the block on at most n intra-op threads (0 = unchanged) and restores the count after."""
    old = torch.get_num_threads()
    if n <= 0 or n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True)
class ExpertsPath:
    """The one padding/path policy: which kernel runs the experts, and the rows C every expert gets in an equal
    block part. Auto (grouped) on a CPU outside autocast, for experts whose mean up GEMM reaches `fuse_macs`:
    fused, each expert's rows gathered, through its MLP and combined back, per expert on worker threads with
    no padding (expert_pool.py; under torch.compile one eager call). Otherwise (small experts, autocast,
    accelerators) blocked: an equal block part as two bmm (experts with fewer rows padded, rows past C in a
    ragged tail run expert by expert), C minimising (block rows) + tail_row_cost * (tail rows) +
    tail_expert_cost * (experts with a tail), padding at most `max_padding` of the rows; no blocks below
    tail_expert_cost rows per expert. Big per-expert blocks are GEMMs efficient on their own: never blocked,
    run expert by expert."""
    impl: str = "grouped"            # grouped (auto) | fused | loop | grouped_mm | padded | sparse
    max_padding: float = 0.05        # padding rows at most this share of the real rows
    block_bytes: int = 4 << 20       # an expert whose hidden block (C rows x G) reaches this runs on its own
    tail_row_cost: float = 1.5       # a tail row (small per-expert GEMM) costs this many block rows
    tail_expert_cost: float = 24.0   # an expert with a tail costs this many block rows (two calls, weights re-read)
    few_rows: int = 256              # calls with at most this many token slots (decode) run on few_threads
    few_threads: int = 1             # intra-op threads for those calls, scoped (0 = all); see docs/speed.md
    regather: bool = True            # backward regathers the dispatched rows from x_TD instead of keeping them
    fuse_macs: float = 24e6          # auto fuses when the mean expert's up GEMM has this many multiply-adds;
                                     # below, per-expert Python costs more than the threads save (speed.md)

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"ExpertsPath.impl={self.impl!r} is invalid: allowed one of {', '.join(IMPLS)}")

    def _big(self, C: int, G: int, itemsize: int) -> bool:
        return C * G * itemsize >= self.block_bytes

    def block_rows(self, counts_E: Tensor, *, G: int, itemsize: int) -> int:
        """Dispatcher layout: rows C per expert in the equal block part, 0 = compact rows (no blocks)."""
        if self.impl not in ("grouped", "padded") or counts_E.numel() == 0:
            return 0
        c_E = counts_E.detach().to("cpu", torch.float64)
        R, C_max = float(c_E.sum()), int(c_E.max())
        if R == 0 or (self.impl == "grouped" and self._big(C_max, G, itemsize)):
            return 0
        budget = self.max_padding * R
        if self.impl == "padded":
            return C_max if (C_max - c_E).sum() <= budget else 0
        if R / c_E.numel() < self.tail_expert_cost:  # a few rows per expert (decode): blocks would read every
            return 0                                  # expert's weights, compact rows only the used experts'
        return best_block_rows(c_E, budget, self.tail_row_cost, self.tail_expert_cost)

    def fuses(self, x: Tensor, rows: int, weights) -> bool:
        """True when the experts run as the fused kernel (`expert_pool`: each expert's rows gathered, through
        its MLP and combined back, per expert on worker threads) for `rows` token slots or dispatched rows of x:
        impl fused, or auto (grouped) on a CPU outside autocast, for weights all in memory, when the average
        expert's up GEMM (rows/E x D x G) has at least `fuse_macs` multiply-adds. Under torch.compile the fused
        kernel is one eager call (a graph break around it: threads and Python per expert are not traced)."""
        if not weights.resident or self.impl not in ("fused", "grouped"):
            return False
        if self.impl == "fused":
            return True
        if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return False
        _, D, G = weights.stacked().w_up.shape
        return rows / max(weights.n_experts, 1) * D * G >= self.fuse_macs

    def kernel(self, x_RD: Tensor, counts_E: Tensor, weights) -> str:
        """Name of the kernel for these compact rows (a key of EXPERT_IMPLS, or "blocked")."""
        R = x_RD.shape[0]
        if not weights.resident:  # experts fetched one by one: only those with rows
            return "loop" if self.impl == "loop" else "sparse"
        if self.impl in ("loop", "sparse", "padded"):
            return self.impl
        w = weights.stacked()
        if self.impl == "grouped":
            if R > 0 and self.block_rows(counts_E, G=w.w_up.shape[2], itemsize=x_RD.element_size()):
                return "blocked"
            C = int(counts_E.max()) if R > 0 else 0
            if self._big(C, w.w_up.shape[2], x_RD.element_size()):
                return "sparse"
        if grouped_mm_available(x_RD, w):
            return "grouped_mm"
        return "sparse" if R > 0 else "loop"  # R=0: the loop keeps the weights in the graph

    def run(self, x_RD: Tensor, counts_E: Tensor, weights, block_rows: int = 0) -> Tensor:
        """y_RD = each row's expert applied to it: rows sorted by expert, counts_E real rows per expert, compact
        or (block_rows C > 0) in the blocked layout of dispatch.block_layout."""
        if not block_rows and self.fuses(x_RD, x_RD.shape[0], weights):
            return experts_fused(x_RD, counts_E, weights)
        if block_rows:
            return experts_blocked(x_RD, counts_E, weights, block_rows)
        name = self.kernel(x_RD, counts_E, weights)
        if name == "blocked":
            G = weights.stacked().w_up.shape[2]
            C = self.block_rows(counts_E, G=G, itemsize=x_RD.element_size())
            return experts_blocked(x_RD, counts_E, weights, C, compact=True)
        if name == "padded":
            return experts_padded(x_RD, counts_E, weights, self.block_bytes)
        return EXPERT_IMPLS[name](x_RD, counts_E, weights)


class WrappedPath:
    """An ExpertsPath with something around its kernels (a norm after them, an expert fetch before them):
    `run` is overridden, every other attribute is the inner path's."""

    def __init__(self, inner: ExpertsPath):
        self.inner = inner

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copy / unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run(self, x_RD: Tensor, counts_E: Tensor, weights, block_rows: int = 0) -> Tensor:
        return self.inner.run(x_RD, counts_E, weights, block_rows)


@torch.compiler.disable  # host-side planning on a few numbers: never traced (dynamo's resumes fail in it)
def best_block_rows(c_E: Tensor, budget: float, tail_row_cost: float, tail_expert_cost: float) -> int:
    """argmin over C of E*C + tail_row_cost * sum(max(c - C, 0)) + tail_expert_cost * #(c > C), subject to
    sum(max(C - c, 0)) <= budget padding rows. The cost is piecewise linear in C: the optimum is a count or the
    largest C within the budget. c_E: float64 counts on the CPU."""
    E = c_E.numel()
    c = torch.sort(c_E).values
    below = torch.arange(E, dtype=c.dtype, device=c.device)         # experts strictly below c[i] (ties aside)
    pad_i = below * c - (torch.cumsum(c, 0) - c)                    # padding rows at C = c[i]
    ok = pad_i <= budget
    i = int(ok.nonzero().max())
    c_hi = float(c[i + 1]) if i + 1 < E else float(c[i])
    c_budget = min(float(c[i]) + (budget - float(pad_i[i])) // (i + 1), c_hi)
    cand = torch.cat([c[ok], torch.tensor([c_budget, 0.0], dtype=c.dtype, device=c.device)]).unique()
    over = (c.unsqueeze(0) - cand.unsqueeze(1)).clamp_min(0)        # (candidates, E)
    pad = (cand.unsqueeze(1) - c.unsqueeze(0)).clamp_min(0).sum(1)
    cost = E * cand + tail_row_cost * over.sum(1) + tail_expert_cost * (over > 0).sum(1)
    cost = torch.where(pad <= budget, cost, torch.inf)
    return int(cand[int(cost.argmin())])


def regather_saved_rows(x_TD: Tensor, token_R: Tensor, x_RD: Tensor):
    """Saved-tensor hooks for the expert GEMMs: a saved view of the dispatched rows x_RD (= x_TD[token_R]) is
    not kept for backward; backward gathers the rows again from x_TD (once) and takes the same view. Saves
    R x D activations for one more gather pass. x_TD must not change in place before backward."""
    ptr, cache = x_RD.untyped_storage().data_ptr(), {}

    def pack(t: Tensor):
        if t.device == x_RD.device and t.dtype == x_RD.dtype and t.untyped_storage().data_ptr() == ptr:
            return _RowsView(t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(p):
        if not isinstance(p, _RowsView):
            return p
        if "x_RD" not in cache:
            cache["x_RD"] = x_TD.detach().index_select(0, token_R)
        return cache["x_RD"].as_strided(p.size, p.stride, p.offset)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class _RowsView(NamedTuple):
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class Experts(nn.Module):
    """E expert MLPs as two 3-D parameters, w_up_EDG (gate|up for SwiGLU) and w_down_EFD: moelab's own
    expert-weights provider."""

    resident = True

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.activation = activation
        G = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w_up_EDG = nn.Parameter(torch.empty(n_experts, d_model, G))
        self.w_down_EFD = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_up_EDG, std=self.w_up_EDG.shape[1] ** -0.5)
        nn.init.normal_(self.w_down_EFD, std=self.w_down_EFD.shape[1] ** -0.5)

    @property
    def n_experts(self) -> int:
        return self.w_up_EDG.shape[0]

    def act(self, h_RG: Tensor) -> Tensor:
        return activate(h_RG, self.activation)

    def stacked(self) -> ExpertTensors:
        return ExpertTensors(self.w_up_EDG, self.w_down_EFD)

    def expert(self, e: int) -> ExpertTensors:
        return ExpertTensors(self.w_up_EDG[e], self.w_down_EFD[e])


class MLP(nn.Module):
    """A dense FFN (the dense layers, the fused shared experts): act(x W_up^T) W_down^T with two nn.Linear,
    weights stored (out, in) as in transformers, so LoRA and converters see ordinary linears."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(d_model, 2 * d_hidden if activation == "swiglu" else d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_model, bias=False)
        nn.init.normal_(self.up.weight, std=d_model ** -0.5)
        nn.init.normal_(self.down.weight, std=d_hidden ** -0.5)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.down(activate(self.up(x_TD), self.activation))


class RoutedOutput(NamedTuple):
    """What the routed experts return."""
    y_TD: Tensor        # sum over each token's slots of weight * expert(x)
    counts_E: Tensor    # rows each expert received from these tokens (long; torchtitan's num_tokens_per_expert)


class RoutedExperts(nn.Module):
    """The routed-experts seam (the transformers experts signature): forward(x_TD, expert_idx_TK, weight_TK),
    expert -1 = no expert. dispatch (who goes where: local sort, or all-to-all under expert parallelism) ->
    `path.run` over the weights provider -> weighted combine. impl "loop" on one process runs the Mixtral-style
    per-expert loop twin instead (dispatch.experts_reference_forward)."""

    def __init__(self, weights, path: ExpertsPath | None = None, dispatcher=None):
        super().__init__()
        self.weights = weights  # an nn.Module provider registers as a child; others are plain attributes
        self.path = path or ExpertsPath()
        self.dispatcher = dispatcher or LocalDispatcher(weights.n_experts)

    def forward(self, x_TD: Tensor, expert_idx_TK: Tensor, weight_TK: Tensor) -> RoutedOutput:
        few = expert_idx_TK.numel() <= self.path.few_rows and not torch.compiler.is_compiling()
        with scoped_threads(self.path.few_threads if few else 0):  # small calls: no barrier on busy cores
            return self._forward(x_TD, expert_idx_TK, weight_TK)

    def _forward(self, x_TD: Tensor, expert_idx_TK: Tensor, weight_TK: Tensor) -> RoutedOutput:
        if self.path.impl == "loop" and isinstance(self.dispatcher, LocalDispatcher):
            E = self.weights.n_experts
            y_TD = experts_reference_forward(x_TD, expert_idx_TK, weight_TK, self.expert_fn, E)
            return RoutedOutput(y_TD, torch.bincount(expert_idx_TK.reshape(-1) + 1, minlength=E + 1)[1:])
        fuses = self.path.fuses(x_TD, expert_idx_TK.numel(), self.weights)
        if fuses and type(self.path) is ExpertsPath and isinstance(self.dispatcher, LocalDispatcher):
            return _routed_local(x_TD, expert_idx_TK, weight_TK, self.weights)  # dispatch + experts + combine
        rule = None  # compact rows; the fused kernel (wrapped, or over all-to-all) takes them so too
        if self.weights.resident and not fuses:
            G = self.weights.stacked().w_up.shape[-1]

            def rule(counts_E: Tensor) -> int:
                return self.path.block_rows(counts_E, G=G, itemsize=x_TD.element_size())

        x_RD, counts_L, plan = self.dispatcher.dispatch(x_TD, expert_idx_TK, weight_TK, rule)
        regather = (self.path.regather and isinstance(self.dispatcher, LocalDispatcher) and x_RD.requires_grad
                    and not torch.compiler.is_compiling())
        with regather_saved_rows(x_TD, plan.token_R, x_RD) if regather else nullcontext():
            y_RD = self.path.run(x_RD, counts_L, self.weights, getattr(plan, "block_rows", 0))
        return RoutedOutput(self.dispatcher.combine(y_RD, plan), plan.tokens_E)

    def expert_fn(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e applied to any rows (the per-expert reference)."""
        return mlp(x_ND, self.weights.expert(e), self.weights.act)


@torch.compiler.disable  # worker threads and Python per expert: under torch.compile one eager call
def _routed_local(x_TD: Tensor, expert_idx_TK: Tensor, weight_TK: Tensor, weights) -> RoutedOutput:
    """Local dispatch plan (compact rows), then the fused kernel gathers, runs and combines them."""
    plan = sort_plan(expert_idx_TK, weight_TK, weights.n_experts)
    gather = Gather(plan.token_R, plan.row_TK, plan.weight_R.detach())
    return RoutedOutput(routed_fused(x_TD, weight_TK, plan.counts_E, weights, gather), plan.tokens_E)
