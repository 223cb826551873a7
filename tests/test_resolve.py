"""The config resolver: preset -> file -> overrides, typed parsing, flags derived from the dataclasses."""
import json
from dataclasses import fields

import pytest

from moelab.cli import build_parser, main
from moelab.config import ModelConfig, MoEConfig, TrainConfig
from moelab.resolver import SECTIONS, field_help, overrides_from_args, parse_value, qualify, resolve


def test_precedence_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('preset = "olmoe-like"\n[moe]\ntop_k = 4\nbalance = "loss_free"\n[train]\nsteps = 7\nlr = 1e-3\n')
    run = resolve(file=f, overrides={"train.lr": "2e-3", "moe.router": "sigmoid_group"})
    assert run.model.moe.n_experts == 64                       # from the file's preset
    assert (run.model.moe.top_k, run.model.moe.balance) == (4, "loss_free")  # the file
    assert (run.train.steps, run.train.lr) == (7, 2e-3)          # the override beats the file
    assert run.model.moe.router == "sigmoid_group"
    assert resolve("tiny", f).model.moe.n_experts == 8           # an explicit preset beats the file's


def test_bool_int_none_parsing_names_the_field():
    for raw in ("true", "1", "yes", "ON", True):
        assert parse_value("moe.gating_residual", raw) is True
    for raw in ("false", "0", "no", "off", "FALSE", False):
        assert parse_value("moe.gating_residual", raw) is False
    with pytest.raises(ValueError, match=r"moe.gating_residual='maybe' is invalid: allowed true/false"):
        parse_value("moe.gating_residual", "maybe")
    with pytest.raises(ValueError, match=r"train.steps='1.5' is invalid: allowed an integer"):
        parse_value("train.steps", "1.5")
    assert parse_value("moe.capacity_factor", "none") is None and parse_value("moe.capacity_factor", "1.5") == 1.5
    assert parse_value("train.data", ["a", "b"]) == ("a", "b")


def test_bare_names_qualify_unless_ambiguous():
    assert qualify("top_k") == "moe.top_k" and qualify("steps") == "train.steps"
    with pytest.raises(ValueError, match=r"'d_model' is ambiguous.*model.d_model or moe.d_model"):
        qualify("d_model")
    with pytest.raises(ValueError, match="unknown"):
        qualify("moe.bogus")


def test_model_width_carries_to_the_moe_config():
    run = resolve("tiny", overrides={"model.d_model": 64, "model.n_heads": 2})
    assert run.model.d_model == run.model.moe.d_model == 64


def test_every_field_has_a_flag_with_help():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    for section, cls in SECTIONS.items():
        docs = field_help(cls)
        for f in fields(cls):
            if section == "model" and f.name == "moe":
                continue
            assert f"cfg:{section}.{f.name}" in dests
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no comment"
    args = parser.parse_args(["train", "--out", "x", "--train.weight_decay", "0.05", "--train.beta1", "0.8",
                              "--grad-clip", "0.5", "--top-k", "3"])
    run = resolve("tiny", overrides=overrides_from_args(args))
    assert (run.train.weight_decay, run.train.beta1, run.train.grad_clip, run.model.moe.top_k) == (0.05, 0.8, 0.5, 3)


def _data(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text("some text to learn from. " * 12)
    return d


def test_config_file_round_trip_reproduces_the_run(tmp_path):
    """file -> run -> the run's written config.json -> a second run from it: same configs, same losses."""
    data = _data(tmp_path)
    f = tmp_path / "exp.toml"
    f.write_text(f'preset = "tiny"\n[model]\nn_layers = 2\n[moe]\nn_experts = 4\nbalance = "loss_free"\n'
                 f'[train]\nsteps = 2\nbatch_size = 2\nseq_len = 16\neval_every = 0\ndata = ["{data}"]\n')
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--config", str(f), "--train.lr", "1e-3", "--threads", "1", "--out", str(a)]) == 0
    written = json.loads((a / "config.json").read_text())
    assert written["train_config"]["lr"] == 1e-3 and written["model_config"]["moe"]["n_experts"] == 4
    assert set(written["env"]) >= {"threads", "torch", "cpu"}
    assert main(["train", "--config", str(a / "config.json"), "--threads", "1", "--out", str(b)]) == 0
    again = json.loads((b / "config.json").read_text())
    assert again["model_config"] == written["model_config"] and again["train_config"] == written["train_config"]
    loss = [[json.loads(ln)["loss"] for ln in (r / "metrics.jsonl").read_text().splitlines()
             if '"train"' in ln] for r in (a, b)]
    assert loss[0] == loss[1]


def test_resume_refuses_a_changed_field(tmp_path, capsys):
    data = _data(tmp_path)
    run = tmp_path / "r"
    common = ["--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--data", str(data), "--out", str(run),
              "--threads", "1", "--model.n_layers", "1"]
    assert main(["train", "--steps", "1", *common]) == 0
    capsys.readouterr()
    assert main(["train", "--steps", "2", "--resume", "--lr", "1e-2", *common]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "--resume" in err


def test_version_and_python_m(capsys):
    import subprocess
    import sys
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("moelab ")
    out = subprocess.run([sys.executable, "-m", "moelab", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout


def test_defaults_are_the_dataclass_defaults():
    run = resolve("tiny")
    assert run.train == TrainConfig() and isinstance(run.model, ModelConfig) and isinstance(run.model.moe, MoEConfig)


def test_split_version_defaults_new_runs_to_2_and_old_runs_to_1():
    assert TrainConfig().split_version == 2
    old = {k: v for k, v in TrainConfig().__dict__.items() if k != "split_version"}
    assert TrainConfig.from_dict({**old, "data": list(old["data"])}).split_version == 1
    with pytest.raises(ValueError, match="split_version"):
        TrainConfig(split_version=3)
