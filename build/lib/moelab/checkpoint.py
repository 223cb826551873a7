"""Run checkpoints: safetensors weights + optimizer/RNG tensors + a JSON state, written atomically.

Layout of a run folder: ckpt/step_XXXXXXXX/{model.safetensors, trainer.safetensors, state.json}. A checkpoint
is written into a temp folder and renamed into place, so a crash leaves either the old or the new one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moelab.config import ModelConfig
from moelab.model import MoELM

CKPT_RE = re.compile(r"^step_(\d{8})$")


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


def save_checkpoint(run: str | Path, step: int, *, model: nn.Module, opt: torch.optim.Optimizer,
                    extra: dict[str, Tensor], meta: dict, keep_last: int) -> Path:
    """Atomic: write into a temp folder, fsync, os.replace it to ckpt/step_XXXXXXXX; keep the last N.
    `extra` tensors (RNG states) go into trainer.safetensors beside the optimizer's; `meta` into state.json."""
    ckdir = Path(run) / "ckpt"
    final = ckdir / f"step_{step:08d}"
    if final.exists():
        return final
    tmp = ckdir / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    opt_t, opt_meta = optimizer_to_tensors(opt)
    save_file({**opt_t, **extra}, str(tmp / "trainer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta, "optimizer": opt_meta}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, final)
    for old in list_checkpoints(run)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | Path, *, model: nn.Module, opt: torch.optim.Optimizer | None = None
                    ) -> tuple[dict, dict[str, Tensor]]:
    """Load weights (and optimizer state) from a checkpoint folder; returns (state.json, trainer tensors)."""
    path = Path(path)
    meta = read_state(path)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    extra: dict[str, Tensor] = {}
    if opt is not None:
        extra = load_file(str(path / "trainer.safetensors"))
        opt.load_state_dict(optimizer_from_tensors(extra, meta["optimizer"]))
    return meta, extra


def read_state(path: str | Path) -> dict:
    """state.json of a checkpoint folder."""
    return json.loads((Path(path) / "state.json").read_text())


def latest(run: str | Path, ckpt: str | Path | None = None) -> Path:
    """The given checkpoint folder, or the run's latest; a clear error when there is none."""
    path = Path(ckpt) if ckpt else (list_checkpoints(run) or [None])[-1]
    if path is None:
        raise ValueError(f"run {str(run)!r} has no checkpoint under {run}/ckpt")
    return path


def load_model(run: str | Path, ckpt: str | Path | None = None) -> tuple[MoELM, dict]:
    """Model (eval mode) and state.json of a run's latest (or the given) checkpoint."""
    path = latest(run, ckpt)
    model = MoELM(ModelConfig.from_dict(read_state(path)["model_config"]))
    meta, _ = load_checkpoint(path, model=model)
    return model.eval(), meta
