"""`moelab trace | analyze`: record routing traces and write their report."""
from __future__ import annotations

import argparse
from pathlib import Path

from moelab.runtime import DEVICES, best_device


def _trace(args: argparse.Namespace) -> int:
    """Exactly one of RUN / --hf; writes the .npz and prints a one-line summary."""
    from moelab.cli_run import set_threads
    set_threads(args.threads)
    device = args.device or best_device()
    if (args.run is None) == (args.hf is None):
        raise ValueError("give exactly one of RUN (a moelab run folder) or --hf PATH_OR_NAME")
    if args.max_tokens < args.seq_len:
        raise ValueError(f"--max-tokens={args.max_tokens} is invalid: allowed >= --seq-len={args.seq_len}")
    kw = {"seq_len": args.seq_len, "max_tokens": args.max_tokens, "logits": not args.no_logits}
    if args.run is not None:
        from moelab.trace import trace_run
        tr = trace_run(args.run, args.data, device=device, **kw)
    else:
        from moelab.hf import trace_hf_path
        tr = trace_hf_path(args.hf, args.data, dtype=args.dtype, device=device, **kw)
    path = tr.save(args.out)
    print(f"traced {tr.n_tokens} tokens x {tr.n_layers} MoE layers (E={tr.n_experts}, k={tr.top_k}, domains "
          f"{', '.join(tr.domains)}) -> {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from moelab.report import write_report
    from moelab.trace import load_trace
    path = write_report(load_trace(args.trace), args.out)
    print(f"report: {path} ({len(list(Path(args.out).glob('*.png')))} plots)")
    return 0


def register(sub) -> None:
    """trace / analyze."""
    t = sub.add_parser("trace", help="record routing traces (.npz) from a moelab run or a local transformers model",
                       description="Record which experts every token uses in every MoE layer. Give a run folder "
                                   "(moelab trace RUN) or a transformers model (moelab trace --hf PATH).")
    t.add_argument("run", nargs="?", help="run folder written by `moelab train` (its latest checkpoint is traced)")
    t.add_argument("--hf", metavar="PATH_OR_NAME", help="local transformers MoE model folder (or a name already in "
                   "the local HF cache; nothing is downloaded)")
    t.add_argument("--data", nargs="+", metavar="PATH", help="text files/folders; the domain label is the folder "
                   "name (default: the built-in corpus; for a run, its validation split)")
    t.add_argument("--out", default="trace.npz", help="output .npz (default trace.npz)")
    t.add_argument("--seq-len", type=int, default=128, help="tokens per traced window (default 128)")
    t.add_argument("--max-tokens", type=int, default=16384, help="tokens to trace in all (default 16384)")
    t.add_argument("--no-logits", action="store_true", help="do not store router logits (they are float16)")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="--hf model dtype (default float32)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--device", choices=DEVICES, help="cpu | cuda | mps (default: the best available)")
    t.set_defaults(func=_trace)
    a = sub.add_parser("analyze", help="plots + one HTML report from a routing trace",
                       description="Load, specialization, inter-layer affinity, local routing consistency and top "
                                   "tokens per expert; writes PNGs and index.html into --out.")
    a.add_argument("trace", help="trace .npz written by `moelab trace`")
    a.add_argument("--out", default="report", help="output folder (default report/)")
    a.set_defaults(func=_analyze)
