"""Overlay plots of several runs and TensorBoard export, from hand-written metrics.jsonl files."""
import json

import pytest

from moelab.cli import main


def _run(path, losses, max_vio, val):
    path.mkdir(parents=True)
    rows = [{"kind": "train", "step": i + 1, "loss": v, "max_vio": mv, "aux_loss": 0.01, "lr": 1e-3,
             "load": [[0.5, 0.5]] * len(mv)} for i, (v, mv) in enumerate(zip(losses, max_vio))]
    rows += [{"kind": "val", "step": s, "val_loss": {"code": a, "prose": b}} for s, a, b in val]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_overlay_of_two_runs_writes_three_plots_with_a_legend(tmp_path, capsys):
    import matplotlib.pyplot as plt

    from moelab import plots
    a = _run(tmp_path / "aux", [3.0, 2.5, 2.0], [[1.0, 0.8], [0.9, 0.7], [0.5, 0.5]], [(3, 2.1, 2.3)])
    b = _run(tmp_path / "lossfree", [3.1, 2.4, 1.9], [[0.2, 0.1], [0.1, 0.1], [0.0, 0.1]], [(3, 2.0, 2.2)])
    seen = {}
    real = plots._save_line_plot

    def spy(fig, ax, path, ylabel, title):  # what each figure draws, before it is saved
        seen[path.name] = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        return real(fig, ax, path, ylabel, title)

    plots._save_line_plot = spy
    try:
        assert main(["plot", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    finally:
        plots._save_line_plot = real
    for name in ("loss.png", "val_loss.png", "max_vio.png"):
        assert (tmp_path / "cmp" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen["loss.png"] == {"aux": [3.0, 2.5, 2.0], "lossfree": [3.1, 2.4, 1.9]}
    assert seen["max_vio.png"]["aux"] == pytest.approx([0.9, 0.8, 0.5])       # mean over layers
    assert seen["val_loss.png"]["lossfree"] == pytest.approx([2.1])           # mean over domains
    plt.close("all")
    assert main(["plot", str(a), str(b)]) == 2
    assert "--out" in capsys.readouterr().err


def test_tensorboard_export_holds_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    a = _run(tmp_path / "r", [3.0, 2.5], [[1.0, 0.5], [0.25, 0.75]], [(2, 2.1, 2.3)])
    assert main(["plot", str(a), "--tensorboard"]) == 0
    acc = EventAccumulator(str(a / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [3.0, 2.5]
    assert [e.value for e in acc.Scalars("train/max_vio/layer1")] == [0.5, 0.75]
    assert [e.value for e in acc.Scalars("val/val_loss/prose")] == pytest.approx([2.3])
