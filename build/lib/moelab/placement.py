"""Expert placement: which device holds which expert (and its replicas), the heuristic policies, the JSON file.

E=logical experts, W=devices (ranks), S=physical expert slots per device, P=physical slots (W*S),
C=max copies of one expert, L=MoE layers.

A `Placement` is one layer's map. Physical slot p lives on device p // S; `phy2log[p]` is the logical expert
in it (-1 = empty). DeepSeek EPLB's views (github.com/deepseek-ai/EPLB, eplb.py) are derived from it:
`log2phy` (E, C) slots of each expert (-1 padded) and `logcnt` (E,) copies per expert. The single-copy API
of the original EP code (`rank_E`, `world_size`, `contiguous`, `from_map`, `experts_of`, `n_local`, `order`)
is kept so `moelab.parallel` behaves exactly as before with one copy per expert.
Solvers that need HiGHS live in placement_ilp.py; metrics and trace replay in placement_metrics.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PLACEMENT_VERSION = 1
METHODS = ("contiguous", "round_robin", "greedy", "eplb", "affinity", "ilp")


@dataclass(frozen=True)
class Placement:
    """One MoE layer's expert map. Built single-copy from `rank_E`, or with replicas via `from_phy2log`."""
    rank_E: tuple[int, ...]        # device of each logical expert's first copy (length = n_experts)
    world_size: int                # W, number of expert-parallel devices
    phy2log: tuple[int, ...] = ()  # logical expert per physical slot, device-major, -1 = empty; () = single-copy
    slots: int = 0                 # S, physical slots per device; 0 = max experts on one device (single-copy)

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"Placement.world_size={self.world_size!r} is invalid: allowed an integer >= 1")
        if not self.rank_E:
            raise ValueError("Placement.rank_E is empty: allowed one rank per expert")
        bad = [(e, r) for e, r in enumerate(self.rank_E) if not isinstance(r, int) or not 0 <= r < self.world_size]
        if bad:
            raise ValueError(f"Placement.rank_E has ranks outside 0..{self.world_size - 1}: (expert, rank) {bad}")
        if not self.phy2log:  # single copy: each device's experts ascending, padded with empty slots
            per = [[e for e, r in enumerate(self.rank_E) if r == d] for d in range(self.world_size)]
            S = max(self.slots, max(len(p) for p in per))
            object.__setattr__(self, "slots", S)
            object.__setattr__(self, "phy2log", tuple(x for p in per for x in p + [-1] * (S - len(p))))
        E, W = len(self.rank_E), self.world_size
        if self.slots < 1 or len(self.phy2log) != W * self.slots:
            raise ValueError(f"Placement.phy2log has {len(self.phy2log)} slots: allowed world_size * slots = "
                             f"{W} * {self.slots}")
        bad = sorted({x for x in self.phy2log if not isinstance(x, int) or not -1 <= x < E})
        if bad:
            raise ValueError(f"Placement.phy2log has entries {bad}: allowed -1 (empty) and experts 0..{E - 1}")
        first = {}
        for p, e in enumerate(self.phy2log):
            if e >= 0:
                first.setdefault(e, p // self.slots)
        if tuple(first.get(e, -1) for e in range(E)) != self.rank_E:
            missing = [e for e in range(E) if e not in first]
            raise ValueError(f"Placement.phy2log does not match rank_E (experts without a slot: {missing}): "
                             f"every expert needs a copy and rank_E must be the device of its first copy")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def contiguous(cls, n_experts: int, world_size: int) -> Placement:
        """Default: experts split into W contiguous blocks (E/W each; the first E % W ranks get one more)."""
        if world_size < 1 or n_experts < 1:
            raise ValueError(f"contiguous placement needs n_experts >= 1 and world_size >= 1, "
                             f"got {n_experts}, {world_size}")
        base, extra = divmod(n_experts, world_size)
        ranks: list[int] = []
        for r in range(world_size):
            ranks += [r] * (base + (r < extra))
        return cls(tuple(ranks), world_size)

    @classmethod
    def from_map(cls, mapping, *, n_experts: int, world_size: int) -> Placement:
        """From a sequence (rank per expert), a dict {expert: rank} or a Placement; every expert must be placed.
        A replicated Placement is returned as it is after checking its size."""
        if isinstance(mapping, Placement) and mapping.replicated:
            if mapping.n_experts != n_experts or mapping.world_size != world_size:
                raise ValueError(f"placement covers {mapping.n_experts} experts on {mapping.world_size} ranks: "
                                 f"allowed n_experts={n_experts}, world_size={world_size}")
            return mapping
        if isinstance(mapping, Placement):  # single copy: re-read its ranks, as the original EP code did
            mapping = mapping.rank_E
        if isinstance(mapping, dict):
            missing = sorted(set(range(n_experts)) - set(mapping))
            extra = sorted(set(mapping) - set(range(n_experts)))
            if missing or extra:
                raise ValueError(f"placement misses experts {missing} / has unknown experts {extra}: "
                                 f"allowed exactly the experts 0..{n_experts - 1}")
            mapping = [mapping[e] for e in range(n_experts)]
        ranks = tuple(int(r) for r in mapping)
        if len(ranks) != n_experts:
            raise ValueError(f"placement has {len(ranks)} entries but the layer has n_experts={n_experts}: "
                             f"every expert needs exactly one rank")
        return cls(ranks, world_size)

    @classmethod
    def from_phy2log(cls, phy2log, *, n_experts: int, world_size: int) -> Placement:
        """From a physical -> logical map (device-major, len divisible by world_size, -1 = empty slot).
        Each device's slots are kept in the given order (it is the order of that device's local weights)."""
        p2l = tuple(int(x) for x in np.asarray(phy2log).reshape(-1))
        if not p2l or len(p2l) % world_size:
            raise ValueError(f"phy2log has {len(p2l)} slots: allowed a positive multiple of world_size={world_size}")
        S = len(p2l) // world_size
        first: dict[int, int] = {}
        for p, e in enumerate(p2l):
            if 0 <= e < n_experts:
                first.setdefault(e, p // S)
        missing = [e for e in range(n_experts) if e not in first]
        if missing:
            raise ValueError(f"phy2log places no copy of experts {missing}: every expert 0..{n_experts - 1} "
                             f"needs at least one slot")
        return cls(tuple(first[e] for e in range(n_experts)), world_size, p2l, S)

    # ---------------------------------------------------------------- single-copy API (as parallel.py uses it)
    @property
    def n_experts(self) -> int:
        return len(self.rank_E)

    def experts_of(self, rank: int) -> tuple[int, ...]:
        """Logical ids in `rank`'s occupied slots, in slot order (= its local weights; ascending single-copy)."""
        S = self.slots
        return tuple(e for e in self.phy2log[rank * S:(rank + 1) * S] if e >= 0)

    def n_local(self) -> list[int]:
        """Occupied slots per rank, L_r."""
        return [len(self.experts_of(r)) for r in range(self.world_size)]

    def order(self) -> list[int]:
        """Logical ids in send order: rank 0's slots, then rank 1's, ... (a permutation when single-copy)."""
        return [e for r in range(self.world_size) for e in self.experts_of(r)]

    # ---------------------------------------------------------------- EPLB views
    @property
    def logcnt(self) -> np.ndarray:
        """(E,) number of physical copies of each logical expert."""
        p = np.asarray(self.phy2log)
        return np.bincount(p[p >= 0], minlength=self.n_experts)

    @property
    def log2phy(self) -> np.ndarray:
        """(E, C) physical slots of each expert in ascending slot order, -1 padded (C = max copies)."""
        cnt = self.logcnt
        out = np.full((self.n_experts, int(cnt.max())), -1, dtype=np.int64)
        fill = np.zeros(self.n_experts, dtype=np.int64)
        for p, e in enumerate(self.phy2log):
            if e >= 0:
                out[e, fill[e]] = p
                fill[e] += 1
        return out

    @property
    def replicated(self) -> bool:
        return bool((self.logcnt > 1).any())

    def count_WE(self) -> np.ndarray:
        """(W, E) copies of each expert on each device."""
        out = np.zeros((self.world_size, self.n_experts), dtype=np.int64)
        for p, e in enumerate(self.phy2log):
            if e >= 0:
                out[p // self.slots, e] += 1
        return out

    def share_WE(self) -> np.ndarray:
        """(W, E) share of expert e's rows that device w serves when rows are spread evenly over the copies."""
        return self.count_WE() / self.logcnt[None, :]

    def to_dict(self) -> dict:
        return {"phy2log": list(self.phy2log), "slots": self.slots}


# ---------------------------------------------------------------------------- problem description
@dataclass(frozen=True)
class Devices:
    """The expert-parallel machine: W devices in `nodes` nodes, S slots each, optional relative speeds."""
    world_size: int                  # W, devices (GPUs / ranks)
    slots: int                       # S, physical expert slots per device (>= ceil(E / W); extras hold replicas)
    nodes: int = 1                   # nodes; devices d*W/nodes .. are node d (intra-node links are faster)
    speed_W: tuple[float, ...] = ()  # relative throughput per device (rows per unit time); () = all 1
    groups: int = 1                  # expert groups for hierarchical EPLB (packs groups onto nodes)

    def check(self, n_experts: int) -> Devices:
        W, S = self.world_size, self.slots
        if not isinstance(W, int) or W < 1:
            raise ValueError(f"devices={W!r} is invalid: allowed an integer >= 1")
        if not isinstance(self.nodes, int) or self.nodes < 1 or W % self.nodes:
            raise ValueError(f"nodes={self.nodes!r} is invalid: allowed a divisor of devices={W}")
        if not isinstance(S, int) or S * W < n_experts:
            raise ValueError(f"slots={S!r} is infeasible: devices * slots = {W} * {S} < n_experts={n_experts}; "
                             f"allowed slots >= {-(-n_experts // W)}")
        if self.speed_W and (len(self.speed_W) != W or min(self.speed_W) <= 0):
            raise ValueError(f"speed has {len(self.speed_W)} entries: allowed {W} positive numbers (one per device)")
        if not isinstance(self.groups, int) or self.groups < 1 or n_experts % self.groups:
            raise ValueError(f"groups={self.groups!r} is invalid: allowed a divisor of n_experts={n_experts}")
        return self

    @property
    def speeds(self) -> np.ndarray:
        return np.asarray(self.speed_W, dtype=np.float64) if self.speed_W else np.ones(self.world_size)

    def node_of(self, device: int) -> int:
        return device // (self.world_size // self.nodes)


# ---------------------------------------------------------------------------- heuristic policies
def contiguous(loads_LE: np.ndarray, dev: Devices) -> list[Placement]:
    """Experts in W contiguous blocks, one copy each (moelab's default EP layout)."""
    L, E = loads_LE.shape
    dev.check(E)
    p = Placement.contiguous(E, dev.world_size)
    return [Placement(p.rank_E, dev.world_size, slots=dev.slots)] * L


def round_robin(loads_LE: np.ndarray, dev: Devices) -> list[Placement]:
    """Expert e on device e % W, one copy each."""
    L, E = loads_LE.shape
    dev.check(E)
    return [Placement(tuple(e % dev.world_size for e in range(E)), dev.world_size, slots=dev.slots)] * L


def greedy(loads_LE: np.ndarray, dev: Devices) -> list[Placement]:
    """Longest-processing-time first (Graham 1969, SIAM J. Appl. Math. 17(2)): heaviest expert to the device
    that would finish first (load / speed), among devices with a free slot; one copy each, ties -> lower id."""
    L, E = loads_LE.shape
    dev.check(E)
    W, S, speed = dev.world_size, dev.slots, dev.speeds
    out = []
    for l in range(L):
        load_W, used_W, rank_E = np.zeros(W), np.zeros(W, dtype=int), [0] * E
        for e in np.argsort(-loads_LE[l], kind="stable"):
            t = np.where(used_W < S, (load_W + loads_LE[l, e]) / speed, np.inf)
            d = int(np.argmin(t))
            rank_E[e], load_W[d], used_W[d] = d, load_W[d] + loads_LE[l, e], used_W[d] + 1
        out.append(Placement(tuple(rank_E), W, slots=S))
    return out


def balanced_packing(weight_N: np.ndarray, n_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """EPLB `balanced_packing` (github.com/deepseek-ai/EPLB eplb.py): items by descending weight, each to the
    lightest pack that still has room, exactly N / n_packs items per pack -> (pack_N, rank_in_pack_N)."""
    N = len(weight_N)
    per = N // n_packs
    if per == 1:
        return np.arange(N), np.zeros(N, dtype=np.int64)
    pack_N, rank_N = np.full(N, -1, dtype=np.int64), np.full(N, -1, dtype=np.int64)
    w_P, n_P = np.zeros(n_packs), np.zeros(n_packs, dtype=np.int64)
    for i in np.argsort(-weight_N, kind="stable"):
        d = int(np.argmin(np.where(n_P < per, w_P, np.inf)))
        pack_N[i], rank_N[i] = d, n_P[d]
        w_P[d] += weight_N[i]
        n_P[d] += 1
    return pack_N, rank_N


def replicate_experts(weight_E: np.ndarray, n_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB `replicate_experts`: each redundant slot copies the expert with the largest load per copy
    -> (phy2log_P, replica_rank_P, logcnt_E); slots 0..E-1 hold the originals."""
    E = len(weight_E)
    phy2log, rank, cnt = np.arange(n_phy), np.zeros(n_phy, dtype=np.int64), np.ones(E, dtype=np.int64)
    for p in range(E, n_phy):
        e = int(np.argmax(weight_E / cnt))
        phy2log[p], rank[p] = e, cnt[e]
        cnt[e] += 1
    return phy2log, rank, cnt


def eplb_maps(weight_E: np.ndarray, n_phy: int, n_groups: int, n_nodes: int, n_gpus: int):
    """DeepSeek EPLB `rebalance_experts` for one layer -> (phy2log_P, log2phy_EC, logcnt_E), the same outputs
    as eplb.py. Hierarchical when n_groups % n_nodes == 0 (groups packed onto nodes, replicas made inside each
    node, physical experts packed onto the node's GPUs); otherwise the global policy (one group, one node)."""
    if n_groups % n_nodes:
        n_groups, n_nodes = 1, 1
    E = len(weight_E)
    gsize, g_per_node, per_gpu = E // n_groups, n_groups // n_nodes, n_phy // n_gpus
    # step 1: groups -> nodes; mlog = logical ids renumbered node-major
    gpack, grank = balanced_packing(weight_E.reshape(n_groups, gsize).sum(-1), n_nodes)
    log2mlog = (((gpack * g_per_node + grank) * gsize)[:, None] + np.arange(gsize)).reshape(-1)
    mlog2log = np.argsort(log2mlog)
    # step 2: replicas inside each node; step 3: pack each node's physical experts onto its GPUs
    E_node, P_node = E // n_nodes, n_phy // n_nodes
    w_mlog = weight_E[mlog2log].reshape(n_nodes, E_node)
    pphy2log, pphyrank, mlogcnt = [], [], []
    for n in range(n_nodes):
        phy2mlog, phyrank, cnt = replicate_experts(w_mlog[n], P_node)
        pack, rnk = balanced_packing((w_mlog[n] / cnt)[phy2mlog], n_gpus // n_nodes)
        pphy2phy = np.argsort(pack * per_gpu + rnk)
        pphy2log.append(mlog2log[phy2mlog[pphy2phy] + n * E_node])
        pphyrank.append(phyrank[pphy2phy])
        mlogcnt.append(cnt)
    phy2log, phyrank = np.concatenate(pphy2log), np.concatenate(pphyrank)
    logcnt = np.concatenate(mlogcnt)[log2mlog]
    log2phy = np.full((E, int(logcnt.max())), -1, dtype=np.int64)
    log2phy[phy2log, phyrank] = np.arange(n_phy)
    return phy2log, log2phy, logcnt


def eplb(loads_LE: np.ndarray, dev: Devices) -> list[Placement]:
    """DeepSeek EPLB (github.com/deepseek-ai/EPLB, eplb.py `rebalance_experts`): replicate hot experts into
    all W * S - E redundant slots, then balanced packing, hierarchical over nodes when groups % nodes == 0."""
    L, E = loads_LE.shape
    dev.check(E)
    n_phy = dev.world_size * dev.slots
    out = []
    for l in range(L):
        phy2log, _, _ = eplb_maps(loads_LE[l].astype(np.float64), n_phy, dev.groups, dev.nodes, dev.world_size)
        out.append(Placement.from_phy2log(phy2log, n_experts=E, world_size=dev.world_size))
    return out


HEURISTICS = {"contiguous": contiguous, "round_robin": round_robin, "greedy": greedy, "eplb": eplb}


# ---------------------------------------------------------------------------- file format
@dataclass(frozen=True)
class PlacementFile:
    """What `moelab place --out` writes and `moelab train --placement` reads: one Placement per MoE layer."""
    placements: tuple[Placement, ...]  # one per MoE layer, in forward order
    devices: Devices                   # machine the placement was fitted for
    method: str                        # policy that produced it
    info: dict = field(default_factory=dict)  # trace path, fitted tokens, solve time, gap, ...

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.devices
        doc = {"version": PLACEMENT_VERSION, "method": self.method, "n_experts": self.placements[0].n_experts,
               "devices": d.world_size, "nodes": d.nodes, "slots": d.slots, "groups": d.groups,
               "speed": list(d.speed_W), "info": self.info,
               "layers": [{"phy2log": list(p.phy2log)} for p in self.placements]}
        path.write_text(json.dumps(doc, indent=1))
        return path


def load_placement_file(path: str | Path) -> PlacementFile:
    """Read and validate a placement JSON written by PlacementFile.save."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"placement file {str(path)!r} does not exist")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"placement file {str(path)!r} is not JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("version") != PLACEMENT_VERSION:
        raise ValueError(f"placement file {str(path)!r} has version={doc.get('version') if isinstance(doc, dict) else None}"
                         f": this moelab reads version {PLACEMENT_VERSION}")
    missing = [k for k in ("method", "n_experts", "devices", "slots", "layers") if k not in doc]
    if missing:
        raise ValueError(f"placement file {str(path)!r} lacks field(s) {missing}")
    dev = Devices(int(doc["devices"]), int(doc["slots"]), int(doc.get("nodes", 1)),
                  tuple(float(s) for s in doc.get("speed", [])), int(doc.get("groups", 1))).check(int(doc["n_experts"]))
    ps = tuple(Placement.from_phy2log(layer["phy2log"], n_experts=int(doc["n_experts"]), world_size=dev.world_size)
               for layer in doc["layers"])
    if any(p.slots != dev.slots for p in ps):
        raise ValueError(f"placement file {str(path)!r}: every layer's phy2log needs devices * slots = "
                         f"{dev.world_size * dev.slots} entries")
    return PlacementFile(ps, dev, str(doc["method"]), dict(doc.get("info", {})))
