"""Optimal expert placement on HiGHS (highspy): min max device load with replicas, and min cross-layer traffic.

L=MoE layers, E=experts, W=devices, S=slots per device, C=max copies per expert, P=layer pairs (L-1).
Objective (1) `solve_load`, one MIP per layer: choose copies c_e and copies per device so that, with each
expert's rows spread evenly over its copies (EPLB's load model; at run time placement_metrics.replica_slot
prefers the copy on the row's home rank and spreads the rest evenly), the slowest
device's load / speed is minimal; capacity S slots per device. Objective (2) `solve_traffic`, one MIP over all
layers: one copy per expert, minimise the modelled rows that change device between consecutive layers
(MoETuner, arXiv 2502.06643 sec. 3; ExFlow, arXiv 2401.08383 sec. 4) with every layer's max load within
(1 + tolerance) of its single-copy optimum from (1). (2) is a quadratic assignment problem: expect gaps.
Every solve starts from the best heuristic (so it is never worse than it) and reports status, gap and bound.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import highspy
import numpy as np

from moelab.placement import HEURISTICS, Devices, Placement, eplb, greedy


@dataclass(frozen=True)
class IlpOptions:
    """HiGHS settings for the placement MIPs."""
    objective: str = "load"        # "load" (1) min max device load, or "traffic" (2) min cross-layer traffic
    time_limit_s: float = 30.0     # wall-clock budget of the whole fit (split evenly over the MIPs it solves)
    mip_rel_gap: float = 1e-3      # stop when (incumbent - bound) / incumbent <= this
    load_tolerance: float = 0.05   # (2): each layer's max load may exceed its (1) single-copy optimum by this
    max_copies: int = 0            # (1): copies per expert allowed; 0 = max(devices, EPLB's), at most spare slots + 1
    threads: int = 1               # HiGHS threads

    def check(self) -> IlpOptions:
        if self.objective not in ("load", "traffic"):
            raise ValueError(f"ilp objective={self.objective!r} is invalid: allowed load, traffic")
        if not self.time_limit_s > 0 or not 0 <= self.mip_rel_gap < 1 or self.load_tolerance < 0:
            raise ValueError("ilp options invalid: allowed time_limit_s > 0, 0 <= mip_rel_gap < 1, load_tolerance >= 0")
        return self


@dataclass(frozen=True)
class MipResult:
    """What one HiGHS MIP returned."""
    x: np.ndarray        # incumbent column values
    objective: float     # incumbent objective
    bound: float         # proven lower bound (MIP dual bound)
    gap: float           # (objective - bound) / |objective|, 0 when proven optimal
    status: str          # HiGHS model status, e.g. Optimal, Time limit reached
    seconds: float       # solve wall time


class _Model:
    """Columns and sparse rows collected in numpy, handed to HiGHS as one rowwise HighsLp."""

    def __init__(self):
        self.cost, self.lo, self.hi, self.integer = [], [], [], []
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # (idx_RK, val_RK, lo_R, hi_R)
        self.n = 0

    def cols(self, n: int, *, cost=0.0, lo=0.0, hi=1.0, integer=True) -> np.ndarray:
        idx = np.arange(self.n, self.n + n)
        self.n += n
        for lst, v in ((self.cost, cost), (self.lo, lo), (self.hi, hi)):
            lst.append(np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)))
        self.integer.append(np.full(n, integer))
        return idx

    def row(self, idx, val, lo=-np.inf, hi=np.inf) -> None:
        self.rows(np.asarray(idx)[None, :], np.asarray(val, np.float64)[None], lo, hi)

    def rows(self, idx_RK: np.ndarray, val_RK, lo=-np.inf, hi=np.inf) -> None:
        """R rows of K entries each (same lo / hi)."""
        R = idx_RK.shape[0]
        self.blocks.append((np.asarray(idx_RK, dtype=np.int32), np.broadcast_to(np.asarray(val_RK, np.float64),
                            idx_RK.shape), np.full(R, lo, dtype=np.float64), np.full(R, hi, dtype=np.float64)))

    def solve(self, *, time_limit_s: float, gap: float, threads: int, start: np.ndarray | None) -> MipResult:
        h = highspy.Highs()
        h.silent()
        lp = highspy.HighsLp()
        n_row = sum(b[0].shape[0] for b in self.blocks)
        lp.num_col_, lp.num_row_ = self.n, n_row
        lp.col_cost_, lp.col_lower_, lp.col_upper_ = (np.concatenate(v) for v in (self.cost, self.lo, self.hi))
        lp.row_lower_ = np.concatenate([b[2] for b in self.blocks])
        lp.row_upper_ = np.concatenate([b[3] for b in self.blocks])
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = self.n, n_row
        widths = np.concatenate([np.full(b[0].shape[0], b[0].shape[1]) for b in self.blocks])
        lp.a_matrix_.start_ = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
        lp.a_matrix_.index_ = np.concatenate([b[0].reshape(-1) for b in self.blocks]).astype(np.int32)
        lp.a_matrix_.value_ = np.concatenate([b[1].reshape(-1) for b in self.blocks]).astype(np.float64)
        integer = np.concatenate(self.integer)
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in integer]
        h.passModel(lp)
        for k, v in (("time_limit", float(time_limit_s)), ("mip_rel_gap", float(gap)), ("threads", int(threads)),
                     ("random_seed", 0), ("output_flag", False)):
            h.setOptionValue(k, v)
        if start is not None:
            sol = highspy.HighsSolution()
            sol.col_value = list(map(float, start))
            sol.value_valid = True
            h.setSolution(sol)
        t0 = time.perf_counter()
        h.run()
        secs = time.perf_counter() - t0
        status = h.modelStatusToString(h.getModelStatus())
        info = h.getInfo()
        if info.primal_solution_status == 0:  # no incumbent (cannot happen with a feasible start)
            raise ValueError(f"HiGHS found no feasible placement ({status})")
        x = np.asarray(h.getSolution().col_value)
        obj, bound = float(info.objective_function_value), float(info.mip_dual_bound)
        g = max(0.0, (obj - bound) / max(abs(obj), 1e-12))
        return MipResult(x, obj, bound, g, status, secs)


# ---------------------------------------------------------------------------- (1) min max device load
def _copies_cap(dev: Devices, E: int, max_copies: int, start: Placement | None) -> int:
    C = min(dev.world_size * dev.slots - E + 1, max_copies or dev.world_size)
    return max(C, int(start.logcnt.max()) if start is not None else 1)


def solve_load_layer(load_E: np.ndarray, dev: Devices, *, max_copies: int = 0, start: Placement | None = None,
                     time_limit_s: float = 10.0, gap: float = 1e-3, threads: int = 1) -> tuple[Placement, MipResult]:
    """Objective (1) for one layer: min z s.t. sum_{e,c} load_e / c * w[e,c,d] <= speed_d * z,
    sum_{e,c} w[e,c,d] <= S, sum_d w[e,c,d] = c * u[e,c], sum_c u[e,c] = 1 (u binary: expert e has c copies;
    w integer: copies of e on device d). MoETuner (arXiv 2502.06643) sec. 3.1 load term, with EPLB's replicas.
    Copies per expert c <= max_copies (0: max(W, the start's most copies)); optimum and bound are over that set."""
    E, W, S = len(load_E), dev.world_size, dev.slots
    dev.check(E)
    C = _copies_cap(dev, E, max_copies, start)
    m = _Model()
    scale = max(float(load_E.sum()), 1.0) / W  # objective in units of the mean device load
    z = m.cols(1, cost=1.0, lo=0.0, hi=np.inf, integer=False)[0]
    u = m.cols(E * C).reshape(E, C)
    c_C = np.arange(1, C + 1)
    per_copy_EC = (load_E[:, None] / c_C[None, :]) / scale
    hi_ECW = np.broadcast_to(np.minimum(c_C, S)[None, :, None], (E, C, W)).astype(np.float64)
    order_E = np.argsort(-load_E, kind="stable")
    identical = bool(np.all(dev.speeds == dev.speeds[0]))
    if identical and C == 1:  # symmetry: relabel devices by first use, heaviest first -> k-th heaviest on 0..k
        for k, e in enumerate(order_E[:W]):
            hi_ECW[e, :, k + 1:] = 0.0
    w = m.cols(E * C * W, hi=hi_ECW.reshape(-1)).reshape(E, C, W)
    if identical:  # the heaviest expert has a copy on device 0 (any placement can be relabelled so)
        m.row(w[order_E[0], :, 0], 1.0, 1.0, np.inf)
    for e in range(E):
        m.row(u[e], 1.0, 1.0, 1.0)
        for c in range(C):
            m.row(np.append(w[e, c], u[e, c]), np.append(np.ones(W), -(c + 1.0)), 0.0, 0.0)
    for e in range(E):  # valid cut: the device holding one copy of e carries at least load_e / c of it
        m.row(np.append(u[e], z), np.append(per_copy_EC[e], -dev.speeds.max()), -np.inf, 0.0)
    for d in range(W):
        m.row(w[:, :, d].reshape(-1), 1.0, -np.inf, S)
        m.row(np.append(w[:, :, d].reshape(-1), z), np.append(per_copy_EC.reshape(-1), -dev.speeds[d]), -np.inf, 0.0)
    x0 = None
    if start is not None:
        x0 = np.zeros(m.n)
        cnt, cwe = start.logcnt, start.count_WE()
        if identical:  # relabel the start's devices in order of first use, heaviest expert first
            seen = list(dict.fromkeys(int(d) for e in order_E for d in np.nonzero(cwe[:, e])[0]))
            cwe = cwe[seen + [d for d in range(W) if d not in seen]]
        x0[u[np.arange(E), cnt - 1]] = 1.0
        for e in range(E):
            x0[w[e, cnt[e] - 1]] = cwe[:, e]
        x0[z] = float((start.share_WE() @ load_E / dev.speeds).max()) / scale
    res = m.solve(time_limit_s=time_limit_s, gap=gap, threads=threads, start=x0)
    w_ECW = np.rint(res.x[w]).astype(int)
    phy2log = []
    for d in range(W):
        mine = [e for e in range(E) for _ in range(int(w_ECW[e, :, d].sum()))]
        phy2log += mine + [-1] * (S - len(mine))
    p = Placement.from_phy2log(phy2log, n_experts=E, world_size=W)
    obj, bound = max_load(p, load_E, dev), res.bound * scale  # z need not be tight at a time-out incumbent
    gap = max(0.0, (obj - bound) / max(obj, 1e-12))  # HiGHS says Optimal once within mip_rel_gap
    return p, MipResult(res.x, obj, bound, gap, res.status, res.seconds)


def max_load(p: Placement, load_E: np.ndarray, dev: Devices) -> float:
    """Max over devices of expected load / speed with rows spread evenly over copies (objective (1))."""
    return float((p.share_WE() @ load_E / dev.speeds).max())


def solve_load(loads_LE: np.ndarray, dev: Devices, opts: IlpOptions = IlpOptions(), *,
               single_copy: bool = False) -> tuple[list[Placement], dict]:
    """Objective (1) per layer, warm-started from the better of greedy and EPLB (single_copy: greedy only,
    one copy per expert). Returns placements and info (objective, bound, gap, status per layer)."""
    L, E = loads_LE.shape
    dev.check(E)
    starts = [greedy(loads_LE, dev)] + ([] if single_copy else [eplb(loads_LE, dev)])
    out, info = [], {"objective_L": [], "bound_L": [], "gap_L": [], "status_L": [], "seconds": 0.0}
    t0 = time.perf_counter()
    for l in range(L):  # each layer gets an equal share of what is left, so quick layers give time to later ones
        best = min((s[l] for s in starts), key=lambda p: max_load(p, loads_LE[l], dev))
        p, r = solve_load_layer(loads_LE[l], dev, max_copies=1 if single_copy else opts.max_copies, start=best,
                                time_limit_s=max(opts.time_limit_s - (time.perf_counter() - t0), 0.1) / (L - l),
                                gap=opts.mip_rel_gap, threads=opts.threads)
        out.append(p)
        for k, v in (("objective_L", r.objective), ("bound_L", r.bound), ("gap_L", r.gap), ("status_L", r.status)):
            info[k].append(v)
        info["seconds"] += r.seconds
    info["gap"] = max(info["gap_L"])
    info["timed_out"] = any(s != "Optimal" for s in info["status_L"])
    return out, info


# ---------------------------------------------------------------------------- (2) min cross-layer traffic
def stay_traffic(ps: list[Placement], trans_PEE: np.ndarray) -> np.ndarray:
    """Modelled rows changing device between layers l and l+1 (token-stays dispatch, ExFlow arXiv 2401.08383
    sec. 4): sum_ij T[i, j] * P(i's copy and j's copy on different devices), copies spread evenly -> (P,)."""
    return np.array([trans_PEE[l].sum() - np.einsum("ij,di,dj->", trans_PEE[l], ps[l].share_WE(), ps[l + 1].share_WE())
                     for l in range(len(ps) - 1)])


def affinity_greedy(loads_LE: np.ndarray, trans_PEE: np.ndarray, dev: Devices, cap_L: np.ndarray | None = None,
                    fallback: list[Placement] | None = None) -> list[Placement]:
    """Greedy for objective (2), one copy each: layer 0 by LPT; then each layer's experts, heaviest first, go to
    the device where most of their incoming rows already are (rows T[i, j] from layer l's expert i on that
    device), among devices with a free slot and load within cap_L[l] * speed (else the least-loaded free device).
    In the spirit of ExFlow's affinity placement (arXiv 2401.08383 sec. 4), not its solver. With `fallback`
    (placements within the caps), layer 0 is fallback[0] and a layer that breaks its cap is replaced by fallback[l],
    so the result is within the caps (a feasible MIP start)."""
    L, E = loads_LE.shape
    W, S, speed = dev.world_size, dev.slots, dev.speeds
    dev.check(E)
    cap_L = np.full(L, np.inf) if cap_L is None else np.asarray(cap_L, dtype=np.float64)
    out = [fallback[0] if fallback else greedy(loads_LE[:1], dev)[0]]
    for l in range(1, L):
        prev = np.asarray(out[-1].rank_E)
        gain_EW = np.stack([trans_PEE[l - 1][prev == d].sum(0) for d in range(W)], axis=1)  # rows staying on d
        load_W, used_W, rank_E = np.zeros(W), np.zeros(W, dtype=int), [0] * E
        for j in np.argsort(-loads_LE[l], kind="stable"):
            free = used_W < S
            fits = free & (load_W + loads_LE[l, j] <= cap_L[l] * speed + 1e-9)
            if fits.any():
                d = int(np.argmax(np.where(fits, gain_EW[j] - 1e-9 * load_W, -np.inf)))
            else:
                d = int(np.argmin(np.where(free, (load_W + loads_LE[l, j]) / speed, np.inf)))
            rank_E[j], load_W[d], used_W[d] = d, load_W[d] + loads_LE[l, j], used_W[d] + 1
        p = Placement(tuple(rank_E), W, slots=S)
        out.append(fallback[l] if fallback and max_load(p, loads_LE[l], dev) > cap_L[l] + 1e-9 else p)
    return out


def swap_search(ps: list[Placement], loads_LE: np.ndarray, trans_PEE: np.ndarray, dev: Devices, cap_L: np.ndarray,
                max_rounds: int = 20) -> list[Placement]:
    """Local search for objective (2) on single-copy placements: repeatedly apply, layer by layer, the swap of two
    experts on different devices that keeps most rows on their device (rows from layer l-1 and to layer l+1),
    among swaps that keep both devices within cap_L[l] * speed; stops when no swap helps. Never worse than `ps`."""
    L, E = loads_LE.shape
    W, speed = dev.world_size, dev.speeds
    rank_LE = np.array([p.rank_E for p in ps])
    for _ in range(max_rounds):
        improved = False
        for l in range(L):
            stay_ED = np.zeros((E, W))  # rows of expert e that stay on device d given the neighbouring layers
            for d in range(W):
                if l > 0:
                    stay_ED[:, d] += trans_PEE[l - 1][rank_LE[l - 1] == d].sum(0)
                if l < L - 1:
                    stay_ED[:, d] += trans_PEE[l][:, rank_LE[l + 1] == d].sum(1)
            for _ in range(E):
                r = rank_LE[l]
                load_W = np.bincount(r, weights=loads_LE[l], minlength=W)
                own = stay_ED[np.arange(E), r]
                gain = stay_ED[:, r].T + stay_ED[:, r] - own[:, None] - own[None, :]  # gain[a, b]: swap a <-> b
                la = loads_LE[l]
                ok = ((load_W[r][:, None] - la[:, None] + la[None, :] <= cap_L[l] * speed[r][:, None] + 1e-9)
                      & (load_W[r][None, :] - la[None, :] + la[:, None] <= cap_L[l] * speed[r][None, :] + 1e-9)
                      & (r[:, None] != r[None, :]))
                gain = np.where(ok, gain, 0.0)
                a, b = np.unravel_index(int(np.argmax(gain)), gain.shape)
                if gain[a, b] <= 1e-9:
                    break
                rank_LE[l, a], rank_LE[l, b] = r[b], r[a]
                improved = True
        if not improved:
            break
    return [Placement(tuple(int(x) for x in rank_LE[l]), W, slots=dev.slots) for l in range(L)]


def solve_traffic(loads_LE: np.ndarray, trans_PEE: np.ndarray, dev: Devices, opts: IlpOptions = IlpOptions()
                  ) -> tuple[list[Placement], dict]:
    """Objective (2): x[l,e,d] binary (one copy each), y[l,i,j] >= x[l,i,d] - x[l+1,j,d] for all d, minimise
    sum T_l[i,j] y[l,i,j] s.t. slots and load_l(d) <= (1 + tol) * z1_l * speed_d, z1_l = single-copy (1) value.
    MoETuner (arXiv 2502.06643) sec. 3.2 objective; a quadratic assignment problem, so gaps are expected."""
    L, E = loads_LE.shape
    W, S = dev.world_size, dev.slots
    dev.check(E)
    t0 = time.perf_counter()
    t_first = opts.time_limit_s * 0.2
    first, info1 = solve_load(loads_LE, dev, IlpOptions(time_limit_s=t_first, mip_rel_gap=opts.mip_rel_gap,
                                                        threads=opts.threads), single_copy=True)
    cap_L = (1 + opts.load_tolerance) * np.array(info1["objective_L"])
    m = _Model()
    x = m.cols(L * E * W).reshape(L, E, W)
    for l in range(L):
        for e in range(E):
            m.row(x[l, e], 1.0, 1.0, 1.0)
        for d in range(W):
            m.row(x[l, :, d], 1.0, -np.inf, S)
            m.row(x[l, :, d], loads_LE[l], -np.inf, cap_L[l] * dev.speeds[d])
    pairs = []
    for l in range(L - 1):
        ii, jj = np.nonzero(trans_PEE[l] > 0)
        y = m.cols(len(ii), cost=trans_PEE[l][ii, jj], integer=False)
        pairs.append((l, ii, jj, y))
        idx = np.stack(np.broadcast_arrays(y[:, None], x[l, ii], x[l + 1, jj]), -1).reshape(-1, 3)
        m.rows(idx, np.array([1.0, -1.0, 1.0]), 0.0, np.inf)  # y - x[l,i,d] + x[l+1,j,d] >= 0 for every d
    greedy2 = affinity_greedy(loads_LE, trans_PEE, dev, cap_L, fallback=first)  # within the caps
    if stay_traffic(greedy2, trans_PEE).sum() < stay_traffic(first, trans_PEE).sum():
        first = greedy2  # the better start
    first = swap_search(first, loads_LE, trans_PEE, dev, cap_L)
    x0 = np.zeros(m.n)
    rank_LE = np.array([p.rank_E for p in first])
    for l in range(L):
        x0[x[l, np.arange(E), rank_LE[l]]] = 1.0
    for l, ii, jj, y in pairs:
        x0[y] = (rank_LE[l][ii] != rank_LE[l + 1][jj]).astype(float)
    res = m.solve(time_limit_s=max(opts.time_limit_s - (time.perf_counter() - t0), 1.0), gap=opts.mip_rel_gap,
                  threads=opts.threads, start=x0)
    rank = np.rint(res.x[x]).argmax(-1)
    out = [Placement(tuple(int(r) for r in rank[l]), W, slots=S) for l in range(L)]
    obj = float(stay_traffic(out, trans_PEE).sum())  # y need not be tight at a time-out incumbent
    gap = max(0.0, (obj - res.bound) / max(obj, 1e-12))
    info = {"objective": obj, "bound": res.bound, "gap": gap, "status": res.status,
            "timed_out": res.status != "Optimal", "seconds": time.perf_counter() - t0,
            "start_objective": float(stay_traffic(first, trans_PEE).sum()), "load_cap_L": cap_L.tolist(),
            "load_gap": info1["gap"]}
    return out, info


def fit(method: str, loads_LE: np.ndarray, trans_PEE: np.ndarray, dev: Devices,
        opts: IlpOptions = IlpOptions()) -> tuple[list[Placement], dict]:
    """Run one policy -> (placements per layer, info with seconds, and for ilp objective/bound/gap/status)."""
    if method in HEURISTICS:
        t0 = time.perf_counter()
        ps = HEURISTICS[method](loads_LE, dev)
        return ps, {"seconds": time.perf_counter() - t0}
    if method == "affinity":  # objective (2) greedy under objective (1)'s single-copy load, loosened by tolerance
        t0 = time.perf_counter()
        base = greedy(loads_LE, dev)
        cap_L = (1 + opts.load_tolerance) * np.array([max_load(p, loads_LE[l], dev) for l, p in enumerate(base)])
        ps = swap_search(affinity_greedy(loads_LE, trans_PEE, dev, cap_L, fallback=base), loads_LE, trans_PEE, dev,
                         cap_L)
        return ps, {"seconds": time.perf_counter() - t0}
    if method == "ilp":
        opts.check()
        if opts.objective == "load":
            return solve_load(loads_LE, dev, opts)
        return solve_traffic(loads_LE, trans_PEE, dev, opts)
    raise ValueError(f"method={method!r} is invalid: allowed {', '.join([*HEURISTICS, 'affinity', 'ilp'])}")
