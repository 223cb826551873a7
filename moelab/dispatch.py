"""Dispatch: who goes where. Sort token slots by expert, gather, and scatter back weighted.

T=tokens, K=slots per token, D=d_model, E=experts, S=kept slots (sorted by expert).
A dispatcher has two calls: dispatch(x_TD, routing) -> (x_SD, counts_E, plan) and
combine(y_SD, plan) -> y_TD. `parallel.py` implements the same interface over all-to-all.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from moelab.routers import Routing


class DispatchPlan(NamedTuple):
    """Where every kept slot came from."""
    token_S: Tensor     # source token of each sorted slot
    weight_S: Tensor    # combine weight of each sorted slot
    counts_E: Tensor    # slots per expert (long), in expert order
    n_tokens: int       # T, rows of the combined output


def sort_plan(expert_idx_TK: Tensor, weight_TK: Tensor, n_experts: int) -> DispatchPlan:
    """Stable sort of the flat slots by expert; slots with expert -1 are left out."""
    T, K = expert_idx_TK.shape
    flat_idx = expert_idx_TK.reshape(-1)
    keep = flat_idx >= 0
    slot_S = torch.nonzero(keep).squeeze(1)
    order_S = torch.argsort(flat_idx[slot_S], stable=True)
    slot_S = slot_S[order_S]
    counts_E = torch.bincount(flat_idx[slot_S], minlength=n_experts)
    return DispatchPlan(slot_S // K, weight_TK.reshape(-1)[slot_S], counts_E, T)


def permute(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    return x_TD.index_select(0, plan.token_S)


def unpermute(y_SD: Tensor, plan: DispatchPlan) -> Tensor:
    """Weighted scatter-add of the expert outputs back to their tokens."""
    y_SD = y_SD * plan.weight_S.to(y_SD.dtype).unsqueeze(1)
    out_TD = y_SD.new_zeros(plan.n_tokens, y_SD.shape[1])
    return out_TD.index_add(0, plan.token_S, y_SD)


class LocalDispatcher:
    """Single-process dispatcher: every expert lives here."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchPlan]:
        plan = sort_plan(routing.expert_idx_TK, routing.weight_TK, self.n_experts)
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
