"""`make demo`: train the tiny MoE LM on the corpus that ships with Python, print a summary, write plots."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from moelab.config import TrainConfig
from moelab.model import BOS_ID, generate
from moelab.plots import plot_run
from moelab.presets import get_preset
from moelab.train import Trainer, val_table

DEMO_TRAIN = TrainConfig(steps=500, batch_size=16, seq_len=128, lr=3e-3, warmup=30, log_every=50,
                         eval_every=100, eval_batches=4, ckpt_every=350, keep_last=1)
DEMO_OUTPUTS = ("ckpt", "metrics.jsonl", "summary.json", "config.json", "loss.png", "expert_load.png",
                "max_vio.png", "specialization.png", "trace.npz", "report")


def run_demo(out: str = "runs/demo", steps: int | None = None, threads: int = 1) -> int:
    """Train `tiny` (8 experts, top-2, aux loss) for DEMO_TRAIN.steps; returns 0 when every domain's
    validation loss is below its unigram baseline, else 1."""
    console = Console()
    torch.set_num_threads(threads)
    run = Path(out)
    for name in DEMO_OUTPUTS:  # a fresh demo each time; only what the demo itself writes is removed
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    cfg = DEMO_TRAIN if steps is None else DEMO_TRAIN.replace(steps=steps, eval_every=max(1, steps // 7),
                                                               ckpt_every=max(1, steps // 2))
    model_cfg = get_preset("tiny")
    console.print(f"[bold]moelab demo[/bold]: tiny MoE LM ({model_cfg.moe.n_experts} experts, top-"
                  f"{model_cfg.moe.top_k}, {model_cfg.n_layers} layers) on Python's own code, help text and "
                  f"C headers; {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} bytes, {threads} thread(s)")
    t0 = time.perf_counter()
    trainer = Trainer(model_cfg, cfg, run)
    summary = trainer.fit()
    console.print(val_table(summary))
    mean_val = sum(summary["val_loss"].values()) / len(summary["val_loss"])
    mean_uni = sum(summary["unigram_loss"].values()) / len(summary["unigram_loss"])
    console.print(f"mean over domains: val {mean_val:.3f} vs unigram {mean_uni:.3f} nats/byte "
                  f"({mean_val / mean_uni:.0%} of the baseline)")
    gen = torch.Generator().manual_seed(0)
    for prompt in ("def ", "The "):
        ids = torch.tensor([BOS_ID] + list(prompt.encode()))
        cont = generate(trainer.model, ids, max_new_tokens=80, temperature=0.8, top_k=20, generator=gen)
        text = bytes(cont.tolist()).decode("utf-8", errors="replace")
        console.print(f"sample {prompt!r} -> {json.dumps(prompt + text)}", markup=False, highlight=False)
    paths = plot_run(run)
    last = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
            if '"kind": "train"' in ln][-1]
    console.print("final MaxVio per MoE layer: " + ", ".join(f"{v:.2f}" for v in last["max_vio"]))
    console.print(f"{summary['params']:,} parameters ({summary['active_params']:,} active per token), "
                  f"{summary['tokens_per_s']:,} tokens/s (validation included), total {time.perf_counter() - t0:.0f} s")
    console.print("plots: " + ", ".join(str(p) for p in paths))
    from moelab.report import write_report  # routing trace of the trained model + HTML report
    from moelab.trace import trace_run
    tr = trace_run(run, seq_len=cfg.seq_len, max_tokens=4096)
    console.print(f"routing trace: {tr.save(run / 'trace.npz')}, report: {write_report(tr, run / 'report')}")
    ok = all(summary["val_loss"][d] < summary["unigram_loss"][d] for d in summary["val_loss"])
    console.print("[green]validation loss is below the unigram baseline in every domain[/green]" if ok else
                  "[red]validation loss is NOT below the unigram baseline in every domain[/red]")
    return 0 if ok else 1
