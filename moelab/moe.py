"""MoELayer: the one place that reads MoEConfig and wires router -> special experts -> routed experts ->
shared experts -> balance losses and metrics.

T=tokens (all leading dims flattened), D=d_model, E=routed experts, A=all router outputs (E + special), K=slots.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import balance, special_experts
from moelab.balance import BalanceStats
from moelab.config import MoEConfig
from moelab.experts import MLP, Experts, ExpertsPath, RoutedExperts
from moelab.router_state import router_states, step_all
from moelab.routers import ROUTERS, RouteContext, Routing, apply_capacity, capacity, mask_routing


class MoEResult(NamedTuple):
    """What one MoE layer returns."""
    y: Tensor                     # output, same shape and dtype as the input
    aux_loss: Tensor              # weighted sum of this layer's balance + z losses: add it to the LM loss
    losses: dict[str, Tensor]     # each loss unweighted (keeps its graph), e.g. {"aux": ..., "z": ...}
    stats: BalanceStats           # detached balance metrics for this step
    routing: Routing              # the routing actually used (after padding mask and capacity drops)
    router_stats: dict[str, Tensor] | None = None  # special_experts.router_stats: experts/token, FLOPs saved, ...
    counts_E: Tensor | None = None  # rows each routed expert computed (after drops), from RoutedExperts


class MoELayer(nn.Module):
    """Routed experts (+ optional shared and null/zero/copy/const experts), dropless or capacity-limited."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        n_routes = cfg.n_experts + cfg.n_special  # E routed + null/zero/copy/const (special_experts.py)
        self.gate = nn.Linear(cfg.d_model, n_routes, bias=False)
        nn.init.normal_(self.gate.weight, std=cfg.d_model ** -0.5)
        # MoE++ gating residual: + W_g(previous layer's logits); zero init = no residual at the start.
        self.prev_gate = nn.Linear(n_routes, n_routes, bias=False) if cfg.gating_residual else None
        if self.prev_gate is not None:
            nn.init.zeros_(self.prev_gate.weight)
        self.special = special_experts.SpecialExperts(cfg) if cfg.n_special else None
        # parallel.shard_moe_layer swaps in an EPDispatcher and keeps only this rank's expert weights
        self.experts = RoutedExperts(Experts(cfg.n_experts, cfg.d_model, cfg.d_expert, cfg.activation),
                                     ExpertsPath(cfg.expert_impl))
        self.shared = MLP(cfg.d_model, cfg.d_shared_total, cfg.activation) if cfg.n_shared else None
        self.state = router_states(cfg)  # loss-free bias, ReMoE coefficient, global-batch counts
        self.loss_weights = {"aux": cfg.aux_loss_coef, "seq_aux": cfg.aux_loss_coef, "z": cfg.z_loss_coef,
                             "top_p_entropy": cfg.top_p_entropy_coef}
        # Routing replay (moelab.trace.replay_moelab): Routing -> Routing with recorded experts/weights.
        self.routing_override: Callable[[Routing], Routing] | None = None

    def route(self, x_TD: Tensor, valid_T: Tensor | None, token_ids_T: Tensor | None,
              prev_logits_TA: Tensor | None = None) -> Routing:
        """Router in fp32 whatever the model dtype, over all A outputs; padding tokens go nowhere."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):  # fp32 under bf16 autocast too
            return self._route_fp32(x_TD.float(), valid_T, token_ids_T, prev_logits_TA)

    def _route_fp32(self, x_r: Tensor, valid_T: Tensor | None, token_ids_T: Tensor | None,
                    prev_logits_TA: Tensor | None) -> Routing:
        cfg = self.cfg
        if self.training and cfg.jitter_eps > 0:  # Switch Transformer input jitter
            x_r = x_r * torch.empty_like(x_r).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps)
        logits_TA = F.linear(x_r, self.gate.weight.float())
        if self.prev_gate is not None and prev_logits_TA is not None:  # MoE++ gating residual
            logits_TA = logits_TA + F.linear(prev_logits_TA.reshape(logits_TA.shape).float(),
                                             self.prev_gate.weight.float())
        biases = [b for b in (s.bias() for s in self.state.values()) if b is not None]
        ctx = RouteContext(bias_E=biases[0] if biases else None, token_ids_T=token_ids_T, training=self.training,
                           valid_T=valid_T)
        routing = ROUTERS[cfg.router](logits_TA, cfg, ctx)
        if self.routing_override is not None:  # replay a recorded trace instead of the router
            routing = self.routing_override(routing)
        return mask_routing(routing, valid_T)

    def forward(self, x: Tensor, *, valid: Tensor | None = None, token_ids: Tensor | None = None,
                prev_logits: Tensor | None = None) -> MoEResult:
        """y = sum_k w_k E_k(x) + shared(x) (DeepSeekMoE, arXiv 2401.06066, eq. 9). x: (..., D); valid: (...) bool,
        False for padding; token_ids: (...) long, for the hash router; prev_logits: the previous MoE layer's
        `routing.logits_TE`, for the MoE++ gating residual (None for the first layer)."""
        cfg = self.cfg
        x_TD, valid_T, token_ids_T = self._flatten(x, valid, token_ids)
        full = self.route(x_TD, valid_T, token_ids_T, prev_logits)  # all A outputs, before capacity
        y_TD, routing = None, full
        if self.special is not None:  # null/zero/copy/const experts: computed here, their slots -> -1
            y_TD, routing, _ = self.special(x_TD, full)
        chosen = routing  # the router's choice before capacity drops: what every balance loss and counter sees
        wanted_E, n_dropped = None, torch.zeros((), dtype=torch.long, device=x.device)
        if cfg.capacity_factor is not None:  # losses and counters see the wanted slots, stats the kept ones
            wanted_E = balance.expert_counts(expert_idx_TK=routing.expert_idx_TK, n_experts=cfg.n_experts)
            n_real = x_TD.shape[0] if valid_T is None else int(valid_T.sum())
            routing, n_dropped = apply_capacity(routing, capacity(cfg.capacity_factor, n_real, cfg.top_k,
                                                                  cfg.n_experts), cfg.n_experts)
        routed = self.experts(x_TD, routing.expert_idx_TK, routing.weight_TK)
        y_TD = routed.y_TD if y_TD is None else routed.y_TD + y_TD
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        counts_E = routed.counts_E.float() if wanted_E is None else wanted_E
        losses = self.losses(full, chosen, valid_T, x.shape[:-1], counts_E)
        weights = {**self.loss_weights, **{k: w for s in self.state.values() for k, w in s.loss_weights().items()}}
        aux = sum((weights[name] * v for name, v in losses.items()), torch.zeros((), device=x.device))
        router_stats = special_experts.router_stats(cfg=cfg, full=full, valid_T=valid_T)
        if self.training and torch.is_grad_enabled():  # training forwards only: eval never moves the state
            for s in self.state.values():
                s.observe(counts_E=counts_E, sparsity=router_stats["gate_sparsity"])
        n_tok = x_TD.shape[0] if valid_T is None else valid_T.sum()
        stats = balance.balance_stats(counts_E=routed.counts_E, n_dropped=n_dropped, n_tokens=n_tok)
        return MoEResult(y_TD.reshape(x.shape), aux, losses, stats, routing, router_stats, routed.counts_E)

    def _flatten(self, x: Tensor, valid: Tensor | None, token_ids: Tensor | None):
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"MoELayer input last dim is {x.shape[-1]}, expected d_model={self.cfg.d_model}")
        if valid is not None and valid.shape != x.shape[:-1]:
            raise ValueError(f"valid mask shape {tuple(valid.shape)} must equal x.shape[:-1]={tuple(x.shape[:-1])}")
        return (x.reshape(-1, self.cfg.d_model), None if valid is None else valid.reshape(-1).bool(),
                None if token_ids is None else token_ids.reshape(-1))

    def losses(self, full: Routing, routing: Routing, valid_T: Tensor | None, batch_shape,
               counts_E: Tensor) -> dict[str, Tensor]:
        """Unweighted losses of this layer (computed per layer, never pooled across layers)."""
        cfg = self.cfg
        out: dict[str, Tensor] = {}
        if "global" in self.state and self.training and torch.is_grad_enabled():
            counts_E = self.state["global"].counts(counts_E)  # summed over micro-batches (and ranks)
        # special_experts.router_losses owns "aux" with special experts; ReMoE's balanced L1 replaces it for relu
        over_all_outputs = (cfg.n_special or cfg.router == "relu") and cfg.balance == "aux"
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
        out.update(special_experts.router_losses(cfg=cfg, full=full, valid_T=valid_T))
        return out

    def step(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Once per optimizer step, after it: every router state steps (loss-free bias, ReMoE coefficient) and
        zeroes what it counted. `reduce` sums a tensor over data-parallel ranks (None: one process)."""
        step_all([self.state], reduce)

    def discard_observations(self) -> None:
        """Forget what the router states counted in this (failed) step."""
        for s in self.state.values():
            s.discard()


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoELayer of `model`, in registration (= forward) order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def step_routers(model: nn.Module, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
    """Call after each optimizer step: steps every MoE layer's router state (MoELayer.step)."""
    step_all([m.state for m in moe_layers(model)], reduce)  # ReMoE: one lambda from all layers' sparsity
