"""EP with replicated placements and the online rebalancer, on real gloo processes.

Every rank builds the same full layer (same seed) and the same global batch; rank r feeds its slice to the EP
layer; references: the single-process layer on the whole batch, the default (contiguous) EP layer, the
placement simulator's rows (placement_metrics), and the same EP training run without moves.
"""
import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist import run_distributed, text_domains, train_side_by_side

from moelab.config import MoEConfig
from moelab.moe import MoELayer
from moelab.parallel import (
    enable_global_balance,
    expert_grad_sq,
    shard_moe_layer,
    sync_grads,
)
from moelab.placement import Devices, Placement
from moelab.placement_metrics import home_ranks, replica_device, score

TOL = {"atol": 1e-5, "rtol": 1e-5}
E = 8


def _cfg(**kw) -> MoEConfig:
    base = {"d_model": 16, "d_expert": 8, "n_experts": E, "top_k": 2, "n_shared": 1, "balance": "global",
            "z_loss_coef": 1e-2, "aux_loss_coef": 1e-1}
    return MoEConfig(**{**base, **kw})


# replicated placements: (world, phy2log)
PLACEMENTS = {
    2: [[0, 1, 2, 3, 7, 4, 5, 6, 7, 0],       # experts 0 and 7 on both ranks
        [0, 0, 1, 2, 3, 4, 5, 6, 7, -1]],     # two copies of expert 0 on rank 0, an empty slot on rank 1
    4: [[0, 1, 2, 3, 4, 0, 5, 6, 0, 7, 1, -1]],  # expert 0 on ranks 0-2 (rank 3 spreads), expert 1 on 0 and 3
}


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t.contiguous())
    return every


def _copies_equal(p: torch.Tensor, local_experts) -> None:
    """Every copy of an expert, on any rank, holds bitwise the same tensor."""
    world = dist.get_world_size()
    ids = torch.tensor(list(local_experts) + [-1] * (8 - len(local_experts)))
    all_ids = _gather(ids)
    pad = torch.zeros((8,) + tuple(p.shape[1:]))
    pad[:p.shape[0]] = p.detach()
    all_p = _gather(pad)
    first = {}
    for r in range(world):
        for j, e in enumerate(all_ids[r].tolist()):
            if e >= 0:
                assert torch.equal(all_p[r][j], first.setdefault(e, all_p[r][j])), f"copies of expert {e} differ"


def _check_replicated_layer(rank, world, phy2log, T=6):
    """Forward/backward of a replicated EP layer vs the single-process layer and the default EP layer (1e-5),
    and the rows it sends vs the placement simulator's prediction (exact)."""
    cfg = _cfg()
    placement = Placement.from_phy2log(phy2log, n_experts=E, world_size=world)
    torch.manual_seed(0)
    ref = MoELayer(cfg)
    ep = shard_moe_layer(copy.deepcopy(ref), placement)
    enable_global_balance(ep)
    default = shard_moe_layer(copy.deepcopy(ref), None)
    enable_global_balance(default)
    g = torch.Generator().manual_seed(1)
    x_TD, w_TD = torch.randn(world * T, cfg.d_model, generator=g), torch.randn(world * T, cfg.d_model, generator=g)
    sl = slice(rank * T, (rank + 1) * T)
    xr = x_TD.clone().requires_grad_(True)
    out_ref = ref(xr)
    ((out_ref.y * w_TD).sum(-1).mean() + out_ref.aux_loss).backward()
    xe = x_TD[sl].clone().requires_grad_(True)
    out = ep(xe)
    ((out.y * w_TD[sl]).sum(-1).mean() + out.aux_loss).backward()
    sync_grads(ep)
    torch.testing.assert_close(out.y, out_ref.y[sl], **TOL)
    torch.testing.assert_close(out.y, default(x_TD[sl]).y, **TOL)
    torch.testing.assert_close(xe.grad / world, xr.grad[sl], **TOL)
    ids = list(ep.experts.dispatcher.local_experts)
    assert ids == list(placement.experts_of(rank))
    for name in ("w_up_EDG", "w_down_EFD"):  # every copy holds the single expert's gradient
        torch.testing.assert_close(_grad(getattr(ep.experts.weights, name)),
                                   getattr(ref.experts.weights, name).grad[ids], **TOL)
        _copies_equal(_grad(getattr(ep.experts.weights, name)), ids)
    torch.testing.assert_close(ep.gate.weight.grad, ref.gate.weight.grad, **TOL)
    # the clipping norm counts each replicated expert once: summed over ranks it is the reference's expert norm
    sq = expert_grad_sq(ep).reshape(1)
    dist.all_reduce(sq)
    want = sum(float(p.grad.double().pow(2).sum()) for p in ref.experts.weights.parameters())
    assert abs(float(sq) - want) < 1e-6 * want, (float(sq), want)
    # rows on the wire vs the simulator: home ranks from sequence ids (one sequence of T tokens per rank)
    idx_NK = torch.cat(_gather(out.routing.expert_idx_TK)).numpy()
    home_N, local_N = home_ranks(np.repeat(np.arange(world), T), world)
    dev_NK = replica_device(placement, idx_NK, home_N, local_N)
    home_NK = np.broadcast_to(home_N[:, None], dev_NK.shape)
    rows_out = int(((home_NK == rank) & (dev_NK >= 0) & (dev_NK != rank)).sum())
    rows_in = int(((home_NK != rank) & (dev_NK == rank)).sum())
    comm = ep.experts.dispatcher.last_comm
    assert (comm.tokens_sent, comm.tokens_recv) == (rows_out, rows_in)
    n_slots, n_local = sum(placement.n_local()), len(ids)
    assert comm.bytes_sent == 8 * (n_slots - n_local) + (rows_out + rows_in) * cfg.d_model * 4
    sc = score([placement], idx_NK[None], np.repeat(np.arange(world), T), Devices(world, placement.slots),
               row_bytes=cfg.d_model * 4)
    sent_all = torch.tensor([float(comm.tokens_sent)])
    dist.all_reduce(sent_all)
    assert float(sent_all) == sc.off_home_L[0]
    # the rule really keeps rows home: a rank holding a copy never sends that expert's rows away
    held = set(ids)
    mine = dev_NK[home_N == rank]
    assert all(d == rank for d, e in zip(mine.reshape(-1), idx_NK[home_N == rank].reshape(-1)) if e in held)
    return int(((idx_NK >= 0) & np.isin(idx_NK, [e for e in range(E) if placement.logcnt[e] > 1])).sum())


def _train_replicated(rank, world, phy2log, n_steps=3, T=8):
    """AdamW steps of a replicated EP layer vs one process on the whole batch: weights equal (1e-5), copies equal."""
    cfg = _cfg(balance="loss_free", bias_update_rate=1e-2)
    placement = Placement.from_phy2log(phy2log, n_experts=E, world_size=world)
    torch.manual_seed(3)
    ref = MoELayer(cfg)
    ep = shard_moe_layer(copy.deepcopy(ref), placement)
    train_side_by_side(ref, ep, rank=rank, world=world, T=T, n_steps=n_steps, d_model=cfg.d_model)
    ids = list(ep.experts.dispatcher.local_experts)
    for (n, p_ep), (_, p_ref) in zip(ep.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p_ep, p_ref[ids] if n.startswith("experts.") else p_ref, **TOL, msg=n)
        if n.startswith("experts."):
            _copies_equal(p_ep, ids)


def _check_move(rank, world, old_phy2log, new_phy2log):
    """move_experts: every new slot holds its expert's weights and Adam moments (from the full layer), the
    output is unchanged, and the rows sent equal the simulator's migration count."""
    from moelab.placement_metrics import migration_bytes
    from moelab.rebalance import move_experts
    old = Placement.from_phy2log(old_phy2log, n_experts=E, world_size=world)
    new = Placement.from_phy2log(new_phy2log, n_experts=E, world_size=world)
    torch.manual_seed(0)
    ref = MoELayer(_cfg())
    ep = shard_moe_layer(copy.deepcopy(ref), old)
    opt = torch.optim.AdamW(ep.parameters())
    for p in ep.experts.weights.parameters():  # moments that name their expert: 2 x / 3 x its weights
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": 2 * p.data, "exp_avg_sq": 3 * p.data}
    x_TD = torch.randn(6, 16, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        y0 = ep(x_TD).y
    sent = move_experts(ep, new, opt)
    ids = list(new.experts_of(rank))
    assert list(ep.experts.dispatcher.local_experts) == ids and ep.experts.phy2log_P.tolist() == list(new_phy2log)
    for name in ("w_up_EDG", "w_down_EFD"):
        p, full = getattr(ep.experts.weights, name), getattr(ref.experts.weights, name).detach()
        assert torch.equal(p.data, full[ids])
        assert torch.equal(opt.state[p]["exp_avg"], 2 * full[ids]) and torch.equal(opt.state[p]["exp_avg_sq"], 3 * full[ids])
        assert float(opt.state[p]["step"]) == 3.0
    with torch.no_grad():
        torch.testing.assert_close(ep(x_TD).y, y0, **TOL)
    per_slot = sum(3 * p[0].numel() * 4 for p in ep.experts.weights.parameters())  # weights + 2 moments, fp32
    total = torch.tensor([float(sent)])
    dist.all_reduce(total)
    assert float(total) == migration_bytes([old], [new], per_slot)[0] > 0


def _layer_worker(rank, world, train: bool):
    rows = [_check_replicated_layer(rank, world, p) for p in PLACEMENTS[world]]
    if train:
        _train_replicated(rank, world, PLACEMENTS[world][0])
    else:  # 4 ranks: uneven slot counts before and after, an empty slot, replicas dropped and made
        _check_move(rank, world, PLACEMENTS[world][0], [7, 6, 5, 4, 3, 2, 1, 0, -1, 0, 1, 2])
    return rows


@pytest.mark.parametrize("world", [2, 4])
def test_replicated_ep_layer_matches_single_process_and_simulator(world):
    """Replicated placements on 2 and 4 gloo ranks: outputs and gradients equal the single-process layer and the
    default EP layer (1e-5), each copy of an expert gets the full expert gradient, rows and bytes sent equal
    the placement simulator's home-rank prediction exactly; 2 ranks also train 3 AdamW steps, 4 ranks move
    experts with their optimizer state to another map."""
    res = run_distributed(_layer_worker, world, args=(world == 2,), timeout_s=120)
    assert all(r > 0 for r in res[0])  # replicated experts did get rows


# ---------------------------------------------------------------------------- online rebalancer
def _tiny_lm():
    from moelab.config import ModelConfig
    moe = MoEConfig(d_model=32, d_expert=32, n_experts=4, top_k=2, balance="global", aux_loss_coef=1e-1)
    return ModelConfig(moe=moe, d_model=32, n_layers=2, n_heads=2, d_dense=64, max_seq_len=32)


def _rebalance_worker(rank, world, model_cfg, cfg, out, placements):
    from moelab.checkpoint import list_checkpoints
    from moelab.ep_train import EPTrainer, merge_ep_run
    from moelab.rebalance import RebalanceConfig
    res = {}
    rb = RebalanceConfig(every=2, window=2)
    for name, conf in (("static", None), ("moving", rb)):
        t = EPTrainer(model_cfg, cfg, f"{out}/{name}", placement=placements, rebalance=conf)
        recs = []
        for step in range(cfg.steps):
            recs.append(t.train_step())
            if step + 1 in (4, cfg.steps):
                t.save_checkpoint()
        res[name] = [r["loss"] for r in recs]
        res[f"{name}_moves"] = [r["rebalance"] for r in recs if "rebalance" in r]
        for m in t.model.modules():
            if isinstance(m, MoELayer):
                _copies_equal(m.experts.weights.w_up_EDG, m.experts.dispatcher.local_experts)
        dist.barrier()
        if rank == 0:
            merge_ep_run(f"{out}/{name}")
    # resume the moving run from its step-4 checkpoint (saved after the step-2 move) into a fresh trainer
    t = EPTrainer(model_cfg, cfg, f"{out}/resumed", placement=placements, rebalance=rb)
    t.load_checkpoint(list_checkpoints(f"{out}/moving/rank{rank}")[0])
    res["resumed"] = [t.train_step()["loss"] for _ in range(t.step, cfg.steps)]
    return res


def test_rebalancer_moves_experts_and_training_continues_exactly(tmp_path):
    """6 steps of EP=2 on the tiny LM with a replicated starting placement, re-fit (EPLB) every 2 steps on a
    2-step window: experts and Adam state move (balancedness logged, never worse), copies stay equal, and the
    losses equal the same run without moves (1e-5) -- with clipping active, so the global grad norm must count
    each replicated expert once. A checkpoint written after moves resumes into a fresh trainer (laid out as
    saved) with the same losses, and both runs merge into the same full model."""
    from moelab.checkpoint import load_model
    from moelab.config import TrainConfig
    data = text_domains(tmp_path)
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=32, lr=1e-2, warmup=2, grad_clip=0.3,
                      data=(str(data / "code"), str(data / "prose")))
    start = [Placement.from_phy2log([0, 1, 3, 2, 3, 0], n_experts=4, world_size=2),
             Placement.from_phy2log([0, 1, 2, 2, 3, 1], n_experts=4, world_size=2)]
    res = run_distributed(_rebalance_worker, 2, args=(_tiny_lm(), cfg, str(tmp_path / "ep"), start), timeout_s=150)
    for r in res:
        assert max(abs(a - b) for a, b in zip(r["static"], r["moving"])) < 1e-5, (r["static"], r["moving"])
        assert max(abs(a - b) for a, b in zip(r["moving"][4:], r["resumed"])) < 1e-5, (r["moving"], r["resumed"])
        assert r["static_moves"] == []
        assert [m["step"] for m in r["moving_moves"]] == [2, 4, 6]
    moves = res[0]["moving_moves"]  # the step-2 re-fit moves experts before the step-4 checkpoint is written
    assert any(moves[0]["moved"]) and moves[0]["moved_bytes"] > 0
    for m in moves:
        assert all(a >= b for a, b in zip(m["balancedness_after"], m["balancedness_before"]))
    assert res[0]["moving_moves"] == res[1]["moving_moves"]  # every rank made the same decisions
    static, _ = load_model(tmp_path / "ep" / "static")
    moving, _ = load_model(tmp_path / "ep" / "moving")
    want = static.state_dict()
    for k, v in moving.state_dict().items():
        if not k.endswith("load_E"):
            torch.testing.assert_close(v, want[k], **TOL, msg=k)


def test_cli_placement_and_rebalance_flags_are_checked_before_spawning(tmp_path, monkeypatch, capsys):
    """Wrong files and flag combinations fail with one clear line, before any process starts."""
    from moelab.cli import main
    from moelab.ep_train import launch
    from moelab.placement import PlacementFile
    from moelab.rebalance import RebalanceConfig, ep_options
    from moelab.resolver import resolve
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run = resolve("tiny")
    E, L = run.model.moe.n_experts, len(run.model.moe_layer_ids)
    good = PlacementFile(tuple([Placement.contiguous(E, 2)] * L), Devices(2, E // 2), "contiguous").save(tmp_path / "p.json")
    opts = ep_options(str(good), 4, None, run.model)
    assert [p.world_size for p in opts["placement"]] == [2] * L and opts["rebalance"] == RebalanceConfig(4, 0)
    short = PlacementFile((Placement.contiguous(E, 2),) * (L + 1), Devices(2, E // 2), "contiguous").save(tmp_path / "s.json")
    with pytest.raises(ValueError, match=f"one per MoE layer of the model \\({L}\\)"):
        ep_options(str(short), None, None, run.model)
    other = PlacementFile((Placement.contiguous(E + 2, 2),) * L, Devices(2, E // 2 + 1), "contiguous").save(tmp_path / "o.json")
    with pytest.raises(ValueError, match=f"model's n_experts={E}"):
        ep_options(str(other), None, None, run.model)
    with pytest.raises(ValueError, match="--rebalance-window=3 needs --rebalance-every"):
        ep_options(None, None, 3, run.model)
    with pytest.raises(ValueError, match="--rebalance-every=0 is invalid"):
        ep_options(None, 0, None, run.model)
    from moelab.rebalance import Rebalancer
    assert Rebalancer(every=3, window=5).cfg == RebalanceConfig(3, 5, "eplb")
    with pytest.raises(ValueError, match="method='ilp' is invalid"):
        Rebalancer(every=3, method="ilp")
    with pytest.raises(ValueError, match="fitted for --ep=4"):
        launch(run, out=str(tmp_path / "r"), resume=False, nproc=4, ep=4, threads=None, placement=opts["placement"])
    assert main(["train", "--placement", str(good), "--out", str(tmp_path / "r")]) == 2
    assert "need expert parallelism: add --ep P" in capsys.readouterr().err
