"""`moelab train | eval | generate | plot | demo`: the handlers (argparse in, library calls out)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from rich.console import Console

from moelab.cli_offload import add_offload_flags
from moelab.resolver import RunConfig, add_config_flags, apply, diff, overrides_from_args, resolve
from moelab.runtime import DEVICES, DTYPES, Runtime, runtime

# fields `train --resume` may change (what the run does next, not what it is); anything else is refused
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_last",
                     "train.eval_batches", "train.compile")


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


def init_from(model: torch.nn.Module, run: str | Path) -> Path:
    """--init-from RUN: the weights (and router state) of RUN's latest checkpoint into `model`, before training
    with a fresh optimizer and schedule; names and shapes must match (else an error naming the tensor)."""
    from safetensors.torch import load_file

    from moelab.checkpoint import latest
    path = latest(run)
    sd, own = load_file(str(path / "model.safetensors")), model.state_dict()
    for k in sorted(set(own) | set(sd)):
        if k not in sd or k not in own or sd[k].shape != own[k].shape:
            got = tuple(sd[k].shape) if k in sd else "missing"
            want = tuple(own[k].shape) if k in own else "not in this model"
            raise ValueError(f"--init-from {run}: tensor {k} is {got} there, {want} here (train with the same "
                             "model config: omit --preset/--config to use the run's)")
    model.load_state_dict(sd)
    return path


def _train(args: argparse.Namespace) -> int:
    from moelab.checkpoint import list_checkpoints
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
    elif args.init_from and args.preset is None and args.config is None:  # the source run's config
        run = resolve(file=Path(args.init_from) / "config.json", overrides=overrides)
    else:
        run = resolve(args.preset, args.config, overrides)
    if args.nproc is not None or args.ep is not None or "WORLD_SIZE" in os.environ:  # expert x data parallel
        if args.init_from or (out / "peft.json").exists():
            raise ValueError("--init-from is single-process: allowed without --nproc / --ep / torchrun")
        from moelab.ep_train import launch
        from moelab.rebalance import ep_options  # --placement, --rebalance-every/-window
        return launch(run, out=args.out, resume=args.resume, nproc=args.nproc, ep=args.ep, threads=args.threads,
                      **ep_options(args.placement, args.rebalance_every, args.rebalance_window, run.model))
    if args.placement or args.rebalance_every is not None:
        raise ValueError("--placement / --rebalance-every need expert parallelism: add --ep P (or --nproc N)")
    # a folder with checkpoints is resumed (keeping its weights) or refused by fit: nothing is copied into it
    fresh_init = args.init_from and not list_checkpoints(out)
    tok = run.model.tokenizer
    if fresh_init and tok != "bytes" and not Path(tok).is_absolute():  # the run's tokenizer folder comes along
        from moelab.hf_tokenizer import copy_tokenizer
        copy_tokenizer(Path(args.init_from) / tok, out / tok)
    from moelab.peft_train import trainer_from_args
    rt = runtime_of(args)
    peft = trainer_from_args(args, run.train, out, runtime=rt)  # --lora-* / --esft: base loaded and frozen there
    trainer = peft if peft is not None else Trainer(run.model, run.train, out, runtime=rt)
    if args.tensorboard:
        from moelab.tensorboard import EventWriter
        trainer.log_sinks.append(EventWriter(out / "tb").write)
    if fresh_init and peft is None:
        init_from(trainer.model, args.init_from)
    summary = trainer.fit(resume=args.resume)
    Console().print(val_table(summary))
    Console().print(f"run folder: {out} (metrics.jsonl, summary.json, ckpt/); plots: moelab plot {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moelab.config import TrainConfig
    from moelab.peft_train import load_peft_model  # a LoRA run comes back with its adapters
    from moelab.train import corpus_for, evaluate, val_table
    rt = runtime_of(args)
    model, meta = load_peft_model(args.run, args.ckpt)
    cfg = TrainConfig.from_dict(meta["train_config"])
    if args.batches is not None:
        if args.batches < 1:
            raise ValueError(f"--batches={args.batches} is invalid: allowed an integer >= 1")
        cfg = cfg.replace(eval_batches=args.batches)
    corpus = corpus_for(model.cfg, cfg, args.run)
    corpus.check(cfg.seq_len)
    ev = evaluate(model.to(rt.device), corpus, cfg, rt)
    summary = {"step": meta["step"], **ev, "unigram_loss": {d: corpus.unigram_loss(d) for d in corpus.domains}}
    Console().print(val_table(summary))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import sys
    import time

    from moelab.checkpoint import load_model
    from moelab.hf_tokenizer import load_tokenizer, prompt_ids
    from moelab.model import generate
    rt = runtime_of(args)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is invalid: allowed an integer >= 0")
    if args.prompt_file is not None:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    else:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.offload:  # experts read from the checkpoint file on demand (moelab.offload_store)
        from moelab.cli_offload import offloaded_model, report_offload
        model, store = offloaded_model(args)
    else:
        model, _ = load_model(args.run, args.ckpt)
    tok = load_tokenizer(model.cfg.tokenizer, args.run)
    ids = prompt_ids(tok, prompt).to(rt.device)
    if ids.numel() + args.max_new_tokens > model.cfg.max_seq_len:
        print(f"note: prompt + new tokens exceed max_seq_len={model.cfg.max_seq_len}; past it the context slides "
              "(each token re-reads the last max_seq_len tokens)", file=sys.stderr)
    t0 = time.perf_counter()
    with rt.autocast():
        out = generate(model.to(rt.device), ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, generator=torch.Generator(device=rt.device).manual_seed(
                           args.seed), use_cache=not args.no_cache, suppress_ids=tok.never_sampled(model.cfg.vocab_size))
    dt = time.perf_counter() - t0
    print(prompt + tok.decode(out.tolist()))
    if args.offload:
        store.close()
        print(report_offload(store, out.numel(), dt), file=sys.stderr)
    else:
        print(f"{out.numel()} tokens in {dt:.2f} s ({out.numel() / max(dt, 1e-9):.1f} tokens/s)", file=sys.stderr)
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
    t.add_argument("--init-from", help="start from the weights of this run's latest checkpoint (an imported or "
                   "upcycled run, or any run) with a fresh optimizer and schedule; without --preset/--config the "
                   "model and train config are that run's")
    from moelab.peft_train import add_peft_flags  # --lora-* / --esft: after --init-from, which they need
    add_peft_flags(t)
    t.add_argument("--tensorboard", action="store_true", help="also log metrics as TensorBoard events in OUT/tb "
                   "(needs the optional `tensorboard` package: pip install moelab[tb])")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint with its saved "
                   f"config; only {', '.join(RESUME_MAY_CHANGE)} may change. The lr schedule keeps the length of "
                   "the run's first --steps: a larger --steps continues at the cosine floor (min_lr_ratio * lr)")
    add_runtime_flags(t)
    t.add_argument("--nproc", type=int, help="spawn N local gloo processes for expert x data parallel training "
                   "(--batch-size is per rank; under torchrun the world size is torchrun's)")
    t.add_argument("--ep", type=int, help="expert-parallel size P: experts sharded over blocks of P ranks, N/P "
                   "copies of each shard (a divisor of N; default N); rank r writes OUT/rank{r}, OUT the merged model")
    t.add_argument("--placement", metavar="FILE", help="with --ep P: expert placement JSON from `moelab place --out` "
                   "(one map per MoE layer, fitted for P devices; replicas allowed) instead of contiguous blocks")
    t.add_argument("--rebalance-every", type=int, metavar="N", help="with --ep: every N steps re-fit each layer's "
                   "placement (EPLB) on recent loads and move experts and their optimizer state between ranks")
    t.add_argument("--rebalance-window", type=int, metavar="W", help="steps of loads the re-fit sees (default N)")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="validation loss per domain of a run vs the unigram baseline",
                       description="Evaluate the latest (or --ckpt) checkpoint of RUN on its validation split.")
    e.add_argument("run", help="run folder written by `moelab train`")
    e.add_argument("--ckpt", help="a checkpoint folder (default: the run's latest)")
    e.add_argument("--batches", type=int, help="validation micro-batches per domain (default: the run's)")
    add_runtime_flags(e)
    e.set_defaults(func=_eval)
    g = sub.add_parser("generate", help="sample text from a trained run",
                       description="Sample bytes after the prompt from RUN's latest (or --ckpt) checkpoint, "
                                    "with a KV cache; prints the text, and the speed on stderr.")
    g.add_argument("run", help="run folder written by `moelab train`")
    g.add_argument("--prompt", default="def ", help="text to continue, '-' = read it from stdin (default 'def ')")
    g.add_argument("--prompt-file", help="read the prompt from this UTF-8 file (instead of --prompt)")
    g.add_argument("--ckpt", help="a checkpoint folder (default: the run's latest)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="bytes to sample (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=20, help="sample among the k most likely bytes (default 20)")
    g.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely bytes up to this "
                   "probability mass (default: off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--no-cache", action="store_true", help="re-read the whole context every token instead of a "
                   "KV cache (same tokens, slower)")
    add_runtime_flags(g)
    add_offload_flags(g)
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
