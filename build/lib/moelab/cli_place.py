"""`moelab place TRACE`: fit expert placements on a routing trace, score them on held-out tokens, write JSON."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moelab.placement import HEURISTICS, Devices, PlacementFile, contiguous, load_placement_file
from moelab.placement_ilp import IlpOptions
from moelab.placement_metrics import Network, PolicyRow, compare, migration_bytes

ALL = [*HEURISTICS, "affinity", "ilp-load", "ilp-traffic"]


def register(sub) -> None:
    p = sub.add_parser("place", help="expert placement over devices: contiguous, round-robin, greedy, EPLB, ILP",
                       description="Fit an expert placement (one per MoE layer, with replicas in spare slots) on "
                                   "the first part of a routing trace and score it on the rest: balancedness "
                                   "(mean/max tokens per device), rows sent off their home rank, modelled "
                                   "cross-layer rows, estimated all-to-all time. Writes a versioned JSON.")
    p.add_argument("trace", help="trace .npz written by `moelab trace`")
    p.add_argument("--devices", type=int, required=True, help="expert-parallel devices W")
    p.add_argument("--nodes", type=int, default=1, help="nodes (devices split evenly; default 1)")
    p.add_argument("--slots", type=int, help="expert slots per device (default ceil(E / devices): no replicas)")
    p.add_argument("--groups", type=int, default=1, help="expert groups for hierarchical EPLB (default 1)")
    p.add_argument("--speed", type=float, nargs="+", help="relative speed of each device (default all 1)")
    p.add_argument("--method", default="eplb", choices=[*HEURISTICS, "affinity", "ilp", "all"],
                   help="policy (default eplb); all = every policy and both ILP objectives, one table + plot")
    p.add_argument("--objective", default="load", choices=["load", "traffic"],
                   help="--method ilp: min max device load (with replicas) or min cross-layer traffic")
    p.add_argument("--time-limit", type=float, default=30.0, help="ILP wall-clock budget in seconds (default 30)")
    p.add_argument("--mip-gap", type=float, default=1e-3, help="ILP relative gap to stop at (default 0.001)")
    p.add_argument("--load-tol", type=float, default=0.05,
                   help="traffic ILP / affinity: max load allowed above the load optimum / greedy (default 0.05)")
    p.add_argument("--fit-fraction", type=float, default=0.5, help="share of sequences to fit on (default 0.5)")
    p.add_argument("--seqs-per-rank", type=int, default=1, help="sequences per rank per EP batch (default 1)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size for bytes/time estimates (default 2048)")
    p.add_argument("--row-bytes", type=int, default=2, help="bytes per hidden value (default 2: bf16)")
    p.add_argument("--expert-ffn", type=int, default=1024,
                   help="expert hidden size F for migration bytes (3 * hidden * F values per expert; default 1024)")
    p.add_argument("--current", metavar="JSON", help="placement now in use: migration is counted from it "
                   "(default: the contiguous layout)")
    p.add_argument("--out", default="placement.json", help="output JSON (--method all: one per method + .png)")
    p.set_defaults(func=cli_place)


def cli_place(args: argparse.Namespace) -> int:
    from moelab.trace import load_trace
    trace = load_trace(args.trace)
    E, W = trace.n_experts, args.devices
    dev = Devices(W, args.slots or -(-E // W), args.nodes, tuple(args.speed or ()), args.groups).check(E)
    opts = IlpOptions(objective=args.objective, time_limit_s=args.time_limit, mip_rel_gap=args.mip_gap,
                      load_tolerance=args.load_tol).check()
    methods = ALL if args.method == "all" else [args.method if args.method != "ilp" else f"ilp-{args.objective}"]
    rows = []
    for m in methods:
        o = opts if not m.startswith("ilp-") else IlpOptions(**{**opts.__dict__, "objective": m[4:]})
        rows += [PolicyRow(m, r.placements, r.scores, r.fit_max_load, r.fit_traffic, r.info) for r in
                 compare(trace, dev, ["ilp" if m.startswith("ilp-") else m], fit_fraction=args.fit_fraction,
                         row_bytes=args.hidden * args.row_bytes, net=Network(), opts=o,
                         seqs_per_rank=args.seqs_per_rank)]
    current = None
    if args.current:
        cur = load_placement_file(args.current)
        if cur.devices.world_size != W or len(cur.placements) != trace.n_layers or cur.placements[0].n_experts != E:
            raise ValueError(f"--current {args.current!r} is for {cur.devices.world_size} devices, "
                             f"{len(cur.placements)} layers, {cur.placements[0].n_experts} experts: allowed "
                             f"{W}, {trace.n_layers}, {E} (this trace and --devices)")
        current = list(cur.placements)
    old = current or contiguous(np.zeros((trace.n_layers, E)), dev)
    expert_bytes = 3 * args.hidden * args.expert_ffn * args.row_bytes
    moved = {r.method: float(migration_bytes(old, r.placements, expert_bytes).sum()) for r in rows}
    print(format_table(rows, dev, moved))
    out = Path(args.out)
    for r in rows:
        path = out if len(rows) == 1 else out.with_name(f"{out.stem}.{r.method}{out.suffix or '.json'}")
        info = {"trace": str(Path(args.trace).resolve()), "fit_fraction": args.fit_fraction,
                "fit_max_load": r.fit_max_load, "fit_traffic": r.fit_traffic, "migration_bytes": moved[r.method],
                "migration_from": args.current or "contiguous",
                **{k: v for k, v in r.info.items() if isinstance(v, (int, float, str, bool, list))}}
        PlacementFile(tuple(r.placements), dev, r.method, info).save(path)
        print(path)
    if len(rows) > 1:
        print(plot_policies(rows, out.with_suffix(".png")))
    return 0


def load_bound(rows: list[PolicyRow]) -> float | None:
    """Proven lower bound on the summed max device load (objective (1)) from the load ILP, if it ran."""
    for r in rows:
        if "bound_L" in r.info:
            return float(sum(r.info["bound_L"]))
    return None


def format_table(rows: list[PolicyRow], dev: Devices, moved: dict[str, float] | None = None) -> str:
    """One line per policy: held-out metrics, then fit objectives against the ILP's proven bound."""
    lb = load_bound(rows)
    head = (f"{'method':<12} {'balanced':>8} {'max/mean':>8} {'off-home/tok':>12} {'stay-x/tok*':>11} "
            f"{'KB/tok':>7} {'a2a us/L':>9} {'load/LB':>8} {'traffic':>10} {'move MiB':>8} {'solve s':>8} {'gap':>7}")
    lines = [(f"placement on {dev.world_size} devices x {dev.slots} slots ({dev.nodes} node(s)); fitted on one part "
              f"of the trace, scored on the other ({rows[0].scores.n_tokens} tokens)"), head, "-" * len(head)]
    for r in rows:
        s, n = r.scores, max(r.scores.n_tokens, 1)
        gap = r.info.get("gap")
        lines.append(f"{r.method:<12} {s.balancedness_L.mean():>8.3f} {s.max_over_mean_L.mean():>8.3f} "
                     f"{s.off_home_L.sum() / n:>12.2f} {s.stay_cross_P.sum() / n:>11.2f} "
                     f"{s.bytes_per_token / 1024:>7.1f} {s.a2a_s_L.mean() * 1e6:>9.1f} "
                     f"{(f'{r.fit_max_load / lb:.4f}' if lb else '-'):>8} {r.fit_traffic:>10.0f} "
                     f"{(moved or {}).get(r.method, float('nan')) / 2**20:>8.1f} "
                     f"{r.info.get('seconds', 0.0):>8.2f} {('-' if gap is None else f'{gap:.2%}'):>7}"
                     + ("  (time limit: incumbent)" if r.info.get("timed_out") else ""))
    lines.append("balanced/max/mean/off-home/a2a: held-out tokens, layer mean; stay-x* = MODELLED rows a token-stays "
                 "dispatch moves between consecutive layers; load/LB = fitted max load over the load ILP's proven "
                 "lower bound; traffic = modelled cross-layer rows on the fit part; move = expert weights copied "
                 "to switch from the current placement (--current, default contiguous)")
    return "\n".join(lines)


def plot_policies(rows: list[PolicyRow], path: Path) -> Path:
    """Bar plot: held-out balancedness and modelled cross-layer rows per token for each policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r.method for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].bar(names, [r.scores.balancedness_L.mean() for r in rows], color="tab:blue")
    ax[0].set_ylabel("balancedness (mean/max), held-out")
    ax[0].set_ylim(0, 1.05)
    ax[1].bar(names, [r.scores.stay_cross_P.sum() / max(r.scores.n_tokens, 1) for r in rows], color="tab:orange")
    ax[1].set_ylabel("modelled cross-layer rows / token")
    for a in ax:
        a.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

