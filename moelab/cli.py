"""`moelab` entry point: subcommands only, no logic. Each subcommand lives in its own module's `cli_*`."""
from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from moelab.demo import run_demo
    return run_demo(out=args.out)


def _trace(args: argparse.Namespace) -> int:
    from moelab.trace import cli_trace
    return cli_trace(run=args.run, hf=args.hf, data=args.data, out=args.out, seq_len=args.seq_len,
                     max_tokens=args.max_tokens, logits=not args.no_logits, dtype=args.dtype)


def _analyze(args: argparse.Namespace) -> int:
    from moelab.report import cli_analyze
    return cli_analyze(trace=args.trace, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelab", description="Mixture-of-Experts toolkit.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the demo (what `make demo` runs)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.set_defaults(func=_demo)
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
    t.set_defaults(func=_trace)
    a = sub.add_parser("analyze", help="plots + one HTML report from a routing trace",
                       description="Load, specialization, inter-layer affinity, local routing consistency and top "
                                   "tokens per expert; writes PNGs and index.html into --out.")
    a.add_argument("trace", help="trace .npz written by `moelab trace`")
    a.add_argument("--out", default="report", help="output folder (default report/)")
    a.set_defaults(func=_analyze)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # config / input errors: one clear line, no stack trace
        print(f"moelab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
