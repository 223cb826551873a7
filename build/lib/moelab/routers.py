"""Routers: logits -> who goes where. One registry, one `Routing` record.

T=tokens, E=routed experts, K=slots per token (a router may use K=E for a variable number).
Every router receives fp32 logits and returns a Routing; slot expert -1 means "no expert"
(dropped, padding, null). The bias (loss-free balancing) changes selection only, never weights.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from moelab.config import ROUTER_NAMES, MoEConfig


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
    valid_T: Tensor | None = None       # bool, False = padding (expert_choice / base leave it out)


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


# ---- routers with a variable or fixed-by-rule number of experts per token ---------------------------
# A = all router outputs = E routed experts + null/zero/copy/const experts (moelab.special_experts).
# Variable-count routers return K=A slots, -1 where a slot is unused.

def _slots_from_mask(keep_TA: Tensor, w_TA: Tensor) -> tuple[Tensor, Tensor]:
    """(T, A) keep mask + weights -> K=A slots: slot n holds expert n or -1, weight 0 where unused."""
    ar_TA = torch.arange(keep_TA.shape[1], device=keep_TA.device).expand_as(keep_TA)
    return torch.where(keep_TA, ar_TA, -1), torch.where(keep_TA, w_TA, 0.0)


def route_expert_choice(logits_TE: Tensor, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """Expert choice (Zhou et al. 2022, arXiv 2202.09368) sec. 3: each expert takes its top-C tokens by
    token-to-expert softmax score, C = ceil(T * ec_capacity_factor / E) with T the real (non-padding) tokens;
    a token gets 0..E experts.
    Not causal: a token's experts depend on the other tokens of the batch, so outside training it falls
    back to top-k (cfg.ec_eval="topk", the usual fix for autoregressive decoding)."""
    if not ctx.training and cfg.ec_eval == "topk":
        return route_topk(logits_TE, cfg, ctx)
    T, A = logits_TE.shape
    probs_TE = torch.softmax(logits_TE, dim=-1)
    choice_TE = _biased(probs_TE, ctx)
    n_real = T
    if ctx.valid_T is not None:  # padding is never chosen and takes no capacity: C counts real tokens only
        choice_TE = choice_TE.masked_fill(~ctx.valid_T.reshape(-1, 1), float("-inf"))
        n_real = int(ctx.valid_T.sum())
    C = min(n_real, math.ceil(n_real * cfg.ec_capacity_factor / A))
    keep_TE = torch.zeros_like(probs_TE, dtype=torch.bool)
    if C > 0:
        keep_TE.scatter_(0, torch.topk(choice_TE, C, dim=0).indices, True)
    idx_TK, w_TK = _slots_from_mask(keep_TE, probs_TE)
    return Routing(idx_TK, w_TK * cfg.routed_scaling_factor, logits_TE, probs_TE)


def route_adamoe(logits_TE: Tensor, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """AdaMoE (Zeng et al. 2024, arXiv 2406.13233) sec. 3, as in the authors' released code: softmax over the
    E true + n_null null outputs, top-k, then the chosen true experts' weights renormalised over the true experts
    selected (nulls take no weight mass; a token with only nulls keeps weight 0). Ignores renormalize/score_order."""
    probs_TA = torch.softmax(logits_TE, dim=-1)
    idx_TK = torch.topk(_biased(probs_TA, ctx), cfg.top_k, dim=-1).indices
    w_TK = probs_TA.gather(1, idx_TK)
    true_TK = idx_TK < cfg.n_experts
    mass_T1 = (w_TK * true_TK).sum(-1, keepdim=True)
    w_TK = torch.where(true_TK, w_TK / torch.where(mass_T1 > 0, mass_T1, torch.ones_like(mass_T1)), w_TK)
    return Routing(idx_TK, w_TK * cfg.routed_scaling_factor, logits_TE, probs_TA)


def route_top_p(logits_TE: Tensor, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """Top-p dynamic routing (Huang et al. 2024, "Harder Tasks Need More Experts", arXiv 2403.07652) sec. 3:
    experts sorted by probability, keep the smallest prefix whose cumulative probability >= top_p;
    weights are the probabilities, not renormalised. The entropy loss is in special_experts.router_losses."""
    probs_TE = torch.softmax(logits_TE, dim=-1)
    order_TA = torch.argsort(_biased(probs_TE, ctx), dim=-1, descending=True, stable=True)
    p_sorted_TA = probs_TE.gather(1, order_TA)
    before_TA = p_sorted_TA.detach().cumsum(-1) - p_sorted_TA.detach()  # mass strictly before each expert
    keep_TA = before_TA < cfg.top_p
    keep_TA[:, 0] = True
    idx_TK = torch.where(keep_TA, order_TA, -1)
    w_TK = torch.where(keep_TA, p_sorted_TA, 0.0)
    return Routing(idx_TK, w_TK * cfg.routed_scaling_factor, logits_TE, probs_TE)


def route_relu(logits_TE: Tensor, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """ReMoE (Wang et al. 2024, arXiv 2412.14711) sec. 3: gates = ReLU(x W), no top-k; an expert is used
    where its gate is > 0. Sparsity comes from the adaptive L1 loss (special_experts.relu_l1_loss)."""
    gates_TE = torch.relu(logits_TE)
    idx_TK, w_TK = _slots_from_mask(gates_TE > 0, gates_TE)
    return Routing(idx_TK, w_TK * cfg.routed_scaling_factor, logits_TE, torch.softmax(logits_TE, dim=-1))


_P31 = 2147483647  # 2^31 - 1: every product below stays < 2^62, so int64 never overflows


def fixed_hash(x: Tensor, seed: int) -> Tensor:
    """A fixed integer hash of non-negative int64 values into [0, 2^31-1): two Lehmer rounds with xor-shift."""
    h = (x.long() % _P31 + seed * 1000003 + 12345) % _P31
    for a, b in ((48271, 11), (69621, 7)):
        h = (h * a + b) % _P31
        h = h ^ (h >> 13)
    return h


def route_hash(logits_TE: Tensor, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """Hash layers (Roller et al. 2021, arXiv 2106.04426) sec. 3: expert = fixed random hash of the token id,
    weight 1. The gate is not used to route (its softmax still feeds the balance losses)."""
    if ctx.token_ids_T is None:
        raise ValueError("router='hash' needs token ids: call MoELayer(x, token_ids=...) with x.shape[:-1] ids")
    ids_T = ctx.token_ids_T.reshape(-1).to(logits_TE.device)
    if ids_T.numel() != logits_TE.shape[0]:
        raise ValueError(f"router='hash': token_ids has {ids_T.numel()} entries, expected one per token "
                         f"({logits_TE.shape[0]})")
    idx_T1 = (fixed_hash(ids_T, cfg.router_seed) % logits_TE.shape[1]).unsqueeze(1)
    w_T1 = torch.full(idx_T1.shape, cfg.routed_scaling_factor, dtype=logits_TE.dtype, device=logits_TE.device)
    return Routing(idx_T1, w_T1, logits_TE, torch.softmax(logits_TE, dim=-1))


def route_random(logits_TE: Tensor, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """Random routing, the control of Roller et al. 2021 / Zuo et al. 2022 (THOR): top_k distinct experts from
    a fixed-seed hash of (flat token position, token id if given, expert), weights 1/k. Same inputs and
    seed -> same routing; independent of x and of the global RNG."""
    T, A = logits_TE.shape
    key_T = fixed_hash(torch.arange(T, device=logits_TE.device), cfg.router_seed)
    if ctx.token_ids_T is not None:
        key_T = fixed_hash(key_T ^ fixed_hash(ctx.token_ids_T.reshape(-1).to(key_T.device), cfg.router_seed + 1),
                           cfg.router_seed)
    score_TA = fixed_hash(key_T[:, None] * A + torch.arange(A, device=key_T.device), cfg.router_seed)
    idx_TK = torch.topk(score_TA, cfg.top_k, dim=-1).indices
    w_TK = torch.full(idx_TK.shape, cfg.routed_scaling_factor / cfg.top_k, dtype=logits_TE.dtype,
                      device=logits_TE.device)
    return Routing(idx_TK, w_TK, logits_TE, torch.softmax(logits_TE, dim=-1))


@torch.no_grad()
def sinkhorn_plan(logits_TE: Tensor, n_iters: int) -> Tensor:
    """S-BASE (Clark et al. 2022, arXiv 2202.01169, sec. 2.3): Sinkhorn approximation of the balanced linear
    assignment of BASE layers. Returns the log transport plan: rows sum to 1, columns to T/E."""
    T, E = logits_TE.shape
    log_P = logits_TE.float()
    for _ in range(n_iters):
        log_P = log_P - torch.logsumexp(log_P, dim=1, keepdim=True)
        log_P = log_P - torch.logsumexp(log_P, dim=0, keepdim=True) + math.log(T / E)
    return log_P


def route_base(logits_TE: Tensor, cfg: MoEConfig, ctx: RouteContext) -> Routing:
    """BASE layers (Lewis et al. 2021, arXiv 2103.16716) sec. 2 with the S-BASE Sinkhorn assignment: in
    training each token goes to argmax of the balanced plan, at inference greedy top-1; one expert per
    token (top_k is ignored), weight sigmoid(logit of the chosen expert)."""
    idx_T = logits_TE.argmax(-1)
    if ctx.training:
        rows_R = torch.arange(logits_TE.shape[0], device=logits_TE.device)
        if ctx.valid_T is not None:
            rows_R = rows_R[ctx.valid_T.reshape(-1)]
        if rows_R.numel() > 0:
            idx_T = idx_T.clone()
            idx_T[rows_R] = sinkhorn_plan(logits_TE[rows_R], cfg.sinkhorn_iters).argmax(-1)
    idx_T1 = idx_T.unsqueeze(1)
    w_T1 = torch.sigmoid(logits_TE.gather(1, idx_T1))
    return Routing(idx_T1, w_T1 * cfg.routed_scaling_factor, logits_TE, torch.softmax(logits_TE, dim=-1))


ROUTERS: dict[str, RouterFn] = {
    "topk": route_topk,
    "sigmoid_group": route_sigmoid_group,
    "expert_choice": route_expert_choice,
    "top_p": route_top_p,
    "relu": route_relu,
    "hash": route_hash,
    "random": route_random,
    "base": route_base,
    "adamoe": route_adamoe,  # AdaMoE (arXiv 2406.13233): top-k over E true + n_null null experts
    "moepp": route_topk,    # MoE++ (arXiv 2410.07348): top-k over E FFN + zero/copy/const experts
}
if tuple(ROUTERS) != ROUTER_NAMES:  # config validates names without importing this module
    raise ImportError(f"routers.ROUTERS {tuple(ROUTERS)} and config.ROUTER_NAMES {ROUTER_NAMES} must list the same "
                      f"routers in the same order")


def mask_routing(r: Routing, valid_T: Tensor | None) -> Routing:
    """Send padding tokens (valid_T False) to no expert, with zero weight."""
    if valid_T is None:
        return r
    keep_T1 = valid_T.reshape(-1, 1)
    return r._replace(expert_idx_TK=torch.where(keep_T1, r.expert_idx_TK, -1),
                      weight_TK=torch.where(keep_T1, r.weight_TK, 0.0))


def capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """GShard/Switch expert capacity: ceil(cf * T * K / E). The balance losses and the loss-free counter count the
    router's choice before these drops (as GShard/Switch compute f before the capacity mask)."""
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
