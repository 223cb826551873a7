"""Expert weights (3-D, one slab per expert) and their compute.

S=routed slots sorted by expert, D=d_model, F=expert hidden, H=F (gelu) or 2F (swiglu: gate|up), E=experts,
C=rows per expert after padding. One math, several kernels (EXPERT_IMPLS), all tested against the reference
`experts_loop` (one matmul pair per expert): `experts_padded` (equal blocks -> two bmm), `experts_grouped_mm`
(torch._grouped_mm, 16-byte alignment rule), `experts_sparse` (only experts with rows), and `experts_grouped`,
the default, which picks among them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_reference(h_SH: Tensor) -> Tensor:
    """SwiGLU (Shazeer 2020, eq. 6): silu(gate) * up, gate|up concatenated on the last dim (autograd twin)."""
    gate_SF, up_SF = h_SH.chunk(2, dim=-1)
    return F.silu(gate_SF) * up_SF


class _SwiGLU(torch.autograd.Function):
    """SwiGLU (Shazeer 2020, eq. 6) saving only h (not silu(gate) too) and writing both halves of the gradient
    straight into one (S, 2F) buffer (no cat)."""

    @staticmethod
    def forward(ctx, h_SH: Tensor) -> Tensor:
        ctx.save_for_backward(h_SH)
        gate_SF, up_SF = h_SH.chunk(2, dim=-1)
        return F.silu(gate_SF).mul_(up_SF)

    @staticmethod
    def backward(ctx, g_SF: Tensor):
        (h_SH,) = ctx.saved_tensors
        gate_SF, up_SF = h_SH.chunk(2, dim=-1)
        g_SH = torch.empty_like(h_SH)
        g_gate_SF, g_up_SF = g_SH.chunk(2, dim=-1)
        torch.mul(F.silu(gate_SF), g_SF, out=g_up_SF)
        torch.ops.aten.silu_backward.grad_input(g_SF * up_SF, gate_SF, grad_input=g_gate_SF)
        return g_SH


def activate(h_SH: Tensor, activation: str) -> Tensor:
    """SwiGLU (Shazeer 2020, eq. 6): silu(gate) * up, with gate|up concatenated on the last dim; or GELU."""
    if activation == "swiglu":
        return _SwiGLU.apply(h_SH) if h_SH.requires_grad else swiglu_no_grad(h_SH)
    return F.gelu(h_SH)


def swiglu_no_grad(h_SH: Tensor) -> Tensor:
    gate_SF, up_SF = h_SH.chunk(2, dim=-1)
    return F.silu(gate_SF).mul_(up_SF)


def mlp(x_SD: Tensor, w_up_DH: Tensor, w_down_FD: Tensor, activation: str) -> Tensor:
    """One expert (or one dense MLP): activate(x @ w_up) @ w_down."""
    return activate(x_SD @ w_up_DH, activation) @ w_down_FD


def experts_loop(x_SD: Tensor, counts_E: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor,
                 activation: str) -> Tensor:
    """Reference: contiguous per-expert blocks, one MLP each."""
    blocks = torch.split(x_SD, counts_E.tolist())
    out = [mlp(xb, w_up_EDH[e], w_down_EFD[e], activation) for e, xb in enumerate(blocks)]
    return torch.cat(out) if out else x_SD.new_zeros(0, w_down_EFD.shape[-1])


def experts_sparse(x_SD: Tensor, counts_E: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor,
                   activation: str) -> Tensor:
    """One MLP per expert that received rows; experts with none are never touched (no weight read, no kernel
    launch). unbind, not w[e]: its backward stacks the E weight grads once instead of zero-filling E copies."""
    blocks = zip(torch.split(x_SD, counts_E.tolist()), w_up_EDH.unbind(0), w_down_EFD.unbind(0))
    out = [mlp(xb, w_up_DH, w_down_FD, activation) for xb, w_up_DH, w_down_FD in blocks if xb.shape[0]]
    return torch.cat(out) if out else x_SD.new_zeros(0, w_down_EFD.shape[-1])


class _GroupedMM(torch.autograd.Function):
    """y_S* = x_S? @ w_E??[expert of row], rows grouped by the cumulative offsets offs_E (int32)."""

    @staticmethod
    def forward(ctx, x_SK: Tensor, w_EKN: Tensor, offs_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_SK, w_EKN, offs_E)
        return torch._grouped_mm(x_SK, w_EKN, offs=offs_E)

    @staticmethod
    def backward(ctx, g_SN: Tensor):
        x_SK, w_EKN, offs_E = ctx.saved_tensors
        g_SN = g_SN.contiguous()
        g_x = torch._grouped_mm(g_SN, w_EKN.transpose(-2, -1), offs=offs_E) if ctx.needs_input_grad[0] else None
        g_w = None
        if ctx.needs_input_grad[1]:
            g_w = torch._grouped_mm(x_SK.t(), g_SN, offs=offs_E)
        return g_x, g_w, None


def _aligned(*sizes: int, itemsize: int) -> bool:
    return all((s * itemsize) % 16 == 0 for s in sizes)


def grouped_mm_available(x_SD: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor) -> bool:
    """torch._grouped_mm needs every row stride (and S for the weight grad) to be a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x_SD.dtype != w_up_EDH.dtype:
        return False
    D, H = w_up_EDH.shape[1:]
    S = x_SD.shape[0]
    if S == 0 or w_up_EDH.shape[0] == 0:  # no rows (e.g. an EP rank that receives nothing): the loop handles it
        return False
    return _aligned(D, H, w_down_EFD.shape[1], S, itemsize=x_SD.element_size())


def experts_grouped(x_SD: Tensor, counts_E: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor,
                    activation: str, max_padding: float = 0.25, block_bytes: int = 4 << 20) -> Tensor:
    """Fast path: grouped GEMMs over all experts; same math as `experts_loop`. Experts whose hidden block
    reaches `block_bytes` are GEMMs big enough on their own: expert by expert, unpadded (`experts_sparse`).
    Smaller blocks: when padding every expert to the largest count adds at most `max_padding` rows, two
    batched GEMMs (`experts_padded`); otherwise torch._grouped_mm (empty experts: no work, no weight read),
    or, when the shapes break its alignment rule, one MLP per expert that got rows (`experts_sparse`)."""
    E = w_up_EDH.shape[0]
    S = x_SD.shape[0]
    C = int(counts_E.max()) if S > 0 else 0
    if max_padding > 0 and C * w_up_EDH.shape[2] * x_SD.element_size() >= block_bytes:
        return experts_sparse(x_SD, counts_E, w_up_EDH, w_down_EFD, activation)  # big blocks: no padding
    if S > 0 and max_padding > 0 and E * C <= (1 + max_padding) * S:
        return experts_padded(x_SD, counts_E, w_up_EDH, w_down_EFD, activation, block_bytes)
    if not grouped_mm_available(x_SD, w_up_EDH, w_down_EFD):
        fallback = experts_sparse if S > 0 else experts_loop  # S=0: the loop keeps the weights in the graph
        return fallback(x_SD, counts_E, w_up_EDH, w_down_EFD, activation)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    h_SH = _GroupedMM.apply(x_SD.contiguous(), w_up_EDH, offs_E)
    return _GroupedMM.apply(activate(h_SH, activation).contiguous(), w_down_EFD, offs_E)


def padded_positions(counts_E: Tensor, n_rows: int) -> tuple[Tensor, int]:
    """Row s of expert e (sorted, contiguous blocks) -> row e*C + (s - start_e) of an (E*C)-row padded buffer,
    C = the largest count. One host sync (C), the same one the loop twin makes."""
    E = counts_E.numel()
    C = int(counts_E.max()) if E else 0
    e_S = torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E, output_size=n_rows)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    return torch.arange(n_rows, device=counts_E.device) + (e_S * C - start_E.index_select(0, e_S)), C


def experts_padded(x_SD: Tensor, counts_E: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor,
                   activation: str, block_bytes: int = 4 << 20) -> Tensor:
    """Grouped GEMM as two batched GEMMs: every expert's block padded with zero rows to the largest count C.
    One parallel region per GEMM instead of one per expert (what a busy 2-core CPU rewards); costs
    E*C/S - 1 extra FLOPs, so `experts_grouped` only takes it when routing is near-balanced.
    When one expert's hidden activations reach `block_bytes`, equal blocks run expert by expert instead:
    cache-sized pieces beat one pass over a tensor of hundreds of MB (~20% on the coarse shape)."""
    S, D = x_SD.shape
    E = w_up_EDH.shape[0]
    if S == 0 or E == 0:
        return experts_loop(x_SD, counts_E, w_up_EDH, w_down_EFD, activation)
    if S % E == 0 and bool((counts_E == S // E).all()):  # already equal blocks (a padded dispatch): no copies
        C = S // E
        if E > 1 and C * w_up_EDH.shape[2] * x_SD.element_size() >= block_bytes:
            # split/unbind (not indexing): their backward is one cat/stack, not E zero-filled full-size grads
            blocks = zip(x_SD.split(C), w_up_EDH.unbind(0), w_down_EFD.unbind(0))
            return torch.cat([mlp(x_CD, w_up_DH, w_down_FD, activation) for x_CD, w_up_DH, w_down_FD in blocks])
        x_ECD = x_SD.reshape(E, C, D)
        return torch.bmm(activate(torch.bmm(x_ECD, w_up_EDH), activation), w_down_EFD).reshape(S, -1)
    pos_S, C = padded_positions(counts_E, S)
    x_ECD = x_SD.new_zeros(E * C, D).index_copy(0, pos_S, x_SD).view(E, C, D)
    y_ECD = torch.bmm(activate(torch.bmm(x_ECD, w_up_EDH), activation), w_down_EFD)
    return y_ECD.view(E * C, -1).index_select(0, pos_S)


def experts_grouped_mm(x_SD: Tensor, counts_E: Tensor, w_up_EDH: Tensor, w_down_EFD: Tensor,
                       activation: str) -> Tensor:
    """torch._grouped_mm, never padded (per-expert fallback when unaligned)."""
    return experts_grouped(x_SD, counts_E, w_up_EDH, w_down_EFD, activation, max_padding=0.0)


EXPERT_IMPLS = {"loop": experts_loop, "grouped": experts_grouped, "grouped_mm": experts_grouped_mm,
                "padded": experts_padded, "sparse": experts_sparse}


class Experts(nn.Module):
    """E expert MLPs stored as two 3-D parameters: w_up_EDH (gate|up for SwiGLU) and w_down_EFD."""

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, activation: str = "swiglu"):
        super().__init__()
        self.activation = activation
        H = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w_up_EDH = nn.Parameter(torch.empty(n_experts, d_model, H))
        self.w_down_EFD = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_up_EDH, std=self.w_up_EDH.shape[1] ** -0.5)
        nn.init.normal_(self.w_down_EFD, std=self.w_down_EFD.shape[1] ** -0.5)

    @property
    def n_experts(self) -> int:
        return self.w_up_EDH.shape[0]

    def forward(self, x_SD: Tensor, counts_E: Tensor, impl: str = "grouped") -> Tensor:
        """x_SD sorted by expert, counts_E rows per expert -> y_SD in the same order."""
        return EXPERT_IMPLS[impl](x_SD, counts_E, self.w_up_EDH, self.w_down_EFD, self.activation)

    def expert(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e applied to any rows (the per-expert reference)."""
        return mlp(x_ND, self.w_up_EDH[e], self.w_down_EFD[e], self.activation)
