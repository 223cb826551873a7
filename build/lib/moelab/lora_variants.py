"""The per-token rules of the LoRA-expert variants: who gets which adapter (or rank), with what weight.

T=tokens, I=input features, O=output features, E=LoRA experts / adapters, R=rank, K=slots per token.
Pure functions over tensors plus the two small model-level pieces (the X-LoRA classifier and the
similarity router's centroid fit); the module that holds the weights is moelab.lora.LoRAExperts.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from moelab.balance import switch_aux_loss
from moelab.config import MoEConfig
from moelab.routers import ROUTERS, RouteContext, Routing


def dense_weights(routing: Routing, n: int) -> Tensor:
    """Routing slots -> (T, n) combine weights, 0 for experts a token does not use (-1 slots ignored)."""
    idx_TK = routing.expert_idx_TK
    w_TK = torch.where(idx_TK >= 0, routing.weight_TK, 0.0)
    return torch.zeros(idx_TK.shape[0], n, dtype=w_TK.dtype, device=w_TK.device).scatter_add_(
        1, idx_TK.clamp_min(0), w_TK)


def route_mixlora(logits_TE: Tensor, moe_cfg: MoEConfig, bias_E: Tensor | None, training: bool) -> Routing:
    """MixLoRA (Li et al. 2024, arXiv 2404.15159) sec. 3.2: a moelab router (default top-k softmax,
    renormalised over the k, as Mixtral's gate the paper copies) picks k LoRA experts per token."""
    ctx = RouteContext(bias_E=bias_E, training=training)
    return ROUTERS[moe_cfg.router](logits_TE, moe_cfg, ctx)


def route_smora(logits_TR: Tensor, moe_cfg: MoEConfig, bias_R: Tensor | None, training: bool) -> Routing:
    """SMoRA (Zhao et al. 2025, arXiv 2501.15103) sec. 4: every rank of one LoRA is an expert; the gate picks
    k of the R ranks per token. Deviation (no released code found): the k renormalised router weights are
    multiplied by k, so a uniform router gives each active rank weight 1 and k = R is the plain LoRA."""
    r = route_mixlora(logits_TR, moe_cfg, bias_R, training)
    return r._replace(weight_TK=r.weight_TK * moe_cfg.top_k)


def route_flylora(y_TR: Tensor, top_k: int, bias_R: Tensor) -> Routing:
    """FlyLoRA (Zou et al. 2025, arXiv 2510.08396) sec. 3: the frozen sparse random projection y = A x is
    also the router: the k ranks of largest |y + d| pass (weight 1), d the loss-free balancing bias
    (updated outside forward, moelab.balance.loss_free_bias_step)."""
    idx_TK = torch.topk((y_TR + bias_R).abs(), top_k, dim=-1).indices
    w_TK = torch.ones(idx_TK.shape, dtype=y_TR.dtype, device=y_TR.device)
    return Routing(idx_TK, w_TK, y_TR, torch.softmax(y_TR.abs(), dim=-1))


def flylora_projection(rank: int, d_in: int, sparsity: float, gen: torch.Generator) -> Tensor:
    """FlyLoRA sec. 3.1: A (R, I), each row p = max(1, round(sparsity * I)) non-zeros drawn N(0, 1/R^2)."""
    p = max(1, round(sparsity * d_in))
    a_RI = torch.zeros(rank, d_in)
    for i in range(rank):
        cols = torch.randperm(d_in, generator=gen)[:p]
        a_RI[i, cols] = torch.randn(p, generator=gen) / rank
    return a_RI


def similarity_weights(x_TI: Tensor, centroids_EI: Tensor, temperature: float) -> Tensor:
    """Token-level adaptation of LoRA adapters (Belofsky 2023, arXiv 2311.10847) sec. 3: gradient-free
    weights = softmax over adapters of cos(x, domain centroid) / temperature. Deviation: the paper compares the
    prompt's embedding to each domain's embedding once per few tokens; here every token, at every wrapped layer,
    compares its own input to that layer's mean input on the adapter's domain (fit_centroids)."""
    sim_TE = F.normalize(x_TI.float(), dim=-1) @ F.normalize(centroids_EI.float(), dim=-1).t()
    return torch.softmax(sim_TE / temperature, dim=-1)


def balance_loss(routing: Routing, n: int) -> Tensor:
    """Switch Transformer eq. 4 over the LoRA experts (the loss MixLoRA sec. 3.3 adds, coefficient 0.01)."""
    return switch_aux_loss(probs_TE=routing.probs_TE, expert_idx_TK=routing.expert_idx_TK, n_experts=n)


class XLoRAClassifier(nn.Module):
    """X-LoRA (Buehler & Buehler 2024, arXiv 2402.07148) sec. 2 / PEFT's XLoraClassifier: one linear layer
    (xlora_depth=1) from the last hidden state of a no-adapter scaling pass to n_adapters scalings per token,
    softmax with temperature (enable_softmax), the same scalings for every layer (layerwise_scalings=False)."""

    def __init__(self, d_model: int, n_adapters: int, temperature: float):
        super().__init__()
        self.proj = nn.Linear(d_model, n_adapters, bias=True)
        self.temperature = temperature

    def forward(self, hidden_TD: Tensor) -> Tensor:
        return torch.softmax(self.proj(hidden_TD.float()) / self.temperature, dim=-1)


def moe_config_for(n: int, d_in: int, top_k: int, router: str, balance: str) -> MoEConfig:
    """The MoEConfig a moelab router reads, for n LoRA experts (or ranks) on a d_in-wide input."""
    bal = balance if balance in ("aux", "loss_free", "none") else "none"
    return MoEConfig(d_model=d_in, d_expert=1, n_experts=n, top_k=min(top_k, n), router=router, balance=bal)


def lora_init(a_ERI: Tensor) -> None:
    """PEFT / Hu et al. 2021 (arXiv 2106.09685) sec. 4.1: A Kaiming-uniform (a=sqrt(5)), B zero."""
    for a_RI in a_ERI:
        nn.init.kaiming_uniform_(a_RI, a=math.sqrt(5))


@torch.no_grad()
def fit_centroids(model: nn.Module, batches_by_adapter: list[list], forward) -> None:
    """Similarity router: centroid e of each wrapped layer = mean input of that layer over adapter e's domain
    batches, adapters off. `forward(model, batch)` runs the model on one batch; gradient-free."""
    mods = {n: m for n, m in model.named_modules() if hasattr(m, "centroids_EI")}
    sums = {n: None for n in mods}
    hooks = []
    for n, m in mods.items():
        m.scaling_pass = True
        hooks.append(m.register_forward_hook(lambda mod, inp, out, n=n: sums.__setitem__(n, inp[0].reshape(
            -1, inp[0].shape[-1]).float().mean(0))))
    try:
        for e, batches in enumerate(batches_by_adapter):
            acc = {n: [] for n in mods}
            for b in batches:
                forward(model, b)
                for n in mods:
                    acc[n].append(sums[n])
            for n, m in mods.items():
                m.centroids_EI[e] = torch.stack(acc[n]).mean(0)
    finally:
        for h in hooks:
            h.remove()
        for m in mods.values():
            m.scaling_pass = False


def load_peft_adapter(path: str | Path) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
    """A PEFT LoRA folder -> ({target module name: (A (R, I), B (O, R))}, scale alpha / r). Reads
    `base_model.model.{name}.lora_A[.default].weight`; rank_pattern / alpha_pattern / rslora are refused."""
    path = Path(path)
    conf_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not conf_path.is_file() or not w_path.is_file():
        raise ValueError(f"adapter folder {str(path)!r} must hold adapter_config.json and adapter_model.safetensors")
    conf = json.loads(conf_path.read_text())
    if conf.get("peft_type", "LORA") != "LORA" or conf.get("use_rslora") or conf.get("rank_pattern") \
            or conf.get("alpha_pattern") or conf.get("use_dora"):
        raise ValueError(f"adapter {str(path)!r}: only plain LoRA (no rslora/DoRA/rank_pattern) is supported")
    sd = load_file(str(w_path))
    pat = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
    ab: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        m = pat.match(k)
        if m:
            ab.setdefault(m.group(1), {})[m.group(2)] = v.float()
    return {n: (d["A"], d["B"]) for n, d in ab.items() if "A" in d and "B" in d}, conf["lora_alpha"] / conf["r"]
