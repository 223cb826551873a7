"""transformers experts implementations on one Qwen3-MoE-shaped model: moelab vs eager vs grouped_mm vs batched_mm.

A tiny random-weight Qwen3-MoE (a few layers, fine-grained experts) built from its config (no download); every
implementation runs the same weights and inputs, interleaved in one process (A B C D, then rotated) after
warm-up. Reported: the median over rounds of each implementation's time divided by moelab's time in the same
round (> 1 = moelab faster), for the forward, forward+backward, greedy generate (KV cache) tokens/s, and the
experts call alone at T = 1, 32, 512 tokens (decode-sized to prefill-sized).
Both clocks are kept: process CPU time (the table's: on a shared, oversubscribed CPU the wall clock mostly
measures waiting for a core) and wall time. Default one thread, so CPU time is the work of one core.
Run: `python benchmarks/bench_hf.py` (`--quick`: tiny shapes, a smoke test). Writes
benchmarks/results/bench_hf.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch

IMPLS = ("moelab", "grouped_mm", "batched_mm", "eager")


def build(args):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=args.vocab, hidden_size=args.d, intermediate_size=4 * args.d,
                               num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=args.d // 4, moe_intermediate_size=args.f, num_experts=args.e,
                               num_experts_per_tok=args.k, max_position_embeddings=2048, norm_topk_prob=True)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # a trained-like router: input-dependent routing (HF inits it at zero)
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, args.d ** -0.5)
    return model


def timed(fn) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - t


def run(args) -> dict:
    from moelab.hf import register
    register()
    torch.set_num_threads(args.threads)
    model = build(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=g)

    def fwd():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, use_cache=False).logits.mean().backward()

    def generate():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

    blk = model.model.layers[0].mlp
    calls = []
    for T in args.call_tokens:  # the experts call alone (T tokens, the block's own routing), no grad
        x_TD = torch.randn(T, args.d, generator=g)
        with torch.no_grad():
            _, w_TK, idx_TK = blk.gate(x_TD)
        n = max(1, args.call_rows // T)

        def call(x_TD=x_TD, w_TK=w_TK, idx_TK=idx_TK, n=n):
            with torch.no_grad():
                for _ in range(n):
                    blk.experts(x_TD, idx_TK, w_TK)
        calls.append((f"experts call T={T}", call))

    out = {}
    for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd), ("generate", generate), *calls):
        impls = [i for i in IMPLS if not (i == "batched_mm" and name.startswith("forward") and args.skip_batched)]
        times = {i: [] for i in impls}
        for r in range(args.warmup + args.rounds):
            order = impls[r % len(impls):] + impls[: r % len(impls)]
            for impl in order:
                model.set_experts_implementation(impl)
                t = timed(fn)
                if r >= args.warmup:
                    times[impl].append(t)
        res = {}
        for j, clock in enumerate(("cpu", "wall")):
            res[f"median_{clock}_s"] = {i: statistics.median(t[j] for t in v) for i, v in times.items()}
            res[f"ratio_vs_moelab_{clock}"] = {i: statistics.median(a[j] / b[j] for a, b in zip(times[i],
                                                                                             times["moelab"]))
                                               for i in impls}
        if name == "generate":
            res["tokens_per_s_cpu"] = {i: args.new_tokens / t for i, t in res["median_cpu_s"].items()}
        out[name] = res
        print(name, "cpu", {i: f"{v:.2f}x" for i, v in res["ratio_vs_moelab_cpu"].items()},
              "wall", {i: f"{v:.2f}x" for i, v in res["ratio_vs_moelab_wall"].items()}, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 round (smoke test)")
    p.add_argument("--out", default=str(Path("benchmarks") / "results" / "bench_hf.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-batched", action="store_true", help="leave batched_mm out of fwd / fwd+bwd")
    args = p.parse_args()
    shape = {"vocab": 2048, "d": 128, "f": 64, "e": 64, "k": 8, "layers": 2, "batch": 2, "seq": 256, "prompt": 32,
             "new_tokens": 32, "warmup": 1,
             "call_tokens": (1, 32, 512), "call_rows": 2048}
    if args.quick:
        shape.update(d=32, f=16, e=8, k=2, layers=2, batch=2, seq=32, prompt=8, new_tokens=4, warmup=1,
                     call_tokens=(1, 32), call_rows=64)
        args.rounds = min(args.rounds, 3)
    for k, v in shape.items():
        setattr(args, k, v)
    load_start = os.getloadavg()
    results = run(args)
    load_end = os.getloadavg()
    rec = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
           "shape": {k: getattr(args, k) for k in shape}, "dtype": "float32",
           "load_avg_start": load_start, "load_avg_end": load_end,
           "noisy": max(load_start[0], load_end[0]) > 1.5, "results": results}
    import transformers
    rec["transformers"] = transformers.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=1))
    print(f"wrote {args.out} (load average {load_start[0]:.1f} -> {load_end[0]:.1f})")


if __name__ == "__main__":
    main()
