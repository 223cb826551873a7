"""One config resolver: preset -> config file -> overrides -> validated ModelConfig / MoEConfig / TrainConfig.

The CLI, `moelab compare` and Python users all call `resolve`. Overrides are dotted names, `section.field`
with section model | moe | train (a bare field name works where only one section has it), and values are
typed values or strings parsed by the field's type (booleans: true/false/1/0/yes/no/on/off). Config files:
TOML or JSON with an optional `preset` key and [model] / [moe] / [train] tables, or the config.json a run
writes (its full resolved config). `add_config_flags` derives one command-line flag per field
(`--moe.top_k`, `--train.lr`, ...; help from the field's comment) so a new field is one edit.
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import tomllib
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple

from moelab.config import (
    ACTIVATIONS,
    BALANCES,
    EXPERT_IMPLS,
    ROUTER_NAMES,
    SCORE_ORDERS,
    ModelConfig,
    MoEConfig,
    TrainConfig,
)

SECTIONS: dict[str, type] = {"model": ModelConfig, "moe": MoEConfig, "train": TrainConfig}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# short flags kept from the first CLI, as aliases of the namespaced ones
ALIASES: dict[str, str] = {
    "router": "moe.router", "balance": "moe.balance", "experts": "moe.n_experts", "top-k": "moe.top_k",
    "aux-coef": "moe.aux_loss_coef", "expert-impl": "moe.expert_impl", "steps": "train.steps",
    "batch-size": "train.batch_size", "seq-len": "train.seq_len", "grad-accum": "train.grad_accum",
    "lr": "train.lr", "warmup": "train.warmup", "seed": "train.seed", "log-every": "train.log_every",
    "eval-every": "train.eval_every", "ckpt-every": "train.ckpt_every", "keep-last": "train.keep_last",
    "data": "train.data", "weight-decay": "train.weight_decay", "grad-clip": "train.grad_clip",
    "val-fraction": "train.val_fraction", "min-lr-ratio": "train.min_lr_ratio",
}

# fields with a fixed set of values: their flags list them (argparse choices)
CHOICES: dict[str, tuple[str, ...]] = {"moe.router": ROUTER_NAMES, "moe.balance": BALANCES,
                                       "moe.activation": ACTIVATIONS, "moe.score_order": SCORE_ORDERS,
                                       "moe.expert_impl": EXPERT_IMPLS, "moe.ec_eval": ("topk", "expert_choice")}


class RunConfig(NamedTuple):
    """A resolved run configuration."""
    model: ModelConfig   # the model (its .moe is the MoEConfig)
    train: TrainConfig   # the training loop


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_names(section: str) -> list[str]:
    return [f.name for f in fields(SECTIONS[section]) if not (section == "model" and f.name == "moe")]


def qualify(name: str) -> str:
    """'top_k' -> 'moe.top_k'; 'moe.top_k' stays; unknown or ambiguous names raise one clear line."""
    if "." in name:
        section, field = name.split(".", 1)
        if section not in SECTIONS:
            raise ValueError(f"config key {name!r} is invalid: allowed sections {', '.join(SECTIONS)}")
        if field not in _field_names(section):
            raise ValueError(f"config key {name!r} is unknown: allowed {section}.FIELD with FIELD one of "
                             f"{', '.join(_field_names(section))}")
        return name
    owners = [s for s in SECTIONS if name in _field_names(s)]
    if len(owners) != 1:
        what = f"in {' and '.join(owners)}: write {' or '.join(f'{s}.{name}' for s in owners)}" if owners else \
            "in no config section (model, moe, train)"
        raise ValueError(f"config key {name!r} is {'ambiguous' if owners else 'unknown'}: it is {what}")
    return f"{owners[0]}.{name}"


def parse_value(key: str, raw: Any) -> Any:
    """Value for `section.field` from a typed value or a string, checked against the field's type."""
    section, name = key.split(".", 1)
    hint = _types(SECTIONS[section])[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{key}=None is invalid: allowed a {getattr(base, '__name__', base)}")
    if typing.get_origin(base) is tuple:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(str(v) for v in items)
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"{key}={raw!r} is invalid: allowed true/false (also 1/0, yes/no, on/off)")
    if base is int:
        if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, str) and re.fullmatch(r"[-+]?\d+", raw))):
            raise ValueError(f"{key}={raw!r} is invalid: allowed an integer")
        return int(raw)
    if base is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={raw!r} is invalid: allowed a number") from None
    return str(raw)


def read_file(path: str | Path) -> dict:
    """A config file as {"preset": ..., "model": {...}, "moe": {...}, "train": {...}} (all optional), or a run's
    config.json as {"model_config": ..., "train_config": ...}."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {str(path)!r} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: "
                         f"{e}") from None
    allowed = {"preset", "model", "moe", "train", "model_config", "train_config", "env"}  # env: recorded, unused
    bad = sorted(set(data) - allowed)
    if bad:
        raise ValueError(f"config file {str(path)!r} has unknown keys {bad}: allowed {sorted(allowed)}")
    return data


def resolve(preset: str | None = None, file: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> RunConfig:
    """preset (default: the file's, else "tiny") -> file -> overrides -> validated configs."""
    from moelab.presets import get_preset
    data = read_file(file) if file is not None else {}
    if "model_config" in data:  # a run's own config.json: the full resolved config
        from moelab.checkpoint import check_run_config
        check_run_config(file)  # unknown or broken fields: one line naming the file and the field
        model = ModelConfig.from_dict(data["model_config"])
        train = TrainConfig.from_dict(data.get("train_config", {}))
    else:
        model, train = get_preset(preset or data.get("preset") or "tiny"), TrainConfig()
    changes: dict[str, Any] = {}
    for section in ("model", "moe", "train"):
        for name, value in (data.get(section) or {}).items():
            changes[qualify(f"{section}.{name}")] = value
    for name, value in (overrides or {}).items():
        changes[qualify(name)] = value
    return apply(RunConfig(model, train), changes)


def apply(run: RunConfig, changes: dict[str, Any]) -> RunConfig:
    """RunConfig with dotted-key changes applied; model.d_model carries over to moe.d_model unless set."""
    by: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in changes.items():
        section, name = qualify(key).split(".", 1)
        by[section][name] = parse_value(f"{section}.{name}", value)
    if "d_model" in by["model"] and "d_model" not in by["moe"]:
        by["moe"]["d_model"] = by["model"]["d_model"]
    moe = run.model.moe.replace(**by["moe"]) if by["moe"] else run.model.moe
    model = run.model.replace(moe=moe, **by["model"])
    train = run.train.replace(**by["train"]) if by["train"] else run.train
    return RunConfig(model, train)


def diff(a: RunConfig, b: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two run configs: {key: (a's, b's)}."""
    out = {}
    for section in SECTIONS:
        ca = a.model.moe if section == "moe" else getattr(a, "model" if section == "model" else "train")
        cb = b.model.moe if section == "moe" else getattr(b, "model" if section == "model" else "train")
        for name in _field_names(section):
            if getattr(ca, name) != getattr(cb, name):
                out[f"{section}.{name}"] = (getattr(ca, name), getattr(cb, name))
    return out


# ---- command-line flags -------------------------------------------------------------------------------

def field_help(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the class source (the help text of its flag)."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=#]+=[^#]*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = ("model", "moe", "train")) -> None:
    """--config FILE, --preset, --SECTION.FIELD for every field (short aliases kept) and --moe-set F=V."""
    from moelab.presets import PRESETS
    parser.add_argument("--config", metavar="FILE", help="TOML/JSON config file or a run's config.json; flags "
                        "override it")
    parser.add_argument("--preset", choices=list(PRESETS), help="named model config (default: the file's, "
                        "else tiny)")
    inverse = {v: k for k, v in ALIASES.items()}
    for section in sections:
        group = parser.add_argument_group(f"{section} config ({SECTIONS[section].__name__})")
        docs, defaults = field_help(SECTIONS[section]), {f.name: f.default for f in fields(SECTIONS[section])}
        for name in _field_names(section):
            key = f"{section}.{name}"
            flags = [f"--{key}"] + ([f"--{inverse[key]}"] if key in inverse else [])
            extra = {"nargs": "+"} if key == "train.data" else {}
            if key in CHOICES:
                extra["choices"] = CHOICES[key]
            group.add_argument(*flags, dest=f"cfg:{key}", metavar=None if key in CHOICES else name.upper(),
                               default=None, **extra,
                               help=f"{docs.get(name, '')} (default {defaults[name]!r} or the preset's)"
                               .replace("%", "%%"))  # argparse formats help with %
    parser.add_argument("--moe-set", nargs="+", metavar="FIELD=VALUE", help="MoEConfig fields as FIELD=VALUE, "
                        "e.g. --moe-set n_null=2 (same as --moe.n_null 2)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted-key overrides the user gave on the command line (flags left unset are not overrides)."""
    out = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    for item in getattr(args, "moe_set", None) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--moe-set {item!r} is invalid: allowed FIELD=VALUE, e.g. n_null=2")
        out[qualify(f"moe.{key}")] = raw
    return out
