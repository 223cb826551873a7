"""KV-cache generation vs re-reading the context every token (moelab.model.generate, use_cache on / off).

Interleaved A/B after a warm-up, greedy decoding of random-init models (the cost does not depend on the
weights), fp32, one torch thread; reports tokens/s of each and the median speed-up, and checks that both
produced the same tokens. Writes benchmarks/results/generate.json.

    python benchmarks/bench_generate.py [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from moelab.model import BOS_ID, MoELM, generate
from moelab.presets import get_preset

CASES = [("tiny", 16, 64), ("tiny", 16, 224), ("qwen3-moe-like", 16, 224), ("tiny", 16, 400)]  # 400: slides


def _time(model, prompt, n, use_cache) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = generate(model, prompt, max_new_tokens=n, temperature=0, use_cache=use_cache)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    rows = []
    for preset, n_prompt, n_new in CASES:
        torch.manual_seed(0)
        model = MoELM(get_preset(preset)).eval()
        prompt = torch.cat([torch.tensor([BOS_ID]), torch.randint(0, 256, (n_prompt - 1,))])
        _time(model, prompt, 8, True), _time(model, prompt, 8, False)  # warm-up
        cache_s, full_s, same = [], [], True
        for _ in range(args.reps):
            a, out_a = _time(model, prompt, n_new, True)
            b, out_b = _time(model, prompt, n_new, False)
            cache_s.append(a)
            full_s.append(b)
            same &= torch.equal(out_a, out_b)
        rows.append({"preset": preset, "prompt": n_prompt, "new_tokens": n_new,
                     "max_seq_len": model.cfg.max_seq_len,
                     "cache_tok_s": round(n_new / statistics.median(cache_s), 1),
                     "no_cache_tok_s": round(n_new / statistics.median(full_s), 1),
                     "speedup": round(statistics.median(f / c for c, f in zip(cache_s, full_s)), 2),
                     "same_tokens": same})
    load_end = os.getloadavg()
    table = Table(title=f"generate: KV cache vs no cache (1 thread, fp32; load {load_start[0]:.1f} -> "
                        f"{load_end[0]:.1f})")
    for col in ("preset", "prompt", "new_tokens", "max_seq_len", "cache_tok_s", "no_cache_tok_s", "speedup",
                "same_tokens"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[c]) for c in r))
    Console().print(table)
    out = Path(__file__).parent / "results" / "generate.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": 1,
                               "loadavg_start": load_start, "loadavg_end": load_end, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
