"""`moelab export | import | upcycle`: checkpoints to and from transformers, and sparse upcycling."""
from __future__ import annotations

import argparse
import re

from rich.console import Console

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '20000' -> bytes (powers of 1000, as transformers' max_shard_size)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"--max-shard-size={text!r} is invalid: allowed a size like 2GB, 500MB, 64KB or bytes")
    mult = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9}[(m.group(2) or "b").lower()]
    return int(float(m.group(1)) * mult)


def _export(args: argparse.Namespace) -> int:
    from moelab.hf_convert import export_hf
    arch = export_hf(args.run, args.to_hf, arch=args.arch, ckpt=args.ckpt,
                     max_shard_bytes=parse_size(args.max_shard_size))
    Console().print(f"wrote {args.to_hf} ({arch.model_class}): load it with "
                    f"AutoModelForCausalLM.from_pretrained({str(args.to_hf)!r}) and AutoTokenizer")
    return 0


def _import(args: argparse.Namespace) -> int:
    from moelab.hf_convert import import_hf
    ck = import_hf(args.hf, args.out)
    Console().print(f"wrote {ck}: moelab eval/generate/trace {args.out}; train from it with "
                    f"moelab train --init-from {args.out} --out NEW")
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    from moelab.hf_upcycle import upcycle
    ck = upcycle(args.hf, args.out, n_experts=args.experts, top_k=args.top_k, granularity=args.granularity,
                 shared=args.shared, first_dense=args.first_dense, seed=args.seed)
    Console().print(f"wrote {ck}: train it with moelab train --init-from {args.out} --out NEW")
    return 0


def register(sub) -> None:
    """export / import / upcycle."""
    from moelab.hf_archs import ARCHS
    e = sub.add_parser("export", help="write a run as a transformers checkpoint (no custom code needed)",
                       description="Convert RUN's latest (or --ckpt) checkpoint into a transformers folder: "
                                   "config.json, generation_config.json, model.safetensors (sharded with an index "
                                   "above --max-shard-size) and a tokenizer mapping bytes to moelab's ids. Without "
                                   f"--arch the first of {', '.join(ARCHS)} that expresses the run's config; a "
                                   "config the architecture cannot express is refused naming the field.")
    e.add_argument("run", help="run folder written by `moelab train` (or import / upcycle)")
    e.add_argument("--to-hf", required=True, help="output folder")
    e.add_argument("--arch", choices=list(ARCHS), help="target architecture (default: the first that fits)")
    e.add_argument("--ckpt", help="a checkpoint folder (default: the run's latest)")
    e.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    e.set_defaults(func=_export)
    i = sub.add_parser("import", help="turn a transformers checkpoint into a moelab run",
                       description=f"Convert a transformers folder ({', '.join(ARCHS)}; single or sharded "
                                   "safetensors) into a moelab run at step 0: eval, generate and trace read it; "
                                   "`moelab train --init-from OUT` trains from it.")
    i.add_argument("--hf", required=True, help="transformers folder (config.json + safetensors)")
    i.add_argument("--out", required=True, help="new run folder")
    i.set_defaults(func=_import)
    u = sub.add_parser("upcycle", help="turn a dense model into an MoE (sparse upcycling)",
                       description="Each dense MLP becomes --experts experts (copies, or with --granularity g "
                                   "slices of the dense FFN with weight scaling) plus a fresh router; n of the g "
                                   "slices can become shared experts. At step 0 the MoE computes the dense model's "
                                   "function. Then: moelab train --init-from OUT --out NEW.")
    u.add_argument("--hf", required=True, help="a dense moelab run folder or a transformers llama / qwen3 folder")
    u.add_argument("--experts", type=int, required=True, help="routed experts E per MoE layer")
    u.add_argument("--top-k", type=int, required=True, help="experts per token (a multiple of granularity - shared)")
    u.add_argument("--granularity", type=int, default=1, help="slices per dense FFN (default 1: copies)")
    u.add_argument("--shared", type=int, default=0, help="slices that become always-on shared experts (default 0)")
    u.add_argument("--first-dense", type=int, default=0, help="keep the first m layers dense (default 0)")
    u.add_argument("--seed", type=int, default=0, help="router init seed (default 0)")
    u.add_argument("--out", required=True, help="new run folder")
    u.set_defaults(func=_upcycle)
