"""Routing-trace metrics: load, domain specialization, inter-layer affinity, local consistency, top tokens.

L=MoE layers, N=tokens, K=slots per token, E=routed experts, D=domains. Pure numpy on a `Trace`;
slots with expert -1 (dropped / padding) count for no expert. Each metric cites where it comes from.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.trace import Trace


def expert_counts(trace: Trace) -> np.ndarray:
    """Slots routed to each expert per layer -> counts_LE (float64)."""
    L, E = trace.n_layers, trace.n_experts
    counts_LE = np.zeros((L, E))
    for l in range(L):
        idx = trace.expert_idx_LNK[l].reshape(-1)
        counts_LE[l] = np.bincount(idx[idx >= 0], minlength=E)
    return counts_LE


def _pair_counts(a: np.ndarray, b: np.ndarray, n_a: int, n_b: int) -> np.ndarray:
    """Histogram of (a, b) pairs -> (n_a, n_b) float64 (bincount on a * n_b + b)."""
    flat = a.astype(np.int64) * n_b + b.astype(np.int64)
    return np.bincount(flat, minlength=n_a * n_b).astype(np.float64).reshape(n_a, n_b)


def max_vio(counts_LE: np.ndarray) -> np.ndarray:
    """MaxVio (Wang et al. 2024, arXiv 2408.15664, eq. 7): max_i load_i / mean load - 1, per layer."""
    mean_L = counts_LE.mean(-1)
    return np.where(mean_L > 0, counts_LE.max(-1) / np.maximum(mean_L, 1e-12) - 1.0, 0.0)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (Lin 1991, IEEE Trans. Inf. Theory 37(1) eq. 4.1) in bits, over the last axis."""
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    q = q / np.maximum(q.sum(-1, keepdims=True), 1e-300)
    m = 0.5 * (p + q)

    def kl(a, b):
        return np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0) / np.where(b > 0, b, 1.0)), 0.0).sum(-1)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@dataclass(frozen=True)
class Specialization:
    """Expert distribution per domain vs the global one."""
    dist_LDE: np.ndarray   # share of domain d's routed slots that go to expert e, per layer
    global_LE: np.ndarray  # share of all routed slots per expert
    js_LD: np.ndarray      # JS divergence (bits, 0..1) of each domain's distribution from the global one


def specialization(trace: Trace) -> Specialization:
    """Domain specialization as in Mixtral (arXiv 2401.04088 §5) and OLMoE (arXiv 2409.02060 §5): expert
    distribution per domain, scored by its Jensen-Shannon divergence from the global distribution."""
    L, E, D = trace.n_layers, trace.n_experts, len(trace.domains)
    counts_LDE = np.zeros((L, D, E))
    for l in range(L):
        idx_NK = trace.expert_idx_LNK[l]
        dom_NK = np.broadcast_to(trace.domain_N[:, None], idx_NK.shape)
        keep = idx_NK >= 0
        counts_LDE[l] = _pair_counts(dom_NK[keep], idx_NK[keep], D, E)
    global_LE = counts_LDE.sum(1)
    global_LE = global_LE / np.maximum(global_LE.sum(-1, keepdims=True), 1e-300)
    dist_LDE = counts_LDE / np.maximum(counts_LDE.sum(-1, keepdims=True), 1e-300)
    js_LD = js_divergence(dist_LDE, np.broadcast_to(global_LE[:, None, :], dist_LDE.shape))
    return Specialization(dist_LDE, global_LE, js_LD)


@dataclass(frozen=True)
class Affinity:
    """Inter-layer expert affinity for each consecutive layer pair (l, l+1)."""
    cond_PEE: np.ndarray   # P(expert j at layer l+1 | expert i at layer l), rows sum to 1 (0 for unused i)
    counts_PEE: np.ndarray  # tokens with expert i at l and j at l+1
    top_share_P: np.ndarray  # share of l -> l+1 traffic that goes to each expert's `top` most affine successors
    top: int                 # how many successors count as "top affine" (default K)


def affinity(trace: Trace, top: int | None = None) -> Affinity:
    """Inter-layer expert affinity (Yao et al. 2024, "Exploiting Inter-Layer Expert Affinity", arXiv 2401.08383
    §3): P(e_{l+1} = j | e_l = i) over tokens, and the traffic share kept by each expert's top-`top` successors."""
    L, E, K = trace.n_layers, trace.n_experts, trace.top_k
    top = K if top is None else top
    if not 1 <= top <= E:
        raise ValueError(f"affinity top={top} is invalid: allowed 1..n_experts={E}")
    P = max(L - 1, 0)
    counts = np.zeros((P, E, E))
    for l in range(P):
        a_NK, b_NK = trace.expert_idx_LNK[l], trace.expert_idx_LNK[l + 1]
        a = np.repeat(a_NK, b_NK.shape[1], axis=1).reshape(-1)
        b = np.tile(b_NK, (1, a_NK.shape[1])).reshape(-1)
        keep = (a >= 0) & (b >= 0)
        counts[l] = _pair_counts(a[keep], b[keep], E, E)
    rows = counts.sum(-1, keepdims=True)
    cond = counts / np.maximum(rows, 1e-300)
    kept = np.take_along_axis(counts, np.argsort(-counts, axis=-1, kind="stable")[..., :top], -1).sum((-1, -2))
    share = kept / np.maximum(counts.sum((-1, -2)), 1e-300)
    return Affinity(cond, counts, share, top)


def _same_seq_pairs(trace: Trace, d: int) -> np.ndarray:
    """Indices t such that tokens t and t+d are consecutive-by-d in the same sequence."""
    s, p = trace.seq_ids_N, trace.positions_N
    if d >= len(s):
        return np.zeros(0, dtype=np.int64)
    return np.nonzero((s[:-d] == s[d:]) & (p[d:] - p[:-d] == d))[0]


def reuse_curve(trace: Trace, max_dist: int = 16) -> np.ndarray:
    """Local routing consistency (Liang et al. 2025, arXiv 2505.16056 §1): the mean share of token t's K
    experts that token t+d of the same sequence also uses, per layer and distance d=1..max_dist -> (L, max_dist)."""
    L, K = trace.n_layers, trace.top_k
    out = np.full((L, max_dist), np.nan)
    for d in range(1, max_dist + 1):
        t = _same_seq_pairs(trace, d)
        if len(t) == 0:
            continue
        for l in range(L):
            a_TK, b_TK = trace.expert_idx_LNK[l][t], trace.expert_idx_LNK[l][t + d]
            shared = ((a_TK[:, :, None] == b_TK[:, None, :]) & (a_TK[:, :, None] >= 0)).any(-1).sum(-1)
            out[l, d - 1] = float(shared.mean()) / K
    return out


def segment_cache_hit_rate(trace: Trace, seg_len: int, cache_size: int) -> np.ndarray:
    """Segment cache best hit rate, SCH (Liang et al. 2025, arXiv 2505.16056 v1 §3.2): cut each sequence into
    segments of seg_len tokens; a cache holding the `cache_size` experts the segment uses most (best in hindsight)
    serves this share of the segment's expert activations -> per layer (L,)."""
    L, E = trace.n_layers, trace.n_experts
    if not 1 <= cache_size <= E:
        raise ValueError(f"cache_size={cache_size} is invalid: allowed 1..n_experts={E}")
    if seg_len < 1:
        raise ValueError(f"seg_len={seg_len} is invalid: allowed an integer >= 1")
    seg_N = trace.seq_ids_N.astype(np.int64) * (int(trace.positions_N.max(initial=0)) // seg_len + 1) \
        + trace.positions_N // seg_len
    _, seg_N = np.unique(seg_N, return_inverse=True)
    out = np.zeros(L)
    for l in range(L):
        idx_NK = trace.expert_idx_LNK[l]
        keep = idx_NK >= 0
        c_SE = _pair_counts(np.broadcast_to(seg_N[:, None], idx_NK.shape)[keep], idx_NK[keep],
                            int(seg_N.max(initial=-1)) + 1, E)
        hits = np.sort(c_SE, axis=-1)[:, ::-1][:, :cache_size].sum()
        out[l] = hits / max(c_SE.sum(), 1.0)
    return out


def top_tokens(trace: Trace, layer: int, n: int = 5) -> list[list[tuple[str, int, float]]]:
    """For each expert of `layer`: the n tokens routed to it most often, as (decoded text, count, share of that
    token's occurrences) — the token-level view of Mixtral (arXiv 2401.04088 §5) and OLMoE (arXiv 2409.02060 §5)."""
    if not 0 <= layer < trace.n_layers:
        raise ValueError(f"layer={layer} is invalid: allowed 0..{trace.n_layers - 1}")
    idx_NK = trace.expert_idx_LNK[layer]
    tok_N = trace.token_ids_N.astype(np.int64)
    uniq, inv = np.unique(tok_N, return_inverse=True)
    occ_U = np.bincount(inv, minlength=len(uniq))
    out = []
    for e in range(trace.n_experts):
        hit_N = (idx_NK == e).any(-1)
        c_U = np.bincount(inv[hit_N], minlength=len(uniq))
        order = np.argsort(-c_U, kind="stable")[:n]
        out.append([(trace.token_text(int(uniq[u])), int(c_U[u]), float(c_U[u] / occ_U[u]))
                    for u in order if c_U[u] > 0])
    return out


@dataclass(frozen=True)
class Summary:
    """Everything the report shows."""
    counts_LE: np.ndarray
    max_vio_L: np.ndarray
    spec: Specialization
    aff: Affinity
    reuse_LD: np.ndarray        # reuse_curve
    seg_lens: tuple[int, ...]   # segment lengths of sch_LS
    sch_LS: np.ndarray          # SCH per layer and segment length, cache = 2K experts (Liang et al.'s sweet spot)
    cache_size: int


def summarize(trace: Trace, max_dist: int = 16, seg_lens: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> Summary:
    """All metrics of this module for one trace."""
    counts = expert_counts(trace)
    cache = min(2 * trace.top_k, trace.n_experts)
    sch = np.stack([segment_cache_hit_rate(trace, m, cache) for m in seg_lens], axis=1)
    return Summary(counts, max_vio(counts), specialization(trace), affinity(trace), reuse_curve(trace, max_dist),
                   tuple(seg_lens), sch, cache)
