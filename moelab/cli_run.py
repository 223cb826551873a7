"""`moelab train | eval | generate | plot | demo`: the handlers (argparse in, library calls out)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from rich.console import Console

from moelab.resolve import RunConfig, add_config_flags, apply, diff, overrides_from_args, resolve

# fields `train --resume` may change (what the run does next, not what it is); anything else is refused
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_last",
                     "train.eval_batches")


def set_threads(threads: int | None) -> None:
    """--threads N: torch CPU threads (None: torch's choice)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads={threads} is invalid: allowed an integer >= 1")
        torch.set_num_threads(threads)


def resume_config(out: Path, overrides: dict) -> RunConfig:
    """The run's own config, with only the fields in RESUME_MAY_CHANGE changed; other changes are refused."""
    from moelab.checkpoint import check_run_config
    check_run_config(out / "config.json")  # an unknown field is one line naming it, not a TypeError
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
    if args.threads is not None and args.threads < 1:  # before any process starts, with --nproc too
        raise ValueError(f"--threads={args.threads} is invalid: allowed an integer >= 1")
    if args.config and str(args.config).endswith(".json") and Path(args.config).is_file():
        from moelab.checkpoint import check_run_config
        check_run_config(args.config)  # a run's config.json with an unknown field: one line naming it
    saved = out / "config.json"
    if not saved.exists() and (out / "rank0" / "config.json").exists():  # an EP run stopped before its merge
        saved = out / "rank0" / "config.json"
    if args.resume and saved.exists():
        run = resume_config(saved.parent, overrides)
    else:
        run = resolve(args.preset, args.config, overrides)
    if args.nproc is not None or args.ep is not None or "WORLD_SIZE" in os.environ:  # expert x data parallel
        from moelab.ep_train import launch
        return launch(run, out=args.out, resume=args.resume, nproc=args.nproc, ep=args.ep, threads=args.threads)
    set_threads(args.threads)
    summary = Trainer(run.model, run.train, out).fit(resume=args.resume)
    Console().print(val_table(summary))
    Console().print(f"run folder: {out} (metrics.jsonl, summary.json, ckpt/); plots: moelab plot {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moelab.checkpoint import load_model
    from moelab.config import TrainConfig
    from moelab.data import build_corpus
    from moelab.train import evaluate, val_table
    set_threads(args.threads)
    model, meta = load_model(args.run, args.ckpt)
    cfg = TrainConfig.from_dict(meta["train_config"])
    if args.batches is not None:
        if args.batches < 1:
            raise ValueError(f"--batches={args.batches} is invalid: allowed an integer >= 1")
        cfg = cfg.replace(eval_batches=args.batches)
    corpus = build_corpus(list(cfg.data), val_fraction=cfg.val_fraction, split_version=cfg.split_version)
    corpus.check(cfg.seq_len)
    ev = evaluate(model, corpus, cfg)
    summary = {"step": meta["step"], **ev, "unigram_loss": {d: corpus.unigram_loss(d) for d in corpus.domains}}
    Console().print(val_table(summary))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moelab.checkpoint import load_model
    from moelab.model import BOS_ID, generate
    set_threads(args.threads)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is invalid: allowed an integer >= 0")
    model, _ = load_model(args.run)
    ids = torch.tensor([BOS_ID] + list(args.prompt.encode("utf-8")))
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   generator=torch.Generator().manual_seed(args.seed))
    print(args.prompt + bytes(out.tolist()).decode("utf-8", errors="replace"))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from moelab.plots import plot_run
    for path in plot_run(args.run):
        print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from moelab.demo import run_demo
    return run_demo(out=args.out, steps=args.steps, threads=args.threads)


def _threads_flag(p: argparse.ArgumentParser, default_help: str = "torch's choice") -> None:
    p.add_argument("--threads", type=int, help=f"torch CPU threads (default: {default_help})")


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
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint with its saved "
                   f"config; only {', '.join(RESUME_MAY_CHANGE)} may change. The lr schedule keeps the length of "
                   "the run's first --steps: a larger --steps continues at the cosine floor (min_lr_ratio * lr)")
    _threads_flag(t, "torch's choice; 1 per rank with --nproc")
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
    _threads_flag(e)
    e.set_defaults(func=_eval)
    g = sub.add_parser("generate", help="sample text from a trained run",
                       description="Sample bytes after --prompt from RUN's latest checkpoint.")
    g.add_argument("run", help="run folder written by `moelab train`")
    g.add_argument("--prompt", default="def ", help="text to continue (default 'def ')")
    g.add_argument("--max-new-tokens", type=int, default=200, help="bytes to sample (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=20, help="sample among the k most likely bytes (default 20)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _threads_flag(g)
    g.set_defaults(func=_generate)
    pl = sub.add_parser("plot", help="loss, expert-load, MaxVio and specialization plots of a run",
                        description="Write loss.png, expert_load.png, max_vio.png and specialization.png "
                                    "into RUN from its metrics.jsonl and summary.json.")
    pl.add_argument("run", help="run folder written by `moelab train`")
    pl.set_defaults(func=_plot)
