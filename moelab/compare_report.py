"""`moelab compare` report: DIR/report.md and DIR/index.html from the per-arm results (headless matplotlib).

Per claim: the arms, a table of every metric (mean +- 95% CI over seeds), the verdict lines (paired CI and
rule), train-loss curves with bands, MaxVio over steps, validation load heatmaps. L=MoE layers, E=experts.
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from moelab import compare_stats as st
from moelab.compare import evaluate_tests, metric_values
from moelab.compare_claims import CLAIMS, MARGIN, Claim
from moelab.plots import save_figure

# metric -> (label, decimals)
METRICS = {
    "val_loss": ("val loss (nats/byte)", 4), "val_loss_native": ("val loss, training-time routing", 4),
    "max_vio_batch": ("MaxVio_batch", 3), "max_vio_global": ("MaxVio_global", 3),
    "dead_experts": ("dead experts", 1), "specialization": ("specialization (JS bits)", 4),
    "experts_per_token": ("experts / token", 3), "expert_mflops": ("expert MFLOPs / token", 4),
    "steps_to_target": ("steps to target", 0), "params": ("params", 0), "active_params": ("active params", 0),
    "train_time_s": ("train wall s (1 thread)", 0),
}


def fmt_ci(ci: st.CI, decimals: int) -> str:
    """'mean ± half' (half-width of the 95% CI); '—' when no seed finished."""
    if ci.n == 0:
        return "—"
    if ci.n == 1 or not math.isfinite(ci.half):
        return f"{ci.mean:.{decimals}f} (1 seed)"
    return f"{ci.mean:.{decimals}f} ± {ci.half:.{decimals}f}"


def _band(curves: list[list[float]], window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smoothed mean curve and its 95% t band over seeds (the band collapses with one seed)."""
    n = min(len(c) for c in curves)
    Y = np.stack([st.smooth(c[:n], window) for c in curves])
    m = Y.mean(0)
    h = st.t_quantile(len(Y) - 1) * Y.std(0, ddof=1) / math.sqrt(len(Y)) if len(Y) > 1 else np.zeros_like(m)
    return np.arange(1, n + 1), m, h


def plot_curves(arms: dict, key: str, ylabel: str, title: str, path: Path) -> Path | None:
    """One line per arm (smoothed, mean over seeds) with its 95% band."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drew = False
    for arm, rows in arms.items():
        curves = [r[key] for r in rows if r is not None and r.get(key)]
        if not curves:
            continue
        x, m, h = _band(curves, max(1, min(len(c) for c in curves) // 20))
        ax.plot(x, m, label=f"{arm} (n={len(curves)})", lw=1.2)
        ax.fill_between(x, m - h, m + h, alpha=0.2)
        drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if key == "loss_curve":
        lo = min(float(np.min(l.get_ydata())) for l in ax.lines)
        ax.set_ylim(lo - 0.05, lo + 1.5)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=90)


def plot_load(arms: dict, title: str, path: Path) -> Path | None:
    """Validation load per (layer, expert) relative to the mean (1 = balanced), mean over seeds, one panel per arm."""
    panels = []
    for arm, rows in arms.items():
        loads = [np.asarray(r["load_LE"]) for r in rows if r is not None and r.get("load_LE")]
        if loads:
            L_E = np.mean(loads, 0)
            panels.append((arm, L_E * L_E.shape[1]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 1, 2.4), squeeze=False)
    for ax, (arm, rel_LE) in zip(axes[0], panels):
        im = ax.imshow(rel_LE, aspect="auto", cmap="viridis", vmin=0, vmax=3, interpolation="nearest")
        ax.set(title=arm, xlabel="expert")
        ax.set_yticks(range(rel_LE.shape[0]))
    axes[0][0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="load / mean")
    fig.suptitle(title, fontsize=9, y=1.08)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_tradeoff(arms: dict, x: str, y: str, title: str, path: Path) -> Path | None:
    """Mean +- 95% CI of metric y against metric x, one point per arm (e.g. FLOPs vs loss)."""
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for arm, rows in arms.items():
        cx, cy = st.mean_ci(metric_values(rows, x)), st.mean_ci(metric_values(rows, y))
        if cx.n == 0 or cy.n == 0:
            continue
        ex = cx.half if math.isfinite(cx.half) else 0
        ey = cy.half if math.isfinite(cy.half) else 0
        ax.errorbar([cx.mean], [cy.mean], xerr=[ex], yerr=[ey], fmt="o", capsize=3, label=arm)
    ax.set(xlabel=METRICS[x][0], ylabel=METRICS[y][0], title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=90)


def _overrides(ov: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in ov.items()) or "(claim base)"


def _gain_text(t, ci: st.CI) -> str:
    if ci.n == 0:
        return "no finished seed pair"
    if t.kind == "ratio_at_least":
        return f"{ci.mean:.2f}x [{ci.lo:.2f}, {ci.hi:.2f}] (n={ci.n}; need >= {t.margin:g}x)"
    unit = " nats/byte" if t.metric.startswith("val_loss") else ""
    word = "better" if ci.mean > 0 else "worse"
    extra = f"; margin {t.margin:g}" if t.kind in ("noninferior", "not_better") else ""
    return f"{word} by {abs(ci.mean):.4g}{unit}, CI [{ci.lo:.4g}, {ci.hi:.4g}] (n={ci.n}{extra})"


def claim_blocks(name: str, claim: Claim, arms: dict, fig_dir: Path, k: int) -> tuple[list, list]:
    """(report blocks, summary rows) of one claim."""
    b: list = [("h2", f"{k}. {name}: {claim.title}"), ("p", f"**Paper.** {claim.source}"),
               ("p", f"**Matching.** {claim.matching}"), ("p", f"**Claim base.** {_overrides(claim.base)}")]
    b.append(("table", ["arm", "overrides"], [[a, _overrides(o)] for a, o in claim.arms.items()]))
    cols = list(dict.fromkeys(claim.metrics + ("train_time_s",)))
    rows = []
    for arm, rs in arms.items():
        n_ok = sum(r is not None for r in rs)
        rows.append([arm, f"{n_ok}/{len(rs)}"] + [fmt_ci(st.mean_ci(metric_values(rs, m)), METRICS[m][1])
                                                  for m in cols])
    b.append(("p", "Mean ± 95% CI half-width over seeds (Student t):"))
    b.append(("table", ["arm", "seeds"] + [METRICS[m][0] for m in cols], rows))
    if claim.by_domain:
        doms = sorted({d for rs in arms.values() for r in rs if r for d in r.get(claim.by_domain + "_by_domain", {})})
        drows = []
        for arm, rs in arms.items():
            vals = [[r[claim.by_domain + "_by_domain"].get(d) for r in rs if r] for d in doms]
            drows.append([arm] + [fmt_ci(st.mean_ci(v), 3) for v in vals])
        b.append(("p", f"{METRICS[claim.by_domain][0]} by validation domain:"))
        b.append(("table", ["arm"] + doms, drows))
    summary = []
    vrows = []
    for res in evaluate_tests(claim, arms):
        t, ci = res["test"], res["ci"]
        vrows.append([t.paper, f"{t.arm} vs {t.baseline}", f"{t.metric} ({t.kind})", _gain_text(t, ci),
                      f"**{res['verdict']}**"])
        summary.append([name, t.paper, res["verdict"]])
    b.append(("p", "**Verdict** (paired per-seed comparison; rule at the top):"))
    b.append(("table", ["paper says", "arms", "deciding metric", "measured", "verdict"], vrows))
    figs = [plot_curves(arms, "loss_curve", "train loss (nats/byte)", f"{name}: train loss",
                        fig_dir / f"{name}_loss.png"),
            plot_curves(arms, "max_vio_curve", "MaxVio_batch (mean over layers)", f"{name}: MaxVio over steps",
                        fig_dir / f"{name}_maxvio.png"),
            plot_load(arms, f"{name}: validation load / mean load", fig_dir / f"{name}_load.png")]
    if "expert_mflops" in claim.metrics:
        figs.append(plot_tradeoff(arms, "expert_mflops", "val_loss", f"{name}: FLOPs vs loss",
                                  fig_dir / f"{name}_flops.png"))
    b += [("img", f"{fig_dir.name}/{f.name}", f.stem) for f in figs if f is not None]
    secs = sum(r["train_time_s"] for rs in arms.values() for r in rs if r and "trained_in" not in r)
    b.append(("p", (f"Cost: {secs:.0f} s of single-thread training (wall time, summed over the runs first trained "
                   f"for this claim; runs shared with an earlier claim are counted there).")))
    return b, summary


def build_blocks(data: dict, meta: dict, fig_dir: Path) -> list:
    """The whole report as blocks: ("h1"|"h2"|"p", text), ("table", head, rows), ("img", path, alt)."""
    head: list = [("h1", "moelab compare: MoE claims on one data set, model and budget"),
                  ("p", " · ".join(f"**{k}** {v}" for k, v in meta.items())),
                  ("p", (f"**Rule.** {st.RULE} Non-inferiority margin m = {MARGIN} nats/byte unless a test "
                        f"states otherwise. MaxVio_batch = max load / mean load - 1 per training step (mean over "
                        f"layers, then over steps); MaxVio_global = the same over all validation tokens; dead "
                        f"experts = experts with no validation token, summed over layers."))]
    body, summary = [], []
    for k, (name, arms) in enumerate(data.items(), 1):
        b, s = claim_blocks(name, CLAIMS[name], arms, fig_dir, k)
        body += b
        summary += s
    head += [("h2", "Summary"), ("table", ["claim", "paper says", "verdict"],
                                 [[c, p, f"**{v}**"] for c, p, v in summary])]
    return head + body


def render_md(blocks: list) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + blk[1])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "table":
            cells = [[str(c).replace("|", "\\|") for c in row] for row in [blk[1]] + blk[2]]
            out.append("\n".join(["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
                                 + ["| " + " | ".join(r) + " |" for r in cells[1:]]))
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(str(text)))


def render_html(blocks: list, title: str) -> str:
    out = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
           "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
           "font-size:13px}th{background:#f3f3f3}img{max-width:100%;margin:.3em}</style></head><body>")]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{_inline(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(blk[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(c)}</th>" for c in blk[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in blk[2])
            out.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "img":
            out.append(f"<img src='{html.escape(blk[1])}' alt='{html.escape(blk[2])}'>")
    return "\n".join(out) + "</body></html>\n"


def write_report(data: dict, out: str | Path, meta: dict) -> tuple[Path, Path]:
    """Write DIR/report.md, DIR/index.html and DIR/figures/*.png; returns the two document paths."""
    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(data, meta, fig_dir)
    md, page = out / "report.md", out / "index.html"
    md.write_text(render_md(blocks))
    page.write_text(render_html(blocks, "moelab compare"))
    return md, page
