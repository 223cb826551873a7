"""moelab: build, train, balance, trace, place, parallelise and serve Mixture-of-Experts models.

Shape letters, one meaning each, used in tensor names across the package (x_TD, w_up_EDG, counts_LE):
B sequences, S positions in a sequence, T tokens (B*S, flattened), D d_model, V vocabulary, H attention heads,
E routed experts, A all router outputs (E + null/zero/copy/const experts), N traced tokens (trace files),
K slots per token (top-k), F expert hidden size, G fused gate|up width (2F for SwiGLU, F for GELU),
R rows after dispatch (sorted by expert, padded or received over all-to-all), C rows per expert after
padding (or capacity), L MoE layers, W ranks.

The public API is imported lazily (`import moelab` is cheap and never imports transformers):
`moelab.MoELayer`, `moelab.resolve`, ... load their module on first use. docs/api.md lists it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "MoEConfig": "config", "ModelConfig": "config", "TrainConfig": "config",
    "resolve": "resolver", "RunConfig": "resolver",
    "ROUTERS": "routers", "Routing": "routers",
    "MoELayer": "moe", "MoEResult": "moe", "step_routers": "moe",
    "RoutedExperts": "experts", "Experts": "experts", "ExpertsPath": "experts", "MLP": "experts",
    "switch_aux_loss": "balance", "seq_aux_loss": "balance", "z_loss": "balance", "balance_stats": "balance",
    "MoELM": "model", "generate": "model",
    "Trainer": "train", "load_model": "checkpoint",
    "Trace": "trace", "load_trace": "trace", "record_moelab": "trace", "replay_moelab": "trace",
    "Runtime": "runtime",
}
__all__ = [*_API, "hf"]


def __getattr__(name: str):
    if name == "hf":
        return importlib.import_module("moelab.hf")
    if name in _API:
        return getattr(importlib.import_module(f"moelab.{_API[name]}"), name)
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
