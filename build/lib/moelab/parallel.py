"""Expert parallelism on torch.distributed: placement map, all-to-all dispatch/combine, grad sync, balancing.

T=local tokens, K=slots per token, D=d_model, E=routed experts (global, logical), W=ranks, L=expert slots on this
rank, P=occupied physical slots (all ranks; = E without replicas), R=dispatched rows: sent (local kept slots
sorted by destination slot) or received after the all-to-all.

One process per rank; every rank holds the router and all non-expert weights (data parallel) and only
its own experts' weights. `EPDispatcher` has the `LocalDispatcher` interface, so `MoELayer` does not
know it is distributed: dispatch = local sort -> all_to_all(counts) -> all_to_all(rows, uneven splits)
-> regroup by local expert; combine = the reverse. Backward runs the mirrored all-to-alls.
With a replicated `Placement` (placement.py: phy2log) a rank's local experts are its physical slots in slot order;
each row goes to the copy `placement_metrics.replica_slot` picks (the one on the sending rank if any, else spread
evenly: the rule the placement simulator scores), and `sync_grads` sums the copies' gradients over the EP group,
so every copy stays equal to the single-copy expert.
Every collective runs under the process group's timeout (`init_distributed(timeout_s=...)`).
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.dispatch import DispatchPlan, permute, sort_plan, unpermute
from moelab.moe import MoELayer, moe_layers, step_routers
from moelab.placement import Placement
from moelab.placement_metrics import replica_slot, replica_table

BACKENDS = ("gloo", "nccl")


# ----------------------------------------------------------------------------- process group
def init_distributed(*, backend: str = "gloo", timeout_s: float = 120.0, rank: int | None = None,
                     world_size: int | None = None, init_method: str | None = None) -> tuple[int, int]:
    """init_process_group with a collective timeout. rank/world_size/init_method default to the torchrun
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Returns (rank, world_size)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: allowed one of {', '.join(BACKENDS)}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r} is invalid: allowed > 0 (every collective needs a timeout)")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = int(os.environ["RANK"]) if rank is None and "RANK" in os.environ else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None and "WORLD_SIZE" in os.environ else world_size
    if rank is None or world_size is None:
        raise ValueError("init_distributed needs rank and world_size (or the torchrun variables RANK, WORLD_SIZE)")
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world_size


def current_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("expert parallelism needs torch.distributed initialised: call "
                         "moelab.parallel.init_distributed(...) (or run under torchrun) first")
    return dist.get_rank(group), dist.get_world_size(group)


# ----------------------------------------------------------------------------- all-to-all
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven row splits; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_RD.new_empty((sum(out_splits),) + tuple(x_RD.shape[1:]))
        dist.all_to_all_single(out, x_RD.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g_RD: Tensor):
        out_splits, in_splits = ctx.splits
        g_back_RD = g_RD.new_empty((sum(in_splits),) + tuple(g_RD.shape[1:]))
        dist.all_to_all_single(g_back_RD, g_RD.contiguous(), in_splits, out_splits, group=ctx.group)
        return g_back_RD, None, None, None


def all_to_all(x_RD: Tensor, *, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Autograd-correct all_to_all_single: rows in_splits[r] go to rank r, out_splits[r] arrive from r.
    With grad enabled the op always joins the graph, so every rank runs the backward collective
    (a rank whose input needs no grad would otherwise skip it and the others would wait forever)."""
    if torch.is_grad_enabled() and not x_RD.requires_grad:
        x_RD = x_RD.detach().requires_grad_(True)
    return _AllToAll.apply(x_RD, list(out_splits), list(in_splits), group)


class CommStats(NamedTuple):
    """Forward all-to-all traffic of one layer on one rank (the backward moves the same again).
    Rows are token slots (a token sent to two experts on one rank counts twice); self-sends excluded."""
    tokens_sent: int      # dispatch rows sent to other ranks
    tokens_recv: int      # dispatch rows received from other ranks
    bytes_sent: int       # counts + dispatch rows + combine rows sent to other ranks
    bytes_recv: int       # counts + dispatch rows + combine rows received from other ranks

    def __add__(self, other: CommStats) -> CommStats:  # type: ignore[override]
        return CommStats(*(a + b for a, b in zip(self, other)))


ZERO_COMM = CommStats(0, 0, 0, 0)


class EPPlan(NamedTuple):
    """Everything combine needs to send rows back and scatter them to their tokens."""
    local: DispatchPlan   # local sort: token and weight of each sent slot
    order_R: Tensor       # received row -> expert-major position (index_select order)
    send_W: list[int]     # rows sent to each rank
    recv_W: list[int]     # rows received from each rank
    x_RD: Tensor          # received rows: combine ties a zero-row output to them (see combine)
    tokens_E: Tensor      # this rank's slots per (global) expert, before the all-to-all


class EPDispatcher:
    """Expert-parallel dispatcher with the LocalDispatcher interface; counts_E returned are local (L,)."""

    def __init__(self, n_experts: int, placement: Placement, group=None):
        rank, world = current_world(group)  # checks only: no collective before every argument is validated
        if placement.n_experts != n_experts:
            raise ValueError(f"placement covers {placement.n_experts} experts but the layer has "
                             f"n_experts={n_experts}: every expert needs exactly one rank")
        if placement.world_size != world:
            raise ValueError(f"placement is for world_size={placement.world_size} but the process group has "
                             f"{world} ranks: build the Placement with world_size={world}")
        self.n_experts, self.placement, self.group, self.rank, self.world = n_experts, placement, group, rank, world
        self.local_experts = placement.experts_of(rank)  # logical expert of each local slot (= local weight row)
        self.n_local_W = placement.n_local()
        order = placement.order()              # logical expert of each occupied slot, in send order
        self.log_P = torch.tensor(order, dtype=torch.long)
        if placement.replicated:
            self.pos_E = None
            self._table = replica_table(placement)
            phy = np.array(placement.phy2log)
            self._pos_phy = np.full(len(phy), -1, dtype=np.int64)  # physical slot -> position in send order
            self._pos_phy[phy >= 0] = np.arange(len(order))
        else:
            pos = torch.empty(n_experts, dtype=torch.long)
            pos[torch.tensor(order)] = torch.arange(n_experts)
            self.pos_E = pos                   # global expert id -> position in send order
        self.last_comm = ZERO_COMM             # traffic of the latest forward
        self.step_comm = ZERO_COMM             # summed over grad-enabled forwards since take_comm()
        self.step_load_E = torch.zeros(n_experts, dtype=torch.float64)  # this rank's rows per expert, same span

    def send_positions(self, expert_idx_TK: Tensor) -> Tensor:
        """Position in send order (occupied slot, rank-major) of each token slot, -1 = no expert."""
        if self.pos_E is not None:
            pos_E = self.pos_E.to(expert_idx_TK.device)
            return torch.where(expert_idx_TK >= 0, pos_E[expert_idx_TK.clamp_min(0)], -1)
        idx_NK = expert_idx_TK.cpu().numpy()
        T = idx_NK.shape[0]
        slot_NK = replica_slot(self.placement, idx_NK, np.full(T, self.rank), np.arange(T), self._table)
        pos_NK = np.where(slot_NK >= 0, self._pos_phy[np.maximum(slot_NK, 0)], -1)
        return torch.from_numpy(pos_NK).to(expert_idx_TK.device)

    def dispatch(self, x_TD: Tensor, expert_idx_TK: Tensor, weight_TK: Tensor,
                 pads=None) -> tuple[Tensor, Tensor, EPPlan]:
        """`pads` is ignored: received rows are not padded here (the experts path pads them if it pays)."""
        pos_TK = self.send_positions(expert_idx_TK)
        local = sort_plan(pos_TK, weight_TK, len(self.log_P))  # rows grouped by (rank, slot)
        L, W = len(self.local_experts), self.world
        recv_counts = local.counts_E.new_empty(W * L)
        dist.all_to_all_single(recv_counts, local.counts_E.contiguous(), [L] * W, self.n_local_W, group=self.group)
        recv_counts_WL = recv_counts.view(W, L)
        send_W = [int(c.sum()) for c in torch.split(local.counts_E.cpu(), self.n_local_W)]
        recv_W = recv_counts_WL.sum(1).tolist()
        x_RD = all_to_all(permute(x_TD, local), out_splits=recv_W, in_splits=send_W, group=self.group)
        expert_R = torch.arange(L, device=x_RD.device).repeat(W).repeat_interleave(recv_counts_WL.reshape(-1))
        order_R = torch.argsort(expert_R, stable=True)  # (source rank, expert) -> (expert, source rank)
        self._account(send_W, recv_W, x_TD)
        x_RD = x_RD.index_select(0, order_R)
        tokens_E = local.tokens_E.new_zeros(self.n_experts).index_add_(0, self.log_P.to(pos_TK.device),
                                                                      local.tokens_E)
        if torch.is_grad_enabled():  # training forwards: the loads an online rebalancer reads
            self.step_load_E += tokens_E.cpu()
        return x_RD, recv_counts_WL.sum(0), EPPlan(local, order_R, send_W, recv_W, x_RD, tokens_E)

    def combine(self, y_RD: Tensor, plan: EPPlan) -> Tensor:
        if y_RD.shape[0] == 0 and torch.is_grad_enabled():
            # Nothing arrived (or no local experts): keep the dispatch all-to-all in the graph so this
            # rank still joins its backward collective. Zero rows: no arithmetic, no change in value.
            y_RD = y_RD + plan.x_RD[:, :1]
        inv_R = torch.empty_like(plan.order_R)
        inv_R[plan.order_R] = torch.arange(plan.order_R.numel(), device=plan.order_R.device)
        y_RD = all_to_all(y_RD.index_select(0, inv_R), out_splits=plan.send_W, in_splits=plan.recv_W,
                          group=self.group)
        return unpermute(y_RD, plan.local)

    def _account(self, send_W: list[int], recv_W: list[int], x_TD: Tensor) -> None:
        me = self.rank
        rows_out, rows_in = sum(send_W) - send_W[me], sum(recv_W) - recv_W[me]
        row_bytes = x_TD.shape[1] * x_TD.element_size()
        count_bytes = 8 * (len(self.log_P) - self.n_local_W[me])  # int64 counts to the other ranks
        count_in = 8 * len(self.local_experts) * (self.world - 1)
        self.last_comm = CommStats(rows_out, rows_in, count_bytes + (rows_out + rows_in) * row_bytes,
                                   count_in + (rows_in + rows_out) * row_bytes)
        if torch.is_grad_enabled():  # training traffic only: evaluation forwards run under no_grad
            self.step_comm = self.step_comm + self.last_comm

    def take_comm(self) -> CommStats:
        """Traffic of the training forwards since the last call (e.g. one optimizer step), then reset."""
        out, self.step_comm = self.step_comm, ZERO_COMM
        return out

    def take_load(self) -> Tensor:
        """(E,) rows this rank sent to each logical expert in training forwards since the last call, then reset."""
        out, self.step_load_E = self.step_load_E, torch.zeros_like(self.step_load_E)
        return out

    def copy_weight(self) -> Tensor:
        """(L,) 1 / copies of each local slot's expert: sums over all slots of all ranks count each expert once."""
        cnt = self.placement.logcnt
        return torch.tensor([1.0 / cnt[e] for e in self.local_experts], dtype=torch.float64)

    def sum_copy_grads(self, params: list[nn.Parameter]) -> None:
        """Sum the gradients of the copies of every replicated expert over the EP group (one bucketed all-reduce
        over the replicated experts only) and give each copy the sum: the gradient the single copy would get,
        so copies stay equal. A no-op without replicas. A collective over the group when replicated."""
        cnt = self.placement.logcnt
        rep = [e for e in range(self.n_experts) if cnt[e] > 1]
        if not rep or not params:
            return
        row = {e: i for i, e in enumerate(rep)}
        mine = [j for j, e in enumerate(self.local_experts) if e in row]
        dev = params[0].device
        j_idx = torch.tensor(mine, dtype=torch.long, device=dev)
        r_idx = torch.tensor([row[self.local_experts[j]] for j in mine], dtype=torch.long, device=dev)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.new_zeros((len(rep),) + g.shape[1:]).index_add_(0, r_idx, g.index_select(0, j_idx))
                          .reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)  # SUM over the ranks holding copies (others add zeros)
        sizes = [len(rep) * int(np.prod(g.shape[1:])) for g in grads]
        for p, g, b in zip(params, grads, torch.split(flat, sizes)):
            p.grad = g.clone().index_copy_(0, j_idx, b.view((len(rep),) + g.shape[1:]).index_select(0, r_idx))


# ----------------------------------------------------------------------------- model surgery
def shard_moe_layer(layer: nn.Module, placement: Placement | Sequence[int] | dict | None = None,
                    group=None) -> nn.Module:
    """Turn a full MoELayer into its EP version in place: keep only this rank's slots' weights (slot order:
    ascending global id without replicas; each copy of a replicated expert holds its full weights) and dispatch
    over all-to-all. The expert Parameters stay the same objects (their data is sliced), so an optimizer built
    before sharding -- and before its first step -- still holds them."""
    E = layer.cfg.n_experts
    _, world = current_world(group)
    if placement is None:
        placement = Placement.contiguous(E, world)
    elif not isinstance(placement, Placement):  # a Placement is kept as given (slot order, spare slots)
        placement = Placement.from_map(placement, n_experts=E, world_size=world)
    dispatcher = EPDispatcher(E, placement, group)  # checks its sizes
    weights = layer.experts.weights
    if weights.n_experts != E or is_sharded(layer):
        raise ValueError(f"layer.experts has {weights.n_experts} experts, expected the full n_experts={E} "
                         f"(is this layer sharded already?)")
    for p in weights.parameters():
        p.data = p.data[torch.tensor(dispatcher.local_experts, dtype=torch.long, device=p.device)].clone()
    layer.experts.dispatcher = dispatcher
    # the map travels with the weights in checkpoints: a resumed run lays its slots out as they were saved
    layer.experts.register_buffer("phy2log_P", torch.tensor(placement.phy2log, dtype=torch.long))
    layer.experts.register_load_state_dict_pre_hook(_adopt_saved_placement)
    return layer


def set_placement(experts: nn.Module, placement: Placement) -> None:
    """Point a sharded RoutedExperts at `placement` (its weights already laid out for it): a new dispatcher that
    keeps the old one's traffic and load counters, and the checkpointed phy2log buffer."""
    d = experts.dispatcher
    nd = EPDispatcher(d.n_experts, placement, d.group)
    nd.last_comm, nd.step_comm, nd.step_load_E = d.last_comm, d.step_comm, d.step_load_E
    experts.dispatcher = nd
    experts.phy2log_P = torch.tensor(placement.phy2log, dtype=torch.long, device=experts.phy2log_P.device)


def _adopt_saved_placement(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook of a sharded RoutedExperts: a checkpoint written after the online rebalancer moved
    experts holds another phy2log; lay the local slots out as saved (shapes only: the load then fills them)."""
    saved, d = state_dict.get(prefix + "phy2log_P"), module.dispatcher
    if saved is None or not isinstance(d, EPDispatcher) or saved.tolist() == list(d.placement.phy2log):
        return
    new = Placement.from_phy2log(saved.tolist(), n_experts=d.n_experts, world_size=d.world)
    for p in module.weights.parameters():
        p.data = p.data.new_empty((len(new.experts_of(d.rank)),) + tuple(p.shape[1:]))
    module.phy2log_P = saved.clone()
    set_placement(module, new)


def shard_model(model: nn.Module, placements=None, group=None) -> nn.Module:
    """Shard every MoELayer (in module order). `placements`: None (contiguous), one map for all layers,
    or a list with one map per layer."""
    layers = moe_layers(model)
    if isinstance(placements, list) and placements and not isinstance(placements[0], int):
        if len(placements) != len(layers):
            raise ValueError(f"got {len(placements)} placements for {len(layers)} MoE layers: "
                             f"allowed one map for all layers or exactly one per layer")
        per_layer = placements
    else:
        per_layer = [placements] * len(layers)
    for layer, p in zip(layers, per_layer):
        shard_moe_layer(layer, p, group)
    return model


def is_sharded(layer: nn.Module) -> bool:
    return isinstance(layer.experts.dispatcher, EPDispatcher)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that live on one rank only (the sharded experts); all others are replicated."""
    return [p for m in moe_layers(model) if is_sharded(m) for p in m.experts.weights.parameters()]


def comm_stats(model: nn.Module) -> dict[str, CommStats]:
    """Latest forward traffic per sharded MoE layer, keyed like model.named_modules()."""
    return {name: m.experts.dispatcher.last_comm for name, m in model.named_modules()
            if isinstance(m, MoELayer) and is_sharded(m)}


def comm_record(model: nn.Module, group=None) -> dict[str, list[list[int]]]:
    """Training all-to-all traffic since the last call, per rank per sharded layer, for metrics.jsonl:
    {"tokens_sent": [[layer0, layer1, ...] for each rank], ...}. A collective: call it on every rank."""
    _, world = current_world(group)
    mine = torch.tensor([list(m.experts.dispatcher.take_comm()) for m in moe_layers(model) if is_sharded(m)],
                        dtype=torch.float64, device=next(model.parameters()).device).reshape(-1, len(CommStats._fields))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return {f: [[int(v) for v in t[:, k].tolist()] for t in every] for k, f in enumerate(CommStats._fields)}


# ----------------------------------------------------------------------------- data parallel + balancing
def sync_grads(model: nn.Module, group=None, replica_group=None) -> None:
    """Data-parallel gradient sync after backward, for per-rank losses that are means over equal-size
    local batches (global loss = mean of the W rank losses, W = size of `group`): replicated params get the
    all-reduced mean; expert params already hold the sum over their EP group's losses (the all-to-all
    backward brought it), so they are summed over the copies of the same shard (`replica_group`, when
    EP < W) and divided by W -- without the division they would be EP times too large. Copies of a replicated
    expert inside one EP group are summed first (EPDispatcher.sum_copy_grads)."""
    _, world = current_world(group)
    experts = {id(p) for p in expert_parameters(model)}
    shared = [p for p in model.parameters() if p.requires_grad and id(p) not in experts]
    _sum_grads(shared, group)
    for m in moe_layers(model):
        if is_sharded(m):
            m.experts.dispatcher.sum_copy_grads(list(m.experts.weights.parameters()))
    local = expert_parameters(model)
    if replica_group is not None and dist.get_world_size(replica_group) > 1:
        _sum_grads(local, replica_group)
    for p in shared + local:
        if p.grad is not None:
            p.grad /= world


def expert_grad_sq(model: nn.Module) -> Tensor:
    """Squared L2 norm of this rank's expert gradients with every replicated expert's copies weighted 1 / copies
    (after sync_grads they are equal), so the sum over an EP group counts each logical expert once (float64)."""
    total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for m in moe_layers(model):
        if not is_sharded(m):
            continue
        d = m.experts.dispatcher
        for p in m.experts.weights.parameters():
            if p.grad is None:
                continue
            sq = p.grad.double().pow(2)
            if d.placement.replicated:
                total = total + (sq.reshape(p.shape[0], -1).sum(1) * d.copy_weight().to(total.device)).sum()
            else:
                total = total + sq.sum()
    return total


def _sum_grads(params: list[nn.Parameter], group) -> None:
    """Sum the grads of `params` over `group` with one bucketed all-reduce (a missing grad counts as 0)."""
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)  # SUM: gloo has no AVG
    for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def all_reduce_sum(t: Tensor, group=None) -> Tensor:
    """A summed copy of `t` over `group` (the input is left as it is)."""
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def enable_global_balance(model: nn.Module, group=None) -> None:
    """Global-batch LBL across ranks: every balance='global' layer sums its counts over `group` too (a no-op
    without an initialised process group of more than one rank)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
        return
    for m in moe_layers(model):
        if "global" in m.state:
            m.state["global"].reduce = partial(all_reduce_sum, group=group)


def step_routers_global(model: nn.Module, group=None) -> None:
    """Router-state step (loss-free bias, ReMoE coefficient) on observations summed over ranks, so every rank
    applies the same update and keeps the same state."""
    step_routers(model, reduce=partial(all_reduce_sum, group=group))
