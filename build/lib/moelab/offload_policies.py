"""Expert-cache eviction policies and prefetchers for the offloading simulator (moelab.offload).

A cache key is `layer * E + expert`; a cache id is the layer (per-layer caches) or 0 (one global cache).
The engine (offload.replay) owns the resident sets; a policy only ranks victims and keeps its own bookkeeping.
Q=requests (one per decode/prefill step and MoE layer), L=MoE layers, E=routed experts, K=slots per token.
"""
from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict

import numpy as np

INF = float("inf")


class Eviction:
    """Base: `victim(c, candidates, q)` picks which resident key of cache c to drop before request q's fetch."""
    name = "base"
    admits = True  # False: never inserts (static pinning); misses stream through a transient buffer

    def reset(self, reqs, n_caches: int) -> None:
        self.E, self.L = reqs.n_experts, reqs.n_layers

    def on_hit(self, c: int, key: int, q: int) -> None: ...

    def on_insert(self, c: int, key: int, q: int, prefetch: bool = False) -> None: ...

    def on_evict(self, c: int, key: int) -> None: ...

    def victim(self, c: int, candidates: list[int], q: int) -> int:
        raise NotImplementedError

    def order_misses(self, miss: list[int], q: int) -> list[int]:
        """Order in which request q's misses are inserted (matters only when they overflow the cache)."""
        return miss


class LRU(Eviction):
    """Least recently used (mixtral-offloading's per-layer policy, Eliseev & Mazur 2023, arXiv 2312.17238 §3.1).
    A prefetched expert counts as used when it arrives."""
    name = "lru"

    def reset(self, reqs, n_caches):
        super().reset(reqs, n_caches)
        self.order = [OrderedDict() for _ in range(n_caches)]  # oldest first

    def on_hit(self, c, key, q):
        self.order[c].move_to_end(key)

    def on_insert(self, c, key, q, prefetch=False):
        self.order[c][key] = None

    def on_evict(self, c, key):
        del self.order[c][key]

    def victim(self, c, candidates, q):
        cand = set(candidates)
        return next(k for k in self.order[c] if k in cand)


class FIFO(LRU):
    """First in, first out: a hit does not refresh an expert."""
    name = "fifo"

    def on_hit(self, c, key, q):
        pass


class LFU(Eviction):
    """Least frequently used, counting every demand use since the start of the replay (counts survive eviction,
    so popular experts win back their slot); ties go to the least recently used."""
    name = "lfu"

    def reset(self, reqs, n_caches):
        super().reset(reqs, n_caches)
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def on_hit(self, c, key, q):
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = q

    def on_insert(self, c, key, q, prefetch=False):
        if not prefetch:
            self.on_hit(c, key, q)
        else:
            self.last[key] = q

    def victim(self, c, candidates, q):
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last.get(k, -1), k))


class LeastStale(Eviction):
    """Least-Stale, SpecMD (Hoang et al. 2026, arXiv 2602.03921, §4): keep the experts whose layer last
    used them ("least stale"), evict the one whose layer has visited most often since it was last used;
    ties go to the expert whose layer's next visit is furthest away in the layer-by-layer forward order.
    Only the abstract and summaries of the paper were readable here, so this is our reading of the rule, not
    the authors' code: staleness is counted in visits of the expert's own layer (not global time, which makes
    a global LRU evict the next layer's experts just before they are needed: the paper's collision misses).
    With per-layer caches it orders exactly like LRU."""
    name = "least-stale"

    def reset(self, reqs, n_caches):
        super().reset(reqs, n_caches)
        self.last_step: dict[int, int] = {}

    def on_hit(self, c, key, q):
        self.last_step[key] = q // self.L

    def on_insert(self, c, key, q, prefetch=False):
        if prefetch:  # a prefetched expert is for the next visit: fresh, not yet used
            self.last_step[key] = (q + 1) // self.L if (key // self.E) == (q + 1) % self.L else q // self.L
        else:
            self.on_hit(c, key, q)

    def victim(self, c, candidates, q):
        step, lc = divmod(q, self.L)

        def rank(k):
            l = k // self.E
            latest_visit = step if l <= lc else step - 1
            stale = latest_visit - self.last_step.get(k, -1)
            dist = (l - lc - 1) % self.L + 1  # requests until layer l is visited again (L for the current layer)
            return (-stale, -dist, k)
        return min(candidates, key=rank)


class Belady(Eviction):
    """Belady's MIN (Belady 1966, IBM Syst. J. 5(2)): evict the expert whose next use is furthest in the future,
    read from the trace itself. Optimal for demand fetching, so it bounds every eviction policy's hits."""
    name = "belady"

    def reset(self, reqs, n_caches):
        super().reset(reqs, n_caches)
        keys_X = reqs.key_X
        order = np.lexsort((reqs.q_X, keys_X))
        k_sorted, q_sorted = keys_X[order], reqs.q_X[order]
        cuts = np.flatnonzero(np.diff(k_sorted)) + 1
        self.uses = {int(ks[0]): qs.tolist() for ks, qs in zip(np.split(k_sorted, cuts), np.split(q_sorted, cuts))
                     if len(ks)}

    def _next(self, key, q):
        u = self.uses.get(key, ())
        i = bisect_right(u, q)
        return u[i] if i < len(u) else INF

    def victim(self, c, candidates, q):
        return max(candidates, key=lambda k: (self._next(k, q), k))

    def order_misses(self, miss, q):  # an overflowing prefill keeps the experts needed soonest
        return sorted(miss, key=lambda k: (self._next(k, q), k))


class Static(Eviction):
    """Static pinning: the cache holds the experts used most in the profiling part of the trace and never
    changes; other experts stream through a buffer of k slots carved out of the same cache (so a cache of C
    pins C - k per layer). What llama.cpp --n-cpu-moe / -ot users set by hand (there the others run on the
    CPU instead of being fetched)."""
    name = "static"
    admits = False

    def victim(self, c, candidates, q):  # never asked: admits=False
        raise AssertionError("static pinning never evicts")


EVICTIONS = {"lru": LRU, "lfu": LFU, "fifo": FIFO, "least-stale": LeastStale, "static": Static,
             "belady": Belady}


def static_pins(counts_LE: np.ndarray, n: int, scope: str) -> list[list[int]]:
    """Keys to pin: the n most used experts of each layer (scope 'layer'), or the n most used (layer, expert)
    pairs overall (scope 'global'); ties to the lower index."""
    L, E = counts_LE.shape
    if scope == "layer":
        return [[l * E + int(e) for e in np.argsort(-counts_LE[l], kind="stable")[:n]] for l in range(L)]
    return [[int(k) for k in np.argsort(-counts_LE.reshape(-1), kind="stable")[:n]]]


# ---- prefetchers: predict the keys of request q+1 while request q computes ----------------------------------

class Prefetcher:
    name = "none"

    def predict(self, reqs, q: int, keys_now: np.ndarray) -> np.ndarray | None:
        """Keys to fetch for request q + 1, issued while request q (keys_now) computes; None = nothing."""
        return None


class AffinityPrefetch(Prefetcher):
    """Inter-layer affinity: P(expert e' at layer l+1 | expert e at layer l), counted per token on a separate
    (fitting) part of the trace; the experts used at layer l vote, the top-|request| are fetched. In the
    spirit of MoE-Infinity's activation-aware prefetch (Xue et al. 2024, arXiv 2401.14361 §4)."""
    name = "affinity"

    def __init__(self, idx_LNK: np.ndarray, n_experts: int):
        L, _, _ = idx_LNK.shape
        E = n_experts
        self.P_LEE = np.zeros((max(L - 1, 0), E, E))
        for l in range(L - 1):
            a, b = idx_LNK[l], idx_LNK[l + 1]
            ok_a, ok_b = (a >= 0) & (a < E), (b >= 0) & (b < E)
            pairs = ok_a[:, :, None] & ok_b[:, None, :]
            ai = np.broadcast_to(a[:, :, None], pairs.shape)[pairs]
            bi = np.broadcast_to(b[:, None, :], pairs.shape)[pairs]
            np.add.at(self.P_LEE[l], (ai, bi), 1.0)
            self.P_LEE[l] /= np.maximum(self.P_LEE[l].sum(1, keepdims=True), 1.0)

    def predict(self, reqs, q, keys_now):
        l = q % reqs.n_layers
        if l == reqs.n_layers - 1 or len(keys_now) == 0:
            return None
        E = reqs.n_experts
        score_E = self.P_LEE[l][keys_now - l * E].sum(0)
        m = min(len(keys_now), int((score_E > 0).sum()))
        top = np.argsort(-score_E, kind="stable")[:m]
        return (l + 1) * E + top


class PregatePrefetch(Prefetcher):
    """Pre-gating: layer l+1's router applied to layer l's MoE input (recorded by offload.record_pregate), as
    Pre-gated MoE (Hwang et al. 2024, arXiv 2308.12066 §4) does with a trained pre-gate; here the model's own
    next-layer gate, untrained for this use."""
    name = "pregate"

    def __init__(self, pregate_LNK: np.ndarray):
        self.pregate_LNK = pregate_LNK

    def predict(self, reqs, q, keys_now):
        j, l = divmod(q, reqs.n_layers)
        if l == reqs.n_layers - 1:
            return None
        toks = reqs.tok_order_N[reqs.tok_ptr_J1[j]: reqs.tok_ptr_J1[j + 1]]
        e = self.pregate_LNK[l, toks].reshape(-1)
        e = np.unique(e[(e >= 0) & (e < reqs.n_experts)])
        return (l + 1) * reqs.n_experts + e


class PrevTokenPrefetch(Prefetcher):
    """The previous step's experts at the next layer (same sequence): fetched while the current layer computes."""
    name = "prev-token"

    def predict(self, reqs, q, keys_now):
        nxt, prev = q + 1, q + 1 - reqs.n_layers
        if prev < 0 or nxt >= reqs.n_requests:
            return None
        j_next, j_prev = nxt // reqs.n_layers, prev // reqs.n_layers
        if reqs.seq_J[j_next] != reqs.seq_J[j_prev]:
            return None
        return reqs.key_X[reqs.ptr_Q1[prev]: reqs.ptr_Q1[prev + 1]]


PREFETCHERS = ("affinity", "pregate", "prev-token")
