"""`moelab offload simulate TRACE`, `moelab offload pregate TRACE` (the expert-cache simulator's CLI and plots) and
`moelab offload generate RUN` (real offloaded generation: experts read from the checkpoint file on demand)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moelab.offload import (
    LINKS,
    SCOPES,
    CostModel,
    load_pregate,
    parse_caches,
    record_pregate,
    save_pregate,
    simulate,
    write_json,
)
from moelab.offload_policies import EVICTIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("offload", help="expert offloading: cache policy simulator on a routing trace",
                       description="Replay a routing trace through expert caches (LRU, LFU, FIFO, least-stale, "
                                   "static pinning, Belady's optimum, prefetchers) and score them.")
    osub = p.add_subparsers(dest="offload_command", required=True)
    s = osub.add_parser("simulate", help="hit rate, hit rate / Belady's, stalls and tokens/s per policy and cache size",
                        description="Replay TRACE token by token (decode order) through expert caches; prints a table, "
                                    "writes hit-rate and tokens/s plots and offload.json to --out.")
    s.add_argument("trace", help="a .npz routing trace (moelab trace)")
    s.add_argument("--cache", default="1x,2x,4x",
                   help="cache sizes: experts per layer (8), multiples of top-k (2x), or bytes of all caches "
                        "(512MB, 2GiB; via --expert-bytes); default 1x,2x,4x")
    s.add_argument("--policy", default="all",
                   help=f"comma list of {', '.join(EVICTIONS)}, affinity, pregate, prev-token (prefetchers, on "
                        "--prefetch-base), EVICTION+PREFETCHER, or all (default)")
    s.add_argument("--prefetch-base", default="lru", choices=[e for e in EVICTIONS if e != "static"],
                   help="eviction policy under a bare prefetcher name (default lru)")
    s.add_argument("--scope", default="layer", choices=SCOPES,
                   help="one cache per MoE layer, or one global cache of cache*L experts (default layer)")
    s.add_argument("--prompt-len", type=int, default=16, help="positions per sequence replayed as one prefill step")
    s.add_argument("--fit-fraction", type=float, default=0.25,
                   help="first fraction of sequences used to profile static pins / fit affinity (default 0.25)")
    s.add_argument("--pregate", default=None, help="pre-gate predictions (moelab offload pregate), enables 'pregate'")
    s.add_argument("--link", default="pcie4,nvme,cpu", help=f"comma list of links to cost: {', '.join(LINKS)}")
    s.add_argument("--bandwidth", type=float, default=None, help="override link bandwidth, bytes/s")
    s.add_argument("--latency", type=float, default=None, help="override link latency per transfer, seconds")
    s.add_argument("--expert-bytes", type=int, default=None, help="bytes of one expert (default OLMoE-1B-7B's, bf16)")
    s.add_argument("--device-bandwidth", type=float, default=None, help="fast-memory bytes/s while computing")
    s.add_argument("--out", default=None, help="folder for offload.json and the plots")
    s.set_defaults(func=cmd_simulate)
    g = osub.add_parser("pregate", help="record layer l+1's router applied to layer l's input, for a moelab trace",
                        description="Re-run a moelab model on TRACE's token windows and save, per MoE layer l < L-1, "
                                    "the experts layer l+1's gate picks from layer l's MoE input.")
    g.add_argument("trace", help="a .npz routing trace of a moelab run (moelab trace RUN)")
    g.add_argument("--run", default=None, help="the run folder (default: the trace's meta['run'])")
    g.add_argument("--out", required=True, help="output .npz")
    g.set_defaults(func=cmd_pregate)
    gen = osub.add_parser("generate", help="generate from a run with its experts offloaded (read from the "
                          "checkpoint file on demand, at most N per layer in memory)",
                          description="Sample bytes after --prompt from RUN's checkpoint with the routed experts left "
                                      "in model.safetensors (memory-mapped) and at most --cache-experts of them "
                                      "materialised per MoE layer; prints the text, and tokens/s, hit rate and "
                                      "memory on stderr. Same tokens as the fully loaded model.")
    gen.add_argument("run", nargs="?", help="run folder written by `moelab train` (or --hf DIR)")
    gen.add_argument("--hf", metavar="DIR", help="a local transformers MoE model folder instead of a moelab run: its "
                     "experts run through moelab's experts backend, read from DIR's safetensors")
    gen.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    gen.add_argument("--ckpt", help="a checkpoint folder (default: the run's latest)")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="bytes to sample (default 200)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, default=20, help="sample among the k most likely bytes (default 20)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_offload_flags(gen, always=True)
    gen.set_defaults(func=cmd_generate)


def add_offload_flags(p: argparse.ArgumentParser, always: bool = False) -> None:
    """--cache-experts / --policy (and --offload unless `always`): what `moelab generate` adds to offload."""
    if not always:
        p.add_argument("--offload", action="store_true", help="keep the routed experts in the checkpoint file "
                       "(memory-mapped) and at most --cache-experts per layer in memory")
    p.add_argument("--cache-experts", default="2x",
                   help="experts kept per MoE layer: N, a multiple of top-k (2x), or a byte budget for all layers "
                        "(64MB, 1GiB); default 2x")
    p.add_argument("--policy", default="lru",
                   help="eviction: lru (default), lfu, fifo, least-stale; prefetch (= lru+pregate: the next layer's "
                        "gate on this layer's input picks experts loaded ahead on a background thread), or "
                        "EVICTION+pregate")


def offloaded_model(args):
    """(model, store) of args.run with its experts offloaded per --cache-experts / --policy."""
    from moelab.offload_store import load_offloaded
    return load_offloaded(args.run, getattr(args, "ckpt", None), capacity=args.cache_experts, policy=args.policy)


def report_offload(store, n_tokens: int, seconds: float) -> str:
    """One stderr line: tokens/s, hit rate, bytes fetched, experts materialised and anonymous memory."""
    from moelab.offload_store import memory_now
    s = store.stats.summary(store.expert_bytes)
    mem = memory_now()
    f = lambda v: "-" if v is None else f"{v:.3f}"
    return (f"{n_tokens} tokens in {seconds:.2f} s ({n_tokens / max(seconds, 1e-9):.1f} tokens/s); expert cache "
            f"{store.capacity}/layer ({store.prefetcher or 'no'} prefetch): hit rate {f(s['hit_rate'])} "
            f"(decode {f(s['decode_hit_rate'])}), {s['fetched_bytes'] / 1e6:.1f} MB fetched, peak "
            f"{s['peak_resident_experts']} of {store.E * store.L} experts materialised "
            f"({s['peak_resident_bytes'] / 1e6:.1f} MB)"
            + (f"; anonymous memory {mem['anonymous'] / 1e6:.0f} MB" if mem else ""))


def cmd_generate(args) -> int:
    import time

    import torch

    from moelab.hf_tokenizer import load_tokenizer, prompt_ids
    from moelab.model import generate
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads={args.threads} is invalid: allowed an integer >= 1")
        torch.set_num_threads(args.threads)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is invalid: allowed an integer >= 0")
    if (args.run is None) == (args.hf is None):
        raise ValueError("give a run folder or --hf DIR (one of them)")
    if args.hf:
        from moelab.hf_offload import generate_hf_offloaded
        text, n, dt, store = generate_hf_offloaded(args.hf, args.prompt, capacity=args.cache_experts,
                                                   policy=args.policy, max_new_tokens=args.max_new_tokens,
                                                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        print(args.prompt + text)
        print(report_offload(store, n, dt), file=sys.stderr)
        return 0
    model, store = offloaded_model(args)
    tok = load_tokenizer(model.cfg.tokenizer, args.run)
    ids = prompt_ids(tok, args.prompt)
    t0 = time.perf_counter()
    try:
        out = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, generator=torch.Generator().manual_seed(args.seed),
                       suppress_ids=tok.never_sampled(model.cfg.vocab_size))
    finally:
        store.close()
    dt = time.perf_counter() - t0
    print(args.prompt + tok.decode(out.tolist()))
    print(report_offload(store, out.numel(), dt), file=sys.stderr)
    return 0


def cmd_pregate(args) -> int:
    from moelab.checkpoint import load_model
    from moelab.trace import load_trace
    tr = load_trace(args.trace)
    run = args.run or tr.meta.get("run")
    if not run:
        raise ValueError(f"trace {args.trace!r} names no run: pass --run RUN")
    model, _ = load_model(run)
    path = save_pregate(args.out, record_pregate(model, tr), args.trace)
    print(f"pre-gate predictions for {tr.n_tokens} tokens x {tr.n_layers - 1} layers -> {path}")
    return 0


def _caches(text: str, k: int, n_layers: int, expert_bytes: int) -> list[int]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    plain = ",".join(str(int(float(t[:-1]) * k)) if t.lower().endswith("x") else t for t in items)
    return parse_caches(plain, n_layers, expert_bytes)


def cmd_simulate(args) -> int:
    from rich.console import Console

    from moelab.trace import load_trace
    tr = load_trace(args.trace)
    links = [t.strip() for t in args.link.split(",") if t.strip()]
    costs = {ln: CostModel.for_link(ln, link_Bps=args.bandwidth, latency_s=args.latency,
                                    expert_bytes=args.expert_bytes, device_Bps=args.device_bandwidth)
             for ln in links}
    eb = next(iter(costs.values())).expert_bytes if costs else CostModel().expert_bytes
    caches = _caches(args.cache, tr.top_k, tr.n_layers, eb)
    pre = load_pregate(args.pregate, tr) if args.pregate else None
    res = simulate(tr, caches=caches, policies=[p.strip() for p in args.policy.split(",")], scope=args.scope,
                   prompt_len=args.prompt_len, fit_fraction=args.fit_fraction, base=args.prefetch_base,
                   pregate_LNK=pre, costs=costs)
    res["meta"]["trace"] = str(args.trace)
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(result_table(res, links[0] if links else None))
    if args.out:
        out = Path(args.out)
        paths = [write_json(res, out / "offload.json"), *plot_results(res, out, title=Path(args.trace).name)]
        console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def result_table(res: dict, link: str | None):
    from rich.table import Table
    m = res["meta"]
    t = Table(title=f"expert cache, scope={m['scope']}, E={m['n_experts']} k={m['top_k']} L={m['n_layers']}: "
                    f"{m['decode_tokens']} decode + {m['prefill_tokens']} prefill tokens scored")
    for col in ("cache/layer", "policy", "decode hit", "/ Belady", "stalls/token", "prefill hit", "fetched",
                "pf wasted", *([f"{link} tok/s", "resident tok/s"] if link else [])):
        t.add_column(col, justify="left" if col == "policy" else "right")
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    for r in res["rows"]:
        t.add_row(str(r["cache"]), r["policy"], f(r["decode_hit_rate"], ".3f"), f(r["decode_vs_belady"], ".3f"),
                  f(r["decode_misses_per_token"], ".2f"), f(r["prefill_hit_rate"], ".3f"),
                  str(r["decode_fetched_experts"] + r["prefill_fetched_experts"]), str(r["prefetch_wasted"]),
                  *([f(r[f"{link}_decode_tok_s"], ".1f"), f(r[f"{link}_decode_resident_tok_s"], ".1f")]
                    if link else []))
    return t


def plot_results(res: dict, out: Path, title: str = "", prefix: str = "") -> list[Path]:
    """PREFIXhit_rate.png (decode hit rate vs cache size, one line per policy) and PREFIXtokens_s.png (decode tokens/s
    per link vs cache size)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    rows, m = res["rows"], res["meta"]
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in pols:
        rr = [r for r in rows if r["policy"] == p]
        ax.plot([r["cache"] for r in rr], [r["decode_hit_rate"] for r in rr], marker="o", label=p,
                ls="--" if r_pf(rr) else "-", lw=2.5 if p == "belady" else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"cache size, experts per layer (k={m['top_k']}, E={m['n_experts']})")
    ax.set_ylabel("decode hit rate")
    ax.set_title(f"{title} ({m['scope']} cache)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / f"{prefix}hit_rate.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    links = list(m["costs"])
    if links:
        fig, axes = plt.subplots(1, len(links), figsize=(4 * len(links), 3.6), squeeze=False)
        for ax, ln in zip(axes[0], links):
            for p in pols:
                rr = [r for r in rows if r["policy"] == p]
                ax.plot([r["cache"] for r in rr], [r[f"{ln}_decode_tok_s"] for r in rr], marker="o", label=p,
                        ls="--" if r_pf(rr) else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{ln}", fontsize=9)
            ax.set_xlabel("experts per layer")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("decode tokens/s (cost model)")
        axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        paths.append(out / f"{prefix}tokens_s.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def r_pf(rr: list[dict]) -> bool:
    return bool(rr and rr[0]["prefetcher"])
