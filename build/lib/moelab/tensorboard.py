"""TensorBoard event files from moelab's metrics records (optional: needs the `tensorboard` package)."""
from __future__ import annotations

from pathlib import Path


def _writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError("--tensorboard needs the optional tensorboard package: pip install 'moelab[tb]' "
                         "(or pip install tensorboard)") from e
    return SummaryWriter(log_dir=str(log_dir))


def scalars(rec: dict) -> dict[str, float]:
    """A metrics.jsonl record as TensorBoard scalars: numbers as they are, per-layer lists as tag/layerN,
    validation dicts as val_loss/DOMAIN."""
    kind = rec.get("kind", "train")
    out: dict[str, float] = {}
    for key, v in rec.items():
        if key in ("kind", "step") or isinstance(v, bool):
            continue
        tag = f"{kind}/{key}"
        if isinstance(v, (int, float)):
            out[tag] = float(v)
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            out.update({f"{tag}/layer{i}": float(x) for i, x in enumerate(v)})
        elif isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
            out.update({f"{tag}/{d}": float(x) for d, x in v.items()})
    return out


class EventWriter:
    """Writes each record it is given (Trainer.log_sinks) as scalars at the record's step."""

    def __init__(self, log_dir: str | Path):
        self.w = _writer(Path(log_dir))

    def write(self, rec: dict) -> None:
        for tag, v in scalars(rec).items():
            self.w.add_scalar(tag, v, global_step=int(rec.get("step", 0)))
        self.w.flush()


def export_runs(runs: list[str | Path]) -> list[Path]:
    """Each run's metrics.jsonl as event files in RUN/tb; returns the folders."""
    from moelab.plots import read_metrics
    out = []
    for run in runs:
        train, val = read_metrics(run)
        w = EventWriter(Path(run) / "tb")
        for rec in sorted(train + val, key=lambda r: r["step"]):
            w.write(rec)
        w.w.close()
        out.append(Path(run) / "tb")
    return out
