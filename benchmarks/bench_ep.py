"""Expert parallelism on CPU: tokens/s of EP=2 (2 gloo processes, 1 thread each) vs 1 process with 2 threads,
on the tiny model (`presets.tiny`), forward + backward (+ grad sync for EP) on the same global batch; and the
all-to-all bytes per token. Also 1 process x 1 thread, as 2 threads contend badly on a busy 2-core machine.
The sides are interleaved (A B C A B C ...) after warm-up; median ratios are reported.

    python benchmarks/bench_ep.py [--batch 16 --seq 128 --reps 10]

Writes benchmarks/results/bench_ep.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from moelab.model import MoELM, lm_loss
from moelab.parallel import comm_stats, shard_model, sync_grads
from moelab.presets import tiny


def _batch(n_seq: int, seq: int):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(256, (n_seq, seq + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def _step(model, idx, tgt) -> float:
    model.zero_grad(set_to_none=True)
    out = model(idx)
    loss = lm_loss(logits_BSV=out.logits_BSV, targets_BS=tgt, valid_BS=torch.ones_like(idx, dtype=torch.bool))
    (loss + out.aux_loss).backward()
    return loss.item()


def _rank(rank: int, world: int, port: int, args, cmd_q, res_q) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    model = shard_model(MoELM(tiny()))
    idx, tgt = _batch(args.batch, args.seq)
    per = args.batch // world
    idx, tgt = idx[rank * per:(rank + 1) * per], tgt[rank * per:(rank + 1) * per]
    while cmd_q.get() == "go":
        dist.barrier()
        t0 = time.perf_counter()
        _step(model, idx, tgt)
        sync_grads(model)
        dist.barrier()
        dt = time.perf_counter() - t0
        sent = sum(c.bytes_sent for c in comm_stats(model).values())
        rows = sum(c.tokens_sent for c in comm_stats(model).values())
        res_q.put((rank, dt, sent, rows))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="global sequences per step (split over the ranks)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions of each side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repetitions of each side first")
    args = ap.parse_args()
    world = 2
    ctx = mp.get_context("spawn")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd_qs = [ctx.Queue() for _ in range(world)]
    res_q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, cmd_qs[r], res_q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()

    torch.set_num_threads(2)
    torch.manual_seed(0)
    single = MoELM(tiny())
    idx, tgt = _batch(args.batch, args.seq)

    def run_single(threads: int) -> float:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        _step(single, idx, tgt)
        return time.perf_counter() - t0

    def run_ep() -> tuple[float, int, int]:
        for q in cmd_qs:
            q.put("go")
        res = [res_q.get(timeout=300) for _ in range(world)]
        return max(r[1] for r in res), sum(r[2] for r in res), sum(r[3] for r in res)

    t_single, t_one, t_ep = [], [], []
    for i in range(args.warmup + args.reps):
        a = run_single(2)
        c = run_single(1)
        b, bytes_fwd, rows = run_ep()
        if i >= args.warmup:
            t_single.append(a)
            t_one.append(c)
            t_ep.append(b)
    for q in cmd_qs:
        q.put("stop")
    for p in procs:
        p.join(timeout=30)

    tokens = args.batch * args.seq
    res = {
        "tokens_per_step": tokens,
        "single_2threads_tok_per_s": tokens / statistics.median(t_single),
        "single_1thread_tok_per_s": tokens / statistics.median(t_one),
        "ep2_1thread_tok_per_s": tokens / statistics.median(t_ep),
        "ep2_over_single_2threads_speed_median_ratio": statistics.median(s / e for s, e in zip(t_single, t_ep)),
        "ep2_over_single_1thread_speed_median_ratio": statistics.median(s / e for s, e in zip(t_one, t_ep)),
        "a2a_bytes_per_token_forward": bytes_fwd / tokens,
        # backward moves the same rows back, but not the int64 counts (8 * E * (W-1) bytes per layer)
        "a2a_bytes_per_token_fwd_bwd": (2 * bytes_fwd - 8 * tiny().moe.n_experts * (world - 1)
                                        * len(tiny().moe_layer_ids)) / tokens,
        "rows_sent_per_token_per_layer": rows / tokens / len(tiny().moe_layer_ids),
        "moe_layers": len(tiny().moe_layer_ids), "d_model": tiny().d_model, "top_k": tiny().moe.top_k,
        "batch": args.batch, "seq": args.seq, "reps": args.reps,
    }
    table = Table(title="EP=2 (2 gloo procs x 1 thread) vs 1 proc x 2 threads, tiny model, fwd+bwd")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in res.items():
        table.add_row(k, f"{v:,.3f}" if isinstance(v, float) else str(v))
    Console().print(table)
    out = Path(__file__).parent / "results" / "bench_ep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
