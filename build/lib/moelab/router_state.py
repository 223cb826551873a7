"""Router state that outlives one forward: the loss-free selection bias and ReMoE's adaptive L1 coefficient.

E=routed experts. Each state is a small nn.Module (its buffers are saved in checkpoints) with
  bias()              what it adds to the selection scores (None: nothing)
  observe(...)        called by the layer in training forwards with grad enabled (never in eval / no_grad)
  loss_weights()      weights it sets for the layer's losses by name
  step(reduce)        once per optimizer step, after the optimizer (reduce: sum a tensor over data-parallel
                      ranks, or None in one process); zeroes what it observed
  discard()           forget what this step observed (a failed step)
`router_states(cfg)` builds the ones a config needs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moelab.balance import loss_free_bias_step
from moelab.config import MoEConfig
from moelab.special_experts import relu_l1_coef_step

Reduce = Callable[[Tensor], Tensor] | None


class LossFreeBias(nn.Module):
    """Auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664, Alg. 1): a per-expert bias added to
    the selection scores only (never to the gate weights), moved by u * sign(mean load - load) after each
    optimizer step from the loads counted in that step's training forwards."""

    def __init__(self, n_experts: int, n_special: int, rate: float):
        super().__init__()
        self.n_special, self.rate = n_special, rate
        self.register_buffer("bias_E", torch.zeros(n_experts), persistent=True)
        self.register_buffer("load_E", torch.zeros(n_experts), persistent=True)

    def bias(self) -> Tensor:
        """Over all router outputs: special (null/zero/copy/const) experts get no bias."""
        return nn.functional.pad(self.bias_E, (0, self.n_special))

    @torch.no_grad()
    def observe(self, *, counts_E: Tensor, sparsity: Tensor) -> None:
        self.load_E += counts_E.to(self.load_E)

    def loss_weights(self) -> dict[str, Tensor]:
        return {}

    def discard(self) -> None:
        self.load_E.zero_()

    @torch.no_grad()
    def step(self, reduce: Reduce = None) -> None:
        load_E = self.load_E if reduce is None else reduce(self.load_E)
        if load_E.sum() > 0:
            self.bias_E.copy_(loss_free_bias_step(bias_E=self.bias_E, load_E=load_E, rate=self.rate))
        self.load_E.zero_()


class ReluL1(nn.Module):
    """ReMoE (Wang et al. 2024, arXiv 2412.14711, sec. 3.3) adaptive L1 coefficient: once per optimizer step,
    lambda *= rate^sign(target - sparsity), target = 1 - k/A, from the gate sparsity averaged over the step's
    training forwards, ranks and -- through step_all -- all layers: every layer's copy holds the same global
    lambda, as the authors' one config.moe_relu_l1_reg_coeff."""

    def __init__(self, init: float, target: float, rate: float):
        super().__init__()
        self.target, self.rate = target, rate
        self.register_buffer("coef", torch.tensor(float(init)), persistent=True)
        self.register_buffer("seen", torch.zeros(2), persistent=True)  # sum of sparsities, forwards

    def bias(self) -> None:
        return None

    @torch.no_grad()
    def observe(self, *, counts_E: Tensor, sparsity: Tensor) -> None:
        self.seen += torch.stack([sparsity.to(self.seen), self.seen.new_ones(())])

    def loss_weights(self) -> dict[str, Tensor]:
        return {"relu_l1": self.coef.clone()}  # a copy: the buffer is stepped in place later

    def discard(self) -> None:
        self.seen.zero_()

    @torch.no_grad()
    def step(self, reduce: Reduce = None) -> None:
        seen = self.seen if reduce is None else reduce(self.seen)
        if seen[1] > 0:
            self.coef.copy_(relu_l1_coef_step(coef=self.coef, sparsity=seen[0] / seen[1], target=self.target,
                                              rate=self.rate))
        self.seen.zero_()


class GlobalBatchCounts(nn.Module):
    """Global-batch LBL counts (Qiu et al. 2025, arXiv 2501.11873, sec. 3): f_i of the Switch loss from expert
    counts summed over the micro-batches of the optimizer step so far and, when `reduce` is set (expert /
    data parallel training sets it to an all-reduce), over the ranks."""

    def __init__(self):
        super().__init__()
        self.sum_E: Tensor | None = None  # running counts of this optimizer step (not saved: zero at step ends)
        self.reduce: Reduce = None

    def bias(self) -> None:
        return None

    def observe(self, *, counts_E: Tensor, sparsity: Tensor) -> None:
        pass

    def loss_weights(self) -> dict[str, Tensor]:
        return {}

    def counts(self, counts_E: Tensor) -> Tensor:
        """This micro-batch's counts added to the step's running (global) counts; a constant for the loss."""
        c = counts_E.detach().float().clone()
        c = c if self.reduce is None else self.reduce(c)
        self.sum_E = c if self.sum_E is None else self.sum_E + c
        return self.sum_E.clone()

    def discard(self) -> None:
        self.sum_E = None

    def step(self, reduce: Reduce = None) -> None:
        self.discard()


def step_all(states: list[nn.ModuleDict], reduce: Reduce = None) -> None:
    """Step every layer's router state once (after the optimizer step). ReMoE's coefficients first pool their
    observations over all layers, so each layer steps the same global lambda from the same mean sparsity."""
    l1 = [s["relu_l1"] for s in states if "relu_l1" in s]
    if len(l1) > 1:
        with torch.no_grad():
            pooled = torch.stack([m.seen for m in l1]).sum(0)
            for m in l1:
                m.seen.copy_(pooled)
    for s in states:
        for m in s.values():
            m.step(reduce)


def router_states(cfg: MoEConfig) -> nn.ModuleDict:
    """The state modules `cfg` needs, by name ("loss_free", "relu_l1", "global")."""
    states = nn.ModuleDict()
    if cfg.balance == "global":
        states["global"] = GlobalBatchCounts()
    if cfg.balance == "loss_free":
        states["loss_free"] = LossFreeBias(cfg.n_experts, cfg.n_special, cfg.bias_update_rate)
    if cfg.router == "relu":
        n_routes = cfg.n_experts + cfg.n_special
        states["relu_l1"] = ReluL1(cfg.relu_l1_init, 1.0 - cfg.top_k / n_routes, cfg.relu_l1_rate)
    return states
