"""Expert-specialised fine-tuning (ESFT, Wang et al. 2024, arXiv 2407.01906) on a moelab MoE.

L=MoE layers, N=scored tokens, K=slots per token, E=routed experts, D=d_model, G=fused gate|up width,
F=expert hidden. Score every routed expert on the target domain's tokens (`expert_scores`), keep per layer the
most relevant experts up to a cumulative score p (`select_experts`), train only those (`apply_esft`):
everything else frozen by requires_grad, and inside the stacked (E, D, G) / (E, F, D) expert tensors a gradient
mask zeroes the rows of unselected experts. Follows the authors' code (deepseek-ai/ESFT:
scripts/get_expert_scores.py, scripts/generate_expert_config.py, esft.py `to_esft`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moelab.config import replace_fields
from moelab.moe import MoELayer

SCORES = ("token", "gate")


@dataclass(frozen=True)
class ESFTConfig:
    score: str = "token"              # token (selection ratio, ESFT-Token) | gate (mean gate score, ESFT-Gate)
    top_p: float = 0.2                # cumulative score threshold p per layer (the authors' default: token, 0.2)
    train_shared: bool = False        # also train the shared experts (authors' --train_shared_experts)
    train_non_expert: bool = False    # also train attention, norms, embeddings, routers (--train_non_expert_modules)
    n_sample_tokens: int = 8192       # tokens scored (the authors' default n_sample_tokens)
    domain: str = ""                  # score on this domain of the training corpus only; "" = all its domains

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"ESFTConfig.score={self.score!r} is invalid: allowed token or gate")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"ESFTConfig.top_p={self.top_p!r} is invalid: allowed 0 < top_p <= 1")
        if not (isinstance(self.n_sample_tokens, int) and self.n_sample_tokens >= 1):
            raise ValueError(f"ESFTConfig.n_sample_tokens={self.n_sample_tokens!r} is invalid: allowed an integer >= 1")

    def replace(self, **changes) -> ESFTConfig:
        return replace_fields(self, changes)


class ExpertScores(NamedTuple):
    """ESFT relevance scores of one MoE layer's routed experts."""
    token_E: Tensor   # share of routed slots per expert: count_e / (K * N)   (ESFT "token selection ratio")
    gate_E: Tensor    # mean combine weight per expert: sum of its slot weights / N   (ESFT "average gate score")


# ---- the one place that names the expert weights (the lead's seam) -----------------------------------------
def expert_tensors(layer: MoELayer) -> tuple[nn.Parameter, nn.Parameter]:
    """(w_up_EDG, w_down_EFD): the stacked routed-expert Parameters of a MoE layer, experts on dim 0."""
    return layer.experts.weights.w_up_EDG, layer.experts.weights.w_down_EFD


def moe_blocks(model: nn.Module) -> dict[int, MoELayer]:
    """Block index -> its MoELayer (moelab MoELM layout: model.blocks[i].ffn)."""
    return {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)}


# ---- scores and selection ------------------------------------------------------------------------------------
@torch.no_grad()
def expert_scores(model: nn.Module, batches: list, n_sample_tokens: int | None = None) -> dict[int, ExpertScores]:
    """Per MoE block: ESFT expert relevance scores (arXiv 2407.01906, ESFT-Token and ESFT-Gate) over the real
    tokens of `batches` (moelab.data.Batch), eval mode. As the authors' get_expert_scores.py: every selected slot
    adds 1/K to its expert's token score and its routing weight to the gate score, both divided by the number
    of tokens N; batches are used whole until n_sample_tokens tokens are reached (their rule: stop after the
    sample that crosses it). K is MoEConfig.top_k (slots with expert -1 count for no expert). Deviation: the
    gate score uses moelab's combine weights (renormalised top-k when the config says so)."""
    was = model.training
    model.eval()
    E = model.cfg.moe.n_experts
    K = model.cfg.moe.top_k
    token: dict[int, Tensor] = {}
    gate: dict[int, Tensor] = {}
    n = 0
    try:
        for b in batches:
            out = model(b.idx_BS, valid_BS=b.valid_BS)
            valid_T = b.valid_BS.reshape(-1)
            for i, r in out.moe.items():
                idx_NK = r.routing.expert_idx_TK[valid_T]
                w_NK = r.routing.weight_TK[valid_T].float()
                ok = (idx_NK >= 0) & (idx_NK < E)
                flat = idx_NK.clamp(0, E - 1)[ok]
                token[i] = token.get(i, torch.zeros(E)) + torch.bincount(flat, minlength=E).float() / K
                gate[i] = gate.get(i, torch.zeros(E)) + torch.zeros(E).index_add_(0, flat, w_NK[ok])
            n += int(valid_T.sum())
            if n_sample_tokens is not None and n >= n_sample_tokens:
                break
    finally:
        model.train(was)
    if n == 0:
        raise ValueError("expert_scores: the batches hold no real token")
    return {i: ExpertScores(token[i] / n, gate[i] / n) for i in token}


def select_experts(scores_E: Tensor, top_p: float) -> list[int]:
    """The authors' rule (generate_expert_config.py): experts by descending score, each added while the sum
    of those already chosen is below top_p (so the expert that crosses p is kept). Ties: lower id first."""
    order = sorted(range(scores_E.numel()), key=lambda e: (-float(scores_E[e]), e))
    chosen, total = [], 0.0
    for e in order:
        if total >= top_p:
            break
        chosen.append(e)
        total += float(scores_E[e])
    return sorted(chosen)


def choose_experts(scores: dict[int, ExpertScores], cfg: ESFTConfig) -> dict[int, list[int]]:
    """Block index -> trainable expert ids, by cfg.score and cfg.top_p."""
    return {i: select_experts(s.token_E if cfg.score == "token" else s.gate_E, cfg.top_p) for i, s in scores.items()}


# ---- freezing ------------------------------------------------------------------------------------------------
class ESFTMasks(NamedTuple):
    """What apply_esft left trainable."""
    masked: dict[str, Tensor]   # parameter name -> (E, 1, 1) 0/1 mask of its gradient (partially trained slabs)
    trainable: int              # parameters that train (unmasked entries only)


def apply_esft(model: nn.Module, experts: dict[int, list[int]], cfg: ESFTConfig = ESFTConfig()) -> ESFTMasks:
    """Freeze `model` except the chosen experts (ESFT `to_esft`): requires_grad off everywhere (on again for
    everything when cfg.train_non_expert, routers included, as the authors' to_param(model)); shared experts
    per cfg.train_shared; in each MoE block the stacked expert tensors train when any expert is chosen, with
    a gradient hook multiplying unchosen experts' rows by 0. Optimise with weight decay 0 on the masked
    tensors (`esft_param_groups`) or decay would move the frozen rows."""
    model.requires_grad_(cfg.train_non_expert)
    masked: dict[str, Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = moe_blocks(model)
    bad = sorted(set(experts) - set(blocks))
    if bad:
        raise ValueError(f"ESFT experts name block(s) {bad} that are not MoE layers: allowed {sorted(blocks)}")
    for i, layer in blocks.items():
        if layer.shared is not None:
            layer.shared.requires_grad_(cfg.train_shared)
        E = layer.experts.weights.n_experts
        chosen = sorted(set(experts.get(i, [])))
        if any(not 0 <= e < E for e in chosen):
            raise ValueError(f"ESFT experts of block {i} are {chosen}: allowed ids 0..{E - 1}")
        for p in expert_tensors(layer):
            p.requires_grad_(bool(chosen))
            if chosen and len(chosen) < E:
                mask = torch.zeros(E, 1, 1, dtype=p.dtype, device=p.device)
                mask[chosen] = 1
                p.register_hook(lambda g, m=mask: g * m)
                masked[names[id(p)]] = mask
    trainable = 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            trainable += int((masked[n].expand_as(p) != 0).sum()) if n in masked else p.numel()
    return ESFTMasks(masked, trainable)


def esft_param_groups(model: nn.Module, masks: ESFTMasks, weight_decay: float) -> list[dict]:
    """AdamW groups over trainable parameters: matrices (not embeddings) decay as in the Trainer, except the
    masked expert tensors (decay 0: AdamW's decoupled decay would shrink the frozen rows too; with a zero
    gradient Adam's step on them is exactly 0)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "tok_emb" not in n and n not in masks.masked else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def expert_config_json(experts: dict[int, list[int]], cfg: ESFTConfig, scores: dict[int, ExpertScores] | None
                       ) -> dict:
    """The authors' expert_cfg.json fields ({"experts": {layer: [ids]}, "shared_experts", "non_expert_modules"}),
    plus `moelab_esft` = the ESFTConfig and the scores per layer."""
    out = {"experts": {str(i): list(v) for i, v in experts.items()}, "shared_experts": cfg.train_shared,
           "non_expert_modules": cfg.train_non_expert, "moelab_esft": asdict(cfg)}
    if scores is not None:
        out["token_scores"] = {str(i): [round(float(x), 6) for x in s.token_E] for i, s in scores.items()}
        out["gate_scores"] = {str(i): [round(float(x), 6) for x in s.gate_E] for i, s in scores.items()}
    return out


def read_expert_config(path: str | Path) -> tuple[dict[int, list[int]], ESFTConfig]:
    """Inverse of expert_config_json (an authors' expert_cfg.json without moelab_esft reads too)."""
    d = json.loads(Path(path).read_text())
    cfg = ESFTConfig(**d["moelab_esft"]) if "moelab_esft" in d else \
        ESFTConfig(train_shared=bool(d.get("shared_experts")), train_non_expert=bool(d.get("non_expert_modules")))
    return {int(k): [int(e) for e in v] for k, v in d["experts"].items()}, cfg


def tuned_slot_share(scores: dict[int, ExpertScores], experts: dict[int, list[int]]) -> float:
    """Share of routed slots (over the scored tokens, mean over MoE layers) that land on a trained expert."""
    parts = [float(s.token_E[experts.get(i, [])].sum()) for i, s in scores.items()]
    return sum(parts) / max(len(parts), 1)
