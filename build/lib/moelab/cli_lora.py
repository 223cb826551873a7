"""`moelab lora merge` and `moelab compress`: argument parsing and handlers; the logic is in moelab.lora and
moelab.compress. cli.py adds these with `cli_lora.register(sub)`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moelab.compress import (
    BY_MERGE,
    BY_PRUNE,
    expert_param_total,
    low_rank_compress,
    merge_experts,
    prune_experts,
    routing_stats,
)


def register(sub: argparse._SubParsersAction) -> None:
    lo = sub.add_parser("lora", help="LoRA-expert adapters: merge an adapter folder into a plain run",
                        description="Work with LoRA-expert adapter folders (PEFT format: adapter_config.json + "
                                    "adapter_model.safetensors) written by moelab.lora.save_lora.")
    lsub = lo.add_subparsers(dest="lora_cmd", required=True)
    m = lsub.add_parser("merge", help="fold the adapters into the base weights and save a plain run",
                        description="Fold the adapters into dense weights where the routing allows it (a single "
                                    "adapter, X-LoRA with fixed scalings, FlyLoRA with top_k == rank) and save a "
                                    "run folder that loads and trains like any other. Refuses token-routed "
                                    "mixtures with a clear message.")
    m.add_argument("run", help="adapter folder (its adapter_config.json names the base run)")
    m.add_argument("--base", help="base run folder (default: base_model_name_or_path in adapter_config.json)")
    m.add_argument("--out", required=True, help="output run folder")
    m.set_defaults(func=cli_lora_merge)
    x = lsub.add_parser("experts", help="ESFT: score a run's experts on data and show which ones --esft would train",
                        description="Expert-specialised fine-tuning's selection (ESFT, arXiv 2407.01906): score "
                                    "every routed expert on the run's training data (or one domain of it) by token "
                                    "selection ratio or mean gate score, keep per layer the top experts up to a "
                                    "cumulative score p. Prints the scores and the choice; --out writes it in the "
                                    "authors' expert_cfg.json format. Training: moelab train --init-from RUN --esft.")
    x.add_argument("run", help="trained run folder")
    x.add_argument("--score", choices=("token", "gate"), default="token", help="token selection ratio | gate score")
    x.add_argument("--top-p", type=float, default=0.2, help="cumulative score threshold per layer")
    x.add_argument("--domain", default="", help="score on this domain of the run's data (default: all)")
    x.add_argument("--tokens", type=int, default=8192, help="tokens scored")
    x.add_argument("--seed", type=int, default=1, help="sampling of the scored windows")
    x.add_argument("--out", help="write the expert config JSON here")
    x.set_defaults(func=cli_lora_experts)

    c = sub.add_parser("compress", help="shrink a trained MoE run: merge experts (MC-SMoE) or prune by usage",
                       description="Merge each MoE layer's experts to N (MC-SMoE: groups by routing-policy "
                                   "similarity, neuron-aligned, usage-weighted) or prune to the N most used, "
                                   "measured on calibration batches of the run's own training data; optional "
                                   "low-rank stage. Prints validation loss before/after and saves a run folder.")
    c.add_argument("run", help="trained run folder")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--merge-to", type=int, help="experts per MoE layer after merging")
    g.add_argument("--prune-to", type=int, help="experts per MoE layer after pruning")
    c.add_argument("--by", choices=sorted(set(BY_MERGE) | set(BY_PRUNE)),
                   help="merge: routing_similarity (default) | random; prune: usage (default) | random")
    c.add_argument("--low-rank", type=int, help="then keep this rank of every expert matrix (MC-SMoE 'compress')")
    c.add_argument("--sparsity", type=float, default=0.0, help="with --low-rank: share of residual entries kept")
    c.add_argument("--calib-batches", type=int, default=8, help="training batches for usage/similarity stats")
    c.add_argument("--seed", type=int, default=0, help="calibration sampling and random groups")
    c.add_argument("--out", required=True, help="output run folder")
    c.add_argument("--threads", type=int, help="torch threads")
    c.set_defaults(func=cli_compress)


def save_run(model, meta: dict, out: str | Path) -> Path:
    """Save `model` as a run folder with the checkpoint writer (ckpt/step_N with model.safetensors, a fresh
    optimizer and state.json, and config.json), keeping the source run's train config and domains."""
    from moelab.checkpoint import save_checkpoint
    if Path(out, "ckpt").is_dir() and any(Path(out, "ckpt").iterdir()):
        raise ValueError(f"--out {str(out)!r} already holds checkpoints: choose another folder")
    rng = {"rng.torch": torch.get_rng_state(), "rng.data": torch.Generator().manual_seed(0).get_state()}
    path = save_checkpoint(out, int(meta.get("step", 0)), model=model, opt=torch.optim.AdamW(model.parameters()),
                           extra=rng, meta={"model_config": model.cfg.to_dict(), "train_config": meta["train_config"],
                                            "domains": meta.get("domains", [])}, keep_last=1)
    Path(out, "config.json").write_text(json.dumps({"model_config": model.cfg.to_dict(),
                                                    "train_config": meta["train_config"]}, indent=1))
    return path


def cli_lora_merge(args: argparse.Namespace) -> int:
    from moelab.checkpoint import load_model
    from moelab.lora import load_lora, merge_lora
    conf = json.loads((Path(args.run) / "adapter_config.json").read_text()) \
        if (Path(args.run) / "adapter_config.json").is_file() else None
    if conf is None:
        raise ValueError(f"lora merge: {args.run!r} has no adapter_config.json")
    base = args.base or conf.get("base_model_name_or_path")
    if not base:
        raise ValueError("lora merge: the adapter names no base run: pass --base RUN")
    model, meta = load_model(base)
    _, names = load_lora(model, args.run)
    merge_lora(model)
    path = save_run(model, meta, args.out)
    print(f"merged {len(names)} adapted linears into {path}")
    return 0


def cli_compress(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from moelab.checkpoint import load_model
    from moelab.config import TrainConfig
    from moelab.data import build_corpus
    from moelab.train import evaluate
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_model(args.run)
    cfg = TrainConfig.from_dict(meta["train_config"])
    corpus = build_corpus(list(cfg.data), val_fraction=cfg.val_fraction)
    gen = torch.Generator().manual_seed(args.seed)
    calib = [corpus.sample(cfg.batch_size, cfg.seq_len, gen) for _ in range(args.calib_batches)]
    stats = routing_stats(model, calib)
    if args.merge_to is not None:
        new, _ = merge_experts(model, stats, args.merge_to, by=args.by or "routing_similarity", seed=args.seed)
    else:
        new, _ = prune_experts(model, stats, args.prune_to, by=args.by or "usage", seed=args.seed)
    if args.low_rank:
        new, _ = low_rank_compress(new, args.low_rank, args.sparsity)
    before, after = evaluate(model, corpus, cfg)["val_loss"], evaluate(new, corpus, cfg)["val_loss"]
    t = Table(title=f"{args.run}: {model.cfg.moe.n_experts} -> {new.cfg.moe.n_experts} experts per MoE layer "
                    f"({expert_param_total(model):,} -> {expert_param_total(new):,} expert parameters)")
    for col in ("domain", "val loss before", "val loss after"):
        t.add_column(col, justify="right")
    for d in before:
        t.add_row(d, f"{before[d]:.3f}", f"{after[d]:.3f}")
    Console().print(t)
    print(f"saved {save_run(new, meta, args.out)}")
    return 0


def cli_lora_experts(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from moelab.checkpoint import load_model
    from moelab.config import TrainConfig
    from moelab.data import build_corpus
    from moelab.esft import ESFTConfig, choose_experts, expert_config_json, expert_scores
    from moelab.peft_train import domain_corpus
    cfg = ESFTConfig(score=args.score, top_p=args.top_p, n_sample_tokens=args.tokens, domain=args.domain)
    model, meta = load_model(args.run)
    tc = TrainConfig.from_dict(meta["train_config"])
    corpus = domain_corpus(build_corpus(list(tc.data), val_fraction=tc.val_fraction,
                                        split_version=tc.split_version), cfg.domain)
    gen = torch.Generator().manual_seed(args.seed)
    n = -(-cfg.n_sample_tokens // (tc.batch_size * tc.seq_len))
    scores = expert_scores(model, [corpus.sample(tc.batch_size, tc.seq_len, gen) for _ in range(n)],
                           cfg.n_sample_tokens)
    chosen = choose_experts(scores, cfg)
    t = Table(title=f"{args.run}: ESFT-{cfg.score} scores, p={cfg.top_p} ({', '.join(corpus.domains)})")
    for col in ("layer", "chosen", "score of each expert (chosen in bold)"):
        t.add_column(col)
    for i, s in scores.items():
        v = s.token_E if cfg.score == "token" else s.gate_E
        t.add_row(str(i), str(chosen[i]), " ".join(f"[bold]{float(x):.3f}[/bold]" if e in chosen[i] else
                                                   f"{float(x):.3f}" for e, x in enumerate(v)))
    Console().print(t)
    if args.out:
        Path(args.out).write_text(json.dumps(expert_config_json(chosen, cfg, scores), indent=1))
        print(f"wrote {args.out}")
    return 0
