"""Real expert offloading: expert weights stay in the safetensors file (memory-mapped by safe_open) and each MoE
layer keeps at most `capacity` of them materialised, chosen by the simulator's eviction policies
(moelab.offload_policies), optionally prefetched ahead on a background thread.

`OffloadedExperts` is a non-resident expert-weights provider (see moelab/experts.py): RoutedExperts asks it
expert by expert, only for experts that got rows. Its path (`_OffloadPath`) tells the store which experts a
call needs before they are read, so a call is one cache request exactly as moelab.offload.replay counts it:
hits first, then the misses inserted (evicting by the policy, never an expert of the same request); misses
that do not fit (a prefill wider than the cache) stream through without being kept.
E=routed experts, D=d_model, F=expert hidden, G=fused gate|up width, R=dispatched rows, L=MoE layers.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from moelab.expert_kernels import ExpertTensors, activate
from moelab.experts import Experts, ExpertsPath, WrappedPath
from moelab.offload_policies import EVICTIONS

ONLINE = ("lru", "lfu", "fifo", "least-stale")  # eviction policies usable without the future (not belady/static)
PREFETCHERS = ("pregate",)                       # predictors a real run can compute (no profiling pass)


def parse_offload_policy(spec: str) -> tuple[str, str | None]:
    """'lru' -> ('lru', None); 'lfu+pregate' -> ('lfu', 'pregate'); 'prefetch' = 'pregate' = 'lru+pregate'.
    least_stale is accepted for least-stale."""
    s = spec.strip().lower().replace("_", "-")
    if s in ("prefetch", *PREFETCHERS):
        return "lru", "pregate"
    ev, _, pf = s.partition("+")
    if ev not in ONLINE or (pf and pf not in PREFETCHERS):
        raise ValueError(f"--policy {spec!r} is unknown: allowed {', '.join(ONLINE)}, prefetch (= lru+pregate), "
                         f"or EVICTION+pregate")
    return ev, pf or None


@dataclass
class OffloadStats:
    """Counts of one store, per request (one MoE layer call) in call order, as moelab.offload.ReplayCounts."""
    hit_Q: list[int] = field(default_factory=list)       # experts found resident
    miss_Q: list[int] = field(default_factory=list)      # experts fetched on demand (kept or streamed)
    prefetch_Q: list[int] = field(default_factory=list)  # experts prefetched during request q for request q + 1
    tokens_Q: list[int] = field(default_factory=list)    # tokens of the call
    prefetch_used: int = 0     # prefetched experts hit before eviction
    prefetch_waits: int = 0    # demand uses that waited for a prefetch still in flight
    streamed: int = 0          # misses read but not kept (the request alone overflowed the cache)
    peak_resident: int = 0     # most experts materialised at once (all layers)

    def summary(self, expert_bytes: int) -> dict:
        """Totals, and decode (single-token calls) and prefill (the rest) hit rates."""
        out = {"requests": len(self.hit_Q), "hits": sum(self.hit_Q), "misses": sum(self.miss_Q),
               "prefetched": sum(self.prefetch_Q), "prefetch_used": self.prefetch_used,
               "prefetch_waits": self.prefetch_waits, "streamed": self.streamed,
               "peak_resident_experts": self.peak_resident, "peak_resident_bytes": self.peak_resident * expert_bytes,
               "fetched_bytes": (sum(self.miss_Q) + sum(self.prefetch_Q)) * expert_bytes}
        for name, pick in (("decode", lambda t: t == 1), ("prefill", lambda t: t != 1)):
            h = sum(x for x, t in zip(self.hit_Q, self.tokens_Q) if pick(t))
            m = sum(x for x, t in zip(self.miss_Q, self.tokens_Q) if pick(t))
            out[f"{name}_hit_rate"] = h / (h + m) if h + m else None
        out["hit_rate"] = out["hits"] / (out["hits"] + out["misses"]) if out["hits"] + out["misses"] else None
        return out


class SafetensorsExperts:
    """One layer's experts in a safetensors file, as moelab stores them: 3-D (E, D, G) / (E, F, D) tensors,
    read one expert at a time by slicing. safe_open memory-maps the file and a slice is a view of the mapping;
    read() copies it into ordinary (anonymous) memory: that copy is what the cache holds and counts."""

    def __init__(self, path: str | Path, up_key: str, down_key: str):
        from safetensors import safe_open
        self.path, self.up_key, self.down_key = str(path), up_key, down_key
        self._local = threading.local()  # one handle per thread (the prefetcher reads beside the main thread)
        with safe_open(self.path, "pt") as f:
            names = set(f.keys())
            if up_key not in names or down_key not in names:
                raise ValueError(f"weights file {self.path!r} lacks {up_key!r} / {down_key!r}: not this model's")
            self.n_experts = f.get_slice(up_key).get_shape()[0]
        self.expert_bytes = sum(t.numel() * t.element_size() for t in self.read(0) if t is not None)

    def _handle(self):
        from safetensors import safe_open
        h = getattr(self._local, "f", None)
        if h is None:
            h = self._local.f = safe_open(self.path, "pt")
        return h

    def read(self, e: int) -> ExpertTensors:
        f = self._handle()
        return ExpertTensors(f.get_slice(self.up_key)[e:e + 1][0].clone(),
                             f.get_slice(self.down_key)[e:e + 1][0].clone())


class _Keys:
    """What moelab.offload_policies' reset() reads from a Requests."""

    def __init__(self, n_experts: int, n_layers: int):
        self.n_experts, self.n_layers = n_experts, n_layers


class ExpertStore:
    """Per-layer expert caches over `sources` (one per MoE layer, in forward order), sharing one policy object
    (cache id = layer, key = layer * E + expert, request q = step * L + layer, as moelab.offload.replay)."""

    def __init__(self, sources: list, capacity: int, policy: str = "lru", gates: list[Tensor | None] | None = None,
                 top_k: int = 1):
        if capacity < 0:
            raise ValueError(f"--cache-experts={capacity} is invalid: allowed an integer >= 0 (experts per layer)")
        ev, self.prefetcher = parse_offload_policy(policy)
        self.sources, self.capacity, self.L = sources, capacity, len(sources)
        self.E = sources[0].n_experts if sources else 0
        self.expert_bytes = sources[0].expert_bytes if sources else 0
        self.policy = EVICTIONS[ev]()
        self.policy.reset(_Keys(self.E, self.L), self.L)
        self.res: list[dict[int, ExpertTensors | Future]] = [{} for _ in range(self.L)]
        self.pend: list[set[int]] = [set() for _ in range(self.L)]  # prefetched, not yet used
        self.gates = gates or [None] * self.L  # gate weight (N_routes, D) of each layer, for pre-gating
        self.k = top_k  # experts per token the pre-gate predicts
        self.stats = OffloadStats()
        self.tokens = [0] * self.L  # tokens of each layer's current call (set by a hook on its RoutedExperts)
        self.device: torch.device | None = None  # where experts are materialised: the rows' device
        self._step, self._last_layer = -1, self.L
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moelab-prefetch") if self.prefetcher else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # -- one request: called by _OffloadPath before the experts run ------------------------------------------
    def request(self, layer: int, experts: list[int], x_RD: Tensor) -> None:
        if layer <= self._last_layer:
            self._step += 1
        self._last_layer = layer
        q, c, E = self._step * self.L + layer, layer, self.E
        self.device = x_RD.device
        keys = [layer * E + e for e in experts]
        S, P = self.res[c], self.pend[c]
        miss = []
        for k in keys:
            if k in S:
                self.policy.on_hit(c, k, q)
                if k in P:
                    P.remove(k)
                    self.stats.prefetch_used += 1
            else:
                miss.append(k)
        self.stats.hit_Q.append(len(keys) - len(miss))
        self.stats.miss_Q.append(len(miss))
        self.stats.tokens_Q.append(self.tokens[layer])
        self.stats.prefetch_Q.append(0)
        if miss:
            protected = set(keys)
            for k in self.policy.order_misses(miss, q):
                if len(S) >= self.capacity and not self._evict(c, protected, q):
                    break  # the rest stream through (read in expert(), not kept)
                S[k] = self._load(c, k - layer * E)
                self.policy.on_insert(c, k, q)
        if self.prefetcher and layer + 1 < self.L and self.gates[layer + 1] is not None and x_RD.shape[0]:
            self._prefetch(layer + 1, self._pregate(layer + 1, x_RD), q)
        self.stats.peak_resident = max(self.stats.peak_resident, sum(len(r) for r in self.res))

    def _load(self, layer: int, e: int) -> ExpertTensors:
        """Read expert e of `layer` from its source (CPU) and place it on the device the rows are on."""
        t = self.sources[layer].read(e)
        if self.device is None or t.w_up.device == self.device:
            return t
        return ExpertTensors(*(x.to(self.device) if x is not None else None for x in t))

    def _evict(self, c: int, protected: set[int], q: int) -> bool:
        cands = [x for x in self.res[c] if x not in protected]
        if not cands:
            return False
        v = self.policy.victim(c, cands, q)
        del self.res[c][v]
        self.policy.on_evict(c, v)
        self.pend[c].discard(v)
        return True

    def _pregate(self, nxt: int, x_RD: Tensor) -> list[int]:
        """Pre-gated MoE (Hwang et al. 2024, arXiv 2308.12066 §4) with the model's own next-layer gate, as
        moelab.offload.record_pregate: the top-k of x W_{l+1}^T over this layer's rows, routed experts only."""
        w_ND = self.gates[nxt]
        k = min(self.k, w_ND.shape[0])
        idx = (x_RD.float() @ w_ND.float().T).topk(k, dim=-1).indices.unique().tolist()
        return [e for e in idx if e < self.E]

    def _prefetch(self, c2: int, experts: list[int], q: int) -> None:
        """Insert the predicted experts into cache c2 now (as replay does) and read them on the background thread."""
        keys = [c2 * self.E + e for e in experts][: self.capacity]
        protected = set(keys)
        S = self.res[c2]
        for k in keys:
            if k in S:
                continue
            if len(S) >= self.capacity and not self._evict(c2, protected, q):
                break
            S[k] = self._pool.submit(self._load, c2, k - c2 * self.E)
            self.pend[c2].add(k)
            self.policy.on_insert(c2, k, q, prefetch=True)
            self.stats.prefetch_Q[-1] += 1

    def get(self, layer: int, e: int) -> ExpertTensors:
        """Expert e of `layer` for the current request: the cached copy, or a transient read (streamed)."""
        k = layer * self.E + e
        v = self.res[layer].get(k)
        if v is None:
            self.stats.streamed += 1
            return self._load(layer, e)
        if isinstance(v, Future):
            if not v.done():
                self.stats.prefetch_waits += 1
            v = self.res[layer][k] = v.result()
        return v

    @property
    def resident_experts(self) -> int:
        return sum(len(r) for r in self.res)


class OffloadedExperts:
    """Non-resident expert-weights provider of one MoE layer: expert(e) comes from the store's cache."""

    resident = False

    def __init__(self, store: ExpertStore, layer: int, act):
        self.store, self.layer, self.act = store, layer, act  # act(h_RG) -> a_RF, the layer's gate function

    @property
    def n_experts(self) -> int:
        return self.store.E

    def stacked(self) -> ExpertTensors:
        raise ValueError("offloaded experts are read one by one: stacked() would materialise every expert "
                         "(use ExpertsPath impl 'sparse')")

    def expert(self, e: int) -> ExpertTensors:
        return self.store.get(self.layer, e)


class _OffloadPath(WrappedPath):
    """The sparse kernel, told first which experts the call needs (one cache request per call)."""

    def __init__(self):
        super().__init__(ExpertsPath("sparse"))

    def run(self, x_RD: Tensor, counts_E: Tensor, weights: OffloadedExperts, block_rows: int = 0) -> Tensor:
        experts = torch.nonzero(counts_E).flatten().tolist()
        weights.store.request(weights.layer, experts, x_RD)
        return self.inner.run(x_RD, counts_E, weights, block_rows)


def attach(routed: nn.Module, store: ExpertStore, layer: int, act) -> None:
    """Make a RoutedExperts read its experts from `store` (cache `layer`): only its provider and path change."""
    routed.weights, routed.path = OffloadedExperts(store, layer, act), _OffloadPath()
    routed.register_forward_pre_hook(lambda mod, args: store.tokens.__setitem__(layer, args[0].shape[0]))


@contextmanager
def experts_unallocated():
    """Build models inside this and moelab `Experts` parameters are created empty: their last dim is 0, so they
    hold no memory and their init touches nothing, while every other shape (E first) is kept. (Not the meta
    device: its first use imports torch's meta kernels, ~70 MB of Python heap.) offload_model replaces them."""
    def hook(module, name, param):
        if isinstance(module, Experts) and param is not None and param.numel():
            return nn.Parameter(param.new_empty(*param.shape[:-1], 0), requires_grad=param.requires_grad)
        return None
    handle = nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, MoELayer) in forward order: the one place this file reaches into moelab.moe."""
    from moelab.moe import MoELayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


def offload_model(model: nn.Module, weights_file: str | Path, *, capacity: int | str, policy: str = "lru"
                  ) -> ExpertStore:
    """Turn a moelab model's routed experts into offloaded ones read from `weights_file` (the checkpoint's
    model.safetensors), at most `capacity` materialised per layer (an int, or text for parse_cache_experts:
    '16', '2x' top-k, '64MB' for all layers): loads every other tensor from the file, replaces each MoE layer's expert weights by an
    OffloadedExperts provider (freeing them if they were materialised) and returns the store (its .stats)."""
    from safetensors import safe_open
    layers = _moe_layers(model)
    expert_keys, sources, acts = set(), [], []
    for name, layer in layers:
        w = layer.experts.weights
        if not isinstance(w, Experts):
            raise TypeError(f"layer {name} experts are {type(w).__name__}, not moelab Experts: cannot offload")
        pname = {id(p): n for n, p in w.named_parameters()}
        st = w.stacked()
        up, down = (f"{name}.experts.weights.{pname[id(t)]}" for t in (st.w_up, st.w_down))
        expert_keys |= {up, down}
        sources.append(SafetensorsExperts(weights_file, up, down))
        acts.append(partial(activate, activation=w.activation))
    if not sources:
        raise ValueError("the model has no MoE layer: nothing to offload")
    top_k = max(layer.cfg.top_k for _, layer in layers)
    if isinstance(capacity, str):
        capacity = parse_cache_experts(capacity, len(sources), sources[0].expert_bytes, top_k)
    own = {k for k in model.state_dict() if k not in expert_keys}
    with safe_open(str(weights_file), "pt") as f:
        missing = own - set(f.keys())
        if missing:
            raise ValueError(f"weights file {str(weights_file)!r} lacks {min(missing)!r} "
                             f"({len(missing)} tensors missing): not this model's checkpoint")
        sd = {k: f.get_tensor(k) for k in own}
    gates = [layer.gate.weight.detach() for _, layer in layers]
    store = ExpertStore(sources, capacity, policy, gates=gates, top_k=top_k)
    for i, ((_, layer), act) in enumerate(zip(layers, acts)):
        del layer.experts.weights  # the (empty or materialised) Experts module goes; its memory is freed
        attach(layer.experts, store, i, act)
    model.load_state_dict(sd, strict=False)
    trim_heap()
    return store


def load_offloaded(run: str | Path, ckpt: str | Path | None = None, *, capacity: int | str, policy: str = "lru"):
    """(model in eval mode, store): a run's checkpoint with its routed experts left in model.safetensors."""
    from moelab.checkpoint import latest, read_state
    from moelab.config import ModelConfig
    from moelab.model import MoELM
    path = latest(run, ckpt)
    with experts_unallocated():
        model = MoELM(ModelConfig.from_dict(read_state(path)["model_config"]))
    store = offload_model(model, path / "model.safetensors", capacity=capacity, policy=policy)
    return model.eval(), store


def memory_now() -> dict[str, int]:
    """This process's memory in bytes from /proc/self/smaps_rollup (Linux): anonymous (heap, tensors; not
    the mapped file's pages), private_dirty, rss (with mapped file pages) and pss; {} where unavailable."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return {}
    want = {"Anonymous": "anonymous", "Private_Dirty": "private_dirty", "Rss": "rss", "Pss": "pss"}
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in want:
            out[want[name]] = int(rest.split()[0]) * 1024
    return out


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim): tensors freed after loading (the experts a
    transformers model materialised) otherwise stay in the process's anonymous memory. No-op without glibc."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def parse_cache_experts(text: str, n_layers: int, expert_bytes: int, top_k: int) -> int:
    """'16' -> 16 experts per layer; '2x' -> 2 * top_k; '64MB' / '1GiB' -> that byte budget for all layers'
    caches, in experts per layer (as moelab.offload.parse_caches)."""
    from moelab.offload import parse_caches
    t = str(text).strip()
    try:
        if t.lower().endswith("x"):
            t = str(int(float(t[:-1]) * top_k))
        out = parse_caches(t, n_layers, expert_bytes)
    except ValueError:
        raise ValueError(f"--cache-experts {text!r} is invalid: allowed experts per layer (16) or a byte budget "
                         f"for all layers (64MB, 1GiB)") from None
    if len(out) != 1 or out[0] < 0:
        raise ValueError(f"--cache-experts {text!r} is invalid: allowed one value >= 0")
    return out[0]
