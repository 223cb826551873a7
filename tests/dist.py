"""Run a test function on N real gloo processes (torch.multiprocessing 'spawn', free localhost port).

    results = run_distributed(worker, world_size=2, args=(...,), timeout_s=60)

`worker(rank, world_size, *args)` runs in each process after `init_process_group("gloo")` (with a
collective timeout); its return value (plain Python / numpy / tensors, which are sent as numpy) comes
back in rank order. An exception in any rank fails the caller with that rank's traceback; a run that
does not finish in `timeout_s` kills the processes and raises TimeoutError (never hangs the suite).
"""
from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_plain(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj)
    return obj


def _entry(rank, world_size, port, fn, args, out_q, collective_timeout_s, env):
    os.environ.update(env)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        from moelab.parallel import init_distributed
        init_distributed(backend="gloo", timeout_s=collective_timeout_s, rank=rank, world_size=world_size,
                         init_method=f"tcp://127.0.0.1:{port}")
        try:
            out_q.put((rank, "ok", _to_plain(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        out_q.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int, args: tuple = (), *, timeout_s: float = 90.0,
                    collective_timeout_s: float = 30.0, env: dict[str, str] | None = None) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo processes; return the results by rank."""
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, out_q, collective_timeout_s,
                                              dict(env or {})), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    try:
        while len(results) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise TimeoutError(f"{fn.__name__} on {world_size} gloo ranks did not finish in {timeout_s:.0f} s "
                                   f"(ranks done: {sorted(results)})")
            try:
                rank, status, value = out_q.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in results]
                if dead:
                    raise RuntimeError(f"{fn.__name__}: rank(s) {dead} died with exit codes "
                                       f"{[procs[r].exitcode for r in dead]}") from None
                continue
            if status == "error":
                errors = {rank: value}
                try:  # the first error often makes the others fail too: show every rank's traceback
                    while len(errors) + len(results) < world_size:
                        r2, s2, v2 = out_q.get(timeout=3.0)
                        if s2 == "error":
                            errors[r2] = v2
                except queue.Empty:
                    pass
                report = "\n".join(f"--- rank {r} ---\n{v}" for r, v in sorted(errors.items()))
                raise AssertionError(f"{fn.__name__} failed on rank(s) {sorted(errors)} of {world_size}:\n{report}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world_size)]


def train_side_by_side(ref, ep, *, rank: int, world: int, T: int, n_steps: int, d_model: int) -> None:
    """AdamW steps of a full reference MoE layer on the whole batch and of its expert-parallel copy `ep` on this
    rank's slice (grad sync and router state summed over ranks), on the same random inputs and targets."""
    import torch

    from moelab.parallel import step_routers_global, sync_grads
    opt_ref, opt_ep = torch.optim.AdamW(ref.parameters(), lr=1e-2), torch.optim.AdamW(ep.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(n_steps):
        x_TD, w_TD = torch.randn(world * T, d_model, generator=g), torch.randn(world * T, d_model, generator=g)
        sl = slice(rank * T, (rank + 1) * T)
        for layer, opt, x, w in ((ref, opt_ref, x_TD, w_TD), (ep, opt_ep, x_TD[sl], w_TD[sl])):
            opt.zero_grad()
            out = layer(x)
            ((out.y * w).sum(-1).mean() + out.aux_loss).backward()
            if layer is ep:
                sync_grads(ep)
                opt.step()
                step_routers_global(ep)
            else:
                opt.step()
                layer.step()


def text_domains(tmp_path):
    """Two small text domains (a code file and the README) for a fast corpus in the EP training tests."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for dom, src in (("code", "moelab/dispatch.py"), ("prose", "README.md")):
        (tmp_path / dom).mkdir(exist_ok=True)
        (tmp_path / dom / Path(src).name).write_text((root / src).read_text())
    return tmp_path
