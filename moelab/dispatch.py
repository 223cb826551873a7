"""Dispatch: who goes where. Sort token slots by expert, gather, and scatter back weighted.

T=tokens, K=slots per token, D=d_model, E=experts, R=dispatched rows (kept slots sorted by expert, + padding).
A dispatcher has two calls: dispatch(x_TD, expert_idx_TK, weight_TK, pads) -> (x_RD, counts_E, plan) and
combine(y_RD, plan) -> y_TD; plan.tokens_E counts the real rows per expert. `pads(counts_E) -> C` (the
experts path's layout rule, experts.ExpertsPath.block_rows) gives the rows C every expert gets in an equal
block part (padded when it has fewer; its rows past C go to a compact tail); 0 = compact rows; a dispatcher
may ignore it (plan.block_rows then stays 0).
`parallel.py` implements the same interface over all-to-all.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class DispatchPlan(NamedTuple):
    """Where every row of x_RD came from. Rows are grouped by expert; in the blocked layout (block_rows C > 0)
    the first C rows of every expert sit at e*C.. (padded with rows of token 0, weight 0, computed but never
    combined), the rows past C in a compact tail after the E*C block rows, in expert order."""
    token_R: Tensor     # source token of each sorted row
    weight_R: Tensor    # combine weight of each sorted row (0 on padding rows)
    counts_E: Tensor    # real rows per expert (long), in expert order
    n_tokens: int       # T, rows of the combined output
    row_TK: Tensor | None = None     # row of x_RD holding each (token, slot), -1 = dropped (gather-only paths)
    weight_TK: Tensor | None = None  # combine weight per (token, slot), the tensor the gradient flows to
    tokens_E: Tensor | None = None   # real rows per expert (long), the same as counts_E
    block_rows: int = 0              # C: rows every expert has in the equal block part (0 = compact rows)


BlockRule = Callable[[Tensor], int]  # counts_E -> C, rows per expert in the equal block part (0 = compact)


def block_layout(e_R: Tensor, counts_E: Tensor, C: int) -> tuple[Tensor, int]:
    """Blocked layout of rows sorted by expert (e_R: expert of each row): the j-th row of expert e goes to
    e*C + j when j < C, else to the compact tail after the E*C block rows. Returns (row_R, rows in the layout)."""
    E = counts_E.numel()
    start_E = torch.cumsum(counts_E, 0) - counts_E
    j_R = torch.arange(e_R.numel(), device=e_R.device) - start_E.index_select(0, e_R)
    over_E = (counts_E - C).clamp_min(0)
    tail_E = torch.cumsum(over_E, 0) - over_E + E * C
    row_R = torch.where(j_R < C, e_R * C + j_R, tail_E.index_select(0, e_R) + (j_R - C))
    return row_R, E * C + int(over_E.sum())


def sort_plan(expert_idx_TK: Tensor, weight_TK: Tensor, n_experts: int,
              block_rows: BlockRule | None = None) -> DispatchPlan:
    """Stable sort of the flat slots by expert; slots with expert -1 are left out. When `block_rows(counts_E)`
    gives C > 0, the rows go to the blocked layout (`block_layout`): an equal part, one batched GEMM, and a
    compact tail."""
    T, K = expert_idx_TK.shape
    E = n_experts
    flat_idx = expert_idx_TK.reshape(-1)
    key = torch.where(flat_idx >= 0, flat_idx, E)       # dropped slots sort last
    order = torch.argsort(key, stable=True)
    counts_all = torch.bincount(key, minlength=E + 1)
    counts_E = counts_all[:E]
    R = T * K - int(counts_all[E])                      # the one host sync of the plan
    slot_R = order[:R]
    row_TK = torch.full((T * K,), -1, dtype=torch.long, device=flat_idx.device)
    C = block_rows(counts_E) if R and block_rows is not None else 0
    if C:
        e_R = key.index_select(0, slot_R)  # index_select, not x[idx]: no parallel region on a busy CPU
        row_R, n_rows = block_layout(e_R, counts_E, C)
        token_R = slot_R.new_zeros(n_rows).index_copy_(0, row_R, slot_R // K)
        weight_R = weight_TK.new_zeros(n_rows).index_copy(0, row_R,
                                                          weight_TK.reshape(-1).index_select(0, slot_R))
    else:
        row_R = torch.arange(R, device=slot_R.device)
        token_R, weight_R = slot_R // K, weight_TK.reshape(-1).index_select(0, slot_R)
    row_TK = row_TK.index_copy_(0, slot_R, row_R).view(T, K)
    return DispatchPlan(token_R, weight_R, counts_E, T, row_TK, weight_TK, counts_E, C)


class _Permute(torch.autograd.Function):
    """x_RD = x_TD[token_R]; backward sums each token's K row-gradients in one fused gather-sum (embedding_bag),
    no scatter-add and no (T,K,D) temporary."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_R: Tensor, row_TK: Tensor) -> Tensor:
        ctx.save_for_backward(row_TK)
        ctx.any_dropped = bool((row_TK < 0).any())
        return x_TD.index_select(0, token_R)

    @staticmethod
    def backward(ctx, g_RD: Tensor):
        (row_TK,) = ctx.saved_tensors
        if g_RD.shape[0] == 0:
            return g_RD.new_zeros(row_TK.shape[0], g_RD.shape[1]), None, None
        keep_TK = (row_TK >= 0).to(g_RD.dtype) if ctx.any_dropped else None  # dropped slots add nothing
        return F.embedding_bag(row_TK.clamp_min(0), g_RD, per_sample_weights=keep_TK, mode="sum"), None, None


class _Unpermute(torch.autograd.Function):
    """y_TD = sum_k w_TK * y_RD[row_TK] in one fused weighted gather-sum (embedding_bag: faster than
    gather + batched GEMM, no (T,K,D) temporary); backward: each row's gradient is its token's gradient times
    its weight (one gather, no scatter), the weight gradient a row-vector bmm against the gathered rows."""

    @staticmethod
    def forward(ctx, y_RD: Tensor, weight_TK: Tensor, row_TK: Tensor, token_R: Tensor, weight_R: Tensor) -> Tensor:
        T = row_TK.shape[0]
        w_TK = weight_TK.masked_fill(row_TK < 0, 0.0).to(y_RD.dtype)
        ctx.save_for_backward(y_RD, w_TK, row_TK, token_R, weight_R)
        ctx.weight_dtype = weight_TK.dtype
        if y_RD.shape[0] == 0:  # everything dropped
            return y_RD.new_zeros(T, y_RD.shape[1])
        return F.embedding_bag(row_TK.clamp_min(0), y_RD, per_sample_weights=w_TK, mode="sum")

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        y_RD, w_TK, row_TK, token_R, weight_R = ctx.saved_tensors
        (T, K), (R, D) = row_TK.shape, y_RD.shape
        g_y = g_w = None
        if ctx.needs_input_grad[0]:  # row s gets w_s * g[token_s]; padding rows have w_s = 0
            g_y = g_TD.index_select(0, token_R).mul_(weight_R.to(g_TD.dtype).unsqueeze(1))
        if ctx.needs_input_grad[1]:
            if R == 0:
                g_w = torch.zeros_like(w_TK)
            else:
                y_TKD = y_RD.index_select(0, row_TK.clamp_min(0).reshape(-1)).view(T, K, D)
                # (T,1,D) @ (T,D,K): a row vector per batch; (T,K,D) @ (T,D,1) would clone per batch
                g_w = torch.bmm(g_TD.unsqueeze(1), y_TKD.transpose(1, 2)).squeeze(1).masked_fill_(row_TK < 0, 0.0)
            g_w = g_w.to(ctx.weight_dtype)
        return g_y, g_w, None, None, None


def permute(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of x_TD in expert order (x_RD)."""
    if plan.row_TK is None:
        return x_TD.index_select(0, plan.token_R)
    return _Permute.apply(x_TD, plan.token_R, plan.row_TK)


def unpermute(y_RD: Tensor, plan: DispatchPlan) -> Tensor:
    """Weighted sum of each token's expert outputs back in token order (padding rows ignored)."""
    if plan.row_TK is None or plan.weight_TK is None:
        return unpermute_scatter(y_RD, plan)
    return _Unpermute.apply(y_RD, plan.weight_TK, plan.row_TK, plan.token_R, plan.weight_R.detach())


def unpermute_scatter(y_RD: Tensor, plan: DispatchPlan) -> Tensor:
    """Loop-free twin of `unpermute`: weighted scatter-add of the expert outputs back to their tokens."""
    y_RD = y_RD * plan.weight_R.to(y_RD.dtype).unsqueeze(1)
    out_TD = y_RD.new_zeros(plan.n_tokens, y_RD.shape[1])
    return out_TD.index_add(0, plan.token_R, y_RD)


class LocalDispatcher:
    """Single-process dispatcher: every expert lives here; rows sorted by expert, blocked when `pads` says so."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, x_TD: Tensor, expert_idx_TK: Tensor, weight_TK: Tensor,
                 pads: BlockRule | None = None) -> tuple[Tensor, Tensor, DispatchPlan]:
        plan = sort_plan(expert_idx_TK, weight_TK, self.n_experts, pads)
        return permute(x_TD, plan), plan.counts_E, plan

    def combine(self, y_RD: Tensor, plan: DispatchPlan) -> Tensor:
        return unpermute(y_RD, plan)


def experts_reference_forward(x_TD: Tensor, expert_idx_TK: Tensor, weight_TK: Tensor, expert_fn,
                              n_experts: int) -> Tensor:
    """Loop twin of dispatch + experts + combine (Mixtral-style): for each expert, find its
    (token, slot) pairs, run the expert, add weight * output. `expert_fn(e, x_ND)` runs expert e."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(n_experts):
        tok_N, slot_N = torch.where(expert_idx_TK == e)
        if tok_N.numel() == 0:
            continue
        y_ND = expert_fn(e, x_TD[tok_N]) * weight_TK[tok_N, slot_N, None].to(x_TD.dtype)
        out_TD = out_TD.index_add(0, tok_N, y_ND)
    return out_TD
