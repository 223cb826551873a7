"""`moelab compare NAME|all`: parser and handler; the work is in compare.py / compare_report.py."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys


def register(sub) -> None:
    """Add `compare` to an argparse subparsers action."""
    from moelab.compare_claims import CLAIMS, DEFAULT_PRESET, DEFAULT_SCALE, DEFAULT_STEPS
    p = sub.add_parser(
        "compare", help="reproduce MoE paper claims: arms x seeds, report with CIs and verdicts",
        description="Train the arms of one claim (or all) on the same data, model and budget over several seeds, "
                    "then write DIR/report.md and DIR/index.html: per claim a table of mean +- 95%% CI, curves, "
                    "load heatmaps and a verdict (reproduced / not reproduced / inconclusive). Finished arms "
                    f"are skipped on a rerun. Claims: {', '.join(CLAIMS)}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", help="a claim name or 'all'")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (0..n-1), shared by all arms")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps per run (default {DEFAULT_STEPS})")
    p.add_argument("--preset", default=None,
                   help=f"model preset used unchanged (default: {DEFAULT_PRESET} scaled to {DEFAULT_SCALE})")
    p.add_argument("--jobs", type=int, default=None, help="parallel processes (default: os.cpu_count())")
    p.add_argument("--out", required=True, help="output folder (reused to resume)")
    p.add_argument("--report-only", action="store_true", help="write the report from finished runs, train nothing")
    p.set_defaults(func=cli_compare)


def machine_meta(args) -> dict:
    """What the report header states: command, date, machine, torch, load average."""
    import torch

    from moelab.compare_claims import DEFAULT_PRESET, DEFAULT_STEPS
    load = os.getloadavg()
    return {"command": "moelab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "",
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "torch": torch.__version__, "load average (1/5/15 min)": " / ".join(f"{x:.2f}" for x in load),
            "seeds": args.seeds, "steps": args.steps or DEFAULT_STEPS,
            "preset": args.preset or f"{DEFAULT_PRESET} (scaled)"}


def cli_compare(args) -> int:
    from moelab import compare
    from moelab.compare_report import write_report
    if args.report_only:
        data = compare.load_results(compare.claim_names(args.name), seeds=args.seeds, out=args.out)
    else:
        data = compare.run_all(args.name, seeds=args.seeds, steps=args.steps, preset=args.preset, jobs=args.jobs,
                               out=args.out)
    md, page = write_report(data, args.out, machine_meta(args))
    print(f"report: {md}  {page}")
    return 0
