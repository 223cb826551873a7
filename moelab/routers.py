"""Routers: logits -> who goes where. One registry, one `Routing` record.

T=tokens, E=routed experts, K=slots per token (a router may use K=E for a variable number).
Every router receives fp32 logits and returns a Routing; slot expert -1 means "no expert"
(dropped, padding, null). The bias (loss-free balancing) changes selection only, never weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from moelab.config import MoEConfig


class Routing(NamedTuple):
    """Who goes where: one row per (token, slot)."""
    expert_idx_TK: Tensor   # long, chosen expert per token slot, -1 = dropped / null / padding
    weight_TK: Tensor       # fp32 combine weight per slot (0 where expert is -1)
    logits_TE: Tensor       # raw fp32 router logits, for losses and traces
    probs_TE: Tensor        # fp32 scores the balance losses use (softmax or sigmoid)


@dataclass(frozen=True)
class RouteContext:
    """What a router may need besides logits."""
    bias_E: Tensor | None = None        # loss-free balancing bias, selection only
    token_ids_T: Tensor | None = None   # token ids (hash router)
    training: bool = False              # some routers behave differently in training


RouterFn = Callable[[Tensor, MoEConfig, RouteContext], Routing]


def _biased(scores_TE: Tensor, ctx: RouteContext) -> Tensor:
    return scores_TE if ctx.bias_E is None else scores_TE + ctx.bias_E.to(scores_TE.dtype)


def route_topk(logits_TE: Tensor, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """Softmax top-k (Shazeer et al. 2017; Mixtral / Qwen-MoE orderings)."""
    probs_TE = torch.softmax(logits_TE, dim=-1)
    if cfg.score_order == "softmax_topk":           # Qwen/OLMoE: softmax over E, pick k, renormalise optionally
        idx_TK = torch.topk(_biased(probs_TE, ctx), cfg.top_k, dim=-1).indices
        w_TK = probs_TE.gather(1, idx_TK)
        if cfg.renormalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    else:                                           # Mixtral: pick k logits, softmax over those k
        idx_TK = torch.topk(_biased(logits_TE, ctx), cfg.top_k, dim=-1).indices
        w_TK = torch.softmax(logits_TE.gather(1, idx_TK), dim=-1)
    return Routing(idx_TK, w_TK * cfg.routed_scaling_factor, logits_TE, probs_TE)


def route_sigmoid_group(logits_TE: Tensor, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """DeepSeek-V3 (arXiv 2412.19437) eq. 13-16 + node-limited groups: sigmoid scores, keep the
    topk_group groups ranked by the sum of their top-2 biased scores, top-k inside them, weights from
    the unbiased scores normalised over the k and scaled by routed_scaling_factor."""
    T, E = logits_TE.shape
    scores_TE = torch.sigmoid(logits_TE)
    choice_TE = _biased(scores_TE, ctx)
    if cfg.n_group > 1:
        grouped_TGe = choice_TE.view(T, cfg.n_group, E // cfg.n_group)
        group_score_TG = grouped_TGe.topk(2, dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_score_TG.topk(cfg.topk_group, dim=-1).indices, True)
        keep_TE = keep_TG.repeat_interleave(E // cfg.n_group, dim=1)
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
    idx_TK = torch.topk(choice_TE, cfg.top_k, dim=-1).indices
    w_TK = scores_TE.gather(1, idx_TK)
    if cfg.renormalize:
        w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
    probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)  # s' of eq. 19, for the sequence-wise loss
    return Routing(idx_TK, w_TK * cfg.routed_scaling_factor, logits_TE, probs_TE)


ROUTERS: dict[str, RouterFn] = {
    "topk": route_topk,
    "sigmoid_group": route_sigmoid_group,
}


def mask_routing(r: Routing, valid_T: Tensor | None) -> Routing:
    """Send padding tokens (valid_T False) to no expert, with zero weight."""
    if valid_T is None:
        return r
    keep_T1 = valid_T.reshape(-1, 1)
    return r._replace(expert_idx_TK=torch.where(keep_T1, r.expert_idx_TK, -1),
                      weight_TK=torch.where(keep_T1, r.weight_TK, 0.0))
