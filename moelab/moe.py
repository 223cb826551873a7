"""MoELayer: the one place that reads MoEConfig and wires router + dispatch + experts + balancing.

B=sequences, S=positions, T=B*S tokens, D=d_model, E=routed experts, K=slots per token.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import balance
from moelab.balance import BalanceStats
from moelab.config import MoEConfig
from moelab.dispatch import LocalDispatcher, apply_capacity, capacity, experts_reference_forward
from moelab.experts import Experts
from moelab.routers import ROUTERS, RouteContext, Routing, mask_routing
from moelab import special_experts


class MoEResult(NamedTuple):
    """What one MoE layer returns."""
    y: Tensor                     # output, same shape and dtype as the input
    aux_loss: Tensor              # weighted sum of this layer's balance + z losses: add it to the LM loss
    losses: dict[str, Tensor]     # each loss unweighted (keeps its graph), e.g. {"aux": ..., "z": ...}
    stats: BalanceStats           # detached balance metrics for this step
    routing: Routing              # the routing actually used (after padding mask and capacity drops)
    router_stats: dict[str, Tensor] | None = None  # special_experts.router_stats: experts/token, FLOPs saved, ...


class MoELayer(nn.Module):
    """Routed experts (+ optional shared experts) with dropless or capacity-limited dispatch."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        n_routes = cfg.n_experts + cfg.n_special  # E routed + null/zero/copy/const (special_experts.py)
        self.gate = nn.Linear(cfg.d_model, n_routes, bias=False)
        self.special = special_experts.SpecialExperts(cfg) if cfg.n_special else None
        # MoE++ gating residual: + W_g(previous layer's logits); zero init = no residual at the start.
        self.prev_gate = nn.Linear(n_routes, n_routes, bias=False) if cfg.gating_residual else None
        if self.prev_gate is not None:
            nn.init.zeros_(self.prev_gate.weight)
        if cfg.router == "relu":  # ReMoE adaptive L1 coefficient, stepped in training forwards
            self.register_buffer("relu_l1_coef", torch.tensor(float(cfg.relu_l1_init)), persistent=True)
        nn.init.normal_(self.gate.weight, std=cfg.d_model ** -0.5)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.d_expert, cfg.activation)
        self.shared = Experts(1, cfg.d_model, cfg.d_shared_total, cfg.activation) if cfg.n_shared else None
        # parallel.shard_moe_layer swaps in an EPDispatcher. Padding to equal blocks feeds the batched GEMM of
        # the grouped/padded impls; the other impls get compact rows.
        pad = 0.25 if cfg.expert_impl in ("grouped", "padded") else 0.0
        hidden = self.experts.w_up_EDH.shape[2] if cfg.expert_impl == "grouped" else None
        self.dispatcher = LocalDispatcher(cfg.n_experts, max_padding=pad, hidden=hidden)
        self.global_counts = None  # balance="global": local -> global-batch counts, see parallel.py
        # Loss-free balancing state: persistent so it survives save/load and exact resume.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts), persistent=True)
        self.register_buffer("expert_load", torch.zeros(cfg.n_experts), persistent=True)
        # Routing replay (moelab.trace.replay_moelab): Routing -> Routing with recorded experts/weights.
        self.routing_override = None

    def route(self, x_TD: Tensor, valid_T: Tensor | None, token_ids_T: Tensor | None,
              prev_logits_TN: Tensor | None = None) -> Routing:
        """Router in fp32 whatever the model dtype; padding tokens go nowhere. The routing is over all
        E + n_special router outputs (special slots are split off in forward)."""
        cfg = self.cfg
        x_r = x_TD.float()
        if self.training and cfg.jitter_eps > 0:  # Switch Transformer input jitter
            x_r = x_r * torch.empty_like(x_r).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps)
        logits_TE = F.linear(x_r, self.gate.weight.float())
        if self.prev_gate is not None and prev_logits_TN is not None:  # MoE++ gating residual
            logits_TE = logits_TE + F.linear(prev_logits_TN.reshape(logits_TE.shape).float(),
                                             self.prev_gate.weight.float())
        bias_E = F.pad(self.expert_bias, (0, cfg.n_special)) if cfg.balance == "loss_free" else None
        ctx = RouteContext(bias_E=bias_E, token_ids_T=token_ids_T, training=self.training, valid_T=valid_T)
        routing = ROUTERS[cfg.router](logits_TE, cfg, ctx)
        if self.routing_override is not None:  # replay a recorded trace instead of the router
            routing = self.routing_override(routing)
        return mask_routing(routing, valid_T)

    def forward(self, x: Tensor, *, valid: Tensor | None = None, token_ids: Tensor | None = None,
                prev_logits: Tensor | None = None) -> MoEResult:
        """x: (..., D). valid: (...) bool, False for padding. token_ids: (...) long, for the hash router.
        prev_logits: the previous MoE layer's `result.routing.logits_TE`, for the MoE++ gating residual
        (cfg.gating_residual); the model passes it on from layer to layer (None for the first layer)."""
        cfg = self.cfg
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoELayer input last dim is {x.shape[-1]}, expected d_model={cfg.d_model}")
        if valid is not None and valid.shape != x.shape[:-1]:
            raise ValueError(f"valid mask shape {tuple(valid.shape)} must equal x.shape[:-1]={tuple(x.shape[:-1])}")
        x_TD = x.reshape(-1, cfg.d_model)
        valid_T = None if valid is None else valid.reshape(-1).bool()
        token_ids_T = None if token_ids is None else token_ids.reshape(-1)
        routing = self.route(x_TD, valid_T, token_ids_T, prev_logits)
        full = routing  # over all E + n_special outputs, before capacity (router losses and metrics)
        if self.special is not None:  # null/zero/copy/const experts: computed here, their slots -> -1
            special_out = self.special(x_TD, routing)
            routing = special_out.routing

        counts_E = balance.expert_counts(expert_idx_TK=routing.expert_idx_TK, n_experts=cfg.n_experts)
        n_dropped = torch.zeros((), dtype=torch.long)
        if cfg.capacity_factor is not None:
            n_real = x_TD.shape[0] if valid_T is None else int(valid_T.sum())
            cap = capacity(cfg.capacity_factor, n_real, cfg.top_k, cfg.n_experts)
            routing, n_dropped = apply_capacity(routing, cap, cfg.n_experts)

        y_TD = self.experts_forward(x_TD, routing)
        if self.shared is not None:
            y_TD = y_TD + self.shared.expert(0, x_TD)  # one fused dense MLP, every token
        if self.special is not None:
            y_TD = y_TD + special_out.y_TD

        losses = self.losses(routing, valid_T, x.shape[:-1], counts_E)
        losses.update(special_experts.router_losses(cfg=cfg, full=full, valid_T=valid_T))
        aux = sum((self.loss_weight(name) * v for name, v in losses.items()), torch.zeros((), device=x.device))
        router_stats = special_experts.router_stats(cfg=cfg, full=full, valid_T=valid_T)
        if cfg.router == "relu" and self.training and torch.is_grad_enabled():  # after use: this step's weight
            self.relu_l1_coef.copy_(special_experts.relu_l1_coef_step(
                coef=self.relu_l1_coef, sparsity=router_stats["gate_sparsity"].to(self.relu_l1_coef.device),
                target=1.0 - cfg.top_k / full.logits_TE.shape[1], rate=cfg.relu_l1_rate))
        if self.training and torch.is_grad_enabled() and cfg.balance == "loss_free":
            with torch.no_grad():
                self.expert_load += counts_E.to(self.expert_load.device)
        n_tok = x_TD.shape[0] if valid_T is None else valid_T.sum()
        kept_E = counts_E  # no capacity: nothing dropped, skip the second count
        if cfg.capacity_factor is not None:
            kept_E = counts_E - self._dropped_per_expert(counts_E, routing)
        stats = balance.balance_stats(counts_E=kept_E, n_dropped=n_dropped, n_tokens=n_tok)
        return MoEResult(y_TD.reshape(x.shape), aux, losses, stats, routing, router_stats)

    def experts_forward(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """Routed experts only: sort-based dispatch + grouped GEMM, or the per-expert loop reference."""
        if self.cfg.expert_impl == "loop" and isinstance(self.dispatcher, LocalDispatcher):
            return experts_reference_forward(x_TD, routing, self.experts.expert, self.cfg.n_experts)
        x_SD, counts_E, plan = self.dispatcher.dispatch(x_TD, routing)
        return self.dispatcher.combine(self.experts(x_SD, counts_E, self.cfg.expert_impl), plan)

    def _dropped_per_expert(self, counts_E: Tensor, routing: Routing) -> Tensor:
        kept_E = balance.expert_counts(expert_idx_TK=routing.expert_idx_TK, n_experts=self.cfg.n_experts)
        return counts_E - kept_E

    def losses(self, routing: Routing, valid_T: Tensor | None, batch_shape, counts_E: Tensor) -> dict[str, Tensor]:
        """Unweighted balance losses for this layer (computed per layer, never pooled across layers)."""
        cfg = self.cfg
        out: dict[str, Tensor] = {}
        if cfg.balance == "global" and self.global_counts is not None and self.training and torch.is_grad_enabled():
            counts_E = self.global_counts(counts_E)  # summed over DP ranks and micro-batches (parallel.py)
        over_all_outputs = cfg.n_special and cfg.balance == "aux"  # special_experts.router_losses owns "aux"
        if cfg.balance in ("aux", "global") and cfg.aux_loss_coef > 0 and not over_all_outputs:
            out["aux"] = balance.switch_aux_loss(probs_TE=routing.probs_TE, expert_idx_TK=routing.expert_idx_TK,
                                                 n_experts=cfg.n_experts, valid_T=valid_T, counts_E=counts_E)
        if cfg.balance == "seq" and cfg.aux_loss_coef > 0:
            S = batch_shape[-1] if len(batch_shape) >= 1 else 1
            probs_BSE = routing.probs_TE.reshape(-1, S, cfg.n_experts)
            idx_BSK = routing.expert_idx_TK.reshape(probs_BSE.shape[0], S, -1)
            valid_BS = None if valid_T is None else valid_T.reshape(-1, S)
            out["seq_aux"] = balance.seq_aux_loss(probs_BSE=probs_BSE, expert_idx_BSK=idx_BSK,
                                                  n_experts=cfg.n_experts, top_k=cfg.top_k, valid_BS=valid_BS)
        if cfg.z_loss_coef > 0:
            out["z"] = balance.z_loss(logits_TE=routing.logits_TE, valid_T=valid_T)
        return out

    def loss_weight(self, name: str) -> float | Tensor:
        if name == "relu_l1":  # ReMoE adaptive coefficient (a copy: the buffer is stepped in place later)
            return self.relu_l1_coef.clone()
        if name == "top_p_entropy":
            return self.cfg.top_p_entropy_coef
        return self.cfg.z_loss_coef if name == "z" else self.cfg.aux_loss_coef

    @torch.no_grad()
    def update_bias(self, load_E: Tensor | None = None) -> None:
        """Loss-free balancing step (call after optimizer.step). `load_E` overrides the local counts,
        e.g. counts all-reduced across ranks. Zeroes the counters."""
        if self.cfg.balance != "loss_free":
            return
        load_E = self.expert_load if load_E is None else load_E
        if load_E.sum() > 0:
            self.expert_bias.copy_(balance.loss_free_bias_step(bias_E=self.expert_bias, load_E=load_E,
                                                               rate=self.cfg.bias_update_rate))
        self.expert_load.zero_()


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoELayer of `model`, in registration (= forward) order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def update_loss_free_biases(model: nn.Module) -> None:
    """Call after each optimizer step: updates every loss-free MoE layer's bias from its counts."""
    for m in moe_layers(model):
        m.update_bias()

