"""Real offloaded generation vs the fully loaded model: tokens/s, expert-cache hit rate and resident memory.

Each configuration runs in a fresh subprocess (so memory is its own): "empty" (torch + moelab imported, no model:
the baseline every memory number is taken against), "full" (checkpoint.load_model), and "offload" at each cache
size and policy (offload_store.load_offloaded: experts stay in the memory-mapped model.safetensors). Memory comes
from /proc/self/smaps_rollup after generation: Anonymous (heap and tensors, not the mapped file's pages),
Rss - Anonymous (mapped file pages, reclaimable page cache), and VmHWM (peak RSS). Configurations are interleaved
(full, offload..., full, offload...) `--repeats` times; tokens/s is the median and the ratio to full is the median
of per-round ratios. The checkpoint file is read once first so every run starts from a warm page cache.

  python benchmarks/bench_offload_generate.py --run RUN [--hf DIR] [--tokens 64] [--caches 8,16,32] [--policies ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "int main(int argc, char **argv) {\n"


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(cfg: dict) -> dict:
    """One configuration in this (fresh) process -> its numbers."""
    import torch
    torch.set_num_threads(cfg["threads"])
    from moelab.checkpoint import load_model
    from moelab.model import BOS_ID, generate
    from moelab.offload_store import load_offloaded, memory_now
    out = {**cfg}
    if cfg["mode"] == "empty":
        if cfg.get("family") == "hf":  # the transformers baseline: its import alone is ~100 MB of heap
            import transformers  # noqa: F401
            from transformers import AutoModelForCausalLM  # noqa: F401

            import moelab.hf  # noqa: F401
        return {**out, "mem": memory_now(), "peak_rss": _peak_rss()}
    t0 = time.perf_counter()
    store = None
    if cfg["mode"] == "full":
        model, _ = load_model(cfg["run"])
    elif cfg["mode"] == "offload":
        model, store = load_offloaded(cfg["run"], capacity=cfg["cache"], policy=cfg["policy"])
    else:  # hf_full / hf_offload: a transformers model folder
        from moelab.hf import load_hf_causal_lm
        model, tok = load_hf_causal_lm(cfg["run"])
        if cfg["mode"] == "hf_offload":
            from moelab.hf_offload import offload_hf
            store = offload_hf(model, cfg["run"], capacity=cfg["cache"], policy=cfg["policy"])
    out["load_s"] = time.perf_counter() - t0
    out["mem_loaded"] = memory_now()
    t0 = time.perf_counter()
    T, K = cfg["temperature"], 20  # sampling (fixed seed) unless T = 0: greedy text of a briefly trained model
    if cfg["mode"].startswith("hf"):  # degenerates into one repeated byte, which flatters every cache
        ids = tok(PROMPT, return_tensors="pt").input_ids
        torch.manual_seed(0)
        kw = {"do_sample": True, "temperature": T, "top_k": K} if T > 0 else {"do_sample": False}
        toks = model.generate(ids, max_new_tokens=cfg["tokens"], min_new_tokens=cfg["tokens"], use_cache=True,
                              pad_token_id=0, **kw)[0, ids.shape[1]:]
    else:
        ids = torch.tensor([BOS_ID] + list(PROMPT.encode()))
        toks = generate(model, ids, max_new_tokens=cfg["tokens"], temperature=T, top_k=K,
                        generator=torch.Generator().manual_seed(0))
    out["gen_s"] = time.perf_counter() - t0
    out["tok_s"] = cfg["tokens"] / out["gen_s"]
    out["mem"] = memory_now()
    out["peak_rss"] = _peak_rss()
    out["tokens_out"] = toks.tolist()
    if store is not None:
        store.close()
        out["stats"] = store.stats.summary(store.expert_bytes)
        out["text"] = bytes(t for t in toks.tolist() if t < 256).decode("utf-8", errors="replace")
        out["capacity"], out["expert_bytes"], out["n_experts_total"] = store.capacity, store.expert_bytes, \
            store.E * store.L
    return out


def run_one(cfg: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, check=False,
                       env=env, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"worker {cfg} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--run", help="run folder (moelab train) of a model large enough for memory to show")
    ap.add_argument("--hf", help="also a local transformers MoE model folder (through moelab's experts backend)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (top-k 20, seed 0); 0 = "
                    "greedy")
    ap.add_argument("--caches", default="8,16,32", help="experts per layer (comma list)")
    ap.add_argument("--policies", default="lru,lfu,least-stale,prefetch", help="comma list")
    ap.add_argument("--main-cache", default="16", help="cache size at which every policy runs (others: lru only)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_offload_generate.json"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if not args.run and not args.hf:
        ap.error("--run RUN and/or --hf DIR is required")
    from moelab.checkpoint import latest
    configs, files = [], {}
    for fam, src, full, off in (("moelab", args.run, "full", "offload"), ("hf", args.hf, "hf_full", "hf_offload")):
        if not src:
            continue
        files[fam] = latest(src) / "model.safetensors" if fam == "moelab" else Path(src) / "model.safetensors"
        with open(files[fam], "rb") as f:  # warm the page cache: every configuration reads memory, not disk
            while f.read(64 << 20):
                pass
        base = {"run": src, "family": fam, "tokens": args.tokens, "threads": args.threads,
                "temperature": args.temperature}
        configs.append({**base, "mode": full})
        for c in args.caches.split(","):
            for pol in args.policies.split(","):
                if pol == "lru" or c == args.main_cache:
                    configs.append({**base, "mode": off, "cache": c, "policy": pol})
    load0 = os.getloadavg()
    empty = {fam: run_one({"mode": "empty", "family": fam, "threads": args.threads}) for fam in files}
    rounds = []
    for r in range(args.repeats):
        rounds.append([run_one(c) for c in configs])
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    load1 = os.getloadavg()
    rows = []
    for i, c in enumerate(configs):
        runs = [rd[i] for rd in rounds]
        last = runs[-1]
        j = next(n for n, x in enumerate(configs) if x["family"] == c["family"])  # that family's full model
        row = {**c, "tok_s": statistics.median(x["tok_s"] for x in runs),
               "vs_full": statistics.median(x["tok_s"] / rd[j]["tok_s"] for x, rd in zip(runs, rounds)),
               "same_tokens": all(x["tokens_out"] == rounds[0][j]["tokens_out"] for x in runs),
               "anon_MB": (last["mem"]["anonymous"] - empty[c["family"]]["mem"]["anonymous"]) / 1e6,
               "file_MB": (last["mem"]["rss"] - last["mem"]["anonymous"]) / 1e6,
               "peak_rss_MB": (last["peak_rss"] - empty[c["family"]]["peak_rss"]) / 1e6,
               "load_s": statistics.median(x["load_s"] for x in runs)}
        if "stats" in last:
            s = last["stats"]
            row.update(capacity=last["capacity"], hit_rate=s["hit_rate"], decode_hit_rate=s["decode_hit_rate"],
                       materialised_MB=s["peak_resident_bytes"] / 1e6, fetched_MB=s["fetched_bytes"] / 1e6,
                       prefetched=s["prefetched"], prefetch_used=s["prefetch_used"],
                       prefetch_waits=s["prefetch_waits"], n_experts_total=last["n_experts_total"],
                       expert_bytes=last["expert_bytes"])
        rows.append(row)
    res = {"meta": {"run": args.run, "hf": args.hf, "temperature": args.temperature, "top_k": 20, "seed": 0,
                    "weights_file_MB": {k: f.stat().st_size / 1e6 for k, f in files.items()}, "tokens": args.tokens,
                    "prompt": PROMPT, "threads": args.threads, "repeats": args.repeats,
                    "loadavg_start": load0, "loadavg_end": load1, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime()),
                    "empty_process_anon_MB": {k: e["mem"]["anonymous"] / 1e6 for k, e in empty.items()}},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"offloaded vs fully loaded generation, {args.tokens} tokens at T={args.temperature}, load {load0[0]:.1f}"
                    f"->{load1[0]:.1f}")
    for col in ("model", "mode", "cache/layer", "policy", "tok/s", "vs full", "same tokens", "hit rate (decode)",
                "experts MB", "anon MB", "file pages MB", "peak RSS MB"):
        t.add_column(col)
    f = lambda v, fmt=".3f": "-" if v is None else format(v, fmt)
    for r in rows:
        t.add_row(r["family"], r["mode"], str(r.get("capacity", "-")), r.get("policy", "-"), f(r["tok_s"], ".1f"),
                  f(r["vs_full"], ".2f"), str(r["same_tokens"]),
                  f"{f(r.get('hit_rate'))} ({f(r.get('decode_hit_rate'))})", f(r.get("materialised_MB"), ".0f"),
                  f(r["anon_MB"], ".0f"), f(r["file_MB"], ".0f"), f(r["peak_rss_MB"], ".0f"))
    Console(width=160).print(t)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
