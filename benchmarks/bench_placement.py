"""Expert placement: ILP solve time and gap, and every policy's balancedness / traffic on real traces.

    python benchmarks/bench_placement.py [--quick]

1. Synthetic 16 layers x 64 experts x 8 devices (skewed loads, affine layer-to-layer transitions):
   the load MIP (1) with 8 slots (no replicas) and 10 slots (16 replicas) in a 30 s budget, target gap 1%;
   the traffic MIP (2) incumbent and gap at 30 s and 120 s; greedy / EPLB against the MIP's proven bound.
2. Traces: a briefly trained 64-expert moelab preset (/work/artifacts/olmoe64/trace.npz) and a tiny random
   Qwen3-MoE built from a transformers config (/work/artifacts/hf_qwen3moe64, made here if missing), on
   4 devices (1 node) and 8 devices (2 nodes), 2 spare slots per device: every policy fitted on the first
   half of the sequences and scored on the second.
Writes benchmarks/results/bench_placement.json and docs/placement_policies.png. One HiGHS thread.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from moelab.cli_place import format_table, plot_policies
from moelab.placement import Devices, eplb, greedy
from moelab.placement_ilp import (
    IlpOptions,
    fit,
    max_load,
    solve_load,
    solve_traffic,
    stay_traffic,
)
from moelab.placement_metrics import Network, PolicyRow, compare
from moelab.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]
OLMOE64 = Path("/work/artifacts/olmoe64/trace.npz")
HF_DIR = Path("/work/artifacts/hf_qwen3moe64")


def synthetic(L=16, E=64, N=8192, K=8, seed=0):
    """Skewed loads (Zipf-like, exponent 0.8, shuffled per layer) and transition counts sampled from rows of
    a Dirichlet(0.1) affinity (each expert has a few favourite successors, as ExFlow measures)."""
    rng = np.random.default_rng(seed)
    loads = np.zeros((L, E))
    for l in range(L):
        p = rng.permutation(1.0 / np.arange(1, E + 1) ** 0.8)
        loads[l] = rng.multinomial(N * K, p / p.sum())
    trans = np.zeros((L - 1, E, E))
    for l in range(L - 1):
        A = rng.dirichlet(np.full(E, 0.1), size=E)
        trans[l] = np.stack([rng.multinomial(int(loads[l, i]), A[i]) for i in range(E)]) / K
    return loads, trans


def bench_synthetic(quick: bool) -> dict:
    loads, trans = synthetic()
    L = len(loads)
    out = {"shape": "16 layers x 64 experts x 8 devices", "load": [], "traffic": []}
    for S in (8, 10):
        dev = Devices(8, S)
        t0 = time.perf_counter()
        _, info = solve_load(loads, dev, IlpOptions(time_limit_s=30.0, mip_rel_gap=0.01))
        wall = time.perf_counter() - t0
        bound = np.array(info["bound_L"])
        row = {"slots": S, "wall_s": wall, "max_gap": info["gap"],
               "layers_within_target_gap": info["status_L"].count("Optimal"),
               "ilp_over_bound": float(sum(info["objective_L"]) / bound.sum()),
               "greedy_over_bound": float(sum(max_load(p, loads[l], dev) for l, p in enumerate(greedy(loads, dev)))
                                          / bound.sum()),
               "eplb_over_bound": float(sum(max_load(p, loads[l], dev) for l, p in enumerate(eplb(loads, dev)))
                                        / bound.sum()),
               "bound_over_mean": float(bound.sum() / (loads.sum() / 8))}
        print(f"load MIP, {S} slots: {wall:.1f} s, max gap {row['max_gap']:.2%}, layers within the 1% target "
              f"{row['layers_within_target_gap']}/{L}; sum max load / bound: ilp {row['ilp_over_bound']:.4f} greedy "
              f"{row['greedy_over_bound']:.4f} eplb {row['eplb_over_bound']:.4f}")
        out["load"].append(row)
    dev = Devices(8, 8)
    g = greedy(loads, dev)
    aff, _ = fit("affinity", loads, trans, dev)
    for budget in ((30.0,) if quick else (30.0, 120.0)):
        _, info = solve_traffic(loads, trans, dev, IlpOptions(objective="traffic", time_limit_s=budget,
                                                               load_tolerance=0.05))
        row = {"budget_s": budget, "wall_s": info["seconds"], "objective": info["objective"], "bound": info["bound"],
               "gap": info["gap"], "status": info["status"], "start_objective": info["start_objective"],
               "greedy_objective": float(stay_traffic(g, trans).sum()), "total_rows": float(trans.sum()),
               "affinity_objective": float(stay_traffic(aff, trans).sum()),
               "affinity_max_load_over_ilp_cap": max(max_load(p, loads[l], dev) / info["load_cap_L"][l]
                                                     for l, p in enumerate(aff))}
        print(f"traffic MIP at {budget:.0f} s: incumbent {row['objective']:.0f} (start {row['start_objective']:.0f},"
              f" affinity {row['affinity_objective']:.0f}, greedy {row['greedy_objective']:.0f}, all rows {row['total_rows']:.0f}), bound {row['bound']:.0f}, "
              f"gap {row['gap']:.1%}, {row['status']}")
        out["traffic"].append(row)
    return out


def make_hf_trace() -> Path:
    """Tiny random Qwen3-MoE (64 experts, top-8, 4 layers) + byte-level BPE tokenizer, traced on the corpus."""
    path = HF_DIR / "trace.npz"
    if path.is_file():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from moelab.hf import trace_hf_path
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["def f(x): return x", "the cat sat on the mat"] * 4,
                           trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(HF_DIR)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=128,
                               moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, num_experts=64, num_experts_per_tok=8,
                               max_position_embeddings=256, norm_topk_prob=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(HF_DIR)
    return trace_hf_path(str(HF_DIR), max_tokens=16384).save(path)


def bench_trace(path: Path, name: str, quick: bool) -> list[dict]:
    tr = load_trace(path)
    E = tr.n_experts
    out = []
    for W, nodes in ((4, 1), (8, 2)):
        dev = Devices(W, E // W + 2, nodes=nodes, groups=8)
        budget = 10.0 if quick else 30.0
        rows = compare(tr, dev, ["contiguous", "round_robin", "greedy", "eplb", "affinity"], row_bytes=2 * 2048)
        if nodes > 1:  # EPLB's global policy beside the hierarchical one
            rows += [PolicyRow("eplb-global", r.placements, r.scores, r.fit_max_load, r.fit_traffic, r.info)
                     for r in compare(tr, Devices(W, dev.slots, nodes=nodes, groups=1), ["eplb"], row_bytes=2 * 2048)]
        for obj in ("load", "traffic"):
            rows += [PolicyRow(f"ilp-{obj}", r.placements, r.scores, r.fit_max_load, r.fit_traffic, r.info) for r in
                     compare(tr, dev, ["ilp"], row_bytes=2 * 2048,
                             opts=IlpOptions(objective=obj, time_limit_s=budget, mip_rel_gap=1e-3))]
        print(f"\n== {name}: {path}")
        print(format_table(rows, dev))
        if name == "olmoe64" and W == 8:
            plot_policies(rows, ROOT / "docs" / "placement_policies.png")
        lb = next(float(sum(r.info["bound_L"])) for r in rows if r.method == "ilp-load")
        for r in rows:
            n = r.scores.n_tokens
            out.append({"trace": name, "devices": W, "nodes": nodes, "slots": dev.slots, "method": r.method,
                        "balancedness": float(r.scores.balancedness_L.mean()),
                        "balancedness_L": r.scores.balancedness_L.tolist(),
                        "max_over_mean": float(r.scores.max_over_mean_L.mean()),
                        "off_home_rows_per_token": float(r.scores.off_home_L.sum() / n),
                        "stay_cross_rows_per_token_modelled": float(r.scores.stay_cross_P.sum() / n),
                        "kib_per_token": r.scores.bytes_per_token / 1024,
                        "a2a_us_per_layer": float(r.scores.a2a_s_L.mean() * 1e6),
                        "fit_max_load_over_bound": r.fit_max_load / lb, "fit_traffic": r.fit_traffic,
                        "solve_s": r.info.get("seconds", 0.0), "gap": r.info.get("gap"),
                        "timed_out": r.info.get("timed_out", False)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter ILP budgets (smoke run)")
    args = ap.parse_args()
    load0 = os.getloadavg()
    res = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "loadavg_start": load0,
           "network": Network().__dict__, "row_bytes": 2 * 2048, "highs_threads": 1}
    res["synthetic"] = bench_synthetic(args.quick)
    traces = [(OLMOE64, "olmoe64")]
    try:
        traces.append((make_hf_trace(), "hf-qwen3moe64"))
    except (ImportError, OSError, ValueError) as e:  # no transformers / tokenizers: keep the other numbers
        print(f"skipping the HF trace: {e}")
    res["traces"] = [row for p, n in traces if p.is_file() for row in bench_trace(p, n, args.quick)]
    res["loadavg_end"] = os.getloadavg()
    path = ROOT / "benchmarks" / "results" / "bench_placement.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"\nload average {load0[0]:.2f} -> {res['loadavg_end'][0]:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
