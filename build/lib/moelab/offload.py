"""Expert offloading simulator: replays a routing trace through expert caches and scores eviction policies and
prefetchers against Belady's optimum, with a link cost model for tokens/s.

Decode order: each sequence's tokens in position order, sequences one after another. The first `prompt_len`
positions of a sequence are one prefill step (the union of their experts per layer is needed at once); every
later token is one decode step. A step visits the MoE layers in order: one request per (step, layer).
Q=requests, J=steps, X=(request, expert) entries, N=traced tokens, L=MoE layers, E=routed experts, K=slots.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moelab.offload_policies import (
    EVICTIONS,
    PREFETCHERS,
    AffinityPrefetch,
    Prefetcher,
    PregatePrefetch,
    PrevTokenPrefetch,
    Static,
    static_pins,
)

SCOPES = ("layer", "global")
# Link presets: (bytes/s, seconds of latency per transfer). Effective, not peak, rates.
LINKS = {"pcie4": (25e9, 10e-6),   # PCIe 4.0 x16 host->GPU (32 GB/s peak, ~25 measured for pinned copies)
         "nvme": (6e9, 80e-6),     # PCIe 4.0 NVMe SSD sequential read, 4 KiB-aligned direct I/O
         "cpu": (20e9, 1e-6)}      # CPU<->CPU memory (DRAM memcpy across NUMA nodes / from a page cache)


@dataclass(frozen=True)
class CostModel:
    """Time of one request = overhead + (experts used * expert_bytes) / device_Bps + stall. A stall is
    latency + misses * expert_bytes / link_Bps for a demand fetch, plus whatever part of the prefetch issued
    during the previous request did not finish within that request's compute. Memory-bound: a step reads each
    of its experts' weights once, however many tokens it holds."""
    expert_bytes: int = 3 * 2048 * 1024 * 2  # one expert's weights (default OLMoE-1B-7B SwiGLU expert, bf16)
    link_Bps: float = LINKS["pcie4"][0]       # slow -> fast memory bandwidth, bytes/s
    latency_s: float = LINKS["pcie4"][1]      # per transfer (one per request's demand batch / prefetch batch)
    device_Bps: float = 3.0e12                # fast memory bandwidth while computing on resident experts
    overhead_s: float = 100e-6                # non-expert work per layer and step (attention, router, launches)

    @classmethod
    def for_link(cls, link: str, **changes) -> CostModel:
        if link not in LINKS:
            raise ValueError(f"--link={link!r} is unknown: allowed {', '.join(LINKS)}")
        bw, lat = LINKS[link]
        return cls(**{"link_Bps": bw, "latency_s": lat, **{k: v for k, v in changes.items() if v is not None}})


@dataclass(frozen=True)
class Requests:
    """A trace flattened into requests in decode order."""
    n_layers: int              # L
    n_experts: int             # E routed experts (trace indices >= E are special experts: never fetched)
    key_X: np.ndarray          # int64 layer * E + expert, sorted by request then expert (unique per request)
    q_X: np.ndarray            # int64 request of each entry
    ptr_Q1: np.ndarray         # int64 entries of request q are key_X[ptr_Q1[q]: ptr_Q1[q + 1]]
    phase_J: np.ndarray        # int8 0 = prefill step, 1 = decode step
    ntok_J: np.ndarray         # int64 tokens in each step
    seq_J: np.ndarray          # int64 sequence id of each step
    tok_order_N: np.ndarray    # int64 trace token indices in step order
    tok_ptr_J1: np.ndarray     # int64 tokens of step j are tok_order_N[tok_ptr_J1[j]: tok_ptr_J1[j + 1]]

    @property
    def n_requests(self) -> int:
        return len(self.ptr_Q1) - 1

    @property
    def n_steps(self) -> int:
        return len(self.phase_J)

    def keys(self, q: int) -> np.ndarray:
        return self.key_X[self.ptr_Q1[q]: self.ptr_Q1[q + 1]]

    @staticmethod
    def from_lists(reqs: list[list[int]], n_experts: int, n_layers: int = 1) -> Requests:
        """Hand-made requests (tests): request q is layer q % n_layers of decode step q // n_layers; keys given
        as layer * n_experts + expert."""
        if len(reqs) % n_layers:
            raise ValueError(f"{len(reqs)} requests is not a multiple of n_layers={n_layers}")
        J = len(reqs) // n_layers
        keys = [sorted({int(k) for k in r}) for r in reqs]
        return Requests(n_layers, n_experts, np.array([k for r in keys for k in r], dtype=np.int64),
                        np.repeat(np.arange(len(keys)), [len(r) for r in keys]).astype(np.int64),
                        np.r_[0, np.cumsum([len(r) for r in keys])].astype(np.int64), np.ones(J, np.int8),
                        np.ones(J, np.int64), np.zeros(J, np.int64), np.arange(J, dtype=np.int64),
                        np.arange(J + 1, dtype=np.int64))


def build_requests(idx_LNK: np.ndarray, seq_N: np.ndarray, pos_N: np.ndarray, n_experts: int,
                   prompt_len: int) -> Requests:
    """Requests in decode order (see module docstring); experts outside 0..n_experts-1 are not fetched."""
    if prompt_len < 0:
        raise ValueError(f"--prompt-len={prompt_len} is invalid: allowed an integer >= 0")
    L, N, _ = idx_LNK.shape
    order_N = np.lexsort((pos_N, seq_N))
    seq_o = seq_N[order_N]
    starts = np.r_[0, np.flatnonzero(np.diff(seq_o)) + 1]
    rank_N = np.arange(N) - np.repeat(starts, np.diff(np.r_[starts, N]))
    new_step = (rank_N == 0) | (rank_N >= prompt_len)
    step_N = np.cumsum(new_step) - 1
    first_J = np.flatnonzero(new_step)
    J = len(first_J)
    e_LNK = idx_LNK[:, order_N].astype(np.int64)
    ok = (e_LNK >= 0) & (e_LNK < n_experts)
    l_LNK = np.broadcast_to(np.arange(L)[:, None, None], e_LNK.shape)
    q = step_N[None, :, None] * L + l_LNK
    code = np.unique((q * (L * n_experts) + l_LNK * n_experts + e_LNK)[ok])
    q_X, key_X = code // (L * n_experts), code % (L * n_experts)
    return Requests(L, n_experts, key_X, q_X, np.searchsorted(q_X, np.arange(J * L + 1)),
                    (rank_N[first_J] >= prompt_len).astype(np.int8), np.diff(np.r_[first_J, N]),
                    seq_o[first_J].astype(np.int64), order_N.astype(np.int64), np.r_[first_J, N].astype(np.int64))


@dataclass(frozen=True)
class ReplayCounts:
    """Per-request outcome of one replay (timing is applied afterwards, so one replay serves any cost model)."""
    hit_Q: np.ndarray          # demand uses found resident
    miss_Q: np.ndarray         # demand fetches (stalls)
    prefetch_Q: np.ndarray     # experts prefetched while request q computed, for request q + 1
    prefetch_used: int         # prefetched experts hit before eviction
    prefetch_wasted: int       # prefetched experts evicted (or left at the end) unused


def replay(reqs: Requests, capacity: int, policy, *, scope: str = "layer", prefetcher: Prefetcher | None = None,
           initial: list[list[int]] | None = None) -> ReplayCounts:
    """Replay every request through the caches. `capacity` = experts per cache (per layer, or all layers for
    scope='global'); `initial` = keys resident at the start, per cache. A request's experts are pinned while
    it runs; when they alone exceed the cache (a long prefill) the rest stream through without being kept."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is invalid: allowed {', '.join(SCOPES)}")
    L = reqs.n_layers
    n_caches = L if scope == "layer" else 1
    policy.reset(reqs, n_caches)
    res = [set() for _ in range(n_caches)]
    pend = [set() for _ in range(n_caches)]  # prefetched, not yet used
    for c, keys in enumerate(initial or []):
        for k in keys[:capacity]:
            res[c].add(k)
            policy.on_insert(c, k, -1, prefetch=True)
    Q = reqs.n_requests
    hit_Q, miss_Q, pf_Q = np.zeros(Q, np.int64), np.zeros(Q, np.int64), np.zeros(Q, np.int64)
    used = wasted = 0
    key_X, ptr = reqs.key_X.tolist(), reqs.ptr_Q1.tolist()

    def evict_for(c, protected, q):
        nonlocal wasted
        cands = [x for x in res[c] if x not in protected]
        if not cands:
            return False
        v = policy.victim(c, cands, q)
        res[c].remove(v)
        policy.on_evict(c, v)
        if v in pend[c]:
            pend[c].remove(v)
            wasted += 1
        return True

    for q in range(Q):
        c = q % L if scope == "layer" else 0
        keys = key_X[ptr[q]: ptr[q + 1]]
        S, P = res[c], pend[c]
        miss = []
        for k in keys:
            if k in S:
                policy.on_hit(c, k, q)
                if k in P:
                    P.remove(k)
                    used += 1
            else:
                miss.append(k)
        hit_Q[q], miss_Q[q] = len(keys) - len(miss), len(miss)
        if policy.admits and miss:
            protected = set(keys)
            for k in policy.order_misses(miss, q):
                if len(S) >= capacity and not evict_for(c, protected, q):
                    break  # the request alone fills the cache: the remaining misses stream through
                S.add(k)
                policy.on_insert(c, k, q)
        if prefetcher is not None and policy.admits and q + 1 < Q:
            pred = prefetcher.predict(reqs, q, np.asarray(keys, dtype=np.int64))
            if pred is not None and len(pred):
                c2 = (q + 1) % L if scope == "layer" else 0
                pred = [int(k) for k in pred][:capacity]
                protected = set(pred) | (set(keys) if c2 == c else set())
                for k in pred:
                    if k in res[c2]:
                        continue
                    if len(res[c2]) >= capacity and not evict_for(c2, protected, q):
                        break
                    res[c2].add(k)
                    pend[c2].add(k)
                    policy.on_insert(c2, k, q, prefetch=True)
                    pf_Q[q] += 1
    return ReplayCounts(hit_Q, miss_Q, pf_Q, used, wasted + sum(len(p) for p in pend))


def timing(reqs: Requests, rc: ReplayCounts, cost: CostModel) -> dict:
    """Seconds per phase under `cost` (see CostModel), and the same with every expert resident."""
    B = cost.expert_bytes
    compute_Q = cost.overhead_s + (rc.hit_Q + rc.miss_Q) * B / cost.device_Bps
    demand_Q = (rc.miss_Q > 0) * (cost.latency_s + rc.miss_Q * B / cost.link_Bps)
    pf_Q = (rc.prefetch_Q > 0) * (cost.latency_s + rc.prefetch_Q * B / cost.link_Bps)
    late_Q = np.r_[0.0, np.maximum(pf_Q - compute_Q, 0.0)[:-1]]  # prefetch not hidden by the previous request
    phase_Q = np.repeat(reqs.phase_J, reqs.n_layers)
    out = {}
    for name, ph in (("prefill", 0), ("decode", 1)):
        m = phase_Q == ph
        out[f"{name}_s"] = float((compute_Q + demand_Q + late_Q)[m].sum())
        out[f"{name}_resident_s"] = float(compute_Q[m].sum())
    return out


# ---- the sweep ------------------------------------------------------------------------------------------------

def parse_policy(spec: str, base: str) -> tuple[str, str | None]:
    """'lru' -> ('lru', None); 'affinity' -> (base, 'affinity'); 'lfu+prev-token' -> ('lfu', 'prev-token')."""
    ev, _, pf = spec.partition("+")
    if ev in PREFETCHERS and not pf:
        ev, pf = base, ev
    if ev not in EVICTIONS or (pf and pf not in PREFETCHERS):
        raise ValueError(f"--policy {spec!r} is unknown: allowed {', '.join(EVICTIONS)}, {', '.join(PREFETCHERS)} "
                         f"(on --prefetch-base), EVICTION+PREFETCHER, or all")
    if ev == "static" and pf:
        raise ValueError(f"--policy {spec!r} is invalid: static pinning never changes, a prefetcher needs a "
                         f"policy that admits experts")
    return ev, pf or None


def expand_policies(specs: list[str], base: str, have_pregate: bool) -> list[str]:
    out = []
    for s in specs:
        if s == "all":
            out += list(EVICTIONS) + [f"{base}+{p}" for p in PREFETCHERS if p != "pregate" or have_pregate]
        else:
            ev, pf = parse_policy(s, base)
            out.append(f"{ev}+{pf}" if pf else ev)
    return list(dict.fromkeys(out))


def parse_caches(text: str, n_layers: int, expert_bytes: int) -> list[int]:
    """'2,4,8' -> experts per layer; '64MB,1GiB' -> bytes of all caches together, converted to experts per layer."""
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "KB": 1e3, "MB": 1e6, "GB": 1e9, "B": 1}
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        up = item.upper()
        unit = next((u for u in units if up.endswith(u)), None)
        try:
            val = int(item) if unit is None else int(float(up[: -len(unit)]) * units[unit]) // expert_bytes // n_layers
        except ValueError:
            raise ValueError(f"--cache item {item!r} is invalid: allowed experts per layer (8) or bytes (512MB, 2GiB)")
        out.append(val)
    if not out:
        raise ValueError("--cache is empty: allowed a comma list of experts per layer or byte sizes")
    return out


def simulate(trace, *, caches: list[int], policies: list[str], scope: str = "layer", prompt_len: int = 16,
             fit_fraction: float = 0.25, base: str = "lru", pregate_LNK: np.ndarray | None = None,
             costs: dict[str, CostModel] | None = None) -> dict:
    """Every policy at every cache size (experts per layer; a global cache holds cache * L). The first
    fit_fraction of sequences profiles static pinning, fits the affinity prefetcher and picks the experts every
    cache starts with; all numbers come from the remaining sequences. Belady is added whenever an eviction
    policy is asked for (its ratio column needs it). -> {"meta": ..., "rows": [...]}."""
    n_routed = int(trace.meta.get("n_routed_experts", trace.n_experts))
    seqs = np.unique(trace.seq_ids_N)
    n_fit = round(fit_fraction * len(seqs))
    if not 0 <= fit_fraction < 1 or n_fit >= len(seqs):
        raise ValueError(f"--fit-fraction={fit_fraction} leaves no sequence to score ({len(seqs)} in the trace): "
                         f"allowed 0 <= f < 1 with at least one sequence left")
    fit_N = np.isin(trace.seq_ids_N, seqs[:n_fit])
    ev_N = ~fit_N
    idx = trace.expert_idx_LNK
    reqs = build_requests(idx[:, ev_N], trace.seq_ids_N[ev_N], trace.positions_N[ev_N], n_routed, prompt_len)
    need = max((np.diff(reqs.ptr_Q1).reshape(-1, reqs.n_layers)[reqs.phase_J == 1]).max(initial=0), 1)
    for c in caches:
        if c < need:
            raise ValueError(f"--cache={c} experts per layer is invalid: a cache must hold the {need} experts one "
                             f"token needs in a layer: allowed >= {need}")
    fit_idx = idx[:, fit_N]
    counts_LE = np.zeros((trace.n_layers, n_routed))
    for l in range(trace.n_layers):
        e = fit_idx[l].reshape(-1)
        counts_LE[l] = np.bincount(e[(e >= 0) & (e < n_routed)], minlength=n_routed)[:n_routed]
    policies = expand_policies(policies, base, pregate_LNK is not None)
    if "belady" not in policies and any("+" not in p for p in policies):
        policies.append("belady")  # the bound every eviction policy is reported against
    if n_fit == 0 and any(p == "static" or "affinity" in p for p in policies):
        raise ValueError("--fit-fraction=0 leaves nothing to profile: static and affinity need a fitting part > 0")
    costs = costs or {"pcie4": CostModel()}
    rows = []
    for cap in caches:
        cap_c = cap if scope == "layer" else cap * trace.n_layers
        warm = static_pins(counts_LE, cap_c, scope)  # every cache starts with the profiled favourites
        everything = cap >= n_routed  # the whole model fits: nothing to stream
        pinned = static_pins(counts_LE, cap_c if everything else cap_c - need, scope)  # else keep `need` slots
        for spec in policies:
            ev, pf = parse_policy(spec, base)
            policy = Static() if ev == "static" else EVICTIONS[ev]()
            pre = None
            if pf == "affinity":
                pre = AffinityPrefetch(fit_idx, n_routed)
            elif pf == "pregate":
                if pregate_LNK is None:
                    raise ValueError(f"--policy {spec!r} needs --pregate FILE (moelab offload pregate)")
                pre = PregatePrefetch(pregate_LNK[:, ev_N])
            elif pf == "prev-token":
                pre = PrevTokenPrefetch()
            rc = replay(reqs, cap_c, policy, scope=scope, prefetcher=pre, initial=pinned if ev == "static" else warm)
            rows.append(_row(reqs, rc, spec, pf, cap, costs))
    for r in rows:  # hit rate / Belady's at the same cache size (eviction policies only: prefetch can beat it)
        bel = next(b for b in rows if b["policy"] == "belady" and b["cache"] == r["cache"]) \
            if any(b["policy"] == "belady" for b in rows) else None
        for ph in ("decode", "prefill"):
            ok = bel is not None and not r["prefetcher"] and bel[f"{ph}_hit_rate"]
            r[f"{ph}_vs_belady"] = r[f"{ph}_hit_rate"] / bel[f"{ph}_hit_rate"] if ok else None
    k = int(trace.meta.get("top_k", trace.top_k))
    meta = {"scope": scope, "prompt_len": prompt_len, "fit_fraction": fit_fraction, "fit_sequences": n_fit,
            "eval_sequences": int(len(seqs) - n_fit), "decode_tokens": int(reqs.ntok_J[reqs.phase_J == 1].sum()),
            "prefill_tokens": int(reqs.ntok_J[reqs.phase_J == 0].sum()), "n_layers": trace.n_layers,
            "n_experts": n_routed, "top_k": k, "caches": caches, "policies": policies, "base": base,
            "costs": {n: c.__dict__ for n, c in costs.items()}}
    return {"meta": meta, "rows": rows}


def _row(reqs: Requests, rc: ReplayCounts, spec: str, pf: str | None, cap: int, costs: dict) -> dict:
    phase_Q = np.repeat(reqs.phase_J, reqs.n_layers)
    r = {"policy": spec, "prefetcher": pf, "cache": cap}
    for name, ph in (("prefill", 0), ("decode", 1)):
        m = phase_Q == ph
        acc = int((rc.hit_Q + rc.miss_Q)[m].sum())
        ntok = int(reqs.ntok_J[reqs.phase_J == ph].sum())
        r[f"{name}_accesses"] = acc
        r[f"{name}_hits"] = int(rc.hit_Q[m].sum())
        r[f"{name}_hit_rate"] = r[f"{name}_hits"] / acc if acc else None
        r[f"{name}_misses_per_token"] = int(rc.miss_Q[m].sum()) / ntok if ntok else None
        r[f"{name}_fetched_experts"] = int((rc.miss_Q + rc.prefetch_Q)[m].sum())
    r["prefetched"] = int(rc.prefetch_Q.sum())
    r["prefetch_used"], r["prefetch_wasted"] = rc.prefetch_used, rc.prefetch_wasted
    for link, cost in costs.items():
        t = timing(reqs, rc, cost)
        r[f"{link}_fetched_GB"] = int((rc.miss_Q + rc.prefetch_Q).sum()) * cost.expert_bytes / 1e9
        for name, ph in (("prefill", 0), ("decode", 1)):
            ntok = int(reqs.ntok_J[reqs.phase_J == ph].sum())
            r[f"{link}_{name}_tok_s"] = ntok / t[f"{name}_s"] if t[f"{name}_s"] else None
            r[f"{link}_{name}_resident_tok_s"] = ntok / t[f"{name}_resident_s"] if t[f"{name}_resident_s"] else None
    return r


# ---- pre-gating recorder -------------------------------------------------------------------------------------

def record_pregate(model, trace, *, batch_size: int = 8) -> np.ndarray:
    """-> pregate_LNK: for each moelab MoE layer l < L-1, the top-k experts layer l+1's router gate picks from
    layer l's MoE input (Pre-gated MoE, Hwang et al. 2024, arXiv 2308.12066 §4, with the model's own gate
    instead of a trained pre-gate: softmax(x W_{l+1})'s top k, no bias / groups / special experts); row L-1
    is -1. Re-runs the trace's token windows (sequences must all hold the same number of tokens)."""
    import torch

    from moelab.moe import moe_layers  # the one place this file reaches into the model
    layers = moe_layers(model)
    if len(layers) != trace.n_layers:
        raise ValueError(f"trace has {trace.n_layers} MoE layers, the model has {len(layers)}")
    seqs, inv = np.unique(trace.seq_ids_N, return_inverse=True)
    lens = np.bincount(inv)
    if lens.min() != lens.max():
        raise ValueError("trace sequences differ in length: record_pregate needs equal-length windows")
    order = np.lexsort((trace.positions_N, inv)).reshape(len(seqs), lens[0])  # trace index of (seq, position)
    ids_BS = torch.as_tensor(trace.token_ids_N[order].astype(np.int64))
    K = trace.top_k
    out_LNK = np.full((trace.n_layers, trace.n_tokens, K), -1, np.int16)
    captured: list = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw=None: captured.append(args[0].detach()))
             for m in layers]
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(seqs), batch_size):
                captured.clear()
                model(ids_BS[b: b + batch_size])
                rows = order[b: b + batch_size].reshape(-1)
                for l in range(len(layers) - 1):
                    nxt = layers[l + 1]
                    x_TD = captured[l].reshape(-1, captured[l].shape[-1]).float()
                    logits_TE = x_TD @ nxt.gate.weight.float().T
                    k = min(nxt.cfg.top_k, K, logits_TE.shape[1])
                    out_LNK[l, rows, :k] = logits_TE.topk(k, dim=-1).indices.numpy()
    finally:
        for h in hooks:
            h.remove()
    return out_LNK


def save_pregate(path: str | Path, pregate_LNK: np.ndarray, trace_path: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, pregate_LNK=pregate_LNK.astype(np.int16), trace=np.array(str(trace_path)))
    return path


def load_pregate(path: str | Path, trace) -> np.ndarray:
    """Read a pre-gate file and check it matches `trace` (layers, tokens)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--pregate file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as z:
        if "pregate_LNK" not in z.files:
            raise ValueError(f"--pregate file {str(path)!r} lacks pregate_LNK: write it with moelab offload pregate")
        p = z["pregate_LNK"]
    if p.shape[:2] != trace.expert_idx_LNK.shape[:2]:
        raise ValueError(f"--pregate file {str(path)!r} has shape {p.shape}: the trace needs "
                         f"({trace.n_layers}, {trace.n_tokens}, k)")
    return p


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path
