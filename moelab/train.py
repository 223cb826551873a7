"""Trainer: AdamW, warm-up + cosine, clipping, accumulation, checkpoints with exact resume.

L=MoE layers, E=experts, B=sequences, S=positions.
One `Trainer.train_step()` = one optimizer step. Distributed strategies subclass the trainer and override
its hooks (ep_train.EPTrainer): `sync_grads()` after backward, before clipping; `grad_norm(params)`;
`reduce_metrics(t)` sums a 1-D metric tensor over ranks; `step_routers()` after each optimizer step.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor

from moelab import checkpoint
from moelab.balance import BalanceStats, balance_stats
from moelab.config import ModelConfig, TrainConfig
from moelab.data import Batch, Corpus, build_corpus, format_report
from moelab.model import LMOutput, MoELM, lm_loss, param_count
from moelab.moe import moe_layers, step_routers
from moelab.progress import progress
from moelab.runtime import Runtime

ROUTER_STATS = ("experts_per_token", "special_per_token", "flops_saved")  # logged per MoE layer


def corpus_for(model_cfg: ModelConfig, cfg: TrainConfig, run: str | Path | None = None,
               paths: list[str] | None = None) -> Corpus:
    """The run's data (or `paths`) in the run's ids: bytes, or its transformers tokenizer (ModelConfig.tokenizer,
    a folder relative to the run)."""
    tok = None
    if model_cfg.tokenizer != "bytes":
        from moelab.hf_tokenizer import load_tokenizer
        tok = load_tokenizer(model_cfg.tokenizer, run)
    return build_corpus(list(paths or cfg.data), val_fraction=cfg.val_fraction, split_version=cfg.split_version,
                        tokenizer=tok, vocab_size=model_cfg.vocab_size)


def lr_at(step: int, cfg: TrainConfig, horizon: int | None = None) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to min_lr_ratio * lr at `horizon` (default cfg.steps), flat at
    that floor after it (Loshchilov & Hutter 2017). A resumed run keeps its first horizon (Trainer.horizon)."""
    horizon = cfg.steps if horizon is None else horizon
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, horizon - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class RunFailed(RuntimeError):
    """Training stopped on a failure that is not bad input (a rank died, a NaN): one line, exit status 1."""


class NonFiniteError(RunFailed):
    """Training met a NaN/Inf; the message names the step and the layer."""


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped training after a checkpoint; `code` is the exit status (128 + signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.code = 128 + signum


def run_kind(out: str | Path) -> str:
    """What a run folder holds: "none", "single" (one-process checkpoints) or "ep" (an expert-parallel run:
    ep.json or rank*/ folders)."""
    out = Path(out)
    if (out / "ep.json").exists() or any(out.glob("rank*/ckpt")):
        return "ep"
    return "single" if checkpoint.list_checkpoints(out) else "none"


def check_out(out: str | Path) -> None:
    """--out must be a folder (or not exist yet); a file there is one clear error."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file: allowed a run folder (new or existing)")


def locate_nonfinite(model: MoELM, batch: Batch) -> str:
    """Re-run the forward block by block and name the first block whose output is NaN/Inf."""
    found: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: found.append(k) if not torch.isfinite(o[0]).all()
                                     else None) for k, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model(batch.idx_BS, valid_BS=batch.valid_BS)
    finally:
        for h in hooks:
            h.remove()
    return f"layer {found[0]}" if found else "the output head / loss"


class Trainer:
    """Owns model, optimizer, data sampler and run folder. `fit()` loops `train_step()`."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, out: str | Path, *, corpus: Corpus | None = None,
                 verbose: bool = True, runtime: Runtime = Runtime()):
        if cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"TrainConfig.seq_len={cfg.seq_len} is invalid: allowed <= max_seq_len="
                             f"{model_cfg.max_seq_len}")
        self.model_cfg, self.cfg, self.out = model_cfg, cfg, Path(out)
        self.corpus = corpus if corpus is not None else corpus_for(model_cfg, cfg, self.out)
        self.corpus.check(cfg.seq_len)  # too little text for one sequence: one clear error, before any work
        torch.manual_seed(cfg.seed)
        self.runtime = runtime
        self.model = MoELM(model_cfg).to(runtime.device)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "tok_emb" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and "tok_emb" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=False)
        if cfg.compile:  # in place: the same module, parameters and state_dict keys (fused experts stay eager)
            self.model.compile()
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.log_sinks: list[Callable[[dict], None]] = []  # also called with every metrics.jsonl record
        self.horizon = cfg.steps  # the schedule's length: fixed by the run's first --steps, kept on resume
        self.console = Console(quiet=not verbose)
        self._rng_at_step_start = self._rng_state()

    # -- hooks a distributed strategy overrides ------------------------------------
    def sync_grads(self) -> None:
        """After backward, before clipping (data parallel: average the replicated grads)."""

    def grad_norm(self, params: list[Tensor]) -> Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def reduce_metrics(self, flat: Tensor) -> Tensor:
        """Sum of a 1-D metric tensor over ranks (one process: itself)."""
        return flat

    def step_routers(self) -> None:
        """After each optimizer step: loss-free bias, ReMoE coefficient, global-batch counts."""
        step_routers(self.model)

    def agree_stop(self, signum: int) -> int:
        """The stop signal seen by any rank (0: none); every rank must stop at the same step."""
        return signum

    def resume_command(self) -> str:
        return f"moelab train --resume --out {self.out}"

    def resume_point(self, ckpts: list[Path]) -> Path | None:
        """The checkpoint to resume from (distributed: the latest one every rank holds)."""
        return ckpts[-1] if ckpts else None

    # -- one optimizer step ------------------------------------------------------
    def train_step(self) -> dict:
        """Forward/backward over grad_accum micro-batches, grad sync, clip, AdamW, router-state step."""
        cfg, model = self.cfg, self.model
        self._rng_at_step_start = self._rng_state()
        lr = lr_at(self.step, cfg, self.horizon)
        for g in self.opt.param_groups:
            g["lr"] = lr
        model.train()
        self.opt.zero_grad(set_to_none=True)
        L, E = len(moe_layers(model)), self.model_cfg.moe.n_experts
        sums = torch.zeros(4)  # lm loss, weighted aux, micro-batches, tokens
        counts_LE = torch.zeros(L, E)
        router_LR = torch.zeros(L, len(ROUTER_STATS))
        named: dict[str, Tensor] = {}
        t0 = time.perf_counter()
        for _ in range(cfg.grad_accum):
            batch = to_device(self.corpus.sample(cfg.batch_size, cfg.seq_len, self.gen), self.runtime.device)
            with self.runtime.autocast():
                out = model(batch.idx_BS, valid_BS=batch.valid_BS)
            lm = lm_loss(logits_BSV=out.logits_BSV, targets_BS=batch.targets_BS, valid_BS=batch.valid_BS)
            self._check_finite(lm, out, batch)
            ((lm + out.aux_loss) / cfg.grad_accum).backward()
            sums += torch.stack([lm.detach(), out.aux_loss.detach().float(), torch.ones((), device=lm.device),
                                 batch.valid_BS.sum().float()]).cpu()
            for j, r in enumerate(out.moe.values()):
                counts_LE[j] += r.counts_E.float().cpu()
                router_LR[j] += torch.stack([r.router_stats[k].float().cpu() for k in ROUTER_STATS])
                for name, v in r.losses.items():
                    named[name] = named.get(name, torch.zeros(())) + v.detach().cpu() / L
        self.sync_grads()
        params = [p for p in model.parameters() if p.grad is not None]
        gnorm = self.grad_norm(params)
        if not torch.isfinite(gnorm):  # checked before clipping, which would spread the NaN to every grad
            # a NaN spreads backwards, to everything before it: blame the last parameter (forward order) hit
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            bad = bad[-1] if bad else "the global norm (overflow)"
            raise NonFiniteError(f"non-finite gradient at step {self.step + 1} in {_layer_of(bad)} ({bad})")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, gnorm)
        self.opt.step()
        self.step_routers()
        self.step += 1
        parts = [sums, counts_LE.flatten(), router_LR.flatten(), torch.stack(list(named.values())) if named
                 else torch.zeros(0)]
        sums, counts_LE, router_LR, named_N = _split_like(self.reduce_metrics(torch.cat(parts)), parts)
        counts_LE, router_LR = counts_LE.view(L, E), router_LR.view(L, len(ROUTER_STATS))
        n_micro = float(sums[2])
        stats = [_stats(c) for c in counts_LE]
        rec = {"kind": "train", "step": self.step, "loss": float(sums[0]) / n_micro,
               "aux_loss": float(sums[1]) / n_micro, "lr": lr, "grad_norm": float(gnorm),
               "tok_per_s": float(sums[3]) / max(time.perf_counter() - t0, 1e-9),
               "max_vio": [round(float(s.max_vio), 5) for s in stats],
               "load": [[round(x, 5) for x in s.load_E.tolist()] for s in stats]}
        for k, name in enumerate(ROUTER_STATS):
            rec[f"router/{name}"] = [round(float(v) / n_micro, 5) for v in router_LR[:, k]]
        for k, name in enumerate(named):
            rec[f"aux/{name}"] = float(named_N[k]) / n_micro
        return rec

    def _check_finite(self, lm: Tensor, out: LMOutput, batch: Batch) -> None:
        step = self.step + 1
        for i, r in out.moe.items():
            if not torch.isfinite(r.routing.logits_TE).all():
                raise NonFiniteError(f"non-finite router logits at step {step} in layer {i}")
        if not torch.isfinite(lm) or not torch.isfinite(out.aux_loss):
            raise NonFiniteError(f"non-finite loss at step {step}, first non-finite activation in "
                                 f"{locate_nonfinite(self.model, batch)}")

    # -- validation ----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss and bits per byte per domain, and expert counts per (layer, domain)."""
        return evaluate(self.model, self.corpus, self.cfg, self.runtime)

    # -- checkpoints ---------------------------------------------------------------
    def _rng_state(self) -> dict[str, Tensor]:
        return {"rng.torch": torch.get_rng_state(), "rng.data": self.gen.get_state()}

    def save_checkpoint(self, rng: dict[str, Tensor] | None = None) -> Path:
        """checkpoint.save_checkpoint of model, optimizer, RNG (`rng`: the state to resume from) and configs."""
        meta = {"model_config": self.model_cfg.to_dict(), "train_config": asdict(self.cfg),
                "domains": self.corpus.domains, "schedule_steps": self.horizon}
        return checkpoint.save_checkpoint(self.out, self.step, model=self.model, opt=self.opt,
                                          extra=rng or self._rng_state(), meta=meta, keep_last=self.cfg.keep_last)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, step (the schedule is a function of it), RNG and router state."""
        meta, t = checkpoint.load_checkpoint(path, model=self.model, opt=self.opt)
        torch.set_rng_state(t["rng.torch"])
        self.gen.set_state(t["rng.data"])
        self.step = int(meta["step"])
        self.horizon = int(meta.get("schedule_steps", meta["train_config"]["steps"]))

    # -- the loop ------------------------------------------------------------------
    def _log(self, rec: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        for sink in self.log_sinks:
            sink(rec)

    def _prepare(self, resume: bool) -> None:
        """Check the run folder, clean dead temp folders, load the checkpoint to resume from."""
        check_out(self.out)
        kind = run_kind(self.out)
        if kind == "ep":
            raise ValueError(f"--out {str(self.out)!r} holds an expert-parallel run (ep.json, rank*/): "
                             + ("resume it with the same --nproc/--ep" if resume else "pass another --out"))
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create --out {self.out}: {e.strerror} (give a writable folder)") from None
        gone = checkpoint.clean_temp(self.out)
        if gone:
            self.console.print(f"removed {len(gone)} half-written checkpoint folder(s) of a dead process: "
                               f"{', '.join(p.name for p in gone)}")
        ckpts = checkpoint.list_checkpoints(self.out)
        if ckpts and not resume:
            raise ValueError(f"--out {str(self.out)!r} already holds checkpoints: pass --resume or another --out")
        start = self.resume_point(ckpts) if resume else None
        if start is not None:
            self.load_checkpoint(start)
            if self.cfg.steps > self.horizon:
                floor = lr_at(self.horizon, self.cfg, self.horizon)
                self.console.print(f"the schedule keeps its length {self.horizon}: steps {self.horizon + 1}.."
                                   f"{self.cfg.steps} run at the floor lr {floor:.2e}")
            self.console.print(f"resumed from {start} at step {self.step}")
        if resume:  # rows after the checkpoint (or all, with none) will be re-run; a torn last line goes too
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
        else:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        checkpoint.write_text_atomic(self.out / "config.json", json.dumps(
            {"model_config": self.model_cfg.to_dict(), "train_config": asdict(self.cfg), "env": run_env()}, indent=1))

    def _save_or_stop(self, rng: dict[str, Tensor] | None = None) -> Path | None:
        """save_checkpoint; None when the weights are not finite (nothing written: the last one stays good)."""
        try:
            return self.save_checkpoint(rng)
        except checkpoint.NonFiniteCheckpoint:
            return None

    def _stop_on_nonfinite(self, e: NonFiniteError) -> None:
        for m in moe_layers(self.model):
            m.discard_observations()  # of the failed step; none are held at a step start
        path = self._save_or_stop(rng=self._rng_at_step_start)
        last = path or (checkpoint.list_checkpoints(self.out) or [None])[-1]
        where = (f"last good checkpoint: {last}" if last else
                 "no finite checkpoint was saved (lower --lr or check the data)")
        msg = f"{e}; stopped, {where}"
        if path is None:
            msg += f" (the weights after step {self.step} are not finite: not saved)"
        self._log({"kind": "error", "step": self.step + 1, "message": msg})
        raise NonFiniteError(msg) from e

    def _stop_on_signal(self, signum: int) -> None:
        path = self._save_or_stop()
        name = signal.Signals(signum).name
        where = f"checkpoint {path}" if path else "no checkpoint (weights not finite)"
        self._log({"kind": "interrupted", "step": self.step, "signal": name})
        raise Interrupted(f"stopped by {name} after step {self.step}, {where}; resume: {self.resume_command()}",
                          signum)

    def fit(self, resume: bool = False, stop_at: int | None = None) -> dict:
        """Train to cfg.steps (or pause at `stop_at`, with a checkpoint there) with a progress bar, periodic
        validation and checkpoints; returns the summary (also written to summary.json). SIGINT / SIGTERM finish
        the current step, save a checkpoint and raise Interrupted (a second Ctrl-C stops at once)."""
        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        self._prepare(resume)
        pc = param_count(self.model_cfg)
        if getattr(self.corpus, "report", None) is not None:
            self.console.print(format_report(self.corpus.report))
        self.console.print(f"model: {pc.total:,} parameters, {pc.active:,} active per token; MoE layers "
                           f"{self.model_cfg.moe_layer_ids}; domains {self.corpus.domains}")
        t_start, tokens, last_eval = time.perf_counter(), 0, None
        cols = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        seen = [0]
        with _stop_signals(seen), Progress(*cols, console=self.console, transient=False) as bar:
            task = bar.add_task("train", total=cfg.steps, completed=self.step, info="")
            while self.step < end:
                try:
                    rec = self.train_step()
                except NonFiniteError as e:
                    self._stop_on_nonfinite(e)
                except KeyboardInterrupt:  # a second Ctrl-C: stop now, this step is discarded
                    raise Interrupted(f"stopped by SIGINT during step {self.step + 1}, no checkpoint written; "
                                      f"resume from the last one: {self.resume_command()}", signal.SIGINT) from None
                tokens += cfg.batch_size * cfg.seq_len * cfg.grad_accum
                self._log(rec)
                info = f"loss {rec['loss']:.3f}  {rec['tok_per_s']:,.0f} tok/s  MaxVio {max(rec['max_vio'] or [0]):.2f}"
                bar.update(task, completed=self.step, info=info)
                if self.step % cfg.log_every == 0:
                    bar.console.print(f"step {self.step:5d}  lr {rec['lr']:.2e}  {info}  aux {rec['aux_loss']:.4f}")
                done = self.step == end
                if done or (cfg.eval_every and self.step % cfg.eval_every == 0):
                    last_eval = self.evaluate()
                    self._log({"kind": "val", "step": self.step, **last_eval})
                    bar.console.print(f"step {self.step:5d}  val " + "  ".join(
                        f"{d} {v:.3f}" for d, v in last_eval["val_loss"].items()))
                save = done or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0)
                if save and self._save_or_stop() is None:  # weights went non-finite: the last checkpoint stays
                    self._stop_on_nonfinite(NonFiniteError(f"non-finite weights after step {self.step}"))
                signum = self.agree_stop(seen[0])
                if signum:
                    self._stop_on_signal(signum)
        last_eval = last_eval or self.evaluate()
        summary = {"step": self.step, "params": pc.total, "active_params": pc.active,
                   "train_time_s": round(time.perf_counter() - t_start, 1),
                   "tokens_per_s": round(tokens / max(time.perf_counter() - t_start, 1e-9)),
                   "unigram_loss": {d: self.corpus.unigram_loss(d) for d in self.corpus.domains}, **last_eval}
        checkpoint.write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=1))
        return summary


class _stop_signals:
    """While training: SIGINT/SIGTERM set seen[0] (the step finishes, then a checkpoint); a second SIGINT raises
    KeyboardInterrupt at once. Only in the main thread (signal handlers cannot be set elsewhere)."""

    def __init__(self, seen: list[int]):
        self.seen, self.old = seen, {}

    def _handler(self, signum, frame):
        if self.seen[0] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.seen[0] = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def _layer_of(param_name: str) -> str:
    m = re.match(r"blocks\.(\d+)\.", param_name)
    return f"layer {m.group(1)}" if m else param_name.split(".")[0]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be re-run), and a torn last line."""
    if path.exists():
        keep = [r for r in checkpoint.read_metrics(path) if r.get("step", 0) <= step]
        checkpoint.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


@torch.no_grad()
def evaluate(model: MoELM, corpus: Corpus, cfg: TrainConfig, runtime: Runtime = Runtime()) -> dict:
    """Per-domain validation loss (nats/byte) and bits per byte; expert counts per MoE layer and domain."""
    was = model.training
    model.eval()
    layers = model.cfg.moe_layer_ids
    E = model.cfg.moe.n_experts
    counts_LDE = torch.zeros(len(layers), len(corpus.domains), E)
    val_loss, val_bpb = {}, {}
    for d, dom in enumerate(corpus.domains):
        tot, n, n_bytes = 0.0, 0.0, 0.0
        for b in progress(corpus.val_batches(dom, cfg.batch_size, cfg.seq_len, cfg.eval_batches),
                          f"eval {dom}", total=cfg.eval_batches):
            b = to_device(b, runtime.device)
            with runtime.autocast():
                out = model(b.idx_BS, valid_BS=b.valid_BS)
            k = float(b.valid_BS.sum())
            tot += float(lm_loss(logits_BSV=out.logits_BSV, targets_BS=b.targets_BS, valid_BS=b.valid_BS)) * k
            n += k
            if corpus.byte_len_V is not None:  # a BPE vocabulary: the bytes each target id stands for
                n_bytes += float(corpus.byte_len_V[b.targets_BS[b.valid_BS].cpu()].sum())
            for j, i in enumerate(layers):
                counts_LDE[j, d] += out.moe[i].counts_E.float().cpu()
        val_loss[dom] = tot / max(n, 1.0)
        # bits per byte of the text: nats per target id / ln 2 for byte ids, else summed nats over the bytes
        val_bpb[dom] = (val_loss[dom] if corpus.byte_len_V is None else tot / max(n_bytes, 1.0)) / math.log(2)
    model.train(was)
    return {"val_loss": val_loss, "val_bpb": val_bpb,
            "expert_by_domain": {str(i): counts_LDE[j].tolist() for j, i in enumerate(layers)}}


def to_device(batch: Batch, device) -> Batch:
    return Batch(*(t.to(device) for t in batch))


def run_env() -> dict:
    """What results depend on besides the config: torch threads and version, CPU (recorded in config.json)."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}


def _split_like(flat: Tensor, parts: list[Tensor]) -> list[Tensor]:
    return list(torch.split(flat, [p.numel() for p in parts]))


def _stats(counts_E: Tensor) -> BalanceStats:
    return balance_stats(counts_E=counts_E, n_tokens=1)


def val_table(summary: dict):
    """Rich table: validation loss / bits per byte per domain next to the unigram baseline."""
    from rich.table import Table
    t = Table(title=f"validation at step {summary['step']} (nats per byte; bpb = bits per byte)")
    for col in ("domain", "val loss", "val bpb", "unigram loss", "model / unigram"):
        t.add_column(col, justify="right")
    for d, v in summary["val_loss"].items():
        u = summary["unigram_loss"][d]
        t.add_row(d, f"{v:.3f}", f"{summary['val_bpb'][d]:.3f}", f"{u:.3f}", f"{v / u:.2f}")
    return t
