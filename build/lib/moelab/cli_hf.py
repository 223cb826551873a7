"""`moelab finetune`: fine-tune a local transformers MoE model with moelab's experts backend and balancing."""
from __future__ import annotations

import argparse
from dataclasses import fields

from moelab.hf_finetune import FinetuneConfig

_HELP = {  # flag help for FinetuneConfig fields (the dataclass comments, shortened)
    "steps": "optimizer steps", "batch_size": "sequences per step", "seq_len": "tokens per sequence",
    "lr": "AdamW learning rate", "warmup": "linear warmup steps", "weight_decay": "AdamW weight decay",
    "grad_clip": "global grad-norm clip (0 = off)", "balance": "loss_free | global | aux | none",
    "rate": "loss-free bias update rate u", "aux_coef": "weight of the per-layer Switch / global-batch loss",
    "experts_impl": "transformers experts_implementation (moelab, eager, grouped_mm, batched_mm)",
    "max_tokens": "text tokenized per domain, at most", "val_fraction": "share of each domain held out",
    "eval_batches": "validation batches per domain", "log_every": "print every N steps", "seed": "random seed",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a local transformers MoE model with moelab balancing",
                       description="Fine-tune a local Hugging Face MoE model (config, safetensors weights and "
                                   "tokenizer in --hf DIR; nothing is downloaded) with experts_implementation="
                                   "'moelab' and moelab's load balancing; writes metrics.jsonl, summary.json and "
                                   "the plots of `moelab train` into --out, and the model (save_pretrained, "
                                   "safetensors) into OUT/model.")
    p.add_argument("--hf", required=True, metavar="DIR", help="local transformers model folder")
    p.add_argument("--data", nargs="*", default=None, metavar="PATH",
                   help="text files / folders (folder name = domain); default: the built-in corpus")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder")
    for f in fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"choices": ("loss_free", "global", "aux", "none")} if f.name == "balance" else {}
        p.add_argument(flag, type=type(f.default), default=f.default, dest=f.name,
                       help=f"{_HELP.get(f.name, f.name)} (default {f.default})", **kw)
    p.set_defaults(func=finetune_cmd)


def finetune_cmd(args: argparse.Namespace) -> int:
    from moelab.hf_finetune import finetune_path
    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    summary = finetune_path(args.hf, args.data, cfg, args.out)
    print(f"saved {summary['model_dir']}  val loss " + "  ".join(f"{d} {v:.3f}" for d, v in summary["val_loss"].items()))
    return 0
