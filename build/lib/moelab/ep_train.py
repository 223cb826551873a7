"""EP x DP training of the LM: `moelab train --nproc N --ep P` (spawned gloo ranks or torchrun).

`EPTrainer` is the Trainer with the distributed hooks filled in (parallel.py): experts sharded over blocks
of P ranks, everything else data parallel over N, each rank a slice of one global batch, global-batch
balance, router state stepped on counts summed over ranks, global grad-norm clipping; rank 0 merges the
shards into one checkpoint so eval / generate / trace work on the run folder.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from safetensors.torch import save_file
from torch import Tensor, nn

from moelab.checkpoint import file_sha256, list_checkpoints, read_state, read_tensors, verify
from moelab.config import ModelConfig, TrainConfig
from moelab.moe import MoELayer
from moelab.parallel import (
    all_reduce_sum,
    comm_record,
    current_world,
    enable_global_balance,
    expert_grad_sq,
    expert_parameters,
    init_distributed,
    is_sharded,
    shard_model,
    step_routers_global,
    sync_grads,
)
from moelab.rebalance import RebalanceConfig, Rebalancer
from moelab.train import Interrupted, RunFailed, Trainer, check_out, corpus_for, run_kind, val_table


class RankSlice:
    """Data-parallel view of a Corpus: every rank draws the same global batch of W*B sequences (same
    generator) and keeps its own B, so W ranks see exactly what one process with batch W*B sees."""

    def __init__(self, corpus, rank: int, world_size: int):
        self.corpus, self.rank, self.world_size = corpus, rank, world_size

    def sample(self, batch_size: int, seq_len: int, gen: torch.Generator):
        b = self.corpus.sample(batch_size * self.world_size, seq_len, gen)
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return type(b)(*(t[rows] for t in b))

    def __getattr__(self, name: str):  # domains, val_batches, unigram_loss, ...: the full corpus
        return getattr(self.corpus, name)


def global_grad_norm(model: nn.Module, params: list[Tensor], group=None) -> Tensor:
    """L2 norm of all gradients of the whole (sharded) model: replicated grads once, expert grads summed
    over the EP `group` (one full set of experts); identical on every rank, so clipping keeps replicas equal."""
    experts = {id(p) for p in expert_parameters(model)}
    zero = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    rep = sum((p.grad.double().pow(2).sum() for p in params if id(p) not in experts), zero)
    exp = expert_grad_sq(model).reshape(1)  # each replicated expert's copies counted once
    dist.all_reduce(exp, group=group)
    return (rep + exp[0]).sqrt().float()


def ep_groups(ep: int, timeout_s: float = 120.0):
    """(ep_group, replica_group) for EP x DP with expert replicas: blocks of `ep` consecutive ranks each hold
    all experts; ranks at the same position in their blocks hold the same shard. (None, None) when ep equals
    the world size. Collective: every rank must call it, in the same order."""
    rank, world = current_world(None)
    if not isinstance(ep, int) or ep < 1 or world % ep:
        raise ValueError(f"ep={ep!r} is invalid: allowed a divisor of the world size {world}")
    if ep == world:
        return None, None
    timeout = datetime.timedelta(seconds=timeout_s)
    blocks = [dist.new_group(list(range(g * ep, (g + 1) * ep)), timeout=timeout) for g in range(world // ep)]
    copies = [dist.new_group(list(range(i, world, ep)), timeout=timeout) for i in range(ep)]
    return blocks[rank // ep], copies[rank % ep]


class EPTrainer(Trainer):
    """A Trainer for EP x DP on this rank. Experts are sharded over blocks of `ep` ranks (default: all W ranks;
    with ep < W each shard has W/ep copies), the rest is replicated with averaged grads (DP); data = this rank's
    slice of a global batch of W * cfg.batch_size; global-batch LBL counts and router-state observations are
    summed over all ranks; clipping uses the global norm. Rank r writes out/rank{r}."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, out, *, ep: int | None = None, placement=None,
                 timeout_s: float = 120.0, rebalance: RebalanceConfig | None = None):
        rank, world = current_world(None)
        self.ep_group, self.replica_group = ep_groups(ep or world, timeout_s)
        corpus = RankSlice(corpus_for(model_cfg, cfg, out), rank, world)
        super().__init__(model_cfg, cfg, Path(out) / f"rank{rank}", corpus=corpus, verbose=rank == 0)
        shard_model(self.model, placement, self.ep_group)  # same seed on every rank: replicas start equal
        enable_global_balance(self.model)
        if rank == 0:
            write_ep_meta(self.model, out, ep or world)
        self.rebalancer = Rebalancer(rebalance) if rebalance is not None else None  # online placement

    def sync_grads(self) -> None:
        sync_grads(self.model, replica_group=self.replica_group)

    def grad_norm(self, params: list[Tensor]) -> Tensor:
        return global_grad_norm(self.model, params, group=self.ep_group)

    def reduce_metrics(self, flat: Tensor) -> Tensor:
        return all_reduce_sum(flat)

    def step_routers(self) -> None:
        step_routers_global(self.model)

    def agree_stop(self, signum: int) -> int:
        flag = torch.tensor([signum], dtype=torch.long)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank stopped by a signal stops them all, same step
        return int(flag[0])

    def resume_command(self) -> str:
        return f"moelab train --nproc {dist.get_world_size()} --resume --out {self.out.parent}"

    def resume_point(self, ckpts: list[Path]) -> Path | None:
        """The latest step every rank holds a checkpoint of (a rank killed mid-save has an older one); newer
        checkpoints of this rank are removed so the run re-saves them."""
        steps = [None] * dist.get_world_size()
        dist.all_gather_object(steps, sorted(int(p.name[5:]) for p in ckpts))
        common = set.intersection(*(set(s) for s in steps))
        if not common:
            if any(steps):
                raise ValueError(f"the ranks of {self.out.parent} hold no checkpoint of a common step "
                                 f"({steps}): start a new --out")
            return None
        step = max(common)
        for p in ckpts:
            if int(p.name[5:]) > step:
                shutil.rmtree(p)
        return next(p for p in ckpts if int(p.name[5:]) == step)

    def train_step(self) -> dict:
        """The trainer's record + all-to-all traffic per rank per layer."""
        rec = {**super().train_step(), "a2a": comm_record(self.model)}
        moved = self.rebalancer.after_step(self.model, self.opt, self.step) if self.rebalancer else None
        if moved is not None:  # online rebalancer: balancedness before/after, bytes moved
            rec["rebalance"] = moved
            self.console.print(f"step {self.step:5d}  rebalance: balancedness {moved['balancedness_before']} -> "
                               f"{moved['balancedness_after']}, moved {moved['moved_bytes'] / 2**20:.2f} MiB")
        return rec


def write_ep_meta(model: nn.Module, out, ep: int) -> None:
    """out/ep.json: EP size and each sharded layer's placement (what merge_ep_run needs)."""
    placement = {name: list(m.experts.dispatcher.placement.rank_E) for name, m in model.named_modules()
                 if isinstance(m, MoELayer) and is_sharded(m)}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "ep.json").write_text(json.dumps({"ep_size": ep, "placement": placement}, indent=1))


def merge_ep_run(out) -> Path:
    """Merge the ranks' latest checkpoints (out/rank{r}/ckpt/step_N) into one full checkpoint out/ckpt/step_N
    and copy rank 0's metrics/summary/config to out, so eval / generate / plot / trace work on `out`."""
    out = Path(out)
    meta = json.loads((out / "ep.json").read_text())
    shards = [(list_checkpoints(out / f"rank{r}") or [None])[-1] for r in range(meta["ep_size"])]
    if any(s is None for s in shards) or len({s.name for s in shards}) != 1:
        raise ValueError(f"ranks of {out} have no common latest checkpoint: {shards}")
    for s in shards:
        verify(s, read_state(s), ("model.safetensors",))
    tensors = [read_tensors(s / "model.safetensors") for s in shards]
    full = {k: v for k, v in tensors[0].items() if not k.endswith(".phy2log_P")}  # EP-only buffer
    for layer, rank_E in meta["placement"].items():
        for w in ("w_up_EDG", "w_down_EFD"):
            key = f"{layer}.experts.weights.{w}"
            merged = tensors[0][key].new_empty((len(rank_E),) + tuple(tensors[0][key].shape[1:]))
            for r, t in enumerate(tensors):
                p2l = t.get(f"{layer}.experts.phy2log_P")  # rank r's rows = its occupied slots as saved
                S = len(p2l) // len(tensors) if p2l is not None else 0
                merged[[e for e in p2l[r * S:(r + 1) * S].tolist() if e >= 0] if p2l is not None else
                       [e for e, re in enumerate(rank_E) if re == r]] = t[key]
            full[key] = merged
    dst = out / "ckpt" / shards[0].name
    tmp = out / "ckpt" / f".tmp_{shards[0].name}_{os.getpid()}"  # written whole, then renamed (like checkpoints)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(full, str(tmp / "model.safetensors"))
        state = read_state(shards[0])
        state["files"] = {"model.safetensors": file_sha256(tmp / "model.safetensors")}
        (tmp / "state.json").write_text(json.dumps({**state, "merged_from_ep_ranks": meta["ep_size"]}, indent=1))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in ("metrics.jsonl", "summary.json", "config.json"):
        if (out / "rank0" / f).exists():
            shutil.copyfile(out / "rank0" / f, out / f)
    return dst


def _ep_train_rank(rank: int | None, world: int, port: int | None, timeout_s: float, ep: int,
                   run, out: str, resume: bool, threads: int, placement=None, rebalance=None) -> None:
    """One rank of `moelab train --ep`: spawned (rank, port given) or under torchrun (env)."""
    if port is not None:
        init_distributed(backend="gloo", timeout_s=timeout_s, rank=rank, world_size=world,
                         init_method=f"tcp://127.0.0.1:{port}")
    else:
        init_distributed(backend="gloo", timeout_s=timeout_s)
    torch.set_num_threads(threads)
    rank = dist.get_rank()
    try:
        if rank != 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 speaks for all
        try:
            summary = EPTrainer(run.model, run.train, out, ep=ep, timeout_s=timeout_s, placement=placement,
                                rebalance=rebalance).fit(resume=resume)
        except Interrupted as e:
            if rank == 0:
                print(f"moelab train: {e}", file=sys.stderr)
            sys.exit(e.code)  # every rank stopped at the same step (agree_stop), each saved its checkpoint
        dist.barrier()  # every rank has written its final checkpoint
        if rank == 0:
            Console().print(val_table(summary))
            print(f"merged checkpoint: {merge_ep_run(out)}")
    finally:
        dist.destroy_process_group()


def launch(run, *, out: str, resume: bool, nproc: int | None, ep: int | None, threads: int | None,
           timeout_s: float = 300.0, placement=None, rebalance: RebalanceConfig | None = None) -> int:
    """`moelab train --nproc N --ep P ...`: spawn N local gloo processes (or, under torchrun, use its
    RANK/WORLD_SIZE) and train EP x DP: experts sharded over blocks of P ranks (default N), N/P copies of
    each shard, everything else data parallel over the N ranks. `run`: a resolve.RunConfig. `placement`: one
    Placement per MoE layer (placement.PlacementFile.placements) for P devices; `rebalance`: online re-fitting."""
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if torchrun else (nproc or ep or 0)
    if nproc is not None and torchrun and nproc != world:
        raise ValueError(f"--nproc={nproc} is invalid under torchrun: allowed the torchrun world size {world}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"--nproc={nproc} is invalid: allowed an integer >= 1")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads={threads} is invalid: allowed an integer >= 1")
    check_ep_out(out, resume, world)
    ep = world if ep is None else ep
    if not isinstance(ep, int) or ep < 1 or world % ep:
        raise ValueError(f"--ep={ep} is invalid: allowed a divisor of the number of processes ({world})")
    if placement is not None and any(p.world_size != ep for p in placement):
        raise ValueError(f"--placement is for {placement[0].world_size} devices: allowed a file fitted for --ep={ep}")
    args = (ep, run, out, resume, threads or 1, placement, rebalance)  # 1 thread per rank by default
    if torchrun:
        _ep_train_rank(None, world, None, timeout_s, *args)
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_ep_train_rank, args=(world, port, timeout_s, *args), nprocs=world, join=False,
                             start_method="spawn")
    return _join(ctx)


def _join(ctx, grace_s: float = 60.0) -> int:
    """Wait for the ranks. Ctrl-C reaches every rank (same process group) and SIGTERM is forwarded; they finish the
    step, checkpoint and exit 128+signal, which is returned. A rank that fails or dies makes the others fail on
    their next collective (or they are terminated after `grace_s`); its error is raised as one line."""
    import pickle
    import time

    def forward(signum, frame):
        for p in ctx.processes:
            if p.is_alive() and signum == signal.SIGTERM:
                os.kill(p.pid, signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    procs, failed_at = ctx.processes, None
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=0.2)
            if failed_at is None and any(p.exitcode not in (None, 0, 130, 143) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.is_alive():
                        p.terminate()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    codes = [p.exitcode for p in procs]
    for r, c in enumerate(codes):
        if c not in (0, 130, 143):
            err = ctx.error_files[r]
            if c == 1 and os.path.exists(err):
                with open(err, "rb") as f:
                    last = pickle.load(f).strip().splitlines()[-1]
                if last.startswith("ValueError: "):
                    raise ValueError(last[len("ValueError: "):])
                raise RunFailed(f"rank {r} of {len(procs)} failed: {last}")
            first = next(i for i, x in enumerate(codes) if x not in (0, 130, 143))
            raise RunFailed(f"rank {first} of {len(procs)} died (exit status {codes[first]}); the other ranks "
                               f"stopped: resume with the same --nproc and --resume")
    return max(codes)


def check_ep_out(out, resume: bool, world: int) -> None:
    """Before any process starts: --out must not hold a one-process run, nor an EP run unless --resume with the
    same number of ranks."""
    check_out(out)
    kind, out = run_kind(out), Path(out)
    if kind == "single":
        raise ValueError(f"--out {str(out)!r} holds a single-process run: " +
                         ("resume it without --nproc/--ep" if resume else "pass another --out"))
    if kind == "ep" and not resume:
        raise ValueError(f"--out {str(out)!r} already holds checkpoints: pass --resume or another --out")
    ranks = sorted(out.glob("rank*/ckpt"))
    if kind == "ep" and ranks and len(ranks) != world:
        raise ValueError(f"--out {str(out)!r} was trained on {len(ranks)} ranks: resume it with --nproc {len(ranks)}")
