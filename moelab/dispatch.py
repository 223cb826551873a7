"""Dispatch: who goes where. Sort token slots by expert, gather, and scatter back weighted.

T=tokens, K=slots per token, D=d_model, E=experts, S=kept slots (sorted by expert).
A dispatcher has two calls: dispatch(x_TD, routing) -> (x_SD, counts_E, plan) and
combine(y_SD, plan) -> y_TD. `parallel.py` implements the same interface over all-to-all.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.routers import Routing


class DispatchPlan(NamedTuple):
    """Where every row of x_SD came from. Rows are grouped by expert; with padding, every expert has C rows
    and the padding rows (token 0, weight 0) are computed but never combined."""
    token_S: Tensor     # source token of each sorted row
    weight_S: Tensor    # combine weight of each sorted row (0 on padding rows)
    counts_E: Tensor    # rows per expert (long), in expert order (padding rows included)
    n_tokens: int       # T, rows of the combined output
    row_TK: Tensor | None = None     # row of x_SD holding each (token, slot), -1 = dropped (gather-only paths)
    weight_TK: Tensor | None = None  # combine weight per (token, slot), the tensor the gradient flows to


def sort_plan(expert_idx_TK: Tensor, weight_TK: Tensor, n_experts: int,
              max_padding: float = 0.0, max_pad_rows: int | None = None) -> DispatchPlan:
    """Stable sort of the flat slots by expert; slots with expert -1 are left out. When padding every expert
    to the largest count C adds at most `max_padding` * S rows (and C <= max_pad_rows, if given), the plan
    pads (equal counts: one batched GEMM)."""
    T, K = expert_idx_TK.shape
    E = n_experts
    flat_idx = expert_idx_TK.reshape(-1)
    key = torch.where(flat_idx >= 0, flat_idx, E)       # dropped slots sort last
    order = torch.argsort(key, stable=True)
    counts_all = torch.bincount(key, minlength=E + 1)
    counts_E = counts_all[:E]
    S = T * K - int(counts_all[E])                      # the one host sync of the plan
    slot_S = order[:S]
    C = int(counts_E.max()) if S else 0
    row_TK = torch.full((T * K,), -1, dtype=torch.long, device=flat_idx.device)
    if 0 < S < E * C <= (1 + max_padding) * S and (max_pad_rows is None or C <= max_pad_rows):
        e_S = key.index_select(0, slot_S)  # index_select, not x[idx]: no parallel region on a busy CPU
        start_E = torch.cumsum(counts_E, 0) - counts_E
        row_S = torch.arange(S, device=slot_S.device) + (e_S * C - start_E.index_select(0, e_S))
        token_S = slot_S.new_zeros(E * C).index_copy_(0, row_S, slot_S // K)
        weight_S = weight_TK.new_zeros(E * C).index_copy(0, row_S,
                                                         weight_TK.reshape(-1).index_select(0, slot_S))
        counts_E = torch.full_like(counts_E, C)
    else:
        row_S = torch.arange(S, device=slot_S.device)
        token_S, weight_S = slot_S // K, weight_TK.reshape(-1).index_select(0, slot_S)
    row_TK = row_TK.index_copy_(0, slot_S, row_S).view(T, K)
    return DispatchPlan(token_S, weight_S, counts_E, T, row_TK, weight_TK)


class _Permute(torch.autograd.Function):
    """x_SD = x_TD[token_S]; backward sums each token's K row-gradients in one fused gather-sum (embedding_bag),
    no scatter-add and no (T,K,D) temporary."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_S: Tensor, row_TK: Tensor) -> Tensor:
        ctx.save_for_backward(row_TK)
        ctx.any_dropped = bool((row_TK < 0).any())
        return x_TD.index_select(0, token_S)

    @staticmethod
    def backward(ctx, g_SD: Tensor):
        (row_TK,) = ctx.saved_tensors
        if g_SD.shape[0] == 0:
            return g_SD.new_zeros(row_TK.shape[0], g_SD.shape[1]), None, None
        keep_TK = (row_TK >= 0).to(g_SD.dtype) if ctx.any_dropped else None  # dropped slots add nothing
        return F.embedding_bag(row_TK.clamp_min(0), g_SD, per_sample_weights=keep_TK, mode="sum"), None, None


class _Unpermute(torch.autograd.Function):
    """y_TD = sum_k w_TK * y_SD[row_TK] in one fused weighted gather-sum (embedding_bag: ~10x faster than
    gather + batched GEMM, no (T,K,D) temporary); backward: each row's gradient is its token's gradient times
    its weight (one gather, no scatter), the weight gradient a row-vector bmm against the gathered rows."""

    @staticmethod
    def forward(ctx, y_SD: Tensor, weight_TK: Tensor, row_TK: Tensor, token_S: Tensor, weight_S: Tensor) -> Tensor:
        T = row_TK.shape[0]
        w_TK = weight_TK.masked_fill(row_TK < 0, 0.0).to(y_SD.dtype)
        ctx.save_for_backward(y_SD, w_TK, row_TK, token_S, weight_S)
        ctx.weight_dtype = weight_TK.dtype
        if y_SD.shape[0] == 0:  # everything dropped
            return y_SD.new_zeros(T, y_SD.shape[1])
        return F.embedding_bag(row_TK.clamp_min(0), y_SD, per_sample_weights=w_TK, mode="sum")

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        y_SD, w_TK, row_TK, token_S, weight_S = ctx.saved_tensors
        (T, K), (S, D) = row_TK.shape, y_SD.shape
        g_y = g_w = None
        if ctx.needs_input_grad[0]:  # row s gets w_s * g[token_s]; padding rows have w_s = 0
            g_y = g_TD.index_select(0, token_S).mul_(weight_S.to(g_TD.dtype).unsqueeze(1))
        if ctx.needs_input_grad[1]:
            if S == 0:
                g_w = torch.zeros_like(w_TK)
            else:
                y_TKD = y_SD.index_select(0, row_TK.clamp_min(0).reshape(-1)).view(T, K, D)
                # (T,1,D) @ (T,D,K): a row vector per batch; (T,K,D) @ (T,D,1) is 2x slower (per-batch clones)
                g_w = torch.bmm(g_TD.unsqueeze(1), y_TKD.transpose(1, 2)).squeeze(1).masked_fill_(row_TK < 0, 0.0)
            g_w = g_w.to(ctx.weight_dtype)
        return g_y, g_w, None, None, None


def permute(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of x_TD in expert order (x_SD)."""
    if plan.row_TK is None:
        return x_TD.index_select(0, plan.token_S)
    return _Permute.apply(x_TD, plan.token_S, plan.row_TK)


def unpermute(y_SD: Tensor, plan: DispatchPlan) -> Tensor:
    """Weighted sum of each token's expert outputs back in token order (padding rows ignored)."""
    if plan.row_TK is None or plan.weight_TK is None:
        return unpermute_scatter(y_SD, plan)
    return _Unpermute.apply(y_SD, plan.weight_TK, plan.row_TK, plan.token_S, plan.weight_S.detach())


def unpermute_scatter(y_SD: Tensor, plan: DispatchPlan) -> Tensor:
    """Loop-free twin of `unpermute`: weighted scatter-add of the expert outputs back to their tokens."""
    y_SD = y_SD * plan.weight_S.to(y_SD.dtype).unsqueeze(1)
    out_TD = y_SD.new_zeros(plan.n_tokens, y_SD.shape[1])
    return out_TD.index_add(0, plan.token_S, y_SD)


class LocalDispatcher:
    """Single-process dispatcher: every expert lives here. Pads experts to equal counts when that costs at
    most `max_padding` extra rows and an expert's hidden block (C rows of `hidden` values) stays under
    `block_bytes` (then the experts run as one batched GEMM; bigger blocks run expert by expert, unpadded)."""

    def __init__(self, n_experts: int, max_padding: float = 0.25, hidden: int | None = None,
                 block_bytes: int = 4 << 20):
        self.n_experts = n_experts
        self.max_padding = max_padding
        self.hidden, self.block_bytes = hidden, block_bytes

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchPlan]:
        max_rows = None if self.hidden is None else self.block_bytes // (self.hidden * x_TD.element_size())
        plan = sort_plan(routing.expert_idx_TK, routing.weight_TK, self.n_experts, self.max_padding, max_rows)
        return permute(x_TD, plan), plan.counts_E, plan

    def combine(self, y_SD: Tensor, plan: DispatchPlan) -> Tensor:
        return unpermute(y_SD, plan)


def capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """GShard/Switch expert capacity: ceil(cf * T * K / E)."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def apply_capacity(routing: Routing, cap: int, n_experts: int) -> tuple[Routing, Tensor]:
    """Keep at most `cap` slots per expert, dropping the lowest-weight slots first.
    Returns the routing with dropped slots set to expert -1 / weight 0, and the number dropped."""
    idx_flat = routing.expert_idx_TK.reshape(-1)
    w_flat = routing.weight_TK.reshape(-1).detach()
    by_weight = torch.argsort(w_flat, descending=True, stable=True)
    by_expert = by_weight[torch.argsort(idx_flat[by_weight], stable=True)]  # expert asc, weight desc
    sorted_idx = idx_flat[by_expert]
    starts_E = torch.searchsorted(sorted_idx, torch.arange(n_experts, device=sorted_idx.device))
    pos = torch.arange(sorted_idx.numel(), device=sorted_idx.device) - starts_E[sorted_idx.clamp_min(0)]
    drop_sorted = (sorted_idx >= 0) & (pos >= cap)
    drop = torch.zeros_like(drop_sorted).scatter(0, by_expert, drop_sorted).view_as(routing.expert_idx_TK)
    return routing._replace(expert_idx_TK=routing.expert_idx_TK.masked_fill(drop, -1),
                            weight_TK=routing.weight_TK.masked_fill(drop, 0.0)), drop.sum()


def experts_reference_forward(x_TD: Tensor, routing: Routing, expert_fn, n_experts: int) -> Tensor:
    """Loop twin of dispatch + experts + combine (Mixtral-style): for each expert, find its
    (token, slot) pairs, run the expert, add weight * output. `expert_fn(e, x_ND)` runs expert e."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(n_experts):
        tok_N, slot_N = torch.where(routing.expert_idx_TK == e)
        if tok_N.numel() == 0:
            continue
        y_ND = expert_fn(e, x_TD[tok_N]) * routing.weight_TK[tok_N, slot_N, None].to(x_TD.dtype)
        out_TD = out_TD.index_add(0, tok_N, y_ND)
    return out_TD
