"""`moelab` entry point: the command surface only. Each area's handlers live in a cli_* module beside this one.

Convention: flat verbs for actions (`moelab train`, `moelab trace`, ...); a noun group only where it holds
several verbs (`moelab offload simulate`).
"""
from __future__ import annotations

import argparse
import sys

from moelab import __version__, cli_lora, cli_offload, cli_run, cli_trace

AREAS = (cli_run, cli_trace, cli_offload, cli_lora)  # each has register(subparsers)


def _bench(args: argparse.Namespace) -> int:
    from moelab.bench import run_args
    return run_args(args)


def _add_bench(sub) -> None:
    from moelab.bench import add_arguments
    b = sub.add_parser("bench", help="MoE layer speed vs dense-equivalent GEMMs, transformers and the decode floor",
                       description="Interleaved fp32 2-thread timings of the moelab MoE layer (forward, forward+"
                                   "backward) vs the dense-equivalent MLP doing the same FLOPs, the transformers "
                                   "Qwen3-MoE block (eager, grouped_mm), and 8-token decode vs the weight-bandwidth "
                                   "floor; prints median ratios and writes a JSON (--out).")
    add_arguments(b)
    b.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelab", description="Mixture-of-Experts toolkit: build, train, balance, "
                                "trace, place, parallelise and serve MoE models on your own machine.")
    p.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in AREAS:
        area.register(sub)
    _add_bench(sub)
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
