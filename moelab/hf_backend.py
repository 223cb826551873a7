"""moelab as a transformers experts implementation: `experts_implementation="moelab"` runs moelab's
RoutedExperts (dispatch -> ExpertsPath kernels -> combine) on an HF experts module's own fused weights.

transformers 5.x calls every experts module decorated with `@use_experts_implementation` as
fn(experts_module, hidden_states_TD, top_k_index_TK, top_k_weights_TK) -> y_TD, the function picked by name
from `ALL_EXPERTS_FUNCTIONS`. The module keeps its weights fused and 3-D, in the layout the decorator's flags
describe; `HFExpertsWeights` is the expert-weights provider (see moelab/experts.py) over them: views only,
never copies, so gradients land in the module's own Parameters.

E=routed experts, D=hidden size, F=expert hidden, G=fused gate|up width (2F with a gate, F without), T=tokens,
K=slots per token, R=dispatched rows.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.expert_kernels import ExpertTensors, activate
from moelab.experts import ExpertsPath, RoutedExperts, WrappedPath

NAME = "moelab"                      # the experts_implementation this module registers
_ATTR = "_moelab_routed_experts"     # per-module cache of the RoutedExperts (a plain attribute, not a child)


def _default_apply_gate():
    from transformers.integrations import moe
    return moe._default_apply_gate


def _is_silu(act) -> bool:
    """Does `act` compute SiLU (then moelab's fused SwiGLU replaces act(gate) * up)? Probed, not named."""
    if not isinstance(act, nn.Module) and not callable(act):
        return False
    probe = torch.linspace(-6.0, 6.0, 25)
    with torch.no_grad():
        return torch.allclose(act(probe), torch.nn.functional.silu(probe), atol=1e-6)


class HFExpertsWeights:
    """Expert-weights provider over a transformers experts module, honouring its layout flags:
    is_transposed (weights stored (E, D, G) / (E, F, D), e.g. GPT-OSS) or not ((E, G, D) / (E, D, F), read
    as transposed views), is_concatenated (False: gate and up interleaved column by column), has_bias
    (gate_up_proj_bias / down_proj_bias), has_gate (False: `up_proj` and a plain activation, Nemotron-H).
    The gate function is the module's own `_apply_gate` when it overrides transformers' default SwiGLU
    (GPT-OSS clamps: gate * sigmoid(alpha * gate) * (up + 1)); the default with SiLU runs moelab's fused SwiGLU."""

    resident = True

    def __init__(self, module: nn.Module):
        where = type(module).__name__
        for flag in ("is_transposed", "is_concatenated", "has_bias", "has_gate"):
            if not isinstance(getattr(module, flag, None), bool):
                raise ValueError(f"experts_implementation={NAME!r}: {where} has no layout flag {flag!r}: only "
                                 f"modules decorated with transformers' @use_experts_implementation are supported")
        self.module = module
        self.up_name = "gate_up_proj" if module.has_gate else "up_proj"
        for name in (self.up_name, "down_proj"):
            w = getattr(module, name, None)
            if not isinstance(w, Tensor) or w.dim() != 3:
                raise ValueError(f"experts_implementation={NAME!r}: {where}.{name} is not a 3-D (E, out, in) "
                                 f"tensor: unsupported experts layout")
        if module.has_bias and not all(isinstance(getattr(module, f"{n}_bias", None), Tensor)
                                       for n in (self.up_name, "down_proj")):
            raise ValueError(f"experts_implementation={NAME!r}: {where} has has_bias=True but no "
                             f"{self.up_name}_bias / down_proj_bias tensors: unsupported experts layout")
        custom = module.has_gate and getattr(type(module), "_apply_gate", None) is not _default_apply_gate()
        self._gate = module._apply_gate if custom else None  # the family's own gate function
        act = getattr(module, "act_fn", None)
        if not custom and act is None:
            raise ValueError(f"experts_implementation={NAME!r}: {where} has no act_fn: unsupported experts layout")
        self._silu = not custom and module.has_gate and module.is_concatenated and _is_silu(act)

    @property
    def n_experts(self) -> int:
        return getattr(self.module, self.up_name).shape[0]

    def stacked(self) -> ExpertTensors:
        m = self.module
        w_up, w_down = getattr(m, self.up_name), m.down_proj
        if not m.is_transposed:  # stored (E, out, in) as nn.Linear does: the (E, in, out) view
            w_up, w_down = w_up.transpose(1, 2), w_down.transpose(1, 2)
        if m.has_bias:
            return ExpertTensors(w_up, w_down, getattr(m, f"{self.up_name}_bias"), m.down_proj_bias)
        return ExpertTensors(w_up, w_down)

    def expert(self, e: int) -> ExpertTensors:
        return ExpertTensors(*(t[e] if t is not None else None for t in self.stacked()))

    def act(self, h_RG: Tensor) -> Tensor:
        m = self.module
        if not m.has_gate:
            return m.act_fn(h_RG)
        if self._gate is not None:
            return self._gate(h_RG)
        if self._silu:
            return activate(h_RG, "swiglu")
        if m.is_concatenated:
            gate_RF, up_RF = h_RG.chunk(2, dim=-1)
        else:  # interleaved [g0, u0, g1, u1, ...]
            gate_RF, up_RF = h_RG[..., ::2], h_RG[..., 1::2]
        return m.act_fn(gate_RF) * up_RF


class _PostNormPath(WrappedPath):
    """An ExpertsPath whose rows go through the module's post_expert_norm after the down projection (before the
    routing weights), as transformers' `has_post_expert_norm` asks."""

    def __init__(self, path: ExpertsPath, norm: nn.Module):
        super().__init__(path)
        self.norm = norm

    def run(self, x_RD: Tensor, counts_E: Tensor, weights, block_rows: int = 0) -> Tensor:
        return self.norm(self.inner.run(x_RD, counts_E, weights, block_rows))


def routed_experts_of(module: nn.Module) -> RoutedExperts:
    """The RoutedExperts over `module`'s weights, built once and kept as a plain attribute (not a child module:
    the model's state_dict and named_modules are unchanged)."""
    re = module.__dict__.get(_ATTR)
    if re is None:
        path = ExpertsPath()
        if getattr(module, "has_post_expert_norm", False):
            path = _PostNormPath(path, module.post_expert_norm)
        re = RoutedExperts(HFExpertsWeights(module), path=path)
        module.__dict__[_ATTR] = re
    return re


def moelab_experts_forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                           top_k_weights: Tensor) -> Tensor:
    """transformers' experts interface: y_TD = sum_k w_TK * expert_{idx_TK}(x_TD), by moelab's RoutedExperts.
    Expert ids >= num_experts (transformers' expert-parallel sentinel) contribute nothing."""
    re = routed_experts_of(module)
    E = re.weights.n_experts
    idx_TK = top_k_index.reshape(-1, top_k_index.shape[-1]).long()
    idx_TK = torch.where(idx_TK < E, idx_TK, -1)
    w_TK = top_k_weights.reshape(idx_TK.shape)
    x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
    y_TD = re(x_TD, idx_TK, w_TK.to(x_TD.dtype)).y_TD
    return y_TD.to(hidden_states.dtype).reshape(hidden_states.shape)


def register() -> str:
    """Register experts_implementation="moelab" with transformers (idempotent); returns the name. Then
    `from_pretrained(..., experts_implementation="moelab")` or `model.set_experts_implementation("moelab")`."""
    from transformers.integrations.moe import ExpertsInterface
    if ExpertsInterface._global_mapping.get(NAME) is not moelab_experts_forward:
        ExpertsInterface.register(NAME, moelab_experts_forward)
    return NAME
