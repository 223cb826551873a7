"""Scoring expert placements on a routing trace: balancedness, device load, all-to-all rows, time, migration.

L=MoE layers, N=tokens, K=slots per token, E=experts, W=devices, P=layer pairs (L-1).
Replay rule (also the run-time rule): sequences are dealt to ranks the way the EP trainer slices a global batch
(rank r keeps sequences r*B..(r+1)*B-1 of each batch of W*B), so a token's home rank is where its row starts
and returns each layer (moelab.parallel's dispatcher). A row for expert e uses the copy on its home rank when
there is one; otherwise it picks among all c copies: copy (t * K + k + home) % c, t = the token's index on its
home rank in its batch, k its slot, so rows without a local copy spread evenly over the copies (EPLB's load
model, load / logcnt per copy, is this spread; local copies make the real split lean towards home ranks).
`replica_slot` is that rule; the EP dispatcher calls the same function.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from moelab.placement import Devices, Placement
from moelab.placement_ilp import IlpOptions, fit, max_load, stay_traffic
from moelab.trace import Trace


# ---------------------------------------------------------------------------- trace -> fitting inputs
def split_tokens(trace: Trace, fit_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Token indices (fit_N, score_N): the first `fit_fraction` of the sequences (in trace order) and the rest."""
    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction={fit_fraction!r} is invalid: allowed 0 < fit_fraction < 1")
    _, first = np.unique(trace.seq_ids_N, return_index=True)
    order = trace.seq_ids_N[np.sort(first)]
    if len(order) < 2:
        raise ValueError("trace has one sequence: fitting on one part and scoring on another needs >= 2")
    n_fit = min(max(round(len(order) * fit_fraction), 1), len(order) - 1)
    fit_mask = np.isin(trace.seq_ids_N, order[:n_fit])
    return np.nonzero(fit_mask)[0], np.nonzero(~fit_mask)[0]


def loads(idx_LNK: np.ndarray, n_experts: int) -> np.ndarray:
    """Rows per expert per layer -> loads_LE (float64); -1 slots count for nothing."""
    return np.stack([np.bincount(i[i >= 0], minlength=n_experts) for i in idx_LNK.reshape(len(idx_LNK), -1)]
                    ).astype(np.float64)


def transitions(idx_LNK: np.ndarray, n_experts: int) -> np.ndarray:
    """(P, E, E) T[l, i, j] = sum over tokens of [i among its layer-l experts][j among its layer-l+1 experts] / K:
    the rows a token-stays dispatch moves from i to j if the token sits at one of its K layer-l experts
    uniformly (ExFlow, arXiv 2401.08383 sec. 3 affinity counts, normalised to rows)."""
    L, _, K = idx_LNK.shape
    E = n_experts
    out = np.zeros((max(L - 1, 0), E, E))
    for l in range(L - 1):
        a = np.repeat(idx_LNK[l], K, axis=1).reshape(-1).astype(np.int64)
        b = np.tile(idx_LNK[l + 1], (1, K)).reshape(-1).astype(np.int64)
        keep = (a >= 0) & (b >= 0)
        out[l] = np.bincount(a[keep] * E + b[keep], minlength=E * E).reshape(E, E) / K
    return out


def home_ranks(seq_ids_N: np.ndarray, world_size: int, seqs_per_rank: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(home_N, local_N): each token's home rank (its sequence's slot in the EP trainer's global batch) and its
    index among its home rank's tokens of that batch."""
    _, first, inv = np.unique(seq_ids_N, return_index=True, return_inverse=True)
    rank_of_seq = np.argsort(np.argsort(first))          # order of first appearance
    s_N = rank_of_seq[inv]
    home_N = (s_N // seqs_per_rank) % world_size
    bucket_N = (s_N // (seqs_per_rank * world_size)) * world_size + home_N
    local_N = np.zeros(len(s_N), dtype=np.int64)
    order = np.argsort(bucket_N, kind="stable")
    b = bucket_N[order]
    start = np.r_[0, np.nonzero(np.diff(b))[0] + 1]
    pos = np.arange(len(b)) - np.repeat(start, np.diff(np.r_[start, len(b)]))
    local_N[order] = pos
    return home_N, local_N


def replica_table(p: Placement) -> tuple[np.ndarray, np.ndarray]:
    """(cand_WEC, n_WE): the physical slots a row from home device w may use for expert e (its copies on w when
    it has any, else all its copies; ascending slot order, -1 padded) and how many there are."""
    W, S, E = p.world_size, p.slots, p.n_experts
    log2phy, cnt = p.log2phy, p.logcnt
    cand = np.full((W, E, log2phy.shape[1]), -1, dtype=np.int64)
    n = np.zeros((W, E), dtype=np.int64)
    for w in range(W):
        for e in range(E):
            slots = log2phy[e, :cnt[e]]
            mine = slots[slots // S == w]
            use = mine if len(mine) else slots
            cand[w, e, :len(use)], n[w, e] = use, len(use)
    return cand, n


def replica_slot(p: Placement, idx_NK: np.ndarray, home_N: np.ndarray, local_N: np.ndarray,
                 table: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Physical slot serving each row (-1 for empty slots): the home device's copy of expert e if it holds one,
    else copy (local * K + k + home) % logcnt[e]; among several home copies, the same formula picks one.
    `table`: replica_table(p), precomputed by callers that apply the rule often (the EP dispatcher)."""
    K = idx_NK.shape[1]
    cand_WEC, n_WE = replica_table(p) if table is None else table
    e = np.where(idx_NK >= 0, idx_NK, 0).astype(np.int64)
    home = np.broadcast_to(np.asarray(home_N, dtype=np.int64)[:, None], e.shape)
    copy = (np.asarray(local_N, dtype=np.int64)[:, None] * K + np.arange(K)[None, :] + home) % n_WE[home, e]
    return np.where(idx_NK >= 0, cand_WEC[home, e, copy], -1)


def replica_device(p: Placement, idx_NK: np.ndarray, home_N: np.ndarray, local_N: np.ndarray) -> np.ndarray:
    """Device serving each row (-1 for empty slots): the device of `replica_slot`."""
    slot = replica_slot(p, idx_NK, home_N, local_N)
    return np.where(slot >= 0, slot // p.slots, -1)


# ---------------------------------------------------------------------------- network model
@dataclass(frozen=True)
class Network:
    """Alpha-beta link model (Hockney 1994, Parallel Computing 20(3)): time = latency + bytes / bandwidth."""
    alpha_intra_s: float = 5e-6      # latency of one message inside a node (NVLink-class)
    bw_intra: float = 150e9          # bytes/s per device inside a node
    alpha_inter_s: float = 10e-6     # latency of one message across nodes (RDMA-class)
    bw_inter: float = 25e9           # bytes/s per device across nodes (200 Gb/s NIC)


def a2a_seconds(rows_WW: np.ndarray, row_bytes: int, dev: Devices, net: Network) -> float:
    """One all-to-all: each device sends its messages one after another; time = slowest device's max of send and
    receive time, each message alpha + bytes / bandwidth of its link (intra or inter node). Self-sends are free."""
    W = dev.world_size
    node = np.array([dev.node_of(d) for d in range(W)])
    same = node[:, None] == node[None, :]
    cost = np.where(rows_WW > 0, np.where(same, net.alpha_intra_s, net.alpha_inter_s)
                    + rows_WW * row_bytes / np.where(same, net.bw_intra, net.bw_inter), 0.0)
    np.fill_diagonal(cost, 0.0)
    return float(max(cost.sum(1).max(), cost.sum(0).max()))


# ---------------------------------------------------------------------------- scores
@dataclass(frozen=True)
class Scores:
    """A placement replayed on trace tokens (per layer unless said otherwise)."""
    load_LW: np.ndarray           # rows served per device / its speed
    balancedness_L: np.ndarray    # mean / max of load_LW (vLLM / SGLang EPLB metric; 1 = perfect)
    max_over_mean_L: np.ndarray   # max / mean of load_LW
    off_home_L: np.ndarray        # rows the EP dispatcher sends off their home rank (and back)
    stay_cross_P: np.ndarray      # MODELLED rows a token-stays dispatch moves between layers l and l+1
    bytes_per_token: float        # dispatch + combine bytes per token, all layers, forward only
    a2a_s_L: np.ndarray           # alpha-beta estimate of dispatch + combine all-to-all time per layer
    n_tokens: int                 # tokens scored


def score(ps: list[Placement], idx_LNK: np.ndarray, seq_ids_N: np.ndarray, dev: Devices, *, row_bytes: int,
          net: Network = Network(), seqs_per_rank: int = 1) -> Scores:
    """Replay `ps` (one per layer) on the tokens of idx_LNK with home ranks and replica rule of this module."""
    L, N, K = idx_LNK.shape
    if len(ps) != L:
        raise ValueError(f"got {len(ps)} placements for a trace with {L} MoE layers: allowed exactly one per layer")
    W = dev.world_size
    home_N, local_N = home_ranks(seq_ids_N, W, seqs_per_rank)
    dev_LNK = np.stack([replica_device(p, idx_LNK[l], home_N, local_N) for l, p in enumerate(ps)])
    load_LW = np.zeros((L, W))
    off = np.zeros(L)
    a2a = np.zeros(L)
    home_NK = np.broadcast_to(home_N[:, None], (N, K))
    for l in range(L):
        d, h = dev_LNK[l], home_NK
        ok = d >= 0
        load_LW[l] = np.bincount(d[ok], minlength=W) / dev.speeds
        off[l] = float((ok & (d != h)).sum())
        rows_WW = np.bincount(h[ok] * W + d[ok], minlength=W * W).reshape(W, W)
        a2a[l] = 2 * a2a_seconds(rows_WW, row_bytes, dev, net)  # dispatch, then combine (the transpose)
    stay = np.zeros(max(L - 1, 0))
    for l in range(L - 1):
        a = np.repeat(dev_LNK[l], K, axis=1)
        b = np.tile(dev_LNK[l + 1], (1, K))
        stay[l] = float(((a >= 0) & (b >= 0) & (a != b)).sum()) / K
    mean, mx = load_LW.mean(1), load_LW.max(1)
    return Scores(load_LW, np.where(mx > 0, mean / np.maximum(mx, 1e-300), 1.0),
                  np.where(mean > 0, mx / np.maximum(mean, 1e-300), 1.0), off, stay,
                  float(2 * off.sum() * row_bytes / max(N, 1)), a2a, N)


def migration_bytes(old: list[Placement], new: list[Placement], expert_bytes: int) -> np.ndarray:
    """Expert weights copied per layer to go from `old` to `new`: copies a device holds in `new` beyond those it
    already holds in `old`, times the bytes of one expert."""
    return np.array([np.maximum(n.count_WE() - o.count_WE(), 0).sum() * expert_bytes for o, n in zip(old, new)],
                    dtype=np.float64)


# ---------------------------------------------------------------------------- every policy on one trace
@dataclass(frozen=True)
class PolicyRow:
    """One policy fitted on the fit part, scored on the held-out part."""
    method: str
    placements: list[Placement]
    scores: Scores            # held-out tokens
    fit_max_load: float       # objective (1) on the fit loads, summed max device load over layers
    fit_traffic: float        # objective (2) on the fit transitions (modelled rows)
    info: dict                # seconds, gap, bound, status (ilp)


def compare(trace: Trace, dev: Devices, methods: list[str], *, fit_fraction: float = 0.5, row_bytes: int | None = None,
            net: Network = Network(), opts: IlpOptions | None = None, seqs_per_rank: int = 1) -> list[PolicyRow]:
    """Fit every method on the first part of the trace, score it on the rest (loads drift)."""
    opts = opts or IlpOptions()
    dev.check(trace.n_experts)
    fit_N, score_N = split_tokens(trace, fit_fraction)
    idx = trace.expert_idx_LNK.astype(np.int64)
    E = trace.n_experts
    loads_LE, trans = loads(idx[:, fit_N], E), transitions(idx[:, fit_N], E)
    d_model = int(trace.meta.get("d_model", 0) or 0)
    row_bytes = row_bytes or 2 * max(d_model, 1)  # bf16 hidden state per row
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        ps, info = fit(m, loads_LE, trans, dev, opts)
        info = {**info, "wall_s": time.perf_counter() - t0}
        sc = score(ps, idx[:, score_N], trace.seq_ids_N[score_N], dev, row_bytes=row_bytes, net=net,
                   seqs_per_rank=seqs_per_rank)
        rows.append(PolicyRow(m, ps, sc, float(sum(max_load(p, loads_LE[l], dev) for l, p in enumerate(ps))),
                              float(stay_traffic(ps, trans).sum()), info))
    return rows
