"""`moelab` entry point: the command surface only. Each area's handlers live in a cli_* module beside this one.

Convention: flat verbs for actions (`moelab train`, `moelab trace`, ...); a noun group only where it holds
several verbs (`moelab offload simulate`).
"""
from __future__ import annotations

import argparse
import sys

from moelab import (
    __version__,
    cli_compare,
    cli_convert,
    cli_hf,
    cli_lora,
    cli_offload,
    cli_place,
    cli_run,
    cli_trace,
)

# each area has register(subparsers)
AREAS = (cli_run, cli_trace, cli_convert, cli_hf, cli_place, cli_offload, cli_lora, cli_compare)


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


EXIT_INPUT, EXIT_RUNTIME = 2, 1  # bad input (config, flags, files); the run or the machine failed (disk, NaN)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every expected failure is one line on stderr and an exit status: 2 bad input
    (ValueError); 1 a write failed (OSError: disk full, read-only), training diverged or a rank died
    (RunFailed); 128+signal when SIGINT (130) / SIGTERM (143) stopped training after a checkpoint."""
    args = build_parser().parse_args(argv)
    from moelab.train import Interrupted, RunFailed
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # config / input errors: one clear line, no stack trace
        print(f"moelab {args.command}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except Interrupted as e:  # the trainer saved a checkpoint and says how to resume
        print(f"moelab {args.command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"moelab {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, RunFailed) as e:
        msg = str(e)
        if isinstance(e, OSError) and e.strerror:  # moelab's own OSErrors carry the whole line as strerror
            msg = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        print(f"moelab {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    raise SystemExit(main())
