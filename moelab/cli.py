"""`moelab` entry point: subcommands only, no logic. Each subcommand lives in its own module's `cli_*`."""
from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from moelab.demo import run_demo
    return run_demo(out=args.out, steps=args.steps, threads=args.threads)


def _train(args: argparse.Namespace) -> int:
    from moelab.presets import parse_overrides
    from moelab.train import cli_train
    moe = {"router": args.router, "balance": args.balance, "n_experts": args.experts, "top_k": args.top_k,
           "aux_loss_coef": args.aux_coef, "expert_impl": args.expert_impl, **parse_overrides(args.moe_set or [])}
    tr = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
          "grad_accum": args.grad_accum, "lr": args.lr, "warmup": args.warmup, "seed": args.seed,
          "log_every": args.log_every, "eval_every": args.eval_every, "ckpt_every": args.ckpt_every,
          "keep_last": args.keep_last, "data": args.data}
    kw = {"preset": args.preset, "out": args.out, "resume": args.resume, "threads": args.threads,
          "moe_changes": moe, "train_changes": tr}
    if args.nproc or args.ep or "WORLD_SIZE" in os.environ:  # expert parallel (issue 7)
        from moelab.ep_train import cli_train_ep
        return cli_train_ep(nproc=args.nproc, ep=args.ep, **kw)
    return cli_train(**kw)


def _eval(args: argparse.Namespace) -> int:
    from moelab.train import cli_eval
    return cli_eval(run=args.run, ckpt=args.ckpt, batches=args.batches, threads=args.threads)


def _generate(args: argparse.Namespace) -> int:
    from moelab.train import cli_generate
    return cli_generate(run=args.run, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, seed=args.seed)


def _plot(args: argparse.Namespace) -> int:
    from moelab.plots import plot_run
    for path in plot_run(args.run):
        print(path)
    return 0


def _add_lm_commands(sub) -> None:
    """train / eval / generate / plot (issue 5)."""
    from moelab.config import BALANCES, EXPERT_IMPLS
    from moelab.presets import PRESETS
    from moelab.routers import ROUTERS
    t = sub.add_parser("train", help="train a tiny MoE language model on the built-in corpus or your text",
                       description="Train a byte-level MoE LM. Writes metrics.jsonl, summary.json and "
                                   "safetensors checkpoints (ckpt/step_N) into --out. Unset options keep "
                                   "the preset's / TrainConfig's defaults.")
    t.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model shape (default tiny)")
    t.add_argument("--router", choices=sorted(ROUTERS), help="router (default: the preset's)")
    t.add_argument("--balance", choices=list(BALANCES), help="load balancing (default: the preset's)")
    t.add_argument("--experts", type=int, help="routed experts E (default: the preset's)")
    t.add_argument("--top-k", type=int, help="experts per token k (default: the preset's)")
    t.add_argument("--aux-coef", type=float, help="weight of the balance loss (default: the preset's)")
    t.add_argument("--expert-impl", choices=list(EXPERT_IMPLS), help="expert compute path (default grouped)")
    t.add_argument("--moe-set", nargs="+", metavar="FIELD=VALUE", help="any other MoEConfig field, e.g. "
                   "--moe-set n_null=2 (router adamoe) or n_zero=1 n_copy=1 gating_residual=true (moepp)")
    t.add_argument("--steps", type=int, help="optimizer steps (default 600)")
    t.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 16)")
    t.add_argument("--seq-len", type=int, help="bytes per sequence (default 128)")
    t.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    t.add_argument("--warmup", type=int, help="linear warm-up steps (default 30)")
    t.add_argument("--seed", type=int, help="seed for init and data order (default 0)")
    t.add_argument("--log-every", type=int, help="print a line every N steps (default 20)")
    t.add_argument("--eval-every", type=int, help="validate every N steps, 0 = end only (default 200)")
    t.add_argument("--ckpt-every", type=int, help="checkpoint every N steps, 0 = end only (default 200)")
    t.add_argument("--keep-last", type=int, help="checkpoints kept (default 2)")
    t.add_argument("--data", nargs="+", metavar="PATH", help="your text files/folders, domain = folder name "
                   "(default: the built-in corpus: Python stdlib code, pydoc help text, C headers)")
    t.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint "
                   "(with its saved configs; --steps may extend it)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 per rank with --nproc)")
    t.add_argument("--nproc", type=int, help="spawn N local gloo processes for expert x data parallel training "
                   "(--batch-size is per rank; under torchrun the world size is torchrun's)")
    t.add_argument("--ep", type=int, help="expert-parallel size P: experts sharded over blocks of P ranks, "
                   "N/P copies of each shard (a divisor of N; default N); rank r writes OUT/rank{r}, OUT gets "
                   "the merged model")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="validation loss per domain of a run vs the unigram baseline",
                       description="Evaluate the latest (or --ckpt) checkpoint of RUN on its validation split.")
    e.add_argument("run", help="run folder written by `moelab train`")
    e.add_argument("--ckpt", help="a checkpoint folder (default: the run's latest)")
    e.add_argument("--batches", type=int, help="validation micro-batches per domain (default: the run's)")
    e.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    e.set_defaults(func=_eval)
    g = sub.add_parser("generate", help="sample text from a trained run",
                       description="Sample bytes after --prompt from RUN's latest checkpoint.")
    g.add_argument("run", help="run folder written by `moelab train`")
    g.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    g.add_argument("--max-new-tokens", type=int, default=200, help="bytes to sample (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=20, help="sample among the k most likely bytes (default 20)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.set_defaults(func=_generate)
    pl = sub.add_parser("plot", help="loss, expert-load, MaxVio and specialization plots of a run",
                        description="Write loss.png, expert_load.png, max_vio.png and specialization.png "
                                    "into RUN from its metrics.jsonl and summary.json.")
    pl.add_argument("run", help="run folder written by `moelab train`")
    pl.set_defaults(func=_plot)


def _trace(args: argparse.Namespace) -> int:
    from moelab.trace import cli_trace
    return cli_trace(run=args.run, hf=args.hf, data=args.data, out=args.out, seq_len=args.seq_len,
                     max_tokens=args.max_tokens, logits=not args.no_logits, dtype=args.dtype)


def _analyze(args: argparse.Namespace) -> int:
    from moelab.report import cli_analyze
    return cli_analyze(trace=args.trace, out=args.out)


def _bench(args: argparse.Namespace) -> int:
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_moe.py"
    if not path.exists():
        raise ValueError(f"benchmark script not found at {path}: run `moelab bench` from a source checkout")
    spec = importlib.util.spec_from_file_location("bench_moe", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_moe", bench)  # its dataclasses look the module up there
    spec.loader.exec_module(bench)
    bench.run(quick=args.quick, rounds=args.rounds, budget_s=args.budget, impl=args.impl, out=args.out,
              hf=not args.no_hf, prof=args.profile)
    return 0


def _add_bench_command(sub) -> None:
    """bench (issue 6): benchmarks/bench_moe.py."""
    from moelab.config import EXPERT_IMPLS
    b = sub.add_parser("bench", help="MoE layer speed vs dense-equivalent GEMMs, transformers and the decode floor",
                       description="Interleaved fp32 2-thread timings of the moelab MoE layer (forward, forward+"
                                   "backward) vs the dense-equivalent MLP doing the same FLOPs, the transformers "
                                   "Qwen3-MoE block (eager, grouped_mm), and 8-token decode vs the weight-bandwidth "
                                   "floor; prints median ratios and writes benchmarks/results/bench_moe.json.")
    b.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds (smoke test)")
    b.add_argument("--rounds", type=int, default=15, help="interleaved rounds per measurement at most (default 15)")
    b.add_argument("--budget", type=float, default=200.0, help="timing seconds for the whole run; each measurement "
                   "stops early past its share (default 200)")
    b.add_argument("--impl", default="grouped", choices=list(EXPERT_IMPLS), help="moelab expert path (default "
                   "grouped)")
    b.add_argument("--out", help="JSON path (default benchmarks/results/bench_moe.json)")
    b.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    b.add_argument("--profile", action="store_true", help="also record where moelab's time goes (torch.profiler)")
    b.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelab", description="Mixture-of-Experts toolkit.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run the demo (what `make demo` runs)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--steps", type=int, help="training steps (default 500)")
    d.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: robust on a busy "
                   "2-core machine, where 2 threads contend)")
    d.set_defaults(func=_demo)
    _add_lm_commands(sub)
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
    _add_bench_command(sub)
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
