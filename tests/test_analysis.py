"""Trace metrics vs plain-loop references and hand-worked cases; the HTML report is well-formed."""
import math
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from moelab import analysis
from moelab.balance import balance_stats
from moelab.trace import Trace


def make_trace(L=3, S=12, B=4, E=6, K=2, seed=0, domains=("code", "prose")):
    rng = np.random.default_rng(seed)
    N = S * B
    idx = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(N)]) for _ in range(L)])
    idx[0, 3, 1] = -1  # one dropped slot
    return Trace(expert_idx_LNK=idx.astype(np.int16), weight_LNK=rng.random((L, N, K)).astype(np.float32),
                 token_ids_N=rng.integers(97, 103, N).astype(np.int32), seq_ids_N=np.repeat(np.arange(B), S),
                 positions_N=np.tile(np.arange(S), B), domain_N=np.repeat(np.arange(B) % len(domains), S),
                 domains=tuple(domains), n_experts=E,
                 logits_LNE=rng.standard_normal((L, N, E)).astype(np.float16)).validate()


def test_load_and_maxvio_match_balance_stats():
    tr = make_trace()
    counts = analysis.expert_counts(tr)
    for l in range(tr.n_layers):
        loop = Counter(int(e) for e in tr.expert_idx_LNK[l].reshape(-1) if e >= 0)
        assert counts[l].tolist() == [loop[e] for e in range(tr.n_experts)]
        ref = balance_stats(counts_E=torch.tensor(counts[l]), n_tokens=tr.n_tokens)
        assert analysis.max_vio(counts)[l] == pytest.approx(float(ref.max_vio), rel=1e-6)


def test_js_divergence_by_hand():
    assert analysis.js_divergence(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(1.0)
    assert analysis.js_divergence(np.array([0.3, 0.7]), np.array([0.3, 0.7])) == pytest.approx(0.0, abs=1e-12)
    p, q = np.array([0.5, 0.5, 0, 0]), np.full(4, 0.25)
    m = (p + q) / 2
    kl = lambda a, b: sum(x * math.log2(x / y) for x, y in zip(a, b) if x > 0)
    assert analysis.js_divergence(p, q) == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m))


def test_specialization_disjoint_domains_and_loop():
    tr = make_trace()
    # domain 0 only uses experts {0,1}, domain 1 only {2,3}: each is far from the global distribution
    idx = tr.expert_idx_LNK.copy()
    idx[:, tr.domain_N == 0] = np.array([0, 1])
    idx[:, tr.domain_N == 1] = np.array([2, 3])
    spec = analysis.specialization(Trace(**{**tr.__dict__, "expert_idx_LNK": idx}))
    assert np.allclose(spec.global_LE, [0.25, 0.25, 0.25, 0.25, 0, 0])
    want = analysis.js_divergence(np.array([0.5, 0.5, 0, 0]), np.full(4, 0.25))
    assert np.allclose(spec.js_LD, want)
    # random trace: per-domain distribution from a loop
    spec = analysis.specialization(tr)
    for l in range(tr.n_layers):
        for d in range(2):
            c = Counter(int(e) for n in np.nonzero(tr.domain_N == d)[0] for e in tr.expert_idx_LNK[l, n] if e >= 0)
            tot = sum(c.values())
            assert np.allclose(spec.dist_LDE[l, d], [c[e] / tot for e in range(tr.n_experts)])


def test_affinity_loop_and_deterministic_chain():
    tr = make_trace()
    aff = analysis.affinity(tr)
    for l in range(tr.n_layers - 1):
        c = np.zeros((tr.n_experts, tr.n_experts))
        for n in range(tr.n_tokens):
            for i in tr.expert_idx_LNK[l, n]:
                for j in tr.expert_idx_LNK[l + 1, n]:
                    if i >= 0 and j >= 0:
                        c[i, j] += 1
        assert np.array_equal(aff.counts_PEE[l], c)
        assert np.allclose(aff.cond_PEE[l].sum(-1)[c.sum(-1) > 0], 1.0)
        top = sum(sum(sorted(row)[::-1][: tr.top_k]) for row in c) / c.sum()
        assert aff.top_share_P[l] == pytest.approx(top)
    # expert at l+1 = expert at l + 1 (mod E), K=1: a permutation, all traffic with the top-1 successor
    e0 = np.arange(24) % 6
    chain = Trace(expert_idx_LNK=np.stack([e0, (e0 + 1) % 6, (e0 + 2) % 6])[..., None],
                  weight_LNK=np.ones((3, 24, 1), np.float32), token_ids_N=np.zeros(24, np.int32),
                  seq_ids_N=np.zeros(24, np.int32), positions_N=np.arange(24), domain_N=np.zeros(24, np.int16),
                  domains=("x",), n_experts=6).validate()
    aff = analysis.affinity(chain)
    assert np.array_equal(aff.cond_PEE[0], np.roll(np.eye(6), 1, axis=1)) and np.allclose(aff.top_share_P, 1.0)


def test_reuse_curve_and_sch_vs_loops():
    tr = make_trace()
    reuse = analysis.reuse_curve(tr, max_dist=3)
    for l in range(tr.n_layers):
        for d in (1, 3):
            vals = [len({e for e in tr.expert_idx_LNK[l, t] if e >= 0} & set(tr.expert_idx_LNK[l, t + d].tolist())) / 2
                    for t in range(tr.n_tokens - d) if tr.seq_ids_N[t] == tr.seq_ids_N[t + d]]
            assert reuse[l, d - 1] == pytest.approx(np.mean(vals))
    for m, C in ((4, 2), (5, 3)):
        sch = analysis.segment_cache_hit_rate(tr, m, C)
        for l in range(tr.n_layers):
            hits = tot = 0
            for s in range(4):
                for start in range(0, 12, m):
                    c = Counter(int(e) for p in range(start, min(start + m, 12)) for e in tr.expert_idx_LNK[l, s * 12 + p]
                                if e >= 0)
                    hits += sum(v for _, v in c.most_common(C))
                    tot += sum(c.values())
            assert sch[l] == pytest.approx(hits / tot)
    assert np.allclose(analysis.segment_cache_hit_rate(tr, 4, tr.n_experts), 1.0)
    const = Trace(**{**tr.__dict__, "expert_idx_LNK": np.broadcast_to(np.array([1, 4], np.int16), tr.expert_idx_LNK.shape)})
    assert np.allclose(analysis.reuse_curve(const, 4), 1.0)
    with pytest.raises(ValueError, match="cache_size"):
        analysis.segment_cache_hit_rate(tr, 4, 0)


def test_top_tokens_decoded():
    tr = make_trace()
    idx = tr.expert_idx_LNK.copy()
    idx[1, tr.token_ids_N == 100, 0] = 5  # every "d" goes to expert 5
    idx[1, tr.token_ids_N == 100, 1] = 0
    idx[1, tr.token_ids_N != 100] = np.where(idx[1, tr.token_ids_N != 100] == 5, 4, idx[1, tr.token_ids_N != 100])
    top = analysis.top_tokens(Trace(**{**tr.__dict__, "expert_idx_LNK": idx}), layer=1, n=3)
    assert top[5] == [("d", int((tr.token_ids_N == 100).sum()), 1.0)]
    with pytest.raises(ValueError, match="layer"):
        analysis.top_tokens(tr, layer=7)


class _Checker(HTMLParser):
    VOID = frozenset({"img", "meta", "br", "hr", "link", "input", "col"})

    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def test_report_html_wellformed_with_existing_images(tmp_path):
    from moelab.report import write_report
    tr = make_trace()
    html = write_report(tr, tmp_path / "rep")
    chk = _Checker()
    chk.feed(html.read_text())
    assert chk.errors == [] and chk.stack == []
    assert len(chk.imgs) >= 4
    for src in chk.imgs:
        p = tmp_path / "rep" / src
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = html.read_text()
    assert "MaxVio" in text and "2408.15664" in text and "code" in text


def test_report_renders_in_headless_chromium(tmp_path):
    from browser import assert_renders

    from moelab.report import write_report
    dom = assert_renders(write_report(make_trace(), tmp_path / "rep"))
    assert "Routing report" in dom
