"""Run checkpoints: safetensors weights + optimizer/RNG tensors + a JSON state, written atomically and verified.

Layout of a run folder: ckpt/step_XXXXXXXX/{model.safetensors, trainer.safetensors, state.json}. A checkpoint
is written into a temp folder and renamed into place, so a crash leaves either the old or the new one; a
failed write (disk full, read-only) removes its temp folder and keeps the previous checkpoint. state.json
holds a SHA-256 per tensor file ("files"), checked on load, so a torn or bit-flipped file is named, not loaded.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moelab.config import ModelConfig, MoEConfig, TrainConfig
from moelab.model import MoELM

CKPT_RE = re.compile(r"^step_(\d{8})$")
TMP_RE = re.compile(r"^\.tmp_step_\d{8}_(\d+)$")


class NonFiniteCheckpoint(ValueError):
    """The weights or optimizer moments to save hold NaN/Inf: nothing was written."""


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


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temp(run: str | Path) -> list[Path]:
    """Remove half-written .tmp_step_* folders left by dead processes (a crash or a full disk); returns them."""
    d = Path(run) / "ckpt"
    gone = []
    for p in (d.iterdir() if d.is_dir() else []):
        m = TMP_RE.match(p.name)
        if m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def all_finite(tensors: dict[str, Tensor]) -> list[str]:
    """Names of floating-point tensors holding a NaN or Inf (empty: all finite)."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def save_checkpoint(run: str | Path, step: int, *, model: nn.Module, opt: torch.optim.Optimizer,
                    extra: dict[str, Tensor], meta: dict, keep_last: int) -> Path:
    """Atomic: write into a temp folder, fsync, os.replace it to ckpt/step_XXXXXXXX; keep the last N.
    `extra` tensors (RNG states) go into trainer.safetensors beside the optimizer's; `meta` into state.json
    with each tensor file's SHA-256. Refuses (ValueError) to save non-finite weights or optimizer moments; on an
    OSError (disk full, read-only) the temp folder is removed, the previous checkpoint kept, and the error
    says how much space the checkpoint needs."""
    ckdir = Path(run) / "ckpt"
    final = ckdir / f"step_{step:08d}"
    if final.exists():
        return final
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    opt_t, opt_meta = optimizer_to_tensors(opt)
    bad = all_finite(weights) + all_finite(opt_t)
    if bad:
        raise NonFiniteCheckpoint(f"checkpoint at step {step} not saved: {len(bad)} tensors hold NaN/Inf (first: {bad[0]})")
    tmp = ckdir / f".tmp_step_{step:08d}_{os.getpid()}"
    need = sum(v.numel() * v.element_size() for d in (weights, opt_t, extra) for v in d.values())
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / "model.safetensors"))
        save_file({**opt_t, **extra}, str(tmp / "trainer.safetensors"))
        files = {f: file_sha256(tmp / f) for f in ("model.safetensors", "trainer.safetensors")}
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta, "optimizer": opt_meta, "files": files},
                                                   indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, f"checkpoint {final}", ckdir, need, list_checkpoints(run)) from None
    for old in list_checkpoints(run)[:-keep_last]:
        shutil.rmtree(old)
    return final


def write_error(e: OSError, what: str, where: Path, need: int, kept: list[Path]) -> OSError:
    """One-line OSError for a failed write: what, why, space needed/free, the checkpoint that was kept."""
    why = e.strerror or str(e)
    msg = f"cannot write {what}: {why}"
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(_existing(where)).free
        msg += f" (it needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free there)"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        msg += " (give a writable --out)"
    msg += f"; kept {kept[-1]}" if kept else "; no earlier checkpoint"
    return OSError(e.errno, msg)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file via a temp file + os.replace: a failed write (disk full) keeps the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def previous_hint(path: Path) -> str:
    """What to do when checkpoint `path` is unreadable: the previous checkpoint of its run, if any."""
    run = path.parent.parent
    prev = [p for p in list_checkpoints(run) if p.name < path.name]
    if prev:
        return f"the previous checkpoint is {prev[-1]}: pass --ckpt {prev[-1]}, or move {path} away to resume from it"
    return "no earlier checkpoint: retrain (moelab train --out NEW)"


def verify(path: str | Path, state: dict, names: tuple[str, ...]) -> None:
    """Each named tensor file exists and matches the SHA-256 in state.json (old checkpoints without one: exists)."""
    path = Path(path)
    for name in names:
        f = path / name
        if not f.is_file():
            raise ValueError(f"{f} is missing: {previous_hint(path)}")
        want = state.get("files", {}).get(name)
        if want is not None and file_sha256(f) != want:
            raise ValueError(f"{f} is corrupt (its SHA-256 differs from the one in state.json): {previous_hint(path)}")


def read_tensors(path: Path) -> dict[str, Tensor]:
    """safetensors file -> tensors; a torn or malformed file is one ValueError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): {previous_hint(path.parent)}") from None


def load_checkpoint(path: str | Path, *, model: nn.Module, opt: torch.optim.Optimizer | None = None
                    ) -> tuple[dict, dict[str, Tensor]]:
    """Load weights (and optimizer state) from a checkpoint folder, checksums verified first; returns
    (state.json, trainer tensors)."""
    path = Path(path)
    meta = read_state(path)
    names = ("model.safetensors",) + (("trainer.safetensors",) if opt is not None else ())
    if opt is not None and not (path / "trainer.safetensors").is_file() and "merged_from_ep_ranks" in meta:
        raise ValueError(f"{path} is the merged model of an expert-parallel run (no optimizer state): resume it "
                         f"with --nproc {meta['merged_from_ep_ranks']} (the ranks' checkpoints are in rank*/)")
    verify(path, meta, names)
    model.load_state_dict(read_tensors(path / "model.safetensors"))
    extra: dict[str, Tensor] = {}
    if opt is not None:
        extra = read_tensors(path / "trainer.safetensors")
        opt.load_state_dict(optimizer_from_tensors(extra, meta["optimizer"]))
    return meta, extra


def read_state(path: str | Path) -> dict:
    """state.json of a checkpoint folder; missing or invalid JSON is one ValueError naming it."""
    f = Path(path) / "state.json"
    if not Path(path).is_dir():
        raise ValueError(f"checkpoint {str(path)!r} does not exist: allowed a folder ckpt/step_N of a run")
    try:
        state = json.loads(f.read_text())
    except FileNotFoundError:
        raise ValueError(f"{f} is missing: {previous_hint(Path(path))}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e}): {previous_hint(Path(path))}") from None
    if not isinstance(state, dict) or "step" not in state or "model_config" not in state:
        raise ValueError(f"{f} lacks 'step' / 'model_config': {previous_hint(Path(path))}")
    return state


def _checked(cls, d: dict, where: str) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"{where} is not an object: allowed the {cls.__name__} fields")  # noqa: TRY004 - user file
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"{where} has unknown field {bad[0]!r} (written by another moelab version?): allowed "
                         f"{', '.join(sorted(known))}")
    return d


def model_config_from(d: dict, file: str | Path) -> ModelConfig:
    """ModelConfig of a saved dict; an unknown field is one ValueError naming the file and the field."""
    _checked(ModelConfig, d, f"{file}: model_config")
    _checked(MoEConfig, d.get("moe", {}), f"{file}: model_config.moe")
    return ModelConfig.from_dict(d)


def train_config_from(d: dict, file: str | Path) -> TrainConfig:
    """TrainConfig of a saved dict; an unknown field is one ValueError naming the file and the field."""
    return TrainConfig.from_dict(_checked(TrainConfig, d, f"{file}: train_config"))


def check_run_config(path: str | Path) -> None:
    """A run's config.json has only known fields (before resolve reads it)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): restore it from a checkpoint's state.json "
                         f"(model_config, train_config)") from None
    if isinstance(data, dict) and "model_config" in data:
        model_config_from(data["model_config"], path)
        if "train_config" in data:
            train_config_from(data["train_config"], path)


def latest(run: str | Path, ckpt: str | Path | None = None) -> Path:
    """The given checkpoint folder, or the run's latest; a clear error when there is none."""
    if ckpt and not Path(ckpt).is_dir():
        raise ValueError(f"--ckpt {str(ckpt)!r} does not exist: allowed one of "
                         f"{[str(p) for p in list_checkpoints(run)] or 'the ckpt/step_N folders of a run'}")
    if not ckpt and not Path(run).is_dir():
        raise ValueError(f"run {str(run)!r} does not exist: allowed a folder written by moelab train --out")
    path = Path(ckpt) if ckpt else (list_checkpoints(run) or [None])[-1]
    if path is None:
        raise ValueError(f"run {str(run)!r} has no checkpoint under {run}/ckpt")
    return path


def load_model(run: str | Path, ckpt: str | Path | None = None) -> tuple[MoELM, dict]:
    """Model (eval mode) and state.json of a run's latest (or the given) checkpoint."""
    path = latest(run, ckpt)
    state = read_state(path)
    model = MoELM(model_config_from(state["model_config"], path / "state.json"))
    if "train_config" in state:  # callers read it: fail here if a field is unknown
        train_config_from(state["train_config"], path / "state.json")
    meta, _ = load_checkpoint(path, model=model)
    return model.eval(), meta


def read_metrics(path: str | Path, *, repair: bool = False) -> list[dict]:
    """Rows of a metrics.jsonl. A torn last line (what a crash mid-write leaves) is skipped, and with
    repair=True cut from the file; a bad line elsewhere is one ValueError naming the file and line."""
    path = Path(path)
    lines = path.read_text(errors="replace").split("\n")
    rows, good_bytes = [], 0
    for i, ln in enumerate(lines):
        if not ln.strip():
            good_bytes += len(ln.encode()) + 1
            continue
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            if any(x.strip() for x in lines[i + 1:]):
                raise ValueError(f"{path} line {i + 1} is not valid JSON: remove that line") from None
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
            break
        good_bytes += len(ln.encode()) + 1
    return rows
