"""The expert kernels: one math, several layouts, all equal to the reference `experts_loop` (one matmul pair per
expert): `experts_padded` (every expert padded to the largest count -> two bmm), `experts_grouped_mm`
(torch._grouped_mm, 16-byte alignment rule), `experts_sparse` (only experts with rows; what a non-resident,
offloaded provider gets) and `experts_blocked` (an equal part of C rows per expert as bmm + a ragged tail).
Each takes rows sorted by expert, per-expert counts and an expert-weights provider (experts.py).

R=dispatched rows (sorted by expert), D=d_model, F=expert hidden, G=fused gate|up width (2F for SwiGLU, F
for GELU), E=experts, C=rows per expert in the equal part.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.dispatch import block_layout


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
    if torch.compiler.is_compiling() and x_RD.dtype != torch.bfloat16:  # its meta function takes bf16 only
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
