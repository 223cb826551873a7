"""Load-balancing losses (pure, keyword-only), loss-free bias update, and balance metrics.

T=tokens, E=routed experts, K=slots per token, B=sequences, S=tokens per sequence.
Slots with expert -1 (dropped, null, padding) count for no expert. `valid_T` marks real tokens.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def expert_counts(*, expert_idx_TK: Tensor, n_experts: int) -> Tensor:
    """Number of slots routed to each expert, ignoring -1 slots -> (E,) float32."""
    shifted = expert_idx_TK.reshape(-1) + 1  # -1 -> bin 0, dropped below (no boolean-mask copy)
    return torch.bincount(shifted, minlength=n_experts + 1)[1:].float()


def valid_mask(valid_T: Tensor | None, T: int, device) -> Tensor:
    """The (T,) bool mask of real tokens; all True when no mask is given."""
    return torch.ones(T, dtype=torch.bool, device=device) if valid_T is None else valid_T.reshape(-1)


def switch_aux_loss(*, probs_TE: Tensor, expert_idx_TK: Tensor, n_experts: int,
                    valid_T: Tensor | None = None, counts_E: Tensor | None = None,
                    eta_E: Tensor | None = None) -> Tensor:
    """Switch Transformer (Fedus et al. 2021) eq. 4: E * sum_i f_i * P_i.

    f_i = share of routed slots that go to expert i (the router's choice, before capacity drops, as in
    Switch/GShard), P_i = mean router probability of i over real tokens. Equals 1.0 under perfectly uniform routing. transformers' `load_balancing_loss_func`
    returns top_k * this value (its f sums to k), pooled over the layers it concatenates.
    `counts_E` may be passed pre-reduced (global-batch balancing); it is treated as a constant.
    `eta_E` weights each expert's term (MoE++'s heterogeneous loss); None = all 1.
    """
    valid_T = valid_mask(valid_T, probs_TE.shape[0], probs_TE.device)
    if counts_E is None:
        counts_E = expert_counts(expert_idx_TK=expert_idx_TK[valid_T], n_experts=n_experts)
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    P_E = probs_TE[valid_T].mean(0) if bool(valid_T.any()) else probs_TE.sum(0) * 0.0
    fP_E = f_E.detach() * P_E
    return n_experts * (fP_E if eta_E is None else eta_E * fP_E).sum()


def seq_aux_loss(*, probs_BSE: Tensor, expert_idx_BSK: Tensor, n_experts: int, top_k: int,
                 valid_BS: Tensor | None = None) -> Tensor:
    """DeepSeek-V3 (arXiv 2412.19437) eq. 17-20, complementary sequence-wise balance loss, averaged
    over sequences: sum_i f_i P_i with f_i = E/(K*S) * count_i and P_i = mean_t s'_{i,t}.
    Deviation: count_i counts the experts actually selected (biased, group-limited, before capacity drops)
    where eq. 18 counts a plain top-K of s_{i,t}; the two differ only with a bias or n_group > 1."""
    B, S, _ = probs_BSE.shape
    if valid_BS is None:
        valid_BS = torch.ones(B, S, dtype=torch.bool, device=probs_BSE.device)
    onehot_BSKE = torch.nn.functional.one_hot(expert_idx_BSK.clamp_min(0), n_experts).float()
    onehot_BSKE = onehot_BSKE * ((expert_idx_BSK >= 0) & valid_BS[..., None]).unsqueeze(-1)
    n_B = valid_BS.sum(1).clamp_min(1).float()
    f_BE = onehot_BSKE.sum((1, 2)) * n_experts / (top_k * n_B[:, None])
    P_BE = (probs_BSE * valid_BS[..., None]).sum(1) / n_B[:, None]
    per_seq_B = (f_BE.detach() * P_BE).sum(-1)
    has_B = valid_BS.any(1)
    return (per_seq_B * has_B).sum() / has_B.sum().clamp_min(1)


def z_loss(*, logits_TE: Tensor, valid_T: Tensor | None = None) -> Tensor:
    """ST-MoE (Zoph et al. 2022) eq. 5: mean over tokens of logsumexp(logits)^2."""
    valid_T = valid_mask(valid_T, logits_TE.shape[0], logits_TE.device)
    lse_T = torch.logsumexp(logits_TE, dim=-1) ** 2
    return (lse_T * valid_T).sum() / valid_T.sum().clamp_min(1)


@torch.no_grad()
def loss_free_bias_step(*, bias_E: Tensor, load_E: Tensor, rate: float) -> Tensor:
    """Auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664) Alg. 1:
    b_i += u * sign(mean_load - load_i). Returns the new bias."""
    return bias_E + rate * torch.sign(load_E.mean() - load_E)


class BalanceStats(NamedTuple):
    """One layer, one step. Tensors, detached; call .tolist()/float() when logging."""
    load_E: Tensor        # share of routed slots per expert (sums to 1; all 0 if nothing routed)
    max_vio: Tensor       # max load / mean load - 1 (Wang et al. 2024, eq. 7); 0 = perfectly balanced
    cv: Tensor            # coefficient of variation of the per-expert counts (std / mean)
    entropy: Tensor       # entropy of the load distribution / log E; 1 = uniform
    drop_rate: Tensor     # share of wanted slots that capacity dropped
    dead: Tensor          # number of experts that received no slot
    experts_per_token: Tensor  # mean routed experts per real token


@torch.no_grad()
def balance_stats(*, counts_E: Tensor, n_dropped: Tensor | int = 0, n_tokens: Tensor | int = 1) -> BalanceStats:
    """Balance metrics from per-expert slot counts (after drops)."""
    counts_E = counts_E.float()
    total = counts_E.sum()
    E = counts_E.numel()
    load_E = counts_E / total.clamp_min(1.0)
    mean = counts_E.mean()
    zero = counts_E.new_zeros(())
    max_vio = torch.where(mean > 0, counts_E.max() / mean.clamp_min(1e-12) - 1.0, zero)
    cv = torch.where(mean > 0, counts_E.std(unbiased=False) / mean.clamp_min(1e-12), zero)
    plogp = torch.where(load_E > 0, load_E * load_E.clamp_min(1e-30).log(), zero)
    entropy = -plogp.sum() / math.log(E) if E > 1 else zero + 1.0
    n_dropped = torch.as_tensor(n_dropped, dtype=torch.float32, device=counts_E.device)
    drop_rate = n_dropped / (total + n_dropped).clamp_min(1.0)
    dead = (counts_E == 0).sum()
    ept = total / torch.as_tensor(n_tokens, dtype=torch.float32, device=counts_E.device).clamp_min(1.0)
    return BalanceStats(load_E, max_vio, cv, entropy, drop_rate, dead, ept)
