"""Trainer: AdamW, warm-up + cosine, clipping, accumulation, safetensors checkpoints with exact resume.

L=MoE layers, E=experts, B=sequences, S=positions.
One `Trainer.train_step()` = one optimizer step. Hooks for distributed training (not implemented here):
`grad_sync(model)` runs after backward and before clipping; `reduce_metrics(t)` returns the sum of a
1-D metric tensor over ranks; `bias_update(model)` runs after each optimizer step (loss-free balancing);
`data_rank` gives each data-parallel rank its own batches (same model init on every rank).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moelab import balance
from moelab.config import replace_fields
from moelab.data import Batch, Corpus, build_corpus
from moelab.model import LMOutput, ModelConfig, MoELM, lm_loss, param_count
from moelab.moe import MoELayer, update_loss_free_biases
from moelab.parallel import enable_global_balance, reset_global_balance

CKPT_RE = re.compile(r"^step_(\d{8})$")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600                 # optimizer steps
    batch_size: int = 16             # sequences per micro-batch
    seq_len: int = 128               # tokens (bytes) per sequence
    grad_accum: int = 1              # micro-batches per optimizer step
    lr: float = 3e-3                 # peak learning rate
    min_lr_ratio: float = 0.1        # cosine floor as a fraction of lr
    warmup: int = 30                 # linear warm-up steps
    weight_decay: float = 0.1        # AdamW decay on matrices (not on norms/biases/router bias)
    beta1: float = 0.9               # AdamW beta1
    beta2: float = 0.95              # AdamW beta2
    grad_clip: float = 1.0           # max global grad norm; 0 = off
    seed: int = 0                    # seeds model init and data sampling
    log_every: int = 20              # print a line every n steps (metrics.jsonl gets every step)
    eval_every: int = 200            # validation every n steps (and at the end); 0 = end only
    eval_batches: int = 4            # validation micro-batches per domain
    ckpt_every: int = 200            # checkpoint every n steps (and at the end); 0 = end only
    keep_last: int = 2               # checkpoints kept on disk
    val_fraction: float = 0.1        # share of files held out for validation
    data: tuple[str, ...] = ("builtin",)  # "builtin" or the user's text files / folders

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_batches", "keep_last"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 1):
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)!r} is invalid: allowed an integer >= 1")
        for f in ("warmup", "eval_every", "ckpt_every", "seed"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 0):
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)!r} is invalid: allowed an integer >= 0")
        for f in ("lr", "weight_decay", "grad_clip"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)!r} is invalid: allowed >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio={self.min_lr_ratio} is invalid: allowed 0..1")

    def replace(self, **changes) -> TrainConfig:
        return replace_fields(self, changes)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of asdict (JSON turns the data tuple into a list)."""
        return cls(**{**d, "data": tuple(d["data"])})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to min_lr_ratio * lr at cfg.steps (Loshchilov & Hutter 2017)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class NonFiniteError(RuntimeError):
    """Training met a NaN/Inf; the message names the step and the layer."""


def moe_layers(model: nn.Module) -> list[tuple[int, MoELayer]]:
    """(block index, MoELayer) for every MoE block of an MoELM."""
    return [(i, b.ffn) for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)]


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


# ---------------------------------------------------------------- checkpoints (safetensors + JSON)

def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Flatten an optimizer state dict: tensors as 'optim.{param}.{key}', everything else as JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().clone()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, Tensor], meta: dict) -> dict:
    """Inverse of optimizer_to_tensors -> a state dict for `optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for name, v in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def list_checkpoints(run: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written temp folders are ignored)."""
    d = Path(run) / "ckpt"
    return sorted(p for p in d.iterdir() if CKPT_RE.match(p.name)) if d.is_dir() else []


def load_model(run: str | Path, ckpt: str | Path | None = None) -> tuple[MoELM, dict]:
    """Model (eval mode) and state.json of a run's latest (or the given) checkpoint."""
    path = Path(ckpt) if ckpt else (list_checkpoints(run) or [None])[-1]
    if path is None:
        raise ValueError(f"run {str(run)!r} has no checkpoint under {run}/ckpt")
    meta = json.loads((path / "state.json").read_text())
    model = MoELM(ModelConfig.from_dict(meta["model_config"]))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval(), meta


# ---------------------------------------------------------------- trainer

class Trainer:
    """Owns model, optimizer, data sampler and run folder. `fit()` loops `train_step()`."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, out: str | Path, *, corpus: Corpus | None = None,
                 grad_sync: Callable[[nn.Module], None] | None = None,
                 reduce_metrics: Callable[[Tensor], Tensor] | None = None,
                 bias_update: Callable[[nn.Module], None] = update_loss_free_biases, verbose: bool = True,
                 grad_norm: Callable[[list[Tensor]], Tensor] | None = None, data_rank: int = 0):
        if cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"TrainConfig.seq_len={cfg.seq_len} is invalid: allowed <= max_seq_len="
                             f"{model_cfg.max_seq_len}")
        self.model_cfg, self.cfg, self.out = model_cfg, cfg, Path(out)
        self.corpus = corpus if corpus is not None else build_corpus(list(cfg.data), val_fraction=cfg.val_fraction)
        torch.manual_seed(cfg.seed)
        self.model = MoELM(model_cfg)
        enable_global_balance(self.model)  # balance="global": f from counts summed over micro-batches (and ranks)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "tok_emb" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and "tok_emb" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=False)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * data_rank)  # DP ranks: own batches
        self.grad_sync, self.reduce_metrics, self.bias_update = grad_sync, reduce_metrics, bias_update
        self.grad_norm = grad_norm  # distributed: global grad norm over every rank's shard (moelab.parallel)
        self.step = 0
        self.console = Console(quiet=not verbose)
        self._rng_at_step_start = self._rng_state()

    # -- one optimizer step ------------------------------------------------------
    def train_step(self) -> dict:
        """Forward/backward over grad_accum micro-batches, sync hook, clip, AdamW, bias update."""
        cfg, model = self.cfg, self.model
        self._rng_at_step_start = self._rng_state()
        lr = lr_at(self.step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        model.train()
        self.opt.zero_grad(set_to_none=True)
        layers = moe_layers(model)
        E = self.model_cfg.moe.n_experts
        sums = torch.zeros(4)  # lm loss, weighted aux, micro-batches, tokens
        counts_LE = torch.zeros(len(layers), E)
        named: dict[str, Tensor] = {}
        t0 = time.perf_counter()
        for _ in range(cfg.grad_accum):
            batch = self.corpus.sample(cfg.batch_size, cfg.seq_len, self.gen)
            out = model(batch.idx_BS, valid_BS=batch.valid_BS)
            lm = lm_loss(logits_BSV=out.logits_BSV, targets_BS=batch.targets_BS, valid_BS=batch.valid_BS)
            self._check_finite(lm, out, batch)
            ((lm + out.aux_loss) / cfg.grad_accum).backward()
            sums += torch.stack([lm.detach(), out.aux_loss.detach(), torch.tensor(1.0),
                                 batch.valid_BS.sum().float()])
            for j, (i, _) in enumerate(layers):
                r = out.moe[i]
                counts_LE[j] += balance.expert_counts(expert_idx_TK=r.routing.expert_idx_TK, n_experts=E)
                for name, v in r.losses.items():
                    named[name] = named.get(name, torch.zeros(())) + v.detach() / len(layers)
        if self.grad_sync is not None:
            self.grad_sync(model)
        params = [p for p in model.parameters() if p.grad is not None]
        if self.grad_norm is not None:  # sharded experts: every rank clips by the same global norm
            gnorm = self.grad_norm(params)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(gnorm):  # checked before clipping, which would spread the NaN to every grad
            # a NaN spreads backwards, to everything before it: blame the last parameter (forward order) hit
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            bad = bad[-1] if bad else "the global norm (overflow)"
            raise NonFiniteError(f"non-finite gradient at step {self.step + 1} in {_layer_of(bad)} ({bad})")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, gnorm)
        self.opt.step()
        self.bias_update(model)
        reset_global_balance(model)  # the global-batch counts span one optimizer step
        self.step += 1
        flat = torch.cat([sums, counts_LE.flatten(), torch.stack(list(named.values())) if named else torch.zeros(0)])
        if self.reduce_metrics is not None:
            flat = self.reduce_metrics(flat)
        sums, counts_LE = flat[:4], flat[4:4 + counts_LE.numel()].view_as(counts_LE)
        n_micro = float(sums[2])
        stats = [balance.balance_stats(counts_E=c, n_tokens=1) for c in counts_LE]
        rec = {"kind": "train", "step": self.step, "loss": float(sums[0]) / n_micro,
               "aux_loss": float(sums[1]) / n_micro, "lr": lr, "grad_norm": float(gnorm),
               "tok_per_s": float(sums[3]) / max(time.perf_counter() - t0, 1e-9),
               "max_vio": [round(float(s.max_vio), 5) for s in stats],
               "load": [[round(x, 5) for x in s.load_E.tolist()] for s in stats]}
        for k, name in enumerate(named):
            rec[f"aux/{name}"] = float(flat[4 + counts_LE.numel() + k]) / n_micro
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
        return evaluate(self.model, self.corpus, self.cfg)

    # -- checkpoints ---------------------------------------------------------------
    def _rng_state(self) -> dict[str, Tensor]:
        return {"rng.torch": torch.get_rng_state(), "rng.data": self.gen.get_state()}

    def save_checkpoint(self, rng: dict[str, Tensor] | None = None) -> Path:
        """Atomic: write into a temp folder, then os.replace it to ckpt/step_XXXXXXXX; keep the last N."""
        ckdir = self.out / "ckpt"
        final = ckdir / f"step_{self.step:08d}"
        if final.exists():
            return final
        tmp = ckdir / f".tmp_step_{self.step:08d}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        opt_t, opt_meta = optimizer_to_tensors(self.opt)
        save_file({**opt_t, **(rng or self._rng_state())}, str(tmp / "trainer.safetensors"))
        meta = {"step": self.step, "model_config": self.model_cfg.to_dict(), "train_config": asdict(self.cfg),
                "optimizer": opt_meta, "domains": self.corpus.domains}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        for old in list_checkpoints(self.out)[:-self.cfg.keep_last]:
            shutil.rmtree(old)
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, step (the schedule is a function of it), RNG and balancer state."""
        path = Path(path)
        meta = json.loads((path / "state.json").read_text())
        self.model.load_state_dict(load_file(str(path / "model.safetensors")))
        t = load_file(str(path / "trainer.safetensors"))
        self.opt.load_state_dict(optimizer_from_tensors(t, meta["optimizer"]))
        torch.set_rng_state(t["rng.torch"])
        self.gen.set_state(t["rng.data"])
        self.step = int(meta["step"])

    # -- the loop ------------------------------------------------------------------
    def _log(self, rec: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def fit(self, resume: bool = False, stop_at: int | None = None) -> dict:
        """Train to cfg.steps (or pause at `stop_at`, with a checkpoint there) with a progress bar, periodic
        validation and checkpoints; returns the summary (also written to summary.json)."""
        cfg = self.cfg
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        ckpts = list_checkpoints(self.out)
        if ckpts and not resume:
            raise ValueError(f"--out {str(self.out)!r} already holds checkpoints: pass --resume or another --out")
        if resume and ckpts:
            self.load_checkpoint(ckpts[-1])
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
            self.console.print(f"resumed from {ckpts[-1]} at step {self.step}")
        elif not resume:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        (self.out / "config.json").write_text(json.dumps(
            {"model_config": self.model_cfg.to_dict(), "train_config": asdict(cfg)}, indent=1))
        pc = param_count(self.model_cfg)
        self.console.print(f"model: {pc.total:,} parameters, {pc.active:,} active per token; MoE layers "
                           f"{self.model_cfg.moe_layers}; domains {self.corpus.domains}")
        t_start, tokens, last_eval = time.perf_counter(), 0, None
        cols = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        with Progress(*cols, console=self.console, transient=False) as bar:
            task = bar.add_task("train", total=cfg.steps, completed=self.step, info="")
            while self.step < end:
                try:
                    rec = self.train_step()
                except NonFiniteError as e:
                    for _, m in moe_layers(self.model):
                        m.expert_load.zero_()  # counts of the failed step; they are zero at a step start
                    path = self.save_checkpoint(rng=self._rng_at_step_start)
                    msg = f"{e}; stopped, last good checkpoint: {path}"
                    self._log({"kind": "error", "step": self.step + 1, "message": msg})
                    raise NonFiniteError(msg) from e
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
                if done or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                    self.save_checkpoint()
        last_eval = last_eval or self.evaluate()
        summary = {"step": self.step, "params": pc.total, "active_params": pc.active,
                   "train_time_s": round(time.perf_counter() - t_start, 1),
                   "tokens_per_s": round(tokens / max(time.perf_counter() - t_start, 1e-9)),
                   "unigram_loss": {d: self.corpus.unigram_loss(d) for d in self.corpus.domains}, **last_eval}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def _layer_of(param_name: str) -> str:
    m = re.match(r"blocks\.(\d+)\.", param_name)
    return f"layer {m.group(1)}" if m else param_name.split(".")[0]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be re-run)."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


@torch.no_grad()
def evaluate(model: MoELM, corpus: Corpus, cfg: TrainConfig) -> dict:
    """Per-domain validation loss (nats/byte) and bits per byte; expert counts per MoE layer and domain."""
    was = model.training
    model.eval()
    layers = [i for i, _ in moe_layers(model)]
    E = model.cfg.moe.n_experts
    counts_LDE = torch.zeros(len(layers), len(corpus.domains), E)
    val_loss = {}
    for d, dom in enumerate(corpus.domains):
        tot, n = 0.0, 0.0
        for b in corpus.val_batches(dom, cfg.batch_size, cfg.seq_len, cfg.eval_batches):
            out = model(b.idx_BS, valid_BS=b.valid_BS)
            k = float(b.valid_BS.sum())
            tot += float(lm_loss(logits_BSV=out.logits_BSV, targets_BS=b.targets_BS, valid_BS=b.valid_BS)) * k
            n += k
            for j, i in enumerate(layers):
                counts_LDE[j, d] += balance.expert_counts(expert_idx_TK=out.moe[i].routing.expert_idx_TK,
                                                          n_experts=E)
        val_loss[dom] = tot / max(n, 1.0)
    model.train(was)
    return {"val_loss": val_loss, "val_bpb": {d: v / math.log(2) for d, v in val_loss.items()},
            "expert_by_domain": {str(i): counts_LDE[j].tolist() for j, i in enumerate(layers)}}


# ---------------------------------------------------------------- CLI entry points (cli.py parses, these run)

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


def cli_train(*, preset: str, out: str, resume: bool, threads: int | None, moe_changes: dict,
              train_changes: dict, make_trainer: Callable[..., Trainer] = Trainer) -> int:
    """`moelab train`: preset + MoE overrides (router, balance, ...) + TrainConfig overrides."""
    from moelab.presets import get_preset
    if threads:
        torch.set_num_threads(threads)
    model_cfg = get_preset(preset, **moe_changes)
    changes = {k: v for k, v in train_changes.items() if v is not None}
    if "data" in changes:
        changes["data"] = tuple(changes["data"])
    if resume and (Path(out) / "config.json").exists():  # resume with the run's own configs
        saved = json.loads((Path(out) / "config.json").read_text())
        model_cfg = ModelConfig.from_dict(saved["model_config"])
        cfg = TrainConfig.from_dict(saved["train_config"])
        cfg = cfg.replace(steps=changes.get("steps", cfg.steps))
    else:
        cfg = TrainConfig(**changes)
    summary = make_trainer(model_cfg, cfg, out).fit(resume=resume)
    Console().print(val_table(summary))
    Console().print(f"run folder: {out} (metrics.jsonl, summary.json, ckpt/); plots: moelab plot {out}")
    return 0


def cli_eval(*, run: str, ckpt: str | None, batches: int | None, threads: int | None) -> int:
    """`moelab eval RUN`: validation loss per domain of the latest (or given) checkpoint vs unigram."""
    if threads:
        torch.set_num_threads(threads)
    model, meta = load_model(run, ckpt)
    cfg = TrainConfig.from_dict(meta["train_config"])
    cfg = cfg.replace(eval_batches=batches) if batches else cfg
    corpus = build_corpus(list(cfg.data), val_fraction=cfg.val_fraction)
    ev = evaluate(model, corpus, cfg)
    summary = {"step": meta["step"], **ev, "unigram_loss": {d: corpus.unigram_loss(d) for d in corpus.domains}}
    Console().print(val_table(summary))
    return 0


def cli_generate(*, run: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                 seed: int) -> int:
    """`moelab generate RUN --prompt ...`: sample bytes from the latest checkpoint and print them."""
    from moelab.model import BOS_ID, generate
    model, _ = load_model(run)
    ids = torch.tensor([BOS_ID] + list(prompt.encode("utf-8")))
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   generator=torch.Generator().manual_seed(seed))
    print(prompt + bytes(out.tolist()).decode("utf-8", errors="replace"))
    return 0
