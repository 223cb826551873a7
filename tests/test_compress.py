"""Expert merging / pruning: exact no-op cases, assignment vs brute force, alignment invariance, shapes."""
import itertools

import numpy as np
import pytest
import torch

from moelab.compress import (
    RoutingStats,
    align_expert,
    expert_param_total,
    expert_weights,
    group_experts,
    linear_assignment,
    low_rank_compress,
    merge_experts,
    prune_experts,
    routing_similarity,
    routing_stats,
)
from moelab.config import ModelConfig, MoEConfig
from moelab.data import Batch
from moelab.expert_kernels import ExpertTensors, activate, mlp
from moelab.model import MoELM


def model(top_k=2, E=4, seed=0) -> MoELM:
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=32, d_expert=8, n_experts=E, top_k=top_k)
    return MoELM(ModelConfig(moe=moe, d_model=32, n_layers=2, n_heads=2, d_dense=32, max_seq_len=16)).eval()


def batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, 256, (2, 12), generator=g)
        out.append(Batch(idx, idx, torch.ones(2, 12, dtype=torch.bool), torch.zeros(2, dtype=torch.long)))
    return out


def logits(m, bs):
    return torch.cat([m(b.idx_BS).logits_BSV for b in bs])


def test_linear_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 6):
        c = rng.normal(size=(n, n))
        col = linear_assignment(c)
        best = min(sum(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert sorted(col.tolist()) == list(range(n))
        assert np.isclose(sum(c[i, col[i]] for i in range(n)), best)


def test_alignment_recovers_a_permutation_and_keeps_the_function():
    torch.manual_seed(0)
    w_up, w_down = torch.randn(6, 10), torch.randn(5, 6)  # D=6, F=5, swiglu G=10
    perm = torch.randperm(5)
    p_up, p_down = w_up[:, torch.cat([perm, perm + 5])], w_down[perm]
    x = torch.randn(3, 6)
    def swiglu_mlp(x, up, down):
        return mlp(x, ExpertTensors(up, down), lambda h: activate(h, "swiglu"))
    torch.testing.assert_close(swiglu_mlp(x, p_up, p_down), swiglu_mlp(x, w_up, w_down))
    a_up, a_down = align_expert((w_up, w_down), (p_up, p_down))
    assert torch.equal(a_up, w_up) and torch.equal(a_down, w_down)


def test_routing_similarity_and_grouping_by_hand():
    lg = torch.tensor([[1.0, 2.0, 1.0, -1.0], [0.0, 1.0, 0.0, 2.0], [2.0, 0.0, 2.0, 0.5]])
    sim = routing_similarity(lg)
    assert torch.isclose(sim[0, 2], torch.tensor(1.0))
    groups = group_experts(torch.tensor([5.0, 9.0, 0.0, 3.0]), sim, 2)  # dominant: 1 and 0
    c = lambda i, j: float(torch.nn.functional.cosine_similarity(lg[:, i], lg[:, j], dim=0))
    g3 = 1 if c(3, 1) > c(3, 0) else 0
    assert groups == [[0, 2] + ([3] if g3 == 0 else []), [1] + ([3] if g3 == 1 else [])]


def test_merging_two_identical_experts_changes_nothing():
    m = model(top_k=1)
    with torch.no_grad():
        for blk in m.blocks:
            w_up, w_down = expert_weights(blk.ffn)
            w_up[3], w_down[3] = w_up[2], w_down[2]
            blk.ffn.gate.weight[3] = blk.ffn.gate.weight[2]
    bs = batches()
    st = routing_stats(m, bs)
    stats = {i: RoutingStats(torch.tensor([10.0, 10.0, 10.0, 0.0]), s.logits_NE) for i, s in st.items()}
    new, groups = merge_experts(m, stats, 3)
    assert groups == {0: [[0], [1], [2, 3]], 1: [[0], [1], [2, 3]]}
    assert new.cfg.moe.n_experts == 3 and expert_param_total(new) == expert_param_total(m) * 3 // 4
    torch.testing.assert_close(logits(new, bs), logits(m, bs), rtol=0, atol=1e-6)


def test_pruning_an_unused_expert_changes_nothing():
    m = model(top_k=2, E=5)
    with torch.no_grad():  # logits {a, a, -a, -a, 0}: two experts > 0 always, expert 4 never in the top 2
        for blk in m.blocks:
            g = blk.ffn.gate.weight
            g[1], g[2], g[3], g[4] = g[0], -g[0], -g[0], 0.0
    bs = batches()
    stats = routing_stats(m, bs)
    assert all(float(s.usage_E[4]) == 0 for s in stats.values())
    new, kept = prune_experts(m, stats, 4)
    assert kept == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    torch.testing.assert_close(logits(new, bs), logits(m, bs), rtol=1e-5, atol=1e-5)


def test_random_merge_and_low_rank_shapes_and_errors():
    m = model(E=4)
    bs = batches()
    stats = routing_stats(m, bs)
    assert sum(float(s.usage_E.sum()) for s in stats.values()) == 2 * 2 * 24 * 2  # layers * k * tokens
    new, groups = merge_experts(m, stats, 2, by="random", seed=3)
    assert all(sorted(e for grp in g for e in grp) == [0, 1, 2, 3] and len(g) == 2 for g in groups.values())
    assert torch.isfinite(logits(new, bs)).all()
    full, n_full = low_rank_compress(m, rank=16)    # rank = min(D, G=2F): exact
    torch.testing.assert_close(logits(full, bs), logits(m, bs), rtol=1e-4, atol=1e-4)
    _, n_small = low_rank_compress(m, rank=2, sparsity=0.1)
    assert n_small < n_full
    with pytest.raises(ValueError, match="merge-to"):
        merge_experts(m, stats, 1)
    with pytest.raises(ValueError, match="--by"):
        prune_experts(m, stats, 2, by="routing_similarity")


def test_cli_compress_writes_a_loadable_smaller_run(tmp_path, capsys):
    import argparse
    from dataclasses import asdict

    from moelab.checkpoint import load_model
    from moelab.cli_lora import register, save_run
    from moelab.config import TrainConfig
    data = tmp_path / "data"
    for dom in ("a", "b"):
        (data / dom).mkdir(parents=True)
        for k in range(3):
            (data / dom / f"{k}.txt").write_text(f"{dom} text number {k} " * 40)
    cfg = TrainConfig(batch_size=2, seq_len=12, eval_batches=1, data=(str(data / "a"), str(data / "b")))
    m = model(E=4)
    save_run(m, {"train_config": asdict(cfg), "step": 5, "domains": ["a", "b"]}, tmp_path / "run")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["compress", str(tmp_path / "run"), "--prune-to", "2", "--calib-batches", "2",
                              "--out", str(tmp_path / "small")])
    assert args.func(args) == 0
    small, meta = load_model(tmp_path / "small")
    assert small.cfg.moe.n_experts == 2 and meta["step"] == 5
    assert "val loss after" in capsys.readouterr().out
    args = parser.parse_args(["compress", str(tmp_path / "run"), "--merge-to", "3", "--by", "usage",
                              "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--by='usage' is invalid for merging"):
        args.func(args)


def test_stats_from_trace_match_routing_stats():
    from moelab.compress import stats_from_trace
    from moelab.trace import trace_moelab
    m = model(E=4)
    bs = batches(n=1)
    wins = [(0, row.tolist()) for row in bs[0].idx_BS]
    tr = trace_moelab(m, wins, ["d"], batch_size=2)
    got, ref = stats_from_trace(tr, m.cfg.moe_layer_ids), routing_stats(m, bs)
    for i in ref:
        assert torch.equal(got[i].usage_E, ref[i].usage_E)
        torch.testing.assert_close(got[i].logits_NE, ref[i].logits_NE, rtol=1e-2, atol=1e-2)  # fp16 in traces
