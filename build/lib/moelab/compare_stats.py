"""Statistics of `moelab compare`: Student-t confidence intervals over seeds and the verdict rule. Pure (numpy).

n = seeds. Arms share seeds, so an arm is judged against its baseline through the per-seed paired
difference (or ratio), never through two overlapping error bars.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (any statistics table).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)

KINDS = ("better", "noninferior", "not_better", "ratio_at_least")

RULE = (
    "Every arm runs on the same data, steps and seeds 0..n-1. For each test, d_s is the per-seed paired "
    "difference arm - baseline of the deciding metric, sign-flipped so that d > 0 means the arm is better "
    "(lower loss / MaxVio / FLOPs / steps, higher specialization); its 95% CI is mean(d) +- t(0.975, n-1) * "
    "sd(d) / sqrt(n) (Student t). Kinds: **better** (the paper says the arm is better): reproduced if CI low "
    "> 0, not reproduced if CI high < 0, else inconclusive. **noninferior** ('equal or better', margin m): "
    "reproduced if CI low > -m, not reproduced if CI high < -m, else inconclusive. **not_better** (the arm is "
    "no better, margin m): reproduced if CI high < m, not reproduced if CI low > m, else inconclusive. "
    "**ratio_at_least** (e.g. '> 2x faster', threshold r): per-seed ratio baseline / arm, reproduced if CI "
    "low >= r, not reproduced if CI high < r, else inconclusive. With one seed every CI is infinite: "
    "inconclusive.")


def t_quantile(df: int) -> float:
    """Two-sided 95% Student t quantile t_{0.975, df}; df > 30 by the Cornish-Fisher expansion (4 digits)."""
    if df < 1:
        return math.inf
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class CI:
    """Mean and two-sided 95% Student-t interval of n values."""
    mean: float   # sample mean
    lo: float     # lower bound (-inf with one value)
    hi: float     # upper bound (+inf with one value)
    n: int        # values (seeds)

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2


def mean_ci(values) -> CI:
    """Mean +- t(0.975, n-1) * sample sd / sqrt(n); NaN values (missing seeds) are left out."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return CI(math.nan, math.nan, math.nan, 0)
    m = float(v.mean())
    if n == 1:
        return CI(m, -math.inf, math.inf, 1)
    h = t_quantile(n - 1) * float(v.std(ddof=1)) / math.sqrt(n)
    return CI(m, m - h, m + h, n)


def paired_gain(arm, base, *, lower_is_better: bool) -> list[float]:
    """Per-seed gain of the arm over the baseline, > 0 = arm better: base - arm (lower is better) or arm - base."""
    return [(b - a) if lower_is_better else (a - b) for a, b in zip(arm, base) if a is not None and b is not None]


def paired_ratio(arm, base, *, lower_is_better: bool) -> list[float]:
    """Per-seed ratio, > 1 = arm better: base / arm (lower is better, e.g. steps: a speed-up) or arm / base."""
    out = []
    for a, b in zip(arm, base):
        if a is None or b is None or (a if lower_is_better else b) == 0:
            continue
        out.append(b / a if lower_is_better else a / b)
    return out


def verdict(kind: str, ci: CI, margin: float = 0.0) -> str:
    """'reproduced' | 'not reproduced' | 'inconclusive' for a CI of the gain (or ratio), per RULE."""
    if kind not in KINDS:
        raise ValueError(f"test kind={kind!r} is invalid: allowed {', '.join(KINDS)}")
    if ci.n == 0 or math.isnan(ci.mean):
        return "inconclusive"
    if kind == "better":
        yes, no = ci.lo > 0, ci.hi < 0
    elif kind == "noninferior":
        yes, no = ci.lo > -margin, ci.hi < -margin
    elif kind == "not_better":
        yes, no = ci.hi < margin, ci.lo > margin
    else:
        yes, no = ci.lo >= margin, ci.hi < margin
    return "reproduced" if yes else "not reproduced" if no else "inconclusive"


def smooth(y, window: int) -> np.ndarray:
    """Trailing moving average (the first window-1 points average what is there so far)."""
    y = np.asarray(y, dtype=np.float64)
    if window <= 1 or len(y) == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def steps_to_target(curve, target: float, window: int) -> int:
    """First step (1-based) at which the smoothed curve is <= target; len(curve) + 1 if never (censored)."""
    s = smooth(curve, window)
    hit = np.nonzero(s <= target)[0]
    return int(hit[0]) + 1 if len(hit) else len(s) + 1


def final_level(curve, window: int) -> float:
    """Mean of the last `window` points: the level a run ends at."""
    y = np.asarray(curve, dtype=np.float64)
    return float(y[-window:].mean()) if len(y) else math.nan
