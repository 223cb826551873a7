"""Training figures from a run folder (metrics.jsonl + summary.json), headless matplotlib (Agg).

L=MoE layers, E=experts, D=domains, N=logged steps.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def read_metrics(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows) of metrics.jsonl."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"run {str(run)!r} has no metrics.jsonl: train it first (moelab train --out {run})")
    from moelab.checkpoint import read_metrics
    rows = read_metrics(path)  # a torn last line (a crash mid-write) is skipped
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        raise ValueError(f"{path} has no training steps yet: nothing to plot (train first, or wait for a step)")
    return train, [r for r in rows if r.get("kind") == "val"]


def save_figure(fig, path: Path, dpi: int | None = None) -> Path:
    """tight_layout, write the PNG (at `dpi`, default the figure's), free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _save_line_plot(fig, ax, path: Path, ylabel: str, title: str) -> Path:
    """Curves over training steps: labels, legend, grid, then save."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < k or k <= 1:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def _moe_layer_ids(run: str | Path, n: int) -> list[int]:
    """Block indices of the MoE layers (from the run's config.json), else 0..n-1."""
    path = Path(run) / "config.json"
    if path.exists():
        from moelab.checkpoint import model_config_from
        ids = model_config_from(json.loads(path.read_text())["model_config"], path).moe_layer_ids
        if len(ids) == n:
            return ids
    return list(range(n))


def plot_loss(run: str | Path, path: Path, unigram: dict[str, float] | None = None) -> Path:
    """Train loss (smoothed) and validation loss per domain, with the unigram baselines dashed."""
    train, val = read_metrics(run)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    steps = np.array([r["step"] for r in train])
    loss = np.array([r["loss"] for r in train])
    k = max(1, len(loss) // 50)
    ax.plot(steps[k - 1:] if k > 1 and len(loss) >= k else steps, _smooth(loss, k), color="black", lw=1.5,
            label="train (mixed domains)")
    domains = sorted(val[-1]["val_loss"]) if val else []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, d in enumerate(domains):
        c = colors[i % len(colors)]
        ax.plot([r["step"] for r in val], [r["val_loss"][d] for r in val], "o-", color=c, label=f"val {d}")
        if unigram and d in unigram:
            ax.axhline(unigram[d], color=c, ls="--", lw=0.8)
    return _save_line_plot(fig, ax, path, "loss (nats / byte)", "loss; dashed = unigram baseline per domain")


def plot_expert_load(run: str | Path, path: Path) -> Path:
    """Heatmap per MoE layer: expert x step, colour = share of routed slots."""
    train, _ = read_metrics(run)
    load_NLE = np.array([r["load"] for r in train])
    L = load_NLE.shape[1]
    fig, axes = plt.subplots(L, 1, figsize=(6.4, 1.2 + 1.1 * L), dpi=90, sharex=True, squeeze=False)
    steps = [r["step"] for r in train]
    ids = _moe_layer_ids(run, L)
    for j in range(L):
        ax = axes[j, 0]
        im = ax.imshow(load_NLE[:, j].T, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(steps[0], steps[-1], load_NLE.shape[2] - 0.5, -0.5))
        ax.set_ylabel(f"layer {ids[j]}\nexpert", fontsize=8)
        fig.colorbar(im, ax=ax, pad=0.01)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("expert load (share of routed slots) over training")
    return save_figure(fig, path)


def plot_max_vio(run: str | Path, path: Path) -> Path:
    """MaxVio = max load / mean load - 1 per MoE layer over steps (smoothed)."""
    train, _ = read_metrics(run)
    mv_NL = np.array([r["max_vio"] for r in train])
    steps = np.array([r["step"] for r in train])
    k = max(1, len(steps) // 50)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=90)
    for j, layer in enumerate(_moe_layer_ids(run, mv_NL.shape[1])):
        ax.plot(steps[k - 1:] if k > 1 else steps, _smooth(mv_NL[:, j], k), label=f"layer {layer}")
    return _save_line_plot(fig, ax, path, "MaxVio", "load imbalance (MaxVio, 0 = perfectly balanced)")


def plot_run_specialization(summary: dict, path: Path) -> Path:
    """Per MoE layer: domain x expert, share of the domain's routed slots (rows sum to 1)."""
    ebd = summary["expert_by_domain"]
    domains = sorted(summary["val_loss"])
    layers = list(ebd)
    fig, axes = plt.subplots(1, len(layers), figsize=(2.2 + 2.4 * len(layers), 2.6), dpi=90, squeeze=False)
    for j, layer in enumerate(layers):
        c_DE = np.array(ebd[layer], dtype=float)
        share_DE = c_DE / np.maximum(c_DE.sum(1, keepdims=True), 1.0)
        ax = axes[0, j]
        im = ax.imshow(share_DE, aspect="auto", cmap="magma", vmin=0)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_yticks(range(len(domains)), domains if j == 0 else [""] * len(domains), fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, pad=0.02)
    fig.suptitle("expert-by-domain routing share (validation)", fontsize=10)
    return save_figure(fig, path)


def plot_run(run: str | Path) -> list[Path]:
    """All four figures into the run folder; returns their paths."""
    run = Path(run)
    read_metrics(run)  # inputs checked before any figure is written: a bad file changes nothing
    _moe_layer_ids(run, 0)
    summary_path = run / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{summary_path} is not valid JSON ({e}): delete it to plot without the validation "
                         f"figure") from None
    out = [plot_loss(run, run / "loss.png", summary.get("unigram_loss") if summary else None),
           plot_expert_load(run, run / "expert_load.png"),
           plot_max_vio(run, run / "max_vio.png")]
    if summary and summary.get("expert_by_domain"):
        out.append(plot_run_specialization(summary, run / "specialization.png"))
    return out


def _mean_max_vio(train: list[dict]) -> np.ndarray:
    return np.array([float(np.mean(r["max_vio"])) if r["max_vio"] else 0.0 for r in train])


def plot_compare(runs: list[str | Path], out: str | Path) -> list[Path]:
    """Several runs overlaid, one colour per run (legend = run folder): train loss (smoothed), mean validation
    loss over domains, and MaxVio (mean over MoE layers). Writes loss.png, val_loss.png, max_vio.png in `out`."""
    if len(runs) < 1:
        raise ValueError("moelab plot needs at least one run folder")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = [(Path(r).name or str(r), *read_metrics(r)) for r in runs]
    figs = {name: plt.subplots(figsize=(6.4, 4.0), dpi=90) for name in ("loss", "val_loss", "max_vio")}
    for label, train, val in data:
        steps = np.array([r["step"] for r in train])
        k = max(1, len(steps) // 50)
        x = steps[k - 1:] if k > 1 and len(steps) >= k else steps
        figs["loss"][1].plot(x, _smooth(np.array([r["loss"] for r in train]), k), label=label)
        figs["max_vio"][1].plot(x, _smooth(_mean_max_vio(train), k), label=label)
        if val:
            figs["val_loss"][1].plot([r["step"] for r in val], [float(np.mean(list(r["val_loss"].values())))
                                                                for r in val], "o-", label=label)
    titles = {"loss": ("train loss (nats / byte)", "train loss"),
              "val_loss": ("validation loss (nats / byte)", "validation loss, mean over domains"),
              "max_vio": ("MaxVio", "load imbalance (MaxVio, mean over MoE layers)")}
    return [_save_line_plot(fig, ax, out / f"{name}.png", *titles[name]) for name, (fig, ax) in figs.items()]
