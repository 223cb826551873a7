"""Null / zero / copy / constant experts (AdaMoE, MoE++), and what the extra routers need that is not a
router: their losses (top-p entropy, ReMoE L1, heterogeneous balance), the ReMoE coefficient step, metrics.

T=tokens, D=d_model, E=routed (FFN) experts, A=all router outputs=E+special, K=slots per token, J=constant experts.
Router outputs are laid out [E routed | n_null | n_zero | n_copy | n_const]; a slot index >= E names a
special expert. The layer computes the special outputs here, then sets those slots to -1 so dispatch,
capacity and the balance metrics only ever see the E real experts.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from moelab.balance import switch_aux_loss, valid_mask
from moelab.config import MoEConfig
from moelab.routers import Routing


class SpecialSplit(NamedTuple):
    """The router's routing split into special-expert output and the real-expert routing."""
    y_TD: Tensor        # weighted sum of the special experts' outputs per token
    routing: Routing    # special slots set to -1 / weight 0; probs_TE cut to the E real experts; logits_TE all A
    full: Routing       # the router's routing over all A outputs (balance loss and metrics)


class SpecialExperts(nn.Module):
    """AdaMoE null experts (Zeng et al. 2024, arXiv 2406.13233) and MoE++ zero-computation experts
    (Jin et al. 2024, arXiv 2410.07348, sec. 3.1): zero -> 0, copy -> x, constant -> a1*x + a2*v with
    [a1, a2] = softmax(x W_c) and a learned vector v. Null and zero experts are the same computation."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.copy_start = cfg.n_experts + cfg.n_null + cfg.n_zero
        self.const_start = self.copy_start + cfg.n_copy
        self.w_alpha_JD2 = nn.Parameter(torch.empty(cfg.n_const, cfg.d_model, 2))
        self.v_JD = nn.Parameter(torch.empty(cfg.n_const, cfg.d_model))
        nn.init.normal_(self.w_alpha_JD2, std=cfg.d_model ** -0.5)
        nn.init.normal_(self.v_JD, std=cfg.d_model ** -0.5)

    def forward(self, x_TD: Tensor, routing: Routing) -> SpecialSplit:
        idx_TK, w_TK = routing.expert_idx_TK, routing.weight_TK
        x_f = x_TD.float()
        is_copy_TK = (idx_TK >= self.copy_start) & (idx_TK < self.const_start)
        y_TD = (w_TK * is_copy_TK).sum(-1, keepdim=True) * x_f
        for j in range(self.v_JD.shape[0]):
            w_T1 = (w_TK * (idx_TK == self.const_start + j)).sum(-1, keepdim=True)
            a_T2 = torch.softmax(x_f @ self.w_alpha_JD2[j].float(), dim=-1)
            y_TD = y_TD + w_T1 * (a_T2[:, :1] * x_f + a_T2[:, 1:] * self.v_JD[j].float())
        special_TK = idx_TK >= self.n_experts
        real = routing._replace(expert_idx_TK=idx_TK.masked_fill(special_TK, -1),
                                weight_TK=w_TK.masked_fill(special_TK, 0.0),
                                probs_TE=routing.probs_TE[:, :self.n_experts])
        return SpecialSplit(y_TD.to(x_TD.dtype), real, routing)


def special_aux_loss(*, probs_TA: Tensor, expert_idx_TK: Tensor, n_experts: int, tau: float,
                     valid_T: Tensor | None = None) -> Tensor:
    """MoE++ (Jin et al. 2024, arXiv 2410.07348) heterogeneous balance loss: A * sum_i eta_i f_i P_i over all
    A router outputs, eta_i = 1 for the E FFN experts and tau for null/zero/copy/const ones (tau=1: Switch)."""
    A = probs_TA.shape[1]
    eta_A = torch.ones(A, device=probs_TA.device)
    eta_A[n_experts:] = tau
    return switch_aux_loss(probs_TE=probs_TA, expert_idx_TK=expert_idx_TK, n_experts=A, valid_T=valid_T,
                           eta_E=eta_A)


def adamoe_aux_loss(*, probs_TA: Tensor, expert_idx_TK: Tensor, n_experts: int,
                    valid_T: Tensor | None = None) -> Tensor:
    """AdaMoE (Zeng et al. 2024, arXiv 2406.13233) sec. 3 balance loss: the Switch loss over all A = E + n_null
    outputs with the null experts balanced as one group: each null expert's load f is replaced by the mean load
    of the null experts. (The authors' released code means this -- its "## modified" line -- but indexes the
    top-k axis, so as released it is a plain Switch loss for k < E; moelab follows the stated rule.)"""
    valid_T = valid_mask(valid_T, probs_TA.shape[0], probs_TA.device)
    A = probs_TA.shape[1]
    counts_A = torch.bincount(expert_idx_TK[valid_T].reshape(-1) + 1, minlength=A + 1)[1:].float()
    counts_A[n_experts:] = counts_A[n_experts:].mean()
    return switch_aux_loss(probs_TE=probs_TA, expert_idx_TK=expert_idx_TK, n_experts=A, valid_T=valid_T,
                           counts_E=counts_A)


def top_p_entropy_loss(*, probs_TE: Tensor, valid_T: Tensor | None = None) -> Tensor:
    """Dynamic-routing loss of Huang et al. 2024 ("Harder Tasks Need More Experts", arXiv 2403.07652):
    mean over real tokens of the routing entropy -sum_e p_e log p_e (low entropy -> fewer experts pass p)."""
    valid_T = valid_mask(valid_T, probs_TE.shape[0], probs_TE.device)
    ent_T = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1)
    return (ent_T * valid_T).sum() / valid_T.sum().clamp_min(1)


def relu_l1_loss(*, logits_TE: Tensor, top_k: int, valid_T: Tensor | None = None) -> Tensor:
    """ReMoE (Wang et al. 2024, arXiv 2412.14711) eq. 8 load-balanced L1 penalty, as in the authors' code
    (switch_load_balancing_loss_func on the ReLU gates): sum_e f_e * mean_t ReLU(logit_te) over real tokens,
    f_e = E / (k T) * (tokens with a non-zero gate on e), detached."""
    valid_T = valid_mask(valid_T, logits_TE.shape[0], logits_TE.device)
    gates_TE = torch.relu(logits_TE) * valid_T[:, None]
    T, E = valid_T.sum().clamp_min(1).float(), logits_TE.shape[1]
    f_E = (gates_TE > 0).sum(0).float() * E / (top_k * T)
    return (f_E.detach() * gates_TE.sum(0) / T).sum()


@torch.no_grad()
def relu_l1_coef_step(*, coef: Tensor, sparsity: Tensor, target: float, rate: float) -> Tensor:
    """ReMoE (arXiv 2412.14711) adaptive L1 coefficient: lambda * rate^sign(target - sparsity) -- grows while
    the gates are denser than the target sparsity 1 - k/E, shrinks while sparser."""
    return coef * rate ** torch.sign(target - sparsity)


def router_losses(*, cfg: MoEConfig, full: Routing, valid_T: Tensor | None) -> dict[str, Tensor]:
    """Unweighted router-specific losses. With special experts, "aux" is the balance loss over all A outputs
    (it replaces the Switch loss over the E real experts, whose probabilities would not sum to 1): AdaMoE's
    null-group loss for router='adamoe', MoE++'s heterogeneous loss otherwise. ReMoE's "relu_l1" replaces
    the Switch loss (the layer adds none for router='relu' with balance='aux')."""
    out: dict[str, Tensor] = {}
    if cfg.router == "adamoe" and cfg.n_zero + cfg.n_copy + cfg.n_const == 0 and cfg.balance == "aux" \
            and cfg.aux_loss_coef > 0:
        out["aux"] = adamoe_aux_loss(probs_TA=full.probs_TE, expert_idx_TK=full.expert_idx_TK,
                                     n_experts=cfg.n_experts, valid_T=valid_T)
    elif cfg.n_special and cfg.balance == "aux" and cfg.aux_loss_coef > 0:
        out["aux"] = special_aux_loss(probs_TA=full.probs_TE, expert_idx_TK=full.expert_idx_TK,
                                      n_experts=cfg.n_experts, tau=cfg.special_tau, valid_T=valid_T)
    if cfg.router == "top_p" and cfg.top_p_entropy_coef > 0:
        out["top_p_entropy"] = top_p_entropy_loss(probs_TE=full.probs_TE, valid_T=valid_T)
    if cfg.router == "relu":
        out["relu_l1"] = relu_l1_loss(logits_TE=full.logits_TE, top_k=cfg.top_k, valid_T=valid_T)
    return out


@torch.no_grad()
def router_stats(*, cfg: MoEConfig, full: Routing, valid_T: Tensor | None) -> dict[str, Tensor]:
    """Per-layer routing metrics before capacity drops: real (FFN) experts per token, special experts per
    token, FLOPs saved vs a fixed top_k over real experts (1 - real/top_k; negative = more compute), and
    the share of zero router outputs (gate sparsity, the quantity ReMoE steers to 1 - k/A)."""
    idx_TK = full.expert_idx_TK
    valid_T = valid_mask(valid_T, idx_TK.shape[0], idx_TK.device)
    n_tok = valid_T.sum().clamp_min(1).float()
    used_TK = (idx_TK >= 0) & valid_T[:, None]
    real = (used_TK & (idx_TK < cfg.n_experts)).sum() / n_tok
    special = (used_TK & (idx_TK >= cfg.n_experts)).sum() / n_tok
    n_routes = full.logits_TE.shape[1]
    return {"experts_per_token": real, "special_per_token": special, "flops_saved": 1.0 - real / cfg.top_k,
            "gate_sparsity": 1.0 - (real + special) / n_routes}
