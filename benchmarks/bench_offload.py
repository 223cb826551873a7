"""Expert offloading simulator on two traces: a briefly trained 64-expert top-8 `olmoe-like` moelab run and a tiny
random-weight transformers OLMoE (64 experts, top-8). Every eviction policy's decode hit rate and hit rate /
Belady's at cache = 1x, 2x, 4x the active experts per layer (k), per-layer and global caches; prefetchers
(affinity, pre-gate where the model is a moelab run, previous token) scored on stalls per token and experts
fetched; tokens/s under the default cost model (OLMoE-1B-7B expert size) for PCIe 4, NVMe and CPU links.
Quality numbers, not speed: no A/B timing; the sweep's wall time and the load average are recorded.

    python benchmarks/bench_offload.py [--olmoe TRACE] [--hf TRACE] [--plots docs]

Writes benchmarks/results/bench_offload.json and docs/offload_*.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moelab.cli_offload import plot_results
from moelab.offload import LINKS, CostModel, record_pregate, save_pregate, simulate
from moelab.trace import load_trace

MULTS = (1, 1.5, 2, 3, 4, 6, 8)  # cache sizes in units of k, for the plots; the table uses 1x, 2x, 4x


def run_trace(name: str, path: str, pregate_out: Path | None, scopes, console) -> dict:
    tr = load_trace(path)
    pre = None
    if tr.meta.get("source") == "moelab" and tr.meta.get("run") and pregate_out is not None:
        from moelab.checkpoint import load_model
        model, _ = load_model(tr.meta["run"])
        pre = record_pregate(model, tr)
        save_pregate(pregate_out, pre, path)
    k = tr.top_k
    E = int(tr.meta.get("n_routed_experts", tr.n_experts))
    caches = sorted({min(int(m * k), E) for m in MULTS})
    costs = {ln: CostModel.for_link(ln) for ln in LINKS}
    out = {"trace": path, "n_tokens": tr.n_tokens, "n_layers": tr.n_layers, "n_experts": E, "top_k": k,
           "meta": {kk: v for kk, v in tr.meta.items() if kk != "layer_names"}, "scopes": {}}
    for scope in scopes:
        t0 = time.perf_counter()
        res = simulate(tr, caches=caches, policies=["all"], scope=scope, pregate_LNK=pre, costs=costs)
        res["meta"]["wall_s"] = time.perf_counter() - t0
        out["scopes"][scope] = res
        console.print(f"{name} scope={scope}: {len(res['rows'])} replays in {res['meta']['wall_s']:.1f} s")
    return out


def table(name: str, res: dict, k: int) -> Table:
    m = res["meta"]
    t = Table(title=f"{name}, {m['scope']} cache: decode hit rate (hit rate / Belady's) at cache = 1x, 2x, 4x k")
    t.add_column("policy")
    for mult in (1, 2, 4):
        t.add_column(f"{mult}x = {mult * k}", justify="right")
    t.add_column("stalls/token at 2x", justify="right")
    t.add_column("fetched at 2x", justify="right")
    t.add_column("pcie4 tok/s at 2x", justify="right")
    for p in m["policies"]:
        cells = []
        for mult in (1, 2, 4):
            r = next((r for r in res["rows"] if r["policy"] == p and r["cache"] == mult * k), None)
            if r is None:
                cells.append("-")
            elif r["decode_vs_belady"] is None:
                cells.append(f"{r['decode_hit_rate']:.3f}")
            else:
                cells.append(f"{r['decode_hit_rate']:.3f} ({r['decode_vs_belady']:.2f})")
        r2 = next(r for r in res["rows"] if r["policy"] == p and r["cache"] == 2 * k)
        t.add_row(p, *cells, f"{r2['decode_misses_per_token']:.2f}",
                  str(r2["decode_fetched_experts"] + r2["prefill_fetched_experts"]), f"{r2['pcie4_decode_tok_s']:.1f}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_olmoe = "/work/artifacts/olmoe64/trace.npz"
    ap.add_argument("--olmoe", default=default_olmoe if Path(default_olmoe).is_file()
                    else "/work/artifacts/olmoe64_offload/trace.npz")
    ap.add_argument("--hf", default="/work/artifacts/hf_olmoe_tiny/trace.npz")
    ap.add_argument("--pregate-out", default="/work/artifacts/olmoe64_offload/pregate_olmoe64.npz")
    ap.add_argument("--plots", default="docs")
    ap.add_argument("--out", default="benchmarks/results/bench_offload.json")
    args = ap.parse_args()
    console = Console(width=160)
    load0 = os.getloadavg()
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {os.cpu_count()} cpus", "loadavg_start": load0,
              "cost_model": {ln: CostModel.for_link(ln).__dict__ for ln in LINKS}, "traces": {}}
    for name, path, pg, scopes in (("olmoe64", args.olmoe, Path(args.pregate_out), ("layer", "global")),
                                   ("hf_olmoe_tiny", args.hf, None, ("layer", "global"))):
        if not Path(path).is_file():
            console.print(f"[yellow]skip {name}: {path} does not exist[/yellow]")
            continue
        tr_res = run_trace(name, path, pg, scopes, console)
        result["traces"][name] = tr_res
        for scope, res in tr_res["scopes"].items():
            console.print(table(name, res, tr_res["top_k"]))
            title = f"{name}: E={tr_res['n_experts']} k={tr_res['top_k']} L={tr_res['n_layers']}"
            pre = f"offload_{name}_{scope}_"
            plot_results(res, Path(args.plots), title=title, prefix=pre)
    result["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    console.print(f"wrote {args.out}; load average {load0[0]:.2f} -> {result['loadavg_end'][0]:.2f}")


if __name__ == "__main__":
    main()
