"""Routed experts: expert weights, their compute kernels, the one padding/path policy, and `RoutedExperts`,
the seam every caller uses: (x_TD, expert_idx_TK, weight_TK) -> (y_TD, counts_E).

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
`experts_blocked` (an equal part of C rows per expert as bmm + a ragged tail, <= 5% padding rows);
`ExpertsPath` picks among them and decides the dispatch layout (block rows C), with one set of constants.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import EXPERT_IMPLS as IMPLS  # grouped = auto (ExpertsPath.kernel)
from moelab.dispatch import LocalDispatcher, block_layout, experts_reference_forward


class ExpertTensors(NamedTuple):
    """Weights in moelab's layout, all experts (3-D: E first) or one expert (2-D); views, never copies."""
    w_up: Tensor              # (E, D, G) or (D, G): x @ w_up -> gate|up
    w_down: Tensor            # (E, F, D) or (F, D)
    b_up: Tensor | None = None    # (E, G) or (G,)
    b_down: Tensor | None = None  # (E, D) or (D,)


def swiglu_reference(h_RG: Tensor) -> Tensor:
    """SwiGLU (Shazeer 2020, eq. 6): silu(gate) * up, gate|up concatenated on the last dim (autograd twin)."""
    gate_RF, up_RF = h_RG.chunk(2, dim=-1)
    return F.silu(gate_RF) * up_RF


class _SwiGLU(torch.autograd.Function):
    """SwiGLU (Shazeer 2020, eq. 6) saving only h (not silu(gate) too) and writing both halves of the gradient
    straight into one (R, 2F) buffer (no cat)."""

    @staticmethod
    def forward(ctx, h_RG: Tensor) -> Tensor:
        ctx.save_for_backward(h_RG)
        gate_RF, up_RF = h_RG.chunk(2, dim=-1)
        return F.silu(gate_RF).mul_(up_RF)

    @staticmethod
    def backward(ctx, g_RF: Tensor):
        (h_RG,) = ctx.saved_tensors
        gate_RF, up_RF = h_RG.chunk(2, dim=-1)
        g_RG = torch.empty_like(h_RG)
        g_gate_RF, g_up_RF = g_RG.chunk(2, dim=-1)
        torch.mul(F.silu(gate_RF), g_RF, out=g_up_RF)
        torch.ops.aten.silu_backward.grad_input(g_RF * up_RF, gate_RF, grad_input=g_gate_RF)
        return g_RG


def activate(h_RG: Tensor, activation: str) -> Tensor:
    """SwiGLU (Shazeer 2020, eq. 6): silu(gate) * up, with gate|up concatenated on the last dim; or GELU."""
    if activation == "swiglu":
        if torch.compiler.is_compiling():  # inductor fuses the formula; the Function's out= halves break graphs
            return swiglu_reference(h_RG)
        return _SwiGLU.apply(h_RG) if h_RG.requires_grad else swiglu_no_grad(h_RG)
    return F.gelu(h_RG)


def swiglu_no_grad(h_RG: Tensor) -> Tensor:
    gate_RF, up_RF = h_RG.chunk(2, dim=-1)
    return F.silu(gate_RF).mul_(up_RF)


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


def mlp(x_RD: Tensor, w: ExpertTensors, act) -> Tensor:
    """One expert (or one dense MLP): act(x @ w_up + b_up) @ w_down + b_down."""
    h_RG = x_RD @ w.w_up
    if w.b_up is not None:
        h_RG = h_RG + w.b_up
    y_RD = act(h_RG) @ w.w_down
    return y_RD if w.b_down is None else y_RD + w.b_down


def _unbound(weights) -> list[ExpertTensors]:
    """Per-expert views of a resident provider by unbind (its backward stacks the E weight grads once instead
    of zero-filling E full-size copies as w[e] would); on-demand providers are asked expert by expert."""
    if not weights.resident:
        return [weights.expert(e) for e in range(weights.n_experts)]
    w = weights.stacked()
    parts = [t.unbind(0) if t is not None else [None] * weights.n_experts for t in w]
    return [ExpertTensors(*p) for p in zip(*parts)]


def experts_loop(x_RD: Tensor, counts_E: Tensor, weights) -> Tensor:
    """Reference: contiguous per-expert blocks, one MLP each (every expert, even with no rows)."""
    blocks = torch.split(x_RD, counts_E.tolist())
    out = [mlp(x_ND, weights.expert(e), weights.act) for e, x_ND in enumerate(blocks)]
    return torch.cat(out) if out else x_RD.new_zeros(0, x_RD.shape[1])


def experts_sparse(x_RD: Tensor, counts_E: Tensor, weights) -> Tensor:
    """One MLP per expert that received rows; experts with none are never touched (no weight read, no kernel
    launch, nothing fetched from an on-demand provider)."""
    counts = counts_E.tolist()
    per_expert = _unbound(weights) if weights.resident else None
    out = [mlp(x_ND, per_expert[e] if per_expert else weights.expert(e), weights.act)
           for e, x_ND in enumerate(torch.split(x_RD, counts)) if counts[e]]
    return torch.cat(out) if out else x_RD.new_zeros(0, x_RD.shape[1])


class _GroupedMM(torch.autograd.Function):
    """y_R? = x_R? @ w_E??[expert of row], rows grouped by the cumulative offsets offs_E (int32)."""

    @staticmethod
    def forward(ctx, x_RI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_RI, w_EIO, offs_E)
        return torch._grouped_mm(x_RI, w_EIO, offs=offs_E)

    @staticmethod
    def backward(ctx, g_RO: Tensor):
        x_RI, w_EIO, offs_E = ctx.saved_tensors
        g_RO = g_RO.contiguous()
        g_x = torch._grouped_mm(g_RO, w_EIO.transpose(-2, -1), offs=offs_E) if ctx.needs_input_grad[0] else None
        g_w = torch._grouped_mm(x_RI.t(), g_RO, offs=offs_E) if ctx.needs_input_grad[1] else None
        return g_x, g_w, None


def _aligned(*sizes: int, itemsize: int) -> bool:
    return all((s * itemsize) % 16 == 0 for s in sizes)


def grouped_mm_available(x_RD: Tensor, w: ExpertTensors) -> bool:
    """torch._grouped_mm needs every row stride (and R for the weight grad) to be a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x_RD.dtype != w.w_up.dtype:
        return False
    E, D, G = w.w_up.shape
    R = x_RD.shape[0]
    if R == 0 or E == 0:  # no rows (e.g. an EP rank that receives nothing): the loop handles it
        return False
    return _aligned(D, G, w.w_down.shape[1], R, itemsize=x_RD.element_size())


def _per_row(b_E_: Tensor | None, counts_E: Tensor, R: int) -> Tensor | None:
    """Expert biases repeated to their rows (grouped layout), or None."""
    if b_E_ is None:
        return None
    return b_E_.repeat_interleave(counts_E, dim=0, output_size=R)


def experts_grouped_mm(x_RD: Tensor, counts_E: Tensor, weights) -> Tensor:
    """torch._grouped_mm over the unpadded rows (empty experts: no work, no weight read)."""
    w = weights.stacked()
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    R = x_RD.shape[0]
    h_RG = _GroupedMM.apply(x_RD.contiguous(), w.w_up, offs_E)
    if w.b_up is not None:
        h_RG = h_RG + _per_row(w.b_up, counts_E, R)
    y_RD = _GroupedMM.apply(weights.act(h_RG).contiguous(), w.w_down, offs_E)
    return y_RD if w.b_down is None else y_RD + _per_row(w.b_down, counts_E, R)


def bmm_mlp(x_ECD: Tensor, w: ExpertTensors, act) -> Tensor:
    """E equal blocks of C rows through their experts as two batched GEMMs."""
    h_ECG = torch.bmm(x_ECD, w.w_up)
    if w.b_up is not None:
        h_ECG = h_ECG + w.b_up.unsqueeze(1)
    y_ECD = torch.bmm(act(h_ECG), w.w_down)
    return y_ECD if w.b_down is None else y_ECD + w.b_down.unsqueeze(1)


def experts_padded(x_RD: Tensor, counts_E: Tensor, weights, block_bytes: int = 4 << 20) -> Tensor:
    """Grouped GEMM as two batched GEMMs: every expert's block padded with zero rows to the largest count C.
    One parallel region per GEMM instead of one per expert (what a busy 2-core CPU rewards); costs
    E*C/R - 1 extra FLOPs, so `ExpertsPath` only picks it when routing is near-balanced.
    When one expert's hidden activations reach `block_bytes`, equal blocks run expert by expert instead:
    cache-sized pieces beat one pass over a tensor of hundreds of MB."""
    R, D = x_RD.shape
    E = weights.n_experts
    if R == 0 or E == 0:
        return experts_loop(x_RD, counts_E, weights)
    w = weights.stacked()
    if R % E == 0 and bool((counts_E == R // E).all()):  # already equal blocks (a padded dispatch): no copies
        C = R // E
        if E > 1 and C * w.w_up.shape[2] * x_RD.element_size() >= block_bytes:
            return torch.cat([mlp(x_CD, w_e, weights.act) for x_CD, w_e in zip(x_RD.split(C), _unbound(weights))])
        return bmm_mlp(x_RD.reshape(E, C, D), w, weights.act).reshape(R, -1)
    C = int(counts_E.max())
    return experts_blocked(x_RD, counts_E, weights, C, compact=True)


def _expert_of_rows(counts_E: Tensor, R: int) -> Tensor:
    return torch.repeat_interleave(torch.arange(counts_E.numel(), device=counts_E.device), counts_E, output_size=R)


class _BlockedMM(torch.autograd.Function):
    """y_R? = x_R? @ w_E??[expert of row] in the blocked layout: the E*C block rows as one bmm written in place,
    each tail block (over_E rows past C, in expert order) one mm into the same output (no cat). Backward: the
    weight gradient is one (E, I, O) bmm with the tail blocks added into their experts' slices (one buffer, no
    stack of per-expert gradients)."""

    @staticmethod
    def forward(ctx, x_RI: Tensor, w_EIO: Tensor, C: int, over: list[int]) -> Tensor:
        ctx.save_for_backward(x_RI, w_EIO)
        ctx.C, ctx.over = C, over
        E, _, O = w_EIO.shape
        y_RO = x_RI.new_empty(x_RI.shape[0], O)
        torch.bmm(x_RI[: E * C].view(E, C, -1), w_EIO, out=y_RO[: E * C].view(E, C, O))
        for e, x_NI, y_NO in _tail_blocks(x_RI, y_RO, E * C, over):
            torch.mm(x_NI, w_EIO[e], out=y_NO)
        return y_RO

    @staticmethod
    def backward(ctx, g_RO: Tensor):
        x_RI, w_EIO = ctx.saved_tensors
        C, over = ctx.C, ctx.over
        E, I, O = w_EIO.shape
        g_RO = g_RO.contiguous()
        g_x = g_w = None
        if ctx.needs_input_grad[0]:
            g_x = g_RO.new_empty(g_RO.shape[0], I)
            torch.bmm(g_RO[: E * C].view(E, C, O), w_EIO.transpose(1, 2), out=g_x[: E * C].view(E, C, I))
            for e, g_NO, g_NI in _tail_blocks(g_RO, g_x, E * C, over):
                torch.mm(g_NO, w_EIO[e].t(), out=g_NI)
        if ctx.needs_input_grad[1]:
            g_w = torch.bmm(x_RI[: E * C].view(E, C, I).transpose(1, 2), g_RO[: E * C].view(E, C, O))
            for e, x_NI, g_NO in _tail_blocks(x_RI, g_RO, E * C, over):
                g_w[e].addmm_(x_NI.t(), g_NO)
        return g_x, g_w, None, None


def _tail_blocks(a_R_: Tensor, b_R_: Tensor, start: int, over: list[int]):
    """(expert, rows of a, rows of b) for every tail block with rows, in expert order from row `start`."""
    for e, n in enumerate(over):
        if n:
            yield e, a_R_[start: start + n], b_R_[start: start + n]
            start += n


def experts_blocked(x_RD: Tensor, counts_E: Tensor, weights, C: int, compact: bool = False) -> Tensor:
    """Equal part + ragged tail: the first C rows of every expert (padded with zero rows when it has fewer) as
    two bmm (one parallel region per GEMM), the rows past C one MLP per expert that has any (experts_sparse).
    x_RD is in the blocked layout (dispatch.block_layout) unless `compact`, then it is moved there and back."""
    E, D = weights.n_experts, x_RD.shape[1]
    pos_R = None
    if compact:
        pos_R, n_rows = block_layout(_expert_of_rows(counts_E, x_RD.shape[0]), counts_E, C)
        x_RD = x_RD.new_zeros(n_rows, D).index_copy(0, pos_R, x_RD)
    w = weights.stacked()
    if w.b_up is None and w.b_down is None and not torch.compiler.is_compiling():
        over = (counts_E - C).clamp_min(0).tolist()
        h_RG = _BlockedMM.apply(x_RD.contiguous(), w.w_up, C, over)
        y_RD = _BlockedMM.apply(weights.act(h_RG).contiguous(), w.w_down, C, over)
        return y_RD if pos_R is None else y_RD.index_select(0, pos_R)
    y_ECD = bmm_mlp(x_RD[: E * C].view(E, C, D), w, weights.act)
    over_E = (counts_E - C).clamp_min(0)
    if x_RD.shape[0] > E * C:
        y_RD = torch.cat([y_ECD.view(E * C, -1), experts_sparse(x_RD[E * C:], over_E, weights)])
    else:
        y_RD = y_ECD.view(E * C, -1)
    return y_RD if pos_R is None else y_RD.index_select(0, pos_R)


EXPERT_IMPLS = {"loop": experts_loop, "sparse": experts_sparse, "grouped_mm": experts_grouped_mm,
                "padded": experts_padded}


@dataclass(frozen=True)
class ExpertsPath:
    """The one padding/path policy: which kernel runs the experts, and the rows C every expert gets in an equal
    block part (two bmm; experts with fewer rows padded, rows past C in a ragged tail run expert by expert).
    C minimises (block rows) + tail_row_cost * (tail rows) + tail_expert_cost * (experts with a tail), padding at
    most `max_padding` of the rows. Big per-expert blocks are GEMMs efficient on their own: never blocked, run
    expert by expert."""
    impl: str = "grouped"            # grouped (auto) | loop | grouped_mm | padded | sparse
    max_padding: float = 0.05        # padding rows at most this share of the real rows
    block_bytes: int = 4 << 20       # an expert whose hidden block (C rows x G) reaches this runs on its own
    tail_row_cost: float = 1.5       # a tail row (small per-expert GEMM) costs this many block rows
    tail_expert_cost: float = 24.0   # an expert with a tail costs this many block rows (two calls, weights re-read)
    few_rows: int = 256              # calls with at most this many token slots (decode) run on few_threads
    few_threads: int = 1             # intra-op threads for those calls, scoped (0 = all); see docs/speed.md
    regather: bool = True            # backward regathers the dispatched rows from x_TD instead of keeping them

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
        return best_block_rows(c_E, budget, self.tail_row_cost, self.tail_expert_cost)

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


def best_block_rows(c_E: Tensor, budget: float, tail_row_cost: float, tail_expert_cost: float) -> int:
    """argmin over C of E*C + tail_row_cost * sum(max(c - C, 0)) + tail_expert_cost * #(c > C), subject to
    sum(max(C - c, 0)) <= budget padding rows. The cost is piecewise linear in C: the optimum is a count or the
    largest C within the budget. c_E: float64 counts on the CPU."""
    E = c_E.numel()
    c = torch.sort(c_E).values
    below = torch.arange(E, dtype=c.dtype)                          # experts strictly below c[i] (ties aside)
    pad_i = below * c - (torch.cumsum(c, 0) - c)                    # padding rows at C = c[i]
    ok = pad_i <= budget
    i = int(ok.nonzero().max())
    c_hi = float(c[i + 1]) if i + 1 < E else float(c[i])
    c_budget = min(float(c[i]) + (budget - float(pad_i[i])) // (i + 1), c_hi)
    cand = torch.cat([c[ok], torch.tensor([c_budget, 0.0], dtype=c.dtype)]).unique()
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
        rule = None
        if self.weights.resident:
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
