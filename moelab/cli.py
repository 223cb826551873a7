"""`moelab` entry point: subcommands only, no logic. Each subcommand lives in its own module's `cli_*`."""
from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from moelab.demo import run_demo
    return run_demo(out=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelab", description="Mixture-of-Experts toolkit.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the demo (what `make demo` runs)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.set_defaults(func=_demo)
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
