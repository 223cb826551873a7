"""Plots of the routing analysis (matplotlib, headless Agg) and one self-contained HTML report.

`write_report(trace, out)` writes out/*.png and out/index.html (inline CSS, images alongside, no network).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from moelab import analysis
from moelab.plots import plt, save_figure
from moelab.progress import progress
from moelab.trace import Trace

SOURCES = [  # (metric, citation) shown in the report
    ("Expert load, MaxVio", "Wang et al. 2024, Auxiliary-Loss-Free Load Balancing, arXiv 2408.15664, eq. 7"),
    ("Domain specialization (JS divergence from the global distribution)",
     "Mixtral, arXiv 2401.04088 §5; OLMoE, arXiv 2409.02060 §5; JS divergence: Lin 1991"),
    ("Inter-layer affinity P(e_{l+1} | e_l), top-affine traffic share",
     "Yao et al. 2024, Exploiting Inter-Layer Expert Affinity, arXiv 2401.08383 §3"),
    ("Local routing consistency (expert reuse at distance d), segment cache best hit rate (SCH)",
     "Liang et al. 2025, Local Routing Consistency of MoE Models, arXiv 2505.16056 §3"),
    ("Top tokens per expert", "Mixtral, arXiv 2401.04088 §5; OLMoE, arXiv 2409.02060 §5"),
]
MAX_PANELS = 8  # at most this many layers / layer pairs get their own panel (evenly spaced)


def _pick(n: int) -> list[int]:
    return sorted({round(i) for i in np.linspace(0, n - 1, min(n, MAX_PANELS))}) if n else []


def plot_load(s: analysis.Summary, path: Path) -> Path:
    """Heatmap: share of routed slots per expert (columns) and layer (rows), MaxVio per layer on the right."""
    load_LE = s.counts_LE / np.maximum(s.counts_LE.sum(-1, keepdims=True), 1)
    L, E = load_LE.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.25 * E, 14), 1.2 + 0.35 * L), dpi=80)
    im = ax.imshow(load_LE * E, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(L), [f"{l}  (MaxVio {v:.2f})" for l, v in enumerate(s.max_vio_L)])
    fig.colorbar(im, ax=ax, label="load / uniform load")
    ax.set_title("Expert load per layer")
    return save_figure(fig, path)


def plot_trace_specialization(s: analysis.Summary, domains: tuple[str, ...], path: Path) -> Path:
    """One heatmap per (picked) layer: expert distribution of each domain relative to the global one."""
    layers = _pick(s.spec.dist_LDE.shape[0])
    D, E = s.spec.dist_LDE.shape[1:]
    fig, axes = plt.subplots(len(layers), 1, figsize=(min(2.5 + 0.25 * E, 14), 0.8 + (0.3 * D + 0.6) * len(layers)),
                             dpi=80, squeeze=False)
    for ax, l in zip(axes[:, 0], layers):
        ratio = s.spec.dist_LDE[l] / np.maximum(s.spec.global_LE[l], 1e-12)
        im = ax.imshow(ratio, aspect="auto", cmap="RdBu_r", vmin=0, vmax=2)
        ax.set_yticks(range(D), [f"{d} (JS {j:.3f})" for d, j in zip(domains, s.spec.js_LD[l])])
        ax.set_title(f"layer {l}: domain share / global share per expert", fontsize=9)
        fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel("expert")
    return save_figure(fig, path)


def plot_affinity(s: analysis.Summary, path: Path) -> Path:
    """One matrix per (picked) layer pair: P(expert j at l+1 | expert i at l)."""
    pairs = _pick(s.aff.cond_PEE.shape[0])
    n = max(len(pairs), 1)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), dpi=80, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(pairs):
            ax.axis("off")
            continue
        l = pairs[k]
        im = ax.imshow(s.aff.cond_PEE[l], cmap="magma", vmin=0, vmax=max(float(s.aff.cond_PEE.max()), 1e-9))
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"{l}->{l + 1}: top-{s.aff.top} share {s.aff.top_share_P[l]:.2f}", fontsize=9)
        ax.set_xlabel("expert at l+1", fontsize=8)
        ax.set_ylabel("expert at l", fontsize=8)
    fig.suptitle("Inter-layer affinity P(e_{l+1} | e_l)")
    return save_figure(fig, path)


def plot_consistency(s: analysis.Summary, top_k: int, n_experts: int, path: Path) -> Path:
    """Left: share of experts reused by the token d positions later. Right: SCH vs segment length."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    d = np.arange(1, s.reuse_LD.shape[1] + 1)
    for l in _pick(s.reuse_LD.shape[0]):
        a.plot(d, s.reuse_LD[l], marker=".", label=f"layer {l}")
        b.plot(s.seg_lens, s.sch_LS[l], marker=".", label=f"layer {l}")
    a.axhline(top_k / n_experts, ls="--", c="gray", label="random routing")
    a.set_xlabel("distance d (tokens)")
    a.set_ylabel("share of experts reused")
    a.set_title("Local routing consistency")
    b.set_xscale("log", base=2)
    b.set_xlabel("segment length (tokens)")
    b.set_ylabel(f"best hit rate, cache = {s.cache_size} experts")
    b.set_title("Segment cache best hit rate (SCH)")
    a.legend(fontsize=7)
    return save_figure(fig, path)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}td.t{text-align:left;font-family:monospace}img{max-width:100%}")


def _table(head: list[str], rows: list[list[str]], left: int = 0) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f'<td class="t">{c}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _tok(t: str) -> str:
    """Visible text of a token: spaces as an open box, control characters escaped."""
    return html.escape(repr(t)[1:-1].replace(" ", "\u2423"))


def write_report(trace: Trace, out: str | Path, top_layer: int | None = None) -> Path:
    """Write the PNG plots and out/index.html for `trace`; returns the HTML path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = analysis.summarize(trace)
    figures = [("Expert load", lambda: plot_load(s, out / "load.png")),
               ("Domain specialization",
                lambda: plot_trace_specialization(s, trace.domains, out / "specialization.png")),
               ("Inter-layer affinity", lambda: plot_affinity(s, out / "affinity.png")),
               ("Local routing consistency",
                lambda: plot_consistency(s, trace.top_k, trace.n_experts, out / "consistency.png"))]
    imgs = [(title, draw()) for title, draw in progress(figures, "report")]
    L, E, K = trace.n_layers, trace.n_experts, trace.top_k
    rows = []
    for l in range(L):
        js = s.spec.js_LD[l]
        rows.append([str(l), f"{s.max_vio_L[l]:.3f}", str(int((s.counts_LE[l] == 0).sum())),
                     f"{js.mean():.3f}", html.escape(trace.domains[int(js.argmax())]),
                     f"{s.aff.top_share_P[l]:.3f}" if l < L - 1 else "-", f"{s.reuse_LD[l, 0]:.3f}",
                     f"{s.sch_LS[l, -1]:.3f}"])
    head = ["layer", "MaxVio", "dead experts", "mean JS (bits)", "most specialized domain",
            f"top-{s.aff.top} affine share l->l+1 (random {min(s.aff.top, E) / E:.2f})",
            f"reuse d=1 (random {K / E:.2f})", f"SCH seg={s.seg_lens[-1]}, cache={s.cache_size}"]
    tl = L // 2 if top_layer is None else top_layer
    tops = analysis.top_tokens(trace, tl, n=6)
    tok_rows = [[str(e), " ".join(f"{_tok(t)}<sub>{c}, {100 * f:.0f}%</sub>" for t, c, f in tt)]
                for e, tt in enumerate(tops)]
    meta = {k: v for k, v in trace.meta.items() if isinstance(v, (str, int, float))}
    names = [str(n) for n in trace.meta.get("layer_names", [])]
    info = (f"{trace.n_tokens} tokens, {len(np.unique(trace.seq_ids_N))} sequences, {L} MoE layers, "
            f"E={E} experts, k={K}, domains: {', '.join(trace.domains)}")
    parts = [(f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>moelab routing report</title>"
             f"<style>{_CSS}</style></head><body>"),
             "<h1>Routing report</h1>", f"<p>{html.escape(info)}</p>",
             f"<p class=\"meta\">{html.escape(json.dumps(meta))}</p>",
             f"<p>MoE layer i is module: {html.escape(', '.join(f'{i}={n}' for i, n in enumerate(names)))}</p>"
             if names else "",
             "<h2>Summary per layer</h2>", _table(head, rows),
             *[f"<h2>{html.escape(t)}</h2><p><img src=\"{p.name}\" alt=\"{html.escape(t)}\"></p>" for t, p in imgs],
             f"<h2>Top tokens per expert, layer {tl}</h2><p>subscript: times routed to the expert, and the share of that token's occurrences it is</p>",
             _table(["expert", "tokens"], tok_rows, left=2),
             "<h2>Sources</h2><ul>", *[f"<li>{html.escape(m)}: {html.escape(c)}</li>" for m, c in SOURCES],
             "</ul></body></html>"]
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
