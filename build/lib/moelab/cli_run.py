"""`moelab train | eval | generate | plot | demo`: the handlers (argparse in, library calls out)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from rich.console import Console

from moelab.resolver import RunConfig, add_config_flags, apply, diff, overrides_from_args, resolve
from moelab.runtime import DEVICES, DTYPES, Runtime, runtime

# fields `train --resume` may change (what the run does next, not what it is); anything else is refused
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_last",
                     "train.eval_batches")


def set_threads(threads: int | None) -> None:
    """--threads N: torch CPU threads (None: torch's choice)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads={threads} is invalid: allowed an integer >= 1")
        torch.set_num_threads(threads)


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """--device / --dtype / --threads: where and how a command computes (not part of the run's config)."""
    p.add_argument("--device", choices=DEVICES, help="cpu | cuda | mps (default: the best available)")
    p.add_argument("--dtype", choices=DTYPES, help="float32 (default) | bfloat16 (autocast; router and losses "
                   "stay float32)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 per rank with --nproc)")


def runtime_of(args: argparse.Namespace) -> Runtime:
    """Sets --threads and returns the Runtime of --device / --dtype."""
    set_threads(args.threads)
    return runtime(args.device, args.dtype)


def resume_config(out: Path, overrides: dict) -> RunConfig:
    """The run's own config, with only the fields in RESUME_MAY_CHANGE changed; other changes are refused."""
    saved = resolve(file=out / "config.json")
    new = apply(saved, overrides)
    bad = {k: v for k, v in diff(saved, new).items() if k not in RESUME_MAY_CHANGE}
    if bad:
        k, (old, want) = next(iter(bad.items()))
        raise ValueError(f"--resume keeps the run's config: {k} is {old!r} in {out / 'config.json'}, not {want!r}; "
                         f"only {', '.join(RESUME_MAY_CHANGE)} may change on resume (start a new --out instead)")
    return new


def _train(args: argparse.Namespace) -> int:
    from moelab.train import Trainer, val_table
    overrides = overrides_from_args(args)
    out = Path(args.out)
    if args.resume and (out / "config.json").exists():
        run = resume_config(out, overrides)
    else:
        run = resolve(args.preset, args.config, overrides)
    if args.nproc is not None or args.ep is not None or "WORLD_SIZE" in os.environ:  # expert x data parallel
        from moelab.ep_train import launch
        return launch(run, out=args.out, resume=args.resume, nproc=args.nproc, ep=args.ep, threads=args.threads)
    trainer = Trainer(run.model, run.train, out, runtime=runtime_of(args))
    if args.tensorboard:
        from moelab.tensorboard import EventWriter
        trainer.log_sinks.append(EventWriter(out / "tb").write)
    summary = trainer.fit(resume=args.resume)
    Console().print(val_table(summary))
    Console().print(f"run folder: {out} (metrics.jsonl, summary.json, ckpt/); plots: moelab plot {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moelab.checkpoint import load_model
    from moelab.config import TrainConfig
    from moelab.data import build_corpus
    from moelab.train import evaluate, val_table
    rt = runtime_of(args)
    model, meta = load_model(args.run, args.ckpt)
    cfg = TrainConfig.from_dict(meta["train_config"])
    if args.batches is not None:
        if args.batches < 1:
            raise ValueError(f"--batches={args.batches} is invalid: allowed an integer >= 1")
        cfg = cfg.replace(eval_batches=args.batches)
    corpus = build_corpus(list(cfg.data), val_fraction=cfg.val_fraction, split_version=cfg.split_version)
    corpus.check(cfg.seq_len)
    ev = evaluate(model.to(rt.device), corpus, cfg, rt)
    summary = {"step": meta["step"], **ev, "unigram_loss": {d: corpus.unigram_loss(d) for d in corpus.domains}}
    Console().print(val_table(summary))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moelab.checkpoint import load_model
    from moelab.model import BOS_ID, generate
    rt = runtime_of(args)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is invalid: allowed an integer >= 0")
    model, _ = load_model(args.run)
    ids = torch.tensor([BOS_ID] + list(args.prompt.encode("utf-8")), device=rt.device)
    with rt.autocast():
        out = generate(model.to(rt.device), ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, generator=torch.Generator(device=rt.device).manual_seed(args.seed))
    print(args.prompt + bytes(out.tolist()).decode("utf-8", errors="replace"))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from moelab.plots import plot_compare, plot_run
    if len(args.runs) > 1 and args.out is None:
        raise ValueError("several runs are overlaid into one folder: give --out DIR")
    paths = plot_run(args.runs[0]) if args.out is None else plot_compare(args.runs, args.out)
    if args.tensorboard:
        from moelab.tensorboard import export_runs
        paths += export_runs(args.runs)
    for path in paths:
        print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from moelab.demo import run_demo
    return run_demo(out=args.out, steps=args.steps, threads=args.threads)


def register(sub) -> None:
    """demo / train / eval / generate / plot."""
    d = sub.add_parser("demo", help="run the demo (what `make demo` runs)",
                       description="Train the tiny MoE LM on the corpus that ships with Python, print a summary, "
                                   "write plots, a routing trace and its HTML report into --out.")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--steps", type=int, help="training steps (default 500)")
    d.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: robust on a busy "
                   "2-core machine, where 2 threads contend)")
    d.set_defaults(func=_demo)
    t = sub.add_parser("train", help="train an MoE language model on the built-in corpus or your text",
                       description="Train a byte-level MoE LM. Config: --preset, then --config FILE (TOML, JSON, or "
                                   "a run's config.json), then flags; every ModelConfig/MoEConfig/TrainConfig field "
                                   "is a flag (--model.FIELD, --moe.FIELD, --train.FIELD). Writes config.json (the "
                                   "full resolved config), metrics.jsonl, summary.json and checkpoints into --out.")
    add_config_flags(t)
    t.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    t.add_argument("--tensorboard", action="store_true", help="also log metrics as TensorBoard events in OUT/tb "
                   "(needs the optional `tensorboard` package: pip install moelab[tb])")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint with its saved "
                   f"config; only {', '.join(RESUME_MAY_CHANGE)} may change")
    add_runtime_flags(t)
    t.add_argument("--nproc", type=int, help="spawn N local gloo processes for expert x data parallel training "
                   "(--batch-size is per rank; under torchrun the world size is torchrun's)")
    t.add_argument("--ep", type=int, help="expert-parallel size P: experts sharded over blocks of P ranks, N/P "
                   "copies of each shard (a divisor of N; default N); rank r writes OUT/rank{r}, OUT the merged model")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="validation loss per domain of a run vs the unigram baseline",
                       description="Evaluate the latest (or --ckpt) checkpoint of RUN on its validation split.")
    e.add_argument("run", help="run folder written by `moelab train`")
    e.add_argument("--ckpt", help="a checkpoint folder (default: the run's latest)")
    e.add_argument("--batches", type=int, help="validation micro-batches per domain (default: the run's)")
    add_runtime_flags(e)
    e.set_defaults(func=_eval)
    g = sub.add_parser("generate", help="sample text from a trained run",
                       description="Sample bytes after --prompt from RUN's latest checkpoint.")
    g.add_argument("run", help="run folder written by `moelab train`")
    g.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    g.add_argument("--max-new-tokens", type=int, default=200, help="bytes to sample (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=20, help="sample among the k most likely bytes (default 20)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_runtime_flags(g)
    g.set_defaults(func=_generate)
    pl = sub.add_parser("plot", help="plots of a run, or several runs overlaid",
                        description="One RUN: write loss.png, expert_load.png, max_vio.png and specialization.png "
                                    "into it from its metrics.jsonl and summary.json. Several runs (or --out): "
                                    "loss, validation loss and MaxVio curves of every run overlaid, into --out.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `moelab train`")
    pl.add_argument("--out", help="folder for the overlay plots (needed with several runs)")
    pl.add_argument("--tensorboard", action="store_true", help="also write each run's metrics as TensorBoard "
                    "event files into RUN/tb (needs the optional `tensorboard` package: pip install moelab[tb])")
    pl.set_defaults(func=_plot)
