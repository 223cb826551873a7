"""Expert placement: Placement views, EPLB vs an independent reference, ILPs vs brute force, metrics by hand, CLI."""
import argparse
import itertools
import json

import numpy as np
import pytest

from moelab.placement import (
    Devices,
    Placement,
    PlacementFile,
    contiguous,
    eplb,
    eplb_maps,
    greedy,
    load_placement_file,
    round_robin,
)
from moelab.placement_ilp import (
    IlpOptions,
    affinity_greedy,
    max_load,
    solve_load,
    solve_load_layer,
    solve_traffic,
    stay_traffic,
    swap_search,
)
from moelab.placement_metrics import (
    Network,
    a2a_seconds,
    home_ranks,
    migration_bytes,
    replica_device,
    replica_slot,
    score,
    split_tokens,
    transitions,
)
from moelab.trace import Trace


# ---------------------------------------------------------------------------- Placement
def test_single_copy_api_matches_the_ep_placement():
    assert Placement.contiguous(8, 2).rank_E == (0, 0, 0, 0, 1, 1, 1, 1)
    assert Placement.contiguous(7, 3).n_local() == [3, 2, 2]
    p = Placement.from_map({0: 1, 1: 0, 2: 1}, n_experts=3, world_size=2)
    assert p.order() == [1, 0, 2] and p.experts_of(1) == (0, 2) and p.phy2log == (1, -1, 0, 2)
    with pytest.raises(ValueError, match="misses experts"):
        Placement.from_map({0: 0, 1: 1, 2: 0}, n_experts=4, world_size=2)
    with pytest.raises(ValueError, match="outside"):
        Placement.from_map([0, 1, 2, 0], n_experts=4, world_size=2)


def test_replicated_views_by_hand():
    # 2 devices x 3 slots, 4 experts: device 0 = [2, 0, 2], device 1 = [1, 3, 0]
    p = Placement.from_phy2log([2, 0, 2, 1, 3, 0], n_experts=4, world_size=2)
    assert p.rank_E == (0, 1, 0, 1) and p.slots == 3
    assert p.logcnt.tolist() == [2, 1, 2, 1]
    assert p.log2phy.tolist() == [[1, 5], [3, -1], [0, 2], [4, -1]]
    assert p.count_WE().tolist() == [[1, 0, 2, 0], [1, 1, 0, 1]]
    assert p.experts_of(0) == (2, 0, 2) and p.n_local() == [3, 3]
    with pytest.raises(ValueError, match="no copy of experts \\[3\\]"):
        Placement.from_phy2log([0, 1, 2, -1], n_experts=4, world_size=2)


# ---------------------------------------------------------------------------- EPLB vs reference
def _ref_pack(w, n_packs):
    """Reference balanced packing written from the EPLB README: heaviest first, to the lightest non-full pack."""
    n = len(w)
    per = n // n_packs
    if per == 1:
        return list(range(n)), [0] * n
    packs = [[] for _ in range(n_packs)]
    tot = [0.0] * n_packs
    pack, rank = [None] * n, [None] * n
    for i in sorted(range(n), key=lambda i: -w[i]):
        best = min((j for j in range(n_packs) if len(packs[j]) < per), key=lambda j: (tot[j], j))
        pack[i], rank[i] = best, len(packs[best])
        packs[best].append(i)
        tot[best] += w[i]
    return pack, rank


def _ref_eplb(w, n_phy, n_groups, n_nodes, n_gpus):
    """Reference EPLB: groups -> nodes by balanced packing, replicas (max load per copy) inside each node,
    physical experts -> the node's GPUs by balanced packing; slot order = GPU, then rank in pack."""
    if n_groups % n_nodes:
        n_groups, n_nodes = 1, 1
    E = len(w)
    gs = E // n_groups
    gw = [sum(w[g * gs:(g + 1) * gs]) for g in range(n_groups)]
    gpack, grank = _ref_pack(gw, n_nodes)
    node_experts = [[] for _ in range(n_nodes)]  # logical ids in node order (group rank, then inside group)
    for n in range(n_nodes):
        for g in sorted((g for g in range(n_groups) if gpack[g] == n), key=lambda g: grank[g]):
            node_experts[n] += list(range(g * gs, (g + 1) * gs))
    per_node, gpus_per_node, per_gpu = n_phy // n_nodes, n_gpus // n_nodes, n_phy // n_gpus
    phy2log, rank_of_slot, cnt = [], [], [0] * E
    for n in range(n_nodes):
        exps = node_experts[n]
        copies = {e: 1 for e in exps}
        slots = [(e, 0) for e in exps]
        for _ in range(per_node - len(exps)):
            e = max(exps, key=lambda e: (w[e] / copies[e], -exps.index(e)))
            slots.append((e, copies[e]))
            copies[e] += 1
        pack, rnk = _ref_pack([w[e] / copies[e] for e, _ in slots], gpus_per_node)
        ordered = [None] * per_node
        for s, (pk, rk) in enumerate(zip(pack, rnk)):
            ordered[pk * per_gpu + rk] = slots[s]
        phy2log += [e for e, _ in ordered]
        rank_of_slot += [r for _, r in ordered]
        for e in exps:
            cnt[e] = copies[e]
    log2phy = np.full((E, max(cnt)), -1)
    for p, (e, r) in enumerate(zip(phy2log, rank_of_slot)):
        log2phy[e, r] = p
    return np.array(phy2log), log2phy, np.array(cnt)


@pytest.mark.parametrize("E,n_phy,groups,nodes,gpus", [(16, 24, 4, 2, 4), (16, 20, 1, 1, 4), (12, 16, 3, 2, 4),
                                                      (32, 48, 8, 2, 8), (8, 8, 2, 2, 4)])
def test_eplb_equals_reference(E, n_phy, groups, nodes, gpus):
    rng = np.random.default_rng(E + n_phy)
    for _ in range(3):
        w = rng.pareto(1.2, E) * 100 + rng.random(E)  # skewed, no ties
        ref = _ref_eplb(list(w), n_phy, groups, nodes, gpus)
        got = eplb_maps(w, n_phy, groups, nodes, gpus)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- ILPs vs brute force
def _all_devices(E, S, items):
    return list(itertools.combinations_with_replacement(items, S))


def _brute_load(load_E, W, S, speeds):
    """Min over every slot filling (each expert >= 1 copy, rows split evenly over copies) of max load / speed."""
    E = len(load_E)
    best = np.inf
    for fill in itertools.product(_all_devices(E, S, range(-1, E)), repeat=W):
        cnt = np.zeros((W, E))
        for d, slots in enumerate(fill):
            for e in slots:
                if e >= 0:
                    cnt[d, e] += 1
        tot = cnt.sum(0)
        if (tot == 0).any():
            continue
        best = min(best, float(((cnt / tot) @ load_E / speeds).max()))
    return best


@pytest.mark.parametrize("S,speeds", [(2, (1.0, 1.0)), (3, (1.0, 1.0)), (3, (1.0, 2.0))])
def test_load_ilp_equals_brute_force(S, speeds):
    rng = np.random.default_rng(S)
    dev = Devices(2, S, speed_W=speeds)
    for _ in range(2):  # 2 layers x 4 experts x 2 devices
        load_E = rng.integers(1, 50, 4).astype(float) * np.array([5.0, 1, 1, 1])
        p, r = solve_load_layer(load_E, dev, max_copies=S, time_limit_s=20, gap=0.0)  # every copy count
        want = _brute_load(load_E, 2, S, np.array(speeds))
        assert r.objective == pytest.approx(want, rel=1e-6)
        assert max_load(p, load_E, dev) == pytest.approx(want, rel=1e-6)
        assert r.status == "Optimal" and r.bound <= want * (1 + 1e-6)


def test_traffic_ilp_equals_brute_force():
    rng = np.random.default_rng(1)
    L, E, W, S, tol = 2, 4, 2, 2, 0.25
    loads_LE = rng.integers(5, 30, (L, E)).astype(float)
    trans = rng.integers(0, 10, (L - 1, E, E)).astype(float)
    dev = Devices(W, S)
    ps, info = solve_traffic(loads_LE, trans, dev, IlpOptions(objective="traffic", time_limit_s=20, mip_rel_gap=0.0,
                                                              load_tolerance=tol))
    singles = [Placement(r, W, slots=S) for r in itertools.product(range(W), repeat=E)
               if max(r.count(d) for d in range(W)) <= S]
    z1 = [min(max_load(p, loads_LE[l], dev) for p in singles) for l in range(L)]
    ok = [[p for p in singles if max_load(p, loads_LE[l], dev) <= (1 + tol) * z1[l] + 1e-9] for l in range(L)]
    want = min(stay_traffic([a, b], trans).sum() for a in ok[0] for b in ok[1])
    assert info["load_cap_L"] == pytest.approx([(1 + tol) * z for z in z1])
    assert info["objective"] == pytest.approx(want) and stay_traffic(ps, trans).sum() == pytest.approx(want)
    assert info["status"] == "Optimal"


@pytest.mark.parametrize("seed", [0, 1])
def test_ilp_never_worse_than_heuristics_and_respects_capacity(seed):
    rng = np.random.default_rng(seed)
    L, E, W, S = 3, 12, 4, 4
    loads_LE = rng.pareto(1.0, (L, E)) * 100 + 1
    dev = Devices(W, S, nodes=2, groups=2)
    ilp, info = solve_load(loads_LE, dev, IlpOptions(time_limit_s=1.5))
    for other in (greedy(loads_LE, dev), eplb(loads_LE, dev), contiguous(loads_LE, dev)):
        for l in range(L):
            assert max_load(ilp[l], loads_LE[l], dev) <= max_load(other[l], loads_LE[l], dev) + 1e-9
    for l, o, b in zip(range(L), info["objective_L"], info["bound_L"]):
        assert b <= o + 1e-6 and o == pytest.approx(max_load(ilp[l], loads_LE[l], dev))
    trans = rng.integers(0, 5, (L - 1, E, E)).astype(float)
    tr, tinfo = solve_traffic(loads_LE, trans, dev, IlpOptions(objective="traffic", time_limit_s=1.5, load_tolerance=0.5))
    assert stay_traffic(tr, trans).sum() <= tinfo["start_objective"] + 1e-6
    aff = affinity_greedy(loads_LE, trans, dev, np.array(tinfo["load_cap_L"]))
    if all(max_load(p, loads_LE[l], dev) <= tinfo["load_cap_L"][l] + 1e-9 for l, p in enumerate(aff)):
        assert stay_traffic(tr, trans).sum() <= stay_traffic(aff, trans).sum() + 1e-6
    for l in range(L):
        assert max_load(tr[l], loads_LE[l], dev) <= tinfo["load_cap_L"][l] + 1e-6
    for ps in (ilp, tr, aff, greedy(loads_LE, dev), eplb(loads_LE, dev), round_robin(loads_LE, dev)):
        for p in ps:
            assert max(p.n_local()) <= S and (p.logcnt >= 1).all() and p.slots == S


def test_infeasible_capacity_is_a_clear_error_before_solving():
    with pytest.raises(ValueError, match="slots=3 is infeasible"):
        solve_load(np.ones((1, 8)), Devices(2, 3))
    with pytest.raises(ValueError, match="nodes=3"):
        Devices(4, 2, nodes=3).check(8)


# ---------------------------------------------------------------------------- metrics by hand
def test_home_ranks_and_replica_rule_by_hand():
    seq = np.array([7, 7, 3, 3, 9, 9, 5, 5])  # sequences in order 7, 3, 9, 5 -> ranks 0, 1, 0, 1 (B=1, W=2)
    home, local = home_ranks(seq, 2)
    assert home.tolist() == [0, 0, 1, 1, 0, 0, 1, 1] and local.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    home, local = home_ranks(seq, 2, seqs_per_rank=2)  # batch of 4 sequences: rank 0 gets 7, 3
    assert home.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and local.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    p = Placement.from_phy2log([0, 1, 0, 2], n_experts=3, world_size=2)  # expert 0 on both devices
    idx = np.array([[0, 1], [0, -1], [0, 2]])
    dev = replica_device(p, idx, np.array([0, 1, 1]), np.array([0, 0, 1]))
    # every row's home device holds a copy of its expert: rows stay home
    assert dev.tolist() == [[0, 0], [1, -1], [1, 1]]
    # expert 0 on devices 0 and 1, none on device 2: rows from device 2 alternate copy (t + 2) % 2 -> slot 0, 2, 0;
    # rows from devices 0 and 1 use their own copy (the old "spread evenly" rule sent (home 0, t=1) to device 1)
    p3 = Placement.from_phy2log([0, 1, 0, 2, 3, 4], n_experts=5, world_size=3)
    idx = np.zeros((5, 1), dtype=np.int64)
    dev = replica_device(p3, idx, np.array([2, 2, 2, 0, 1]), np.array([0, 1, 2, 1, 2]))
    assert dev[:, 0].tolist() == [0, 1, 0, 0, 1]
    # two copies on the home device: spread over them; a device without one spreads over all copies
    p2 = Placement.from_phy2log([0, 0, 1, 2], n_experts=3, world_size=2)
    slot = replica_slot(p2, np.zeros((4, 1), dtype=np.int64), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))
    assert slot[:, 0].tolist() == [0, 1, 1, 0]


def test_score_by_hand():
    # 2 layers, 4 tokens (2 sequences of 2), K=1, W=2, single copy: experts 0,1 on device 0, experts 2,3 on 1
    idx = np.array([[[0], [2], [1], [3]], [[2], [2], [0], [1]]])
    seq = np.array([0, 0, 1, 1])
    p = Placement((0, 0, 1, 1), 2)
    s = score([p, p], idx, seq, Devices(2, 2), row_bytes=10, net=Network(1.0, 10.0, 1.0, 10.0))
    # layer 0 devices [0,1,0,1], layer 1 [1,1,0,0], homes [0,0,1,1]: off-home rows 2 and 4
    assert s.off_home_L.tolist() == [2, 4] and s.load_LW.tolist() == [[2, 2], [2, 2]]
    assert s.balancedness_L.tolist() == [1.0, 1.0]
    # stay-dispatch moves: token0 0->1 , token1 1->1, token2 0->0, token3 1->0: 2 rows
    assert s.stay_cross_P.tolist() == [2.0]
    assert s.bytes_per_token == 2 * 6 * 10 / 4
    # layer 0: rank 0 sends 1 row to 1, rank 1 sends 1 row to 0: 1 + 10/10 = 2 s each way, x2 (combine)
    assert s.a2a_s_L[0] == pytest.approx(4.0)
    np.testing.assert_allclose(transitions(idx, 4)[0], np.array(
        [[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]]))


def test_a2a_time_and_migration_by_hand():
    dev = Devices(4, 1, nodes=2)
    rows = np.zeros((4, 4))
    rows[0, 1], rows[0, 2] = 10, 10  # intra (0->1) and inter (0->2) node
    net = Network(alpha_intra_s=1.0, bw_intra=100.0, alpha_inter_s=2.0, bw_inter=10.0)
    assert a2a_seconds(rows, 10, dev, net) == pytest.approx((1 + 1) + (2 + 10))
    old = [Placement.from_phy2log([0, 1, 2, 3], n_experts=4, world_size=2)]
    new = [Placement.from_phy2log([0, 3, 2, 1], n_experts=4, world_size=2)]
    assert migration_bytes(old, new, 100).tolist() == [200.0]


def _trace(L=3, N=256, K=2, E=8, seq_len=16, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(E) * 0.5)
    idx = np.stack([np.stack([rng.choice(E, K, replace=False, p=p) for _ in range(N)]) for _ in range(L)])
    return Trace(expert_idx_LNK=idx.astype(np.int16), weight_LNK=np.ones(idx.shape, np.float32),
                 token_ids_N=np.zeros(N, np.int32), seq_ids_N=(np.arange(N) // seq_len).astype(np.int32),
                 positions_N=(np.arange(N) % seq_len).astype(np.int32), domain_N=np.zeros(N, np.int16),
                 domains=("x",), n_experts=E)


def test_split_keeps_sequences_whole():
    tr = _trace()
    fit, held = split_tokens(tr, 0.5)
    assert len(fit) == len(held) == 128
    assert not set(tr.seq_ids_N[fit]) & set(tr.seq_ids_N[held])


def test_cli_all_writes_files_and_json_round_trips(tmp_path, capsys):
    from moelab.cli_place import register
    path = _trace().save(tmp_path / "t.npz")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["place", str(path), "--devices", "4", "--slots", "3", "--method", "all",
                              "--time-limit", "1", "--out", str(tmp_path / "p.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for m in ("contiguous", "round_robin", "greedy", "eplb", "affinity", "ilp-load", "ilp-traffic"):
        assert m in out and (tmp_path / f"p.{m}.json").is_file()
    assert (tmp_path / "p.png").stat().st_size > 0
    f = load_placement_file(tmp_path / "p.eplb.json")
    assert f.method == "eplb" and len(f.placements) == 3 and f.devices.slots == 3
    assert f.placements == tuple(eplb(np.stack([np.bincount(tr_l[tr_l >= 0], minlength=8) for tr_l in
                                                _trace().expert_idx_LNK[:, :128].reshape(3, -1)]).astype(float),
                                       f.devices))
    assert f.info["migration_from"] == "contiguous" and f.info["migration_bytes"] > 0
    args = parser.parse_args(["place", str(path), "--devices", "4", "--slots", "3", "--method", "eplb",
                              "--current", str(tmp_path / "p.eplb.json"), "--out", str(tmp_path / "again.json")])
    assert args.func(args) == 0  # refitting on the same trace moves nothing
    assert load_placement_file(tmp_path / "again.json").info["migration_bytes"] == 0
    doc = json.loads((tmp_path / "p.eplb.json").read_text())
    doc["version"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="version=99"):
        load_placement_file(tmp_path / "bad.json")


def test_placement_file_round_trip(tmp_path):
    dev = Devices(2, 3, speed_W=(1.0, 2.0))
    ps = (Placement.from_phy2log([2, 0, 2, 1, 3, 0], n_experts=4, world_size=2), Placement((0, 1, 1, 0), 2, slots=3))
    PlacementFile(ps, dev, "ilp", {"trace": "x.npz"}).save(tmp_path / "p.json")
    f = load_placement_file(tmp_path / "p.json")
    assert f.placements == ps and f.devices == dev and f.info == {"trace": "x.npz"}


def test_affinity_greedy_with_fallback_stays_within_caps_and_follows_affinity():
    rng = np.random.default_rng(3)
    L, E, W, S = 3, 8, 2, 4
    loads_LE = rng.integers(10, 20, (L, E)).astype(float)
    dev = Devices(W, S)
    base = greedy(loads_LE, dev)
    caps = np.array([max_load(p, loads_LE[l], dev) for l, p in enumerate(base)])
    out = affinity_greedy(loads_LE, np.zeros((L - 1, E, E)), dev, caps, fallback=base)
    assert all(max_load(p, loads_LE[l], dev) <= caps[l] + 1e-9 for l, p in enumerate(out))
    # with a strong i -> i affinity and no load cap, each expert follows its predecessor's device
    trans = np.stack([np.eye(E) * 100] * (L - 1))
    free = affinity_greedy(np.ones((L, E)), trans, dev)
    assert free[1].rank_E == free[0].rank_E == free[2].rank_E
    assert stay_traffic(free, trans).sum() == 0


def test_swap_search_improves_within_caps_and_matches_brute_force_on_one_layer():
    rng = np.random.default_rng(4)
    L, E, W, S = 2, 6, 2, 3
    loads_LE = rng.integers(10, 20, (L, E)).astype(float)
    trans = rng.integers(0, 9, (L - 1, E, E)).astype(float)
    dev = Devices(W, S)
    base = contiguous(loads_LE, dev)
    caps = np.array([max_load(p, loads_LE[l], dev) for l, p in enumerate(base)]) * 1.2
    out = swap_search(base, loads_LE, trans, dev, caps)
    assert stay_traffic(out, trans).sum() <= stay_traffic(base, trans).sum()
    assert all(max_load(p, loads_LE[l], dev) <= caps[l] + 1e-9 for l, p in enumerate(out))
    assert [p.n_local() for p in out] == [[3, 3]] * L
    # a swap local optimum: no single swap in any layer that keeps the caps lowers the traffic further
    for l in range(L):
        for a, b in itertools.combinations(range(E), 2):
            r = list(out[l].rank_E)
            if r[a] == r[b]:
                continue
            r[a], r[b] = r[b], r[a]
            q = Placement(tuple(r), W, slots=S)
            if max_load(q, loads_LE[l], dev) <= caps[l] + 1e-9:
                alt = [q if k == l else out[k] for k in range(L)]
                assert stay_traffic(alt, trans).sum() >= stay_traffic(out, trans).sum() - 1e-9
