"""moelab compare: CI against hand computations, the verdict rule on synthetic numbers, a tiny 2-arm x 2-seed
run that writes every report section, resume, and the deduplicated plan."""
import json
import math
import statistics

import numpy as np
import pytest

from moelab import compare
from moelab import compare_stats as st
from moelab.compare_claims import CLAIMS, Check, Claim, Rel
from moelab.compare_report import write_report

TINY = {"model.d_model": 32, "moe.d_model": 32, "moe.d_expert": 32, "model.n_heads": 4, "model.d_dense": 64,
        "train.batch_size": 4, "train.seq_len": 32, "train.eval_batches": 1, "train.warmup": 2}


# ---------------------------------------------------------------- statistics

def test_t_quantile_table_and_expansion():
    assert st.t_quantile(2) == pytest.approx(4.303)
    assert st.t_quantile(9) == pytest.approx(2.262)
    # published table values beyond the stored ones (df = 40, 60, 120)
    for df, t in ((40, 2.021), (60, 2.000), (120, 1.980)):
        assert st.t_quantile(df) == pytest.approx(t, abs=1.5e-3)


def test_mean_ci_by_hand():
    ci = st.mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3)  # sample sd by hand: sqrt(5/3)
    assert ci.mean == pytest.approx(2.5)
    assert ci.half == pytest.approx(3.182 * sd / 2)
    assert (ci.lo, ci.hi) == pytest.approx((2.5 - 3.182 * sd / 2, 2.5 + 3.182 * sd / 2))
    one = st.mean_ci([0.7])
    assert one.n == 1 and math.isinf(one.half)
    assert st.mean_ci([None, float("nan")]).n == 0


def test_paired_ci_by_hand():
    arm, base = [1.0, 1.2, 0.9], [1.1, 1.5, 1.0]  # lower is better: gains 0.1, 0.3, 0.1
    gains = st.paired_gain(arm, base, lower_is_better=True)
    assert gains == pytest.approx([0.1, 0.3, 0.1])
    ci = st.mean_ci(gains)
    assert ci.mean == pytest.approx(0.5 / 3)
    assert ci.half == pytest.approx(4.303 * statistics.stdev([0.1, 0.3, 0.1]) / math.sqrt(3))
    assert st.paired_gain([2.0], [1.5], lower_is_better=False) == pytest.approx([0.5])
    assert st.paired_ratio([100, 50], [200, 200], lower_is_better=True) == pytest.approx([2.0, 4.0])


@pytest.mark.parametrize("kind,values,margin,expected", [
    ("better", [0.10, 0.11, 0.09], 0.0, "reproduced"),           # clear win
    ("better", [-0.10, -0.11, -0.09], 0.0, "not reproduced"),    # clear loss
    ("better", [0.10, -0.10, 0.05], 0.0, "inconclusive"),        # CI overlaps 0
    ("better", [0.10], 0.0, "inconclusive"),                     # one seed
    ("noninferior", [-0.005, -0.004, -0.006], 0.01, "reproduced"),
    ("noninferior", [-0.05, -0.06, -0.04], 0.01, "not reproduced"),
    ("noninferior", [0.0, -0.02, 0.01], 0.01, "inconclusive"),
    ("not_better", [0.0, 0.001, -0.001], 0.01, "reproduced"),
    ("not_better", [0.05, 0.06, 0.04], 0.01, "not reproduced"),
    ("ratio_at_least", [2.5, 2.6, 2.4], 2.0, "reproduced"),
    ("ratio_at_least", [1.0, 1.1, 0.9], 2.0, "not reproduced"),
    ("ratio_at_least", [1.0, 3.0, 2.0], 2.0, "inconclusive"),
])
def test_verdict_rule(kind, values, margin, expected):
    assert st.verdict(kind, st.mean_ci(values), margin) == expected


def test_verdict_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        st.verdict("faster", st.mean_ci([1, 2]), 0)


def test_steps_to_target_and_smooth():
    assert st.smooth([1, 2, 3, 4], 2) == pytest.approx([1, 1.5, 2.5, 3.5])
    curve = [5, 4, 3, 2, 1, 1]
    assert st.steps_to_target(curve, 2.0, 1) == 4
    assert st.steps_to_target(curve, 0.5, 1) == 7  # never: censored at len + 1
    assert st.final_level(curve, 2) == 1.0


# ---------------------------------------------------------------- plan / spec

def test_plan_dedupes_identical_arms_and_resolves_rel(tmp_path, monkeypatch):
    monkeypatch.setitem(CLAIMS, "t_a", Claim("a", "src", "m", {"x": {}, "y": {"moe.top_k": 1}}, ()))
    monkeypatch.setitem(CLAIMS, "t_b", Claim("b", "src", "m", {"same_as_x": {},
                                                               "wide": {"moe.d_expert": Rel(0.25, 1)}}, ()))
    jobs = compare.plan(["t_a", "t_b"], seeds=2, steps=5, preset="tiny", out=tmp_path)
    assert len(jobs) == 3 * 2  # x and same_as_x train once per seed
    shared = [j for j in jobs if len(j.dirs) == 2]
    assert len(shared) == 2 and all(j.dirs[1].endswith(f"t_b/same_as_x/seed{j.seed}") for j in shared)
    wide = next(j for j in jobs if "wide" in j.dirs[0])
    assert wide.overrides["moe.d_expert"] == 128 // 4 + 1  # tiny preset: d_expert 128


def test_unknown_claim_and_override_errors():
    with pytest.raises(ValueError, match="claim 'nope' is unknown"):
        compare.claim_names("nope")
    with pytest.raises(ValueError, match="compare override 'router'"):
        compare.base_config("tiny", {"router": "topk"})


def test_every_claim_is_consistent():
    from moelab.compare_report import METRICS
    for name, c in CLAIMS.items():
        for t in c.tests:
            assert t.arm in c.arms and t.baseline in c.arms, name
            assert t.kind in st.KINDS and t.metric in METRICS, name
        assert all(m in METRICS for m in c.metrics), name
        for ov in c.arms.values():  # every arm resolves to a valid config
            compare.base_config("tiny", compare.resolve_rel({**c.base, **ov}, "tiny"))


# ---------------------------------------------------------------- a tiny end-to-end run

@pytest.fixture
def tiny_claim(monkeypatch):
    claim = Claim(
        title="tiny", source="none", matching="test", base=TINY,
        arms={"topk": {}, "top1": {"moe.top_k": 1}},
        metrics=("val_loss", "max_vio_batch", "max_vio_global", "dead_experts", "experts_per_token",
                 "steps_to_target"),
        target_arm="topk", by_domain="experts_per_token",
        tests=(Check("top-1 is better", "top1", "topk", "val_loss"),
               Check("top-1 equal or better", "top1", "topk", "val_loss", kind="noninferior", margin=0.01)))
    monkeypatch.setitem(CLAIMS, "tiny_test", claim)
    return claim


def test_tiny_run_report_and_resume(tmp_path, tiny_claim):
    out = tmp_path / "cmp"
    logs = []
    data = compare.run_all("tiny_test", seeds=2, steps=10, preset=None, jobs=2, out=out, log=logs.append)
    assert "4 runs to train, 0 finished" in logs[0]
    rows = data["tiny_test"]
    for arm, k in (("topk", 2), ("top1", 1)):
        for s, r in enumerate(rows[arm]):
            assert r is not None, (arm, s)
            assert r["seed"] == s and len(r["loss_curve"]) == 10 and len(r["max_vio_curve"]) == 10
            load_LE = np.asarray(r["load_LE"])
            assert load_LE.shape == (2, 8) and np.allclose(load_LE.sum(1), 1.0)
            # MaxVio_global and dead experts recomputed from the validation load shares
            assert r["max_vio_global"] == pytest.approx(float(np.mean(load_LE.max(1) * 8 - 1)), rel=1e-6)
            assert r["dead_experts"] == int((load_LE == 0).sum())
            assert r["experts_per_token"] == pytest.approx(k)  # padding excluded: exactly k per real token
            assert r["max_vio_batch"] == pytest.approx(np.mean(r["max_vio_curve"]), abs=1e-4)
            assert 1 <= r["steps_to_target"] <= 11
    # the two seeds differ (seeded runs), the same arm/seed of another folder would not
    assert rows["topk"][0]["val_loss"] != rows["topk"][1]["val_loss"]

    md, page = write_report(data, out, {"command": "test"})
    text = md.read_text()
    for section in ("# moelab compare", "**Rule.**", "## Summary", "## 1. tiny_test", "**Paper.**",
                    "**Matching.**", "| arm | overrides |", "val loss (nats/byte)", "MaxVio_global", "**Verdict**",
                    "top-1 is better", "experts / token by validation domain", "Cost:"):
        assert section in text, section
    for fig in ("tiny_test_loss.png", "tiny_test_maxvio.png", "tiny_test_load.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
        assert f"figures/{fig}" in text and f"figures/{fig}" in page.read_text()
    assert page.read_text().count("<table>") == text.count("| arm ") + 2  # + summary and verdict tables
    assert any(v in text for v in ("**reproduced**", "**not reproduced**", "**inconclusive**"))
    from browser import assert_renders  # the HTML report in a real headless browser (skips without one)
    assert "tiny_test" in assert_renders(page)

    # resume: nothing to train; result files untouched
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    logs.clear()
    compare.run_all("tiny_test", seeds=2, steps=10, preset=None, jobs=1, out=out, log=logs.append)
    assert "0 runs to train, 4 finished" in logs[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamp
    # a missing result.json reruns exactly that arm x seed; a stale one (other config) counts as unfinished
    (out / "tiny_test" / "top1" / "seed1" / "result.json").unlink()
    r0 = out / "tiny_test" / "topk" / "seed0" / "result.json"
    r0.write_text(json.dumps({**json.loads(r0.read_text()), "key": "stale"}))
    logs.clear()
    compare.run_all("tiny_test", seeds=2, steps=10, preset=None, jobs=1, out=out, log=logs.append)
    assert "2 runs to train, 2 finished" in logs[0]
    assert json.loads(r0.read_text())["key"] != "stale"
