"""Fused per-expert MLPs on a pool of worker threads: each expert's row gather, up GEMM, activation, down GEMM
and weighted combine run back to back on one worker while its rows are in cache; the experts are spread over
as many workers as the caller has intra-op threads, each worker on one intra-op thread. No padding, no tail,
no R x D buffer of dispatched rows, and one join per call instead of one OpenMP barrier per GEMM (the barrier
is what makes 64 small two-thread GEMMs slow when the cores are shared). Forward and backward are one
autograd Function. `routed_fused` equals dispatch.permute -> experts_loop -> dispatch.unpermute,
`experts_fused` (on dispatched rows, e.g. after an all-to-all) equals `experts_loop`.

Deterministic: experts go to workers by a fixed rule on their counts (largest first to the least loaded),
each worker adds its experts' outputs into its own (T, D) buffer in a fixed order, and the buffers are summed
in worker order; the result depends on the counts and the thread count, never on timing.

R=dispatched rows (sorted by expert), D=d_model, F=expert hidden, G=fused gate|up width, E=experts.
"""
from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple

import torch
from torch import Tensor

from moelab.expert_kernels import ExpertTensors


@functools.cache
def _pool(n_workers: int, pid: int) -> ThreadPoolExecutor:
    """n worker threads with one intra-op thread each, started now (one pool per process: `pid` keys it, so
    a forked child builds its own). torch.set_num_threads in a worker is that thread's OpenMP/MKL count but
    also torch's default for threads made later, so the caller's count is set again once all have started.
    A worker that ran on two threads would start its own OpenMP team: more OpenMP threads than cores make
    every team's threads sleep between parallel regions, which slows all small parallel ops in the process."""
    caller = torch.get_num_threads()
    started = threading.Barrier(n_workers + 1)

    def init() -> None:
        torch.get_num_threads()  # torch's once-per-thread setup first, or its first op resets the count
        torch.set_num_threads(1)
        started.wait()

    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="moelab-experts", initializer=init)
    for _ in range(n_workers):  # one submit per worker: no worker is idle before all have started
        pool.submit(int)
    started.wait()
    torch.set_num_threads(caller)
    return pool


def run_on_workers(groups: list[list[int]], work: Callable[[int, int], None]) -> None:
    """work(i, w) for every item i of groups[w], worker w taking its group in order, each worker a thread on
    one intra-op thread under the caller's grad and inference mode (one group: run here). Returns when all
    are done; re-raises the first error."""
    if len(groups) == 1:
        for i in groups[0]:
            work(i, 0)
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def worker(w: int) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for i in groups[w]:
                work(i, w)

    pool = _pool(len(groups), os.getpid())
    futures = [pool.submit(worker, w) for w in range(len(groups))]
    wait(futures)  # all done before any error is raised: no worker still writes when the caller unwinds
    for f in futures:
        f.result()


def assign(sizes: list[int], n_workers: int) -> list[list[int]]:
    """Items to workers, largest first to the least loaded (LPT; ties to the lower worker): a fixed rule, so
    the same sizes always give the same groups. Never more groups than items, at least one."""
    groups: list[list[int]] = [[] for _ in range(max(1, min(n_workers, len(sizes))))]
    load = [0] * len(groups)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        w = load.index(min(load))
        groups[w].append(i)
        load[w] += sizes[i]
    return groups


class Gather(NamedTuple):
    """The local dispatch plan the fused kernel works from instead of dispatched rows (dispatch.sort_plan,
    compact): it gathers each expert's rows from x_TD itself and combines them back weighted."""
    token_R: Tensor   # source token of each row, rows sorted by expert
    row_TK: Tensor    # row of each (token, slot), -1 = dropped
    weight_R: Tensor  # combine weight of each row (detached)


def _spans(counts_E: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert with rows."""
    ends = list(itertools.accumulate(counts_E))
    return [(e, end - n, end) for e, (n, end) in enumerate(zip(counts_E, ends)) if n]


def _sum(parts: list[Tensor]) -> Tensor:
    out = parts[0]
    for p in parts[1:]:
        out += p
    return out


class _FusedExperts(torch.autograd.Function):
    """Each row's expert e: y = act(x @ w_up[e] + b_up[e]) @ w_down[e] + b_down[e], per expert on the workers.
    On rows (x_in = x_RD) it returns y_RD. With a Gather plan its input x_in is x_TD and its output the
    combined y_TD = sum_k weight_TK * y[row_TK]: each worker gathers its expert's rows of x_TD (in backward,
    of the output gradient) and adds the weighted outputs into its own (T, D) buffer. Keeps each expert's h (and
    y, for the routing-weight gradient) as its own small tensor; backward recomputes the activation per
    expert and writes every weight gradient into its expert's slice of one buffer (no rows: zeros)."""

    @staticmethod
    def forward(ctx, x_in, weight_TK, w_up, w_down, b_up, b_down, act, counts: list[int], n_workers: int,
                gather: Gather | None, keep: bool):
        spans = _spans(counts)
        groups = assign([hi - lo for _, lo, hi in spans], n_workers)
        D_out = w_down.shape[2]
        h_N: list[Tensor | None] = [None] * len(spans)
        y_N: list[Tensor | None] = [None] * len(spans)
        out = x_in.new_empty(sum(counts), D_out) if gather is None else None
        acc = [x_in.new_zeros(x_in.shape[0], D_out) for _ in groups] if gather is not None else []
        scale_a = gather is not None and not keep and b_down is None  # inference: nothing kept for backward

        def work(i: int, w: int) -> None:
            e, lo, hi = spans[i]
            x_ND = x_in[lo:hi] if gather is None else x_in.index_select(0, gather.token_R[lo:hi])
            h_NG = x_ND @ w_up[e]
            if b_up is not None:
                h_NG += b_up[e]
            a_NF = act(h_NG)
            if scale_a:  # weight * (a @ W) = (weight * a) @ W: F wide instead of D, in place, no y kept
                a_NF.mul_(gather.weight_R[lo:hi, None].to(a_NF.dtype))
                acc[w].index_add_(0, gather.token_R[lo:hi], a_NF @ w_down[e])
                return
            y_ND = torch.mm(a_NF, w_down[e], out=out[lo:hi] if gather is None else None)
            if b_down is not None:
                y_ND += b_down[e]
            if gather is not None:
                acc[w].index_add_(0, gather.token_R[lo:hi], y_ND * gather.weight_R[lo:hi, None].to(y_ND.dtype))
            if keep:
                h_N[i], y_N[i] = h_NG, (y_ND if gather is not None else None)

        run_on_workers(groups, work)
        ctx.save_for_backward(x_in, w_up, w_down)
        ctx.h_N, ctx.y_N, ctx.groups = h_N, y_N, groups
        ctx.act, ctx.spans, ctx.E, ctx.gather = act, spans, len(counts), gather
        ctx.has_bias = (b_up is not None, b_down is not None)
        ctx.weight_dtype = None if weight_TK is None else weight_TK.dtype
        return out if gather is None else _sum(acc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out: Tensor):
        x_in, w_up, w_down = ctx.saved_tensors
        gather, spans, act, groups = ctx.gather, ctx.spans, ctx.act, ctx.groups
        g_out = g_out.contiguous()
        need_x, need_wt, need_wu, need_wd, need_bu, need_bd = ctx.needs_input_grad[:6]
        R = spans[-1][2] if spans else 0
        g_x = g_xs = None
        if need_x and gather is None:
            g_x = x_in.new_empty(x_in.shape)
        elif need_x:
            g_xs = [x_in.new_zeros(x_in.shape) for _ in groups]
        g_wu = w_up.new_empty(w_up.shape) if need_wu else None
        g_wd = w_down.new_empty(w_down.shape) if need_wd else None
        g_bu = w_up.new_zeros(ctx.E, w_up.shape[2]) if need_bu and ctx.has_bias[0] else None
        g_bd = w_down.new_zeros(ctx.E, w_down.shape[2]) if need_bd and ctx.has_bias[1] else None
        g_wR = g_out.new_zeros(R) if need_wt and gather is not None else None

        def work(i: int, w: int) -> None:
            e, lo, hi = spans[i]
            if gather is None:
                g_ND = g_out[lo:hi]
            else:  # output gradient of these rows: their tokens' gradient times their weight
                g_ND = g_out.index_select(0, gather.token_R[lo:hi])
                if g_wR is not None:
                    torch.linalg.vecdot(g_ND, ctx.y_N[i], out=g_wR[lo:hi])
                g_ND.mul_(gather.weight_R[lo:hi].to(g_ND.dtype).unsqueeze(1))
            with torch.enable_grad():
                h_NG = ctx.h_N[i].detach().requires_grad_()
                a_NF = act(h_NG)
            if g_wd is not None:
                torch.mm(a_NF.detach().t(), g_ND, out=g_wd[e])
            (g_NG,) = torch.autograd.grad(a_NF, h_NG, g_ND @ w_down[e].t())
            if g_wu is not None:
                x_ND = x_in[lo:hi] if gather is None else x_in.index_select(0, gather.token_R[lo:hi])
                torch.mm(x_ND.t(), g_NG, out=g_wu[e])
            if g_x is not None:
                torch.mm(g_NG, w_up[e].t(), out=g_x[lo:hi])
            elif g_xs is not None:
                g_xs[w].index_add_(0, gather.token_R[lo:hi], g_NG @ w_up[e].t())
            if g_bu is not None:
                torch.sum(g_NG, 0, out=g_bu[e])
            if g_bd is not None:
                torch.sum(g_ND, 0, out=g_bd[e])

        run_on_workers(groups, work)
        ctx.h_N = ctx.y_N = None
        empty = sorted(set(range(ctx.E)) - {s[0] for s in spans})
        for g in (g_wu, g_wd):
            if g is not None and empty:
                g[empty] = 0.0
        g_wt = None
        if g_wR is not None:  # slot (t, k) gets its row's gradient; dropped slots 0
            row_TK = gather.row_TK
            g_wt = g_wR.index_select(0, row_TK.clamp_min(0).flatten()).view(row_TK.shape) if R else \
                g_wR.new_zeros(row_TK.shape)
            g_wt = g_wt.masked_fill_(row_TK < 0, 0.0).to(ctx.weight_dtype)
        return (g_x if g_xs is None else _sum(g_xs)), g_wt, g_wu, g_wd, g_bu, g_bd, None, None, None, None, None


@torch.compiler.disable  # threads and Python per expert: under torch.compile one eager call
def experts_fused(x_RD: Tensor, counts_E: Tensor, weights, n_workers: int | None = None) -> Tensor:
    """Each expert's MLP on its rows (sorted by expert, compact), per expert on `n_workers` threads (default:
    the caller's intra-op thread count), each worker on one intra-op thread; equals `experts_loop`."""
    return _apply(x_RD, None, counts_E, weights, n_workers, None)


def routed_fused(x_TD: Tensor, weight_TK: Tensor, counts_E: Tensor, weights, gather: Gather,
                 n_workers: int | None = None) -> Tensor:
    """Dispatch + experts + combine in one: y_TD = sum_k weight_TK * expert(x_TD) over each token's kept
    slots, the experts fused per expert on the workers (each gathering its own rows); equals
    dispatch.permute -> experts_loop -> dispatch.unpermute."""
    return _apply(x_TD, weight_TK, counts_E, weights, n_workers, gather)


def _apply(x_in, weight_TK, counts_E, weights, n_workers, gather):
    w: ExpertTensors = weights.stacked()
    n = torch.get_num_threads() if n_workers is None else n_workers
    inputs = (x_in.contiguous(), weight_TK, w.w_up, w.w_down, w.b_up, w.b_down)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return _FusedExperts.apply(*inputs, weights.act, counts_E.tolist(), n, gather, keep)
