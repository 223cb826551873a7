"""Compressing a trained moelab MoE: merge experts (MC-SMoE), prune them by usage, low-rank compress.

L=MoE layers, N=calibration tokens, E=routed experts, E2=experts kept, D=d_model, F=expert hidden,
G=fused gate|up width (2F for SwiGLU). Every function returns a new, smaller MoELM (a new MoEConfig
n_experts) that trains and evaluates like any other; the input model is left unchanged.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.balance import expert_counts
from moelab.model import MoELM
from moelab.moe import MoELayer

BY_MERGE = ("routing_similarity", "random")
BY_PRUNE = ("usage", "random")


# ---- the one place that names the expert weights ---------------------------------------------------------
def expert_weights(layer: MoELayer) -> tuple[Tensor, Tensor]:
    """(w_up_EDG gate|up fused, w_down_EFD) of a MoE layer's routed experts."""
    return layer.experts.weights.w_up_EDG, layer.experts.weights.w_down_EFD


def _expert_param_names() -> tuple[str, str]:
    return "experts.weights.w_up_EDG", "experts.weights.w_down_EFD"


class RoutingStats(NamedTuple):
    """Calibration statistics of one MoE layer."""
    usage_E: Tensor      # routed slots per expert over the calibration tokens
    logits_NE: Tensor    # router logits of the routed experts, one row per calibration token


@torch.no_grad()
def routing_stats(model: MoELM, batches: list, max_tokens: int = 8192) -> dict[int, RoutingStats]:
    """Per MoE layer (block index): expert usage and router logits over `batches` (moelab.data.Batch), eval
    mode, padding left out. Logits are kept for the first `max_tokens` real tokens."""
    was = model.training
    model.eval()
    E = model.cfg.moe.n_experts
    usage: dict[int, Tensor] = {}
    logits: dict[int, list[Tensor]] = {}
    kept = 0
    for b in batches:
        out = model(b.idx_BS, valid_BS=b.valid_BS)
        valid_T = b.valid_BS.reshape(-1)
        for i, r in out.moe.items():
            idx_TK = r.routing.expert_idx_TK[valid_T]
            usage[i] = usage.get(i, torch.zeros(E)) + expert_counts(expert_idx_TK=idx_TK, n_experts=E)
            if kept < max_tokens:
                logits.setdefault(i, []).append(r.routing.logits_TE[valid_T][:max_tokens - kept, :E].float())
        kept += int(valid_T.sum())
    model.train(was)
    return {i: RoutingStats(usage[i], torch.cat(logits[i])) for i in usage}


def stats_from_trace(trace, moe_layer_ids: list[int]) -> dict[int, RoutingStats]:
    """The same statistics from a moelab.trace.Trace (L traced MoE layers, in order; `moe_layer_ids` = their
    block indices, model.cfg.moe_layer_ids). Router outputs past the routed experts (special experts) are left
    out; a trace saved without logits gives usage only (logits_NE with 0 rows)."""
    if trace.n_layers != len(moe_layer_ids):
        raise ValueError(f"trace has {trace.n_layers} MoE layers, the model {len(moe_layer_ids)}")
    E = int(trace.meta.get("n_routed_experts", trace.n_experts))
    out = {}
    for j, i in enumerate(moe_layer_ids):
        idx_NK = torch.from_numpy(trace.expert_idx_LNK[j].astype(np.int64))
        idx_NK = torch.where(idx_NK < E, idx_NK, -1)
        lg = trace.logits_LNE[j, :, :E] if trace.logits_LNE is not None else np.zeros((0, E), np.float32)
        usage_E = expert_counts(expert_idx_TK=idx_NK, n_experts=E)
        out[i] = RoutingStats(usage_E, torch.from_numpy(lg.astype(np.float32)))
    return out


def routing_similarity(logits_NE: Tensor) -> Tensor:
    """MC-SMoE (Li et al. 2023, arXiv 2310.01334) sec. 3.1: similarity of experts i, j = cosine of their router
    logit columns over the calibration tokens (the 'router-logits' policy of the authors' code) -> (E, E)."""
    col_EN = F.normalize(logits_NE.t().float(), dim=-1)
    return col_EN @ col_EN.t()


def group_experts(usage_E: Tensor, sim_EE: Tensor, n_groups: int) -> list[list[int]]:
    """MC-SMoE sec. 3.1: the n_groups most used experts are the dominant ones; every other expert joins the
    group of its most similar dominant expert. Returns groups (dominant first), ordered by expert index."""
    E = usage_E.numel()
    order = torch.argsort(-usage_E.float(), stable=True)  # ties: lower index first
    dominant = sorted(order[:n_groups].tolist())
    groups = {d: [d] for d in dominant}
    for e in range(E):
        if e not in groups:
            best = max(dominant, key=lambda d: float(sim_EE[e, d]))
            groups[best].append(e)
    return [groups[d] for d in dominant]


def random_groups(n_experts: int, n_groups: int, seed: int = 0) -> list[list[int]]:
    """The control arm: n_groups random dominant experts, every other expert in a random group."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_experts, generator=g).tolist()
    dominant = sorted(perm[:n_groups])
    groups = {d: [d] for d in dominant}
    for e in perm[n_groups:]:
        groups[dominant[int(torch.randint(n_groups, (1,), generator=g))]].append(e)
    return [groups[d] for d in dominant]


def linear_assignment(cost_NN: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matching of a square matrix (Hungarian algorithm with potentials, O(n^3), inner
    loop vectorised): returns col_N with row i matched to column col_N[i]."""
    n = cost_NN.shape[0]
    INF = float("inf")
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    p = np.zeros(n + 1, dtype=np.int64)      # p[j] = row matched to column j (1-based, 0 = none)
    way = np.zeros(n + 1, dtype=np.int64)
    cost = np.zeros((n + 1, n + 1))
    cost[1:, 1:] = cost_NN
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = np.full(n + 1, INF)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0, 1:] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], INF)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = np.zeros(n, dtype=np.int64)
    for j in range(1, n + 1):
        col[p[j] - 1] = j - 1
    return col


def neuron_features(w_up_DG: Tensor, w_down_FD: Tensor) -> Tensor:
    """(F, 2D or 3D) one row per hidden neuron: its gate and up columns (SwiGLU) or up column, and down row."""
    Fh = w_down_FD.shape[0]
    cols = [w_up_DG[:, k * Fh:(k + 1) * Fh].t() for k in range(w_up_DG.shape[1] // Fh)]
    return torch.cat(cols + [w_down_FD], dim=1)


def align_expert(ref: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """MC-SMoE sec. 3.2 (weight matching, as the authors' code): permute `other`'s hidden neurons to best
    match `ref`'s (max sum of inner products of neuron_features) -> permuted (w_up_DG, w_down_FD); the
    expert computes the same function after the permutation."""
    w_up, w_down = other
    Fh = w_down.shape[0]
    score_FF = neuron_features(*ref).double() @ neuron_features(*other).double().t()
    perm = torch.from_numpy(linear_assignment(-score_FF.numpy()))   # ref neuron i <- other neuron perm[i]
    idx = torch.cat([perm + k * Fh for k in range(w_up.shape[1] // Fh)])
    return w_up[:, idx], w_down[perm]


def merge_group(w_up_EDG: Tensor, w_down_EFD: Tensor, group: list[int],
                usage_E: Tensor) -> tuple[Tensor, Tensor]:
    """MC-SMoE sec. 3.2: align every member to the group's first (dominant) expert, then average weighted by
    usage (uniform when the group saw no token)."""
    w_G = usage_E[group].double()
    w_G = w_G / w_G.sum() if w_G.sum() > 0 else torch.full_like(w_G, 1.0 / len(group))
    ref = (w_up_EDG[group[0]], w_down_EFD[group[0]])
    up, down = torch.zeros_like(ref[0], dtype=torch.float64), torch.zeros_like(ref[1], dtype=torch.float64)
    for k, e in enumerate(group):
        u, d = ref if k == 0 else align_expert(ref, (w_up_EDG[e], w_down_EFD[e]))
        up += w_G[k] * u.double()
        down += w_G[k] * d.double()
    return up.to(w_up_EDG.dtype), down.to(w_down_EFD.dtype)


def _rebuild(model: MoELM, n_experts: int, per_layer: dict[int, tuple[list[list[int]], Tensor]]) -> MoELM:
    """A new MoELM with n_experts per MoE layer: layer i's new expert g = merge of groups[g] (one-member groups
    = a plain copy, i.e. pruning); router rows and loss-free bias = the group's usage-weighted mean (the
    softmax over the remaining rows renormalises); special-expert rows kept."""
    cfg = model.cfg
    new_cfg = cfg.replace(moe=cfg.moe.replace(n_experts=n_experts))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    up_name, down_name = _expert_param_names()
    if cfg.moe.gating_residual:
        raise ValueError("compress: MoEConfig.gating_residual=True is not supported (its W_g mixes all routes)")
    for i, (groups, usage_E) in per_layer.items():
        layer = model.blocks[i].ffn
        w_up, w_down = expert_weights(layer)
        merged = [merge_group(w_up.detach(), w_down.detach(), g, usage_E) for g in groups]
        pre = f"blocks.{i}.ffn."
        sd[pre + up_name] = torch.stack([u for u, _ in merged])
        sd[pre + down_name] = torch.stack([d for _, d in merged])
        gate_ND = layer.gate.weight.detach()
        E = cfg.moe.n_experts
        rows = []
        for g in groups:
            w_G = usage_E[g].float()
            w_G = w_G / w_G.sum() if w_G.sum() > 0 else torch.full_like(w_G, 1.0 / len(g))
            rows.append((w_G[:, None] * gate_ND[g]).sum(0))
        sd[pre + "gate.weight"] = torch.cat([torch.stack(rows), gate_ND[E:]])
        if "loss_free" in layer.state:  # the selection bias follows its experts; the step's counts restart
            bias = layer.state["loss_free"].bias_E.detach()
            sd[pre + "state.loss_free.bias_E"] = torch.stack([bias[g].mean() for g in groups])
            sd[pre + "state.loss_free.load_E"] = torch.zeros(n_experts)
    new = MoELM(new_cfg)
    new.load_state_dict(sd)
    return new.train(model.training)


def _check_target(model: MoELM, n: int, what: str) -> None:
    m = model.cfg.moe
    if not (m.top_k <= n < m.n_experts) or m.n_experts % m.n_group or n % m.n_group:
        raise ValueError(f"--{what}-to={n} is invalid: allowed top_k={m.top_k} <= N < n_experts={m.n_experts}"
                         f"{f' and a multiple of n_group={m.n_group}' if m.n_group > 1 else ''}")


def merge_experts(model: MoELM, stats: dict[int, RoutingStats], n_experts: int, *,
                  by: str = "routing_similarity", seed: int = 0) -> tuple[MoELM, dict[int, list[list[int]]]]:
    """M-SMoE (arXiv 2310.01334 sec. 3): group by routing-policy similarity around the most used experts
    (by='random': random groups, the control), align and usage-weighted merge each group, router rows merged
    to match. Returns (new model, {layer: groups})."""
    if by not in BY_MERGE:
        raise ValueError(f"--by={by!r} is invalid for merging: allowed {', '.join(BY_MERGE)}")
    _check_target(model, n_experts, "merge")
    if by == "routing_similarity" and any(s.logits_NE.shape[0] == 0 for s in stats.values()):
        raise ValueError("merge --by routing_similarity needs router logits: the trace was saved without them")
    groups = {}
    for i, s in stats.items():
        groups[i] = (group_experts(s.usage_E, routing_similarity(s.logits_NE), n_experts) if by != "random"
                     else random_groups(s.usage_E.numel(), n_experts, seed + i))
    return _rebuild(model, n_experts, {i: (g, stats[i].usage_E) for i, g in groups.items()}), groups


def prune_experts(model: MoELM, stats: dict[int, RoutingStats], n_experts: int, *, by: str = "usage",
                  seed: int = 0) -> tuple[MoELM, dict[int, list[int]]]:
    """Usage-based expert pruning (the frequency-based baseline of MC-SMoE, arXiv 2310.01334 sec. 4): keep
    the n_experts most used experts of each layer (by='random': random ones), drop the
    others' router rows; the softmax over the kept rows renormalises. Returns (new model, {layer: kept})."""
    if by not in BY_PRUNE:
        raise ValueError(f"--by={by!r} is invalid for pruning: allowed {', '.join(BY_PRUNE)}")
    _check_target(model, n_experts, "prune")
    kept = {}
    for i, s in stats.items():
        if by == "usage":
            kept[i] = sorted(torch.argsort(-s.usage_E, stable=True)[:n_experts].tolist())
        else:
            g = torch.Generator().manual_seed(seed + i)
            kept[i] = sorted(torch.randperm(s.usage_E.numel(), generator=g)[:n_experts].tolist())
    per_layer = {i: ([[e] for e in k], stats[i].usage_E) for i, k in kept.items()}
    return _rebuild(model, n_experts, per_layer), kept


@torch.no_grad()
def low_rank_compress(model: MoELM, rank: int, sparsity: float = 0.0) -> tuple[MoELM, int]:
    """The 'compress' stage of MC-SMoE (sec. 3.3): each expert matrix W ~ U_r S_r V_r^T + S, S the largest-
    magnitude `sparsity` share of the residual. Deviation: one-shot truncated SVD + magnitude residual instead
    of the authors' iterative pruning during fine-tuning. The factors are multiplied back into the dense
    weights (same module, same shapes); returns (model copy, parameters the factored form stores)."""
    new = MoELM(model.cfg)
    new.load_state_dict(model.state_dict())
    stored = 0
    for m in new.modules():
        if isinstance(m, MoELayer):
            for w_EXY in expert_weights(m):
                for e in range(w_EXY.shape[0]):
                    approx, n = _low_rank_sparse(w_EXY[e].float(), rank, sparsity)
                    w_EXY[e].copy_(approx)
                    stored += n
    return new.train(model.training), stored


def _low_rank_sparse(w_XY: Tensor, rank: int, sparsity: float) -> tuple[Tensor, int]:
    U, S, Vh = torch.linalg.svd(w_XY, full_matrices=False)
    r = min(rank, S.numel())
    low = (U[:, :r] * S[:r]) @ Vh[:r]
    res = w_XY - low
    k = int(sparsity * res.numel())
    if k > 0:
        thr = res.abs().flatten().kthvalue(res.numel() - k).values
        low = low + torch.where(res.abs() > thr, res, 0.0)
    return low, r * (w_XY.shape[0] + w_XY.shape[1]) + k


def expert_param_total(model: nn.Module) -> int:
    """Routed-expert parameters of a model (what merging and pruning shrink)."""
    return sum(sum(w.numel() for w in expert_weights(m)) for m in model.modules() if isinstance(m, MoELayer))
