"""Online expert rebalancing for EP training: every N steps re-fit each MoE layer's placement on a moving window
of expert loads, move expert weights and their optimizer state between ranks, log balancedness before/after.

L=MoE layers, E=experts, W=EP ranks, S=slots per rank, X=floats per expert slot (weights + optimizer state).
The policy is one of `placement.HEURISTICS` (default DeepSeek EPLB, github.com/deepseek-ai/EPLB eplb.py
`rebalance_experts`, which DeepSeek re-runs periodically on recent loads; replicas need spare slots, i.e. a
starting `--placement` with slots > E / W). Every rank sums the loads over all ranks and fits the same map, so
no placement is sent; a layer moves only when the fitted map's modelled balancedness beats the current one.
Training continues exactly: the routing does not depend on the placement and every copy of an expert carries the
same weights and Adam moments, so losses equal a run without moves up to float summation order.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.config import ModelConfig
from moelab.moe import moe_layers
from moelab.parallel import is_sharded, set_placement
from moelab.placement import HEURISTICS, Devices, Placement, load_placement_file


@dataclass(frozen=True)
class RebalanceConfig:
    """`moelab train --ep P --rebalance-every N --rebalance-window W`."""
    every: int             # re-fit every N optimizer steps (>= 1)
    window: int = 0        # optimizer steps of loads the fit sees (moving window); 0 = `every`
    method: str = "eplb"   # placement.HEURISTICS policy (replicas only with eplb)

    def check(self) -> RebalanceConfig:
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"--rebalance-every={self.every!r} is invalid: allowed an integer >= 1")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"--rebalance-window={self.window!r} is invalid: allowed an integer >= 0 (0 = every)")
        if self.method not in HEURISTICS:
            raise ValueError(f"rebalance method={self.method!r} is invalid: allowed {', '.join(HEURISTICS)}")
        return self


def balancedness(p: Placement, load_E: np.ndarray) -> float:
    """Mean / max device load with each expert's rows spread evenly over its copies (EPLB's load model; 1 = perfect)."""
    load_W = p.share_WE() @ np.asarray(load_E, dtype=np.float64)
    return float(load_W.mean() / load_W.max()) if load_W.max() > 0 else 1.0


def move_experts(layer: nn.Module, new: Placement, opt: torch.optim.Optimizer | None = None) -> int:
    """Re-place one sharded MoE layer: every new slot gets its expert's weights and optimizer state from the old
    copy on its own rank if there is one, else from the expert's first old copy; one uneven all-to-all over the
    EP group. The Parameters stay the same objects (data and state replaced). Returns bytes this rank sent to
    other ranks. A collective over the layer's EP group."""
    d = layer.experts.dispatcher
    old, me, W = d.placement, d.rank, d.world
    Placement.from_map(new, n_experts=d.n_experts, world_size=W)  # size checks before any collective
    old_local = [list(old.experts_of(r)) for r in range(W)]
    plan = [[(r if e in old_local[r] else old.rank_E[e], e) for e in new.experts_of(r)] for r in range(W)]
    plan = [[(s, old_local[s].index(e)) for s, e in slots] for slots in plan]  # (source rank, old local row)
    send_rows = [i for r in range(W) for s, i in plan[r] if s == me]
    in_splits = [sum(s == me for s, _ in plan[r]) for r in range(W)]
    out_splits = [sum(s == src for s, _ in plan[me]) for src in range(W)]
    start = np.cumsum([0] + out_splits)
    seen = [0] * W
    take = []
    for s, _ in plan[me]:  # received rows arrive grouped by source rank, each group in my slot order
        take.append(int(start[s]) + seen[s])
        seen[s] += 1
    params = list(layer.experts.weights.parameters())
    L_old, L_new = len(old_local[me]), len(plan[me])
    parts: list[tuple[nn.Parameter, str | None, Tensor]] = []
    for p in params:
        parts.append((p, None, p.data))
        state = opt.state.get(p, {}) if opt is not None else {}
        for k in sorted(state):
            if isinstance(state[k], Tensor) and state[k].shape == p.shape:
                parts.append((p, k, state[k]))
    widths = [int(np.prod(t.shape[1:])) for _, _, t in parts]
    dtype = params[0].dtype
    x_LX = torch.cat([t.reshape(L_old, w).to(dtype) for (_, _, t), w in zip(parts, widths)], 1)
    send = x_LX.index_select(0, torch.tensor(send_rows, dtype=torch.long, device=x_LX.device))
    recv = send.new_empty((sum(out_splits), x_LX.shape[1]))
    dist.all_to_all_single(recv, send.contiguous(), out_splits, in_splits, group=d.group)
    new_LX = recv.index_select(0, torch.tensor(take, dtype=torch.long, device=recv.device))
    for (p, k, t), chunk in zip(parts, torch.split(new_LX, widths, dim=1)):
        value = chunk.reshape((L_new,) + tuple(t.shape[1:])).to(t.dtype).clone()
        if k is None:
            p.data = value
        else:
            opt.state[p][k] = value
    set_placement(layer.experts, new)
    return (sum(in_splits) - in_splits[me]) * x_LX.shape[1] * x_LX.element_size()


class Rebalancer:
    """Call `after_step(model, opt, step)` after every optimizer step on every rank (a collective): it adds the
    step's loads (summed over all ranks) to the window and, every `cfg.every` steps, re-fits and moves."""

    def __init__(self, cfg: RebalanceConfig | None = None, **kw):
        """`Rebalancer(RebalanceConfig(...))` or `Rebalancer(every=N, window=W, method="eplb")`."""
        self.cfg = cfg = (cfg or RebalanceConfig(**kw)).check()
        self.window: deque[Tensor] = deque(maxlen=cfg.window or cfg.every)

    def observe(self, model: nn.Module) -> Tensor:
        """This step's (L, E) loads summed over all ranks, added to the window."""
        layers = [m for m in moe_layers(model) if is_sharded(m)]
        load_LE = torch.stack([m.experts.dispatcher.take_load() for m in layers]) if layers else torch.zeros(0, 0)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load_LE)  # every rank (every EP group) fits the same placement
        self.window.append(load_LE)
        return load_LE

    def after_step(self, model: nn.Module, opt: torch.optim.Optimizer | None, step: int) -> dict | None:
        """The move record {step, balancedness_before/after per layer, moved per layer, moved_bytes} on a fit
        step, else None."""
        self.observe(model)
        if step % self.cfg.every:
            return None
        layers = [m for m in moe_layers(model) if is_sharded(m)]
        load_LE = torch.stack(list(self.window)).sum(0).numpy()
        before, after, moved, sent = [], [], [], 0
        for m, load_E in zip(layers, load_LE):
            old = m.experts.dispatcher.placement
            dev = Devices(old.world_size, old.slots)
            new = HEURISTICS[self.cfg.method](load_E[None, :], dev)[0]
            b0, b1 = balancedness(old, load_E), balancedness(new, load_E)
            go = new.phy2log != old.phy2log and b1 > b0 + 1e-9
            if go:
                sent += move_experts(m, new, opt)
            before.append(round(b0, 5))
            after.append(round(b1 if go else b0, 5))
            moved.append(bool(go))
        total = torch.tensor([float(sent)], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return {"step": step, "window_steps": len(self.window), "balancedness_before": before,
                "balancedness_after": after, "moved": moved, "moved_bytes": int(total)}


def ep_options(placement_file: str | None, every: int | None, window: int | None, model_cfg: ModelConfig) -> dict:
    """`moelab train --placement FILE --rebalance-every N --rebalance-window W` -> ep_train.launch keyword
    arguments (placement: one Placement per MoE layer; rebalance: a RebalanceConfig), checked against the model."""
    out: dict = {}
    if placement_file:
        pf = load_placement_file(placement_file)
        L, E = len(model_cfg.moe_layer_ids), model_cfg.moe.n_experts
        if pf.placements[0].n_experts != E:
            raise ValueError(f"--placement {placement_file!r} is for n_experts={pf.placements[0].n_experts}: "
                             f"allowed a file fitted for the model's n_experts={E}")
        if len(pf.placements) != L:
            raise ValueError(f"--placement {placement_file!r} has {len(pf.placements)} layers: allowed one per MoE "
                             f"layer of the model ({L})")
        out["placement"] = list(pf.placements)
    if every is not None:
        out["rebalance"] = RebalanceConfig(every, window or 0).check()
    elif window:
        raise ValueError(f"--rebalance-window={window} needs --rebalance-every N")
    return out
