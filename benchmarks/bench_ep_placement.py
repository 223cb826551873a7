"""The EP replica rule on real traces: local copy first (what moelab's EP layer does) vs spreading every row evenly.

    python benchmarks/bench_ep_placement.py

For each trace and machine (4 devices x E/4+2 slots, 8 devices x E/8+2 slots in 2 nodes; 8 expert groups, as bench_placement.py), contiguous, greedy and
EPLB are fitted on the first half of the sequences and replayed on the second half with the home ranks of the EP
trainer (one sequence per rank per batch). EPLB (the only policy with replicas here) is replayed twice: with
`placement_metrics.replica_slot` (a row uses its home rank's copy if there is one, else copies in turn) and with
the previous rule (copies in turn for every row). Reports balancedness (mean / max rows per device) and rows per
token that leave their home rank (the EP layer's all-to-all rows: equal to what it sends, tests/test_ep_placement.py).
Writes benchmarks/results/bench_ep_placement.json.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import numpy as np

from moelab.placement import HEURISTICS, Devices, Placement
from moelab.placement_metrics import home_ranks, loads, replica_device, split_tokens
from moelab.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]
TRACES = {"olmoe64 (moelab preset)": Path("/work/artifacts/olmoe64/trace.npz"),
          "tiny random Qwen3-MoE (transformers)": Path("/work/artifacts/hf_qwen3moe64/trace.npz")}


def spread_device(p: Placement, idx_NK: np.ndarray, home_N: np.ndarray, local_N: np.ndarray) -> np.ndarray:
    """The previous rule: copy (local * K + k + home) % logcnt[e] for every row, local copy or not."""
    K = idx_NK.shape[1]
    e = np.where(idx_NK >= 0, idx_NK, 0)
    copy = (local_N[:, None] * K + np.arange(K)[None, :] + home_N[:, None]) % p.logcnt[e]
    return np.where(idx_NK >= 0, p.log2phy[e, copy] // p.slots, -1)


def replay(ps, idx_LNK, home_N, local_N, rule) -> tuple[float, float]:
    """(mean balancedness over layers, off-home rows per token summed over layers)."""
    W, N = ps[0].world_size, idx_LNK.shape[1]
    bal, off = [], 0
    for p, idx in zip(ps, idx_LNK):
        d = rule(p, idx, home_N, local_N)
        ok = d >= 0
        load = np.bincount(d[ok], minlength=W)
        bal.append(load.mean() / load.max())
        off += int((ok & (d != home_N[:, None])).sum())
    return float(np.mean(bal)), off / N


def main() -> None:
    load0 = os.getloadavg()
    rows = []
    for name, path in TRACES.items():
        if not path.is_file():
            print(f"skip {name}: {path} missing")
            continue
        tr = load_trace(path)
        idx = tr.expert_idx_LNK.astype(np.int64)
        E = tr.n_experts
        fit_N, score_N = split_tokens(tr, 0.5)
        loads_LE = loads(idx[:, fit_N], E)
        W_all = [(4, 1), (8, 2)]
        for W, nodes in W_all:
            dev = Devices(W, E // W + 2, nodes=nodes, groups=8)  # as bench_placement.py
            home_N, local_N = home_ranks(tr.seq_ids_N[score_N], W)
            for method in ("contiguous", "greedy", "eplb"):
                ps = HEURISTICS[method](loads_LE, dev)
                rules = {"local first": replica_device}
                if method == "eplb":
                    rules["spread (previous)"] = spread_device
                for rule_name, rule in rules.items():
                    bal, off = replay(ps, idx[:, score_N], home_N, local_N, rule)
                    rows.append({"trace": name, "devices": W, "slots": dev.slots, "method": method,
                                 "rule": rule_name, "balancedness": round(bal, 4), "off_home_rows_per_token": round(off, 3)})
                    print(f"{name:38s} {W}x{dev.slots:<3d} {method:10s} {rule_name:18s} "
                          f"balancedness {bal:.3f}  off-home rows/token {off:.2f}")
    out = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "loadavg_start": load0,
           "loadavg_end": os.getloadavg(), "rows": rows}
    dst = ROOT / "benchmarks" / "results" / "bench_ep_placement.json"
    dst.write_text(json.dumps(out, indent=1))
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
