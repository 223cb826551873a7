"""Expert-cache simulator: hand-worked policy sequences, Belady vs brute force and vs every policy, request
building against a loop, prefetchers, the pre-gate recorder, the cost model and the CLI."""
import argparse
import itertools
import json
from functools import cache

import numpy as np
import pytest
import torch

from moelab.cli_offload import register
from moelab.model import MoELM
from moelab.offload import (
    CostModel,
    ReplayCounts,
    Requests,
    build_requests,
    parse_caches,
    record_pregate,
    replay,
    simulate,
    timing,
)
from moelab.offload_policies import (
    EVICTIONS,
    AffinityPrefetch,
    PrevTokenPrefetch,
    Static,
    static_pins,
)
from moelab.resolver import resolve
from moelab.trace import trace_moelab, windows

DYNAMIC = ["lru", "lfu", "fifo", "least-stale", "belady"]


def hits(seq, cap, policy, n_layers=1, E=8, scope="layer", initial=None):
    reqs = Requests.from_lists(seq, E, n_layers)
    return replay(reqs, cap, EVICTIONS[policy]() if policy != "static" else Static(), scope=scope,
                  initial=initial).hit_Q.tolist()


# A B A C B A with room for two (worked by hand in the comments)
ABACBA = [[0], [1], [0], [2], [1], [0]]


@pytest.mark.parametrize("policy,want", [
    ("lru", [0, 0, 1, 0, 0, 0]),          # C evicts B (A fresher); B evicts A; A evicts C
    ("least-stale", [0, 0, 1, 0, 0, 0]),  # one layer: staleness in visits == recency
    ("fifo", [0, 0, 1, 0, 1, 0]),         # C evicts A (first in); B hits; A evicts B
    ("lfu", [0, 0, 1, 0, 0, 1]),          # C evicts B (A used twice); B evicts C (A still 2 > 1); A hits
    ("belady", [0, 0, 1, 0, 1, 0]),       # C evicts A (next use 5 > B's 4); B hits; A misses
])
def test_hand_worked_sequences(policy, want):
    assert hits(ABACBA, 2, policy) == want


def test_least_stale_keeps_the_next_layers_expert_where_global_lru_evicts_it():
    # 3 layers, E=4 (key = layer*4 + expert), one global cache of 3. Step 1 layer 1 needs {4, 5}: 5 must evict
    # 0 (layer 0, used this step) or 8 (layer 2, used last step, needed next). LRU evicts 8 (older in global
    # time) and misses it at once; least-stale: both unstale, layer 2 is visited next, so it evicts 0.
    seq = [[0], [4], [8], [0], [4, 5], [8]]
    assert hits(seq, 3, "lru", n_layers=3, E=4, scope="global") == [0, 0, 0, 1, 1, 0]
    assert hits(seq, 3, "least-stale", n_layers=3, E=4, scope="global") == [0, 0, 0, 1, 1, 1]
    assert hits(seq, 3, "belady", n_layers=3, E=4, scope="global") == [0, 0, 0, 1, 1, 1]


def test_static_keeps_its_pins_and_streams_the_rest():
    counts_LE = np.array([[5, 1, 7, 0], [0, 3, 3, 9]])
    assert static_pins(counts_LE, 2, "layer") == [[2, 0], [4 + 3, 4 + 1]]  # tie 1 vs 2 -> lower index
    assert static_pins(counts_LE, 2, "global") == [[4 + 3, 2]]  # the 2 most used pairs overall
    seq = [[0], [1], [0], [1], [2]]
    assert hits(seq, 1, "static", initial=[[1]]) == [0, 1, 0, 1, 0]


def brute_force_hits(seq, cap):
    """Most hits any demand-fetching policy can get: every choice of victims, memoised on (request, cache)."""
    @cache
    def best(q, S):
        if q == len(seq):
            return 0
        R = frozenset(seq[q])
        h, miss = len(R & S), R - S
        n_out = max(len(S) + len(miss) - cap, 0)
        return h + max(best(q + 1, (S - frozenset(out)) | miss)
                       for out in itertools.combinations(sorted(S - R), n_out))
    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(12))
def test_belady_equals_brute_force_optimum_and_bounds_every_policy(seed):
    rng = np.random.default_rng(seed)
    E, cap = int(rng.integers(3, 6)), int(rng.integers(2, 4))
    seq = [rng.choice(E, size=int(rng.integers(1, cap + 1)), replace=False).tolist() for _ in range(10)]
    bel = sum(hits(seq, cap, "belady", E=E))
    assert bel == brute_force_hits(tuple(map(tuple, seq)), cap)
    for p in DYNAMIC:
        assert sum(hits(seq, cap, p, E=E)) <= bel, p


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_belady_bounds_every_policy_on_random_multilayer_traces(scope):
    rng = np.random.default_rng(3)
    L, E, K = 3, 12, 3
    seq = [rng.choice(E, size=K, replace=False) + (q % L) * E for q in range(L * 300)]
    seq = [s.tolist() for s in seq]
    for cap in (3, 5, 8):
        c = cap if scope == "layer" else cap * L
        bel = sum(hits(seq, c, "belady", n_layers=L, E=E, scope=scope))
        for p in DYNAMIC:
            assert sum(hits(seq, c, p, n_layers=L, E=E, scope=scope)) <= bel, (p, cap)


def _tiny_trace(n_experts=16, top_k=4, seq_len=24, n_seq=8, seed=0):
    torch.manual_seed(seed)
    cfg = resolve("tiny", overrides={"moe.n_experts": n_experts, "moe.top_k": top_k}).model
    model = MoELM(cfg.replace(n_layers=3, d_model=32, moe=cfg.moe.replace(d_model=32, d_expert=16), n_heads=2,
                              d_dense=32)).eval()
    rng = np.random.default_rng(seed)
    docs = [("a", rng.integers(0, 256, seq_len * n_seq // 2).tolist()),
            ("b", (np.arange(seq_len * n_seq // 2) % 7 + 97).tolist())]
    domains, wins = windows(docs, seq_len, seq_len * n_seq)
    return model, trace_moelab(model, wins, domains, batch_size=4)


def _hf_trace():
    """A tiny random-weight transformers OLMoE (16 experts, top-4), traced through the moelab.hf adapter."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model("olmoe", vocab_size=64, hidden_size=32, intermediate_size=16,
                                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                            num_experts=16, num_experts_per_tok=4, max_position_embeddings=64,
                                            pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    rng = np.random.default_rng(0)
    docs = [("a", rng.integers(1, 64, 96).tolist()), ("b", (np.arange(96) % 5 + 1).tolist())]
    domains, wins = windows(docs, 24, 192)
    from moelab.hf import trace_hf
    return trace_hf(model, wins, domains, batch_size=4)


@pytest.mark.parametrize("source,prompt_len,scope", [("moelab", 0, "layer"), ("moelab", 4, "layer"),
                                                     ("moelab", 0, "global"), ("hf", 4, "layer"),
                                                     ("hf", 0, "global")])
def test_belady_bounds_every_policy_on_a_real_trace(source, prompt_len, scope):
    tr = _tiny_trace()[1] if source == "moelab" else _hf_trace()
    assert tr.n_experts == 16 and tr.top_k == 4
    res = simulate(tr, caches=[4, 8], policies=list(EVICTIONS), prompt_len=prompt_len, fit_fraction=0.25,
                   scope=scope)
    for cap in (4, 8):
        rows = {r["policy"]: r for r in res["rows"] if r["cache"] == cap}
        for p, r in rows.items():
            tot = r["decode_hits"] + r["prefill_hits"]
            assert tot <= rows["belady"]["decode_hits"] + rows["belady"]["prefill_hits"], (p, cap)
            assert r["decode_vs_belady"] <= 1.0 + 1e-12
    assert res["meta"]["decode_tokens"] + res["meta"]["prefill_tokens"] == 6 * 24
    assert any(r["decode_vs_belady"] < 1 for r in res["rows"])  # the bound is not trivially met


def test_build_requests_matches_a_loop():
    rng = np.random.default_rng(1)
    L, N, K, E = 2, 20, 2, 5
    idx = rng.integers(-1, E + 2, size=(L, N, K))  # -1 and >= E (special experts) are never fetched
    seq = np.repeat([3, 1], 10)
    pos = np.r_[rng.permutation(10), rng.permutation(10)]
    perm = rng.permutation(N)
    reqs = build_requests(idx[:, perm], seq[perm], pos[perm], E, prompt_len=3)
    want = []
    for s in (1, 3):  # sequences in id order, positions in order
        toks = [perm.tolist().index(n) for n in sorted(np.flatnonzero(seq == s), key=lambda n: pos[n])]
        steps = [toks[:3]] + [[t] for t in toks[3:]]
        for st in steps:
            for l in range(L):
                e = {int(x) for t in st for x in idx[l, perm[t]] if 0 <= x < E}
                want.append(sorted(l * E + x for x in e))
    assert [reqs.keys(q).tolist() for q in range(reqs.n_requests)] == want
    assert reqs.phase_J.tolist() == ([0] + [1] * 7) * 2 and reqs.ntok_J.tolist() == ([3] + [1] * 7) * 2


def test_prefetch_prev_token_and_accounting():
    # one layer: the previous step's experts are still resident, nothing to prefetch; hits equal plain LRU's
    reqs = Requests.from_lists([[0, 1], [2], [0, 1]], 8)
    rc = replay(reqs, 3, EVICTIONS["lru"](), prefetcher=PrevTokenPrefetch())
    assert rc.hit_Q.tolist() == [0, 0, 2] and rc.prefetch_Q.sum() == 0
    # 3 layers (key = layer*4 + expert), one global LRU cache of 2. Worked by hand:
    # q2 {8}: evicts 0; prefetch for q3 = step 0's layer-0 {0}, evicting 4 -> q3 hits 0 (used 1)
    # q3: prefetch step 0's layer-1 {4}, evicting 8; q4 {5} evicts 0 (LRU)
    # q4: prefetch step 0's layer-2 {8}, evicting the unused prefetched 4 (wasted 1) -> q5 hits 8 (used 2)
    reqs = Requests.from_lists([[0], [4], [8], [0], [5], [8]], 4, n_layers=3)
    rc = replay(reqs, 2, EVICTIONS["lru"](), scope="global", prefetcher=PrevTokenPrefetch())
    assert rc.hit_Q.tolist() == [0, 0, 0, 1, 0, 1] and rc.prefetch_Q.tolist() == [0, 0, 1, 1, 1, 0]
    assert (rc.prefetch_used, rc.prefetch_wasted) == (2, 1)
    assert replay(reqs, 2, EVICTIONS["lru"](), scope="global").hit_Q.sum() == 0


def test_affinity_fit_matches_counting_loop():
    rng = np.random.default_rng(0)
    L, N, K, E = 3, 50, 2, 6
    idx = rng.integers(-1, E, size=(L, N, K))
    pf = AffinityPrefetch(idx, E)
    for l in range(L - 1):
        C = np.zeros((E, E))
        for n in range(N):
            for a in idx[l, n]:
                for b in idx[l + 1, n]:
                    if a >= 0 and b >= 0:
                        C[a, b] += 1
        np.testing.assert_allclose(pf.P_LEE[l], C / np.maximum(C.sum(1, keepdims=True), 1))
    reqs = Requests.from_lists([[0, 1], [E + 2], [2 * E]], E, n_layers=3)
    score = pf.P_LEE[0][[0, 1]].sum(0)
    want = set((E + np.argsort(-score, kind="stable")[:2]).tolist())
    assert set(pf.predict(reqs, 0, np.array([0, 1])).tolist()) == want
    assert pf.predict(reqs, 2, np.array([2 * E])) is None  # last layer predicts nothing


def test_record_pregate_equals_the_layers_own_choice_when_gates_are_shared():
    model, tr = _tiny_trace()
    from moelab.moe import moe_layers
    layers = moe_layers(model)
    with torch.no_grad():  # layer l+1's gate := layer l's gate, so pre-gating l must reproduce layer l's routing
        for l in range(len(layers) - 1, 0, -1):
            layers[l].gate.weight.copy_(layers[l - 1].gate.weight)
    pre = record_pregate(model, tr, batch_size=3)
    assert pre.shape == tr.expert_idx_LNK.shape and (pre[-1] == -1).all()
    # layer 0 of `tr` was traced before the copy, and layer 0's gate did not change
    np.testing.assert_array_equal(np.sort(pre[0], -1), np.sort(tr.expert_idx_LNK[0], -1))


def test_timing_by_hand():
    reqs = Requests.from_lists([[0, 1], [1, 2]], 8)
    rc = ReplayCounts(np.array([0, 1]), np.array([2, 1]), np.array([3, 0]), 0, 0)
    cost = CostModel(expert_bytes=100, link_Bps=100.0, latency_s=0.5, device_Bps=1000.0, overhead_s=0.1)
    # q0: compute 0.1 + 2*0.1 = 0.3, demand 0.5 + 2 = 2.5; prefetch 0.5 + 3 = 3.5 -> 3.2 late for q1
    # q1: compute 0.3, demand 0.5 + 1 = 1.5, late 3.2
    t = timing(reqs, rc, cost)
    assert t["decode_s"] == pytest.approx(0.3 + 2.5 + 0.3 + 1.5 + 3.2)
    assert t["decode_resident_s"] == pytest.approx(0.6) and t["prefill_s"] == 0


def test_errors_and_cache_parsing():
    _, tr = _tiny_trace()
    with pytest.raises(ValueError, match="--cache=2 experts per layer is invalid.*allowed >= 4"):
        simulate(tr, caches=[2], policies=["lru"])
    with pytest.raises(ValueError, match="--policy 'mru' is unknown"):
        simulate(tr, caches=[4], policies=["mru"])
    with pytest.raises(ValueError, match="needs --pregate"):
        simulate(tr, caches=[4], policies=["pregate"])
    with pytest.raises(ValueError, match="--link='pcie9' is unknown"):
        CostModel.for_link("pcie9")
    assert CostModel.for_link("nvme", latency_s=1.0).latency_s == 1.0
    assert parse_caches("4,8", 2, 100) == [4, 8]
    assert parse_caches("1600B,1KiB", 2, 100) == [8, 5]


def test_cli_simulate_writes_table_json_and_plots(tmp_path, capsys):
    _, tr = _tiny_trace()
    tr.save(tmp_path / "t.npz")
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    args = p.parse_args(["offload", "simulate", str(tmp_path / "t.npz"), "--cache", "1x,8", "--policy", "lru,belady,affinity",
                         "--link", "pcie4,nvme", "--out", str(tmp_path / "o")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "belady" in out and "lru+affinity" in out
    res = json.loads((tmp_path / "o" / "offload.json").read_text())
    assert [r["cache"] for r in res["rows"]] == [4, 4, 4, 8, 8, 8]
    assert (tmp_path / "o" / "hit_rate.png").stat().st_size > 0 and (tmp_path / "o" / "tokens_s.png").is_file()
    assert res["rows"][0]["nvme_decode_tok_s"] < res["rows"][0]["pcie4_decode_tok_s"]
    res = simulate(_tiny_trace()[1], caches=[4], policies=["lru"])  # Belady joins for the ratio
    assert [r["policy"] for r in res["rows"]] == ["lru", "belady"] and res["rows"][0]["decode_vs_belady"] <= 1


def test_static_at_full_size_pins_everything_and_others_start_warm():
    _, tr = _tiny_trace()
    res = simulate(tr, caches=[16], policies=["static", "lru", "belady"], prompt_len=0)
    assert all(r["decode_hit_rate"] == 1.0 for r in res["rows"])  # 16 experts per layer = all of them
