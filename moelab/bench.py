"""MoE layer speed: moelab vs the GEMM floor, the dense-equivalent GEMMs, transformers, and decode vs the
bandwidth floor.

T=tokens, D=d_model, E=experts, K=top-k, F=expert hidden, G=2F (gate|up), C=T*K/E rows per expert.
Everything is measured interleaved in one process (A B C A B C ...) after warm-up; the table reports the
median of the per-round ratios, which survives a noisy shared machine far better than absolute times.
Run: `moelab bench` (or `python benchmarks/bench_moe.py`); `--quick` runs tiny shapes in seconds (a smoke
test: its numbers are not comparable with the real shapes). Results go to --out, by default
benchmarks/results/bench_moe.json under the current folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import Tensor

from moelab.config import EXPERT_IMPLS, MoEConfig
from moelab.expert_kernels import ExpertTensors, activate, bmm_mlp, mlp
from moelab.experts import scoped_threads
from moelab.moe import MoELayer

RESULTS_DIR = Path("benchmarks") / "results"  # relative to the current folder, never the installed package


@dataclass(frozen=True)
class Shape:
    name: str      # label in the table
    E: int         # routed experts
    k: int         # experts per token
    D: int         # d_model
    F: int         # expert hidden size
    T: int         # tokens per call
    max_vio: float = 0.0  # > 0: gate skewed to Zipf-like loads with this MaxVio (max/mean - 1); 0: random init


SHAPES = (Shape("coarse", 8, 2, 512, 1408, 4096), Shape("fine", 64, 8, 512, 256, 2048),
          Shape("fine-skew", 64, 8, 512, 256, 2048, 1.0))
DECODE = Shape("decode", 64, 8, 512, 256, 8)
QUICK_SHAPES = (Shape("coarse", 4, 2, 64, 128, 256), Shape("fine", 16, 4, 64, 32, 256),
                Shape("fine-skew", 16, 4, 64, 32, 256, 1.0))
QUICK_DECODE = Shape("decode", 16, 4, 64, 32, 8)


def interleaved(fns: dict, rounds: int, budget_s: float, before=None) -> dict[str, list[float]]:
    """Times each fn once per round, in turn, after one warm-up call each; stops early past budget_s."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    t_end = time.perf_counter() + budget_s
    for r in range(rounds):
        for name, f in fns.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() > t_end:
            break
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def moelab_layer(s: Shape, impl: str) -> MoELayer:
    cfg = MoEConfig(d_model=s.D, d_expert=s.F, n_experts=s.E, top_k=s.k, expert_impl=impl)
    return MoELayer(cfg)


def hf_block(s: Shape, layer: MoELayer, impl: str):
    """Qwen3-MoE sparse block with the moelab layer's weights (softmax -> top-k -> renormalise: same math)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    cfg = Qwen3MoeConfig(hidden_size=s.D, moe_intermediate_size=s.F, num_experts=s.E, num_experts_per_tok=s.k,
                         norm_topk_prob=True, hidden_act="silu", experts_implementation=impl)
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(layer.gate.weight)
        block.experts.gate_up_proj.copy_(layer.experts.weights.w_up_EDG.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.weights.w_down_EFD.transpose(1, 2))
    return block


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


class Dense:
    """The dense-equivalent: T*K rows through one expert-sized SwiGLU MLP (exactly the expert FLOPs)."""

    def __init__(self, s: Shape):
        self.x_ND = torch.randn(s.T * s.k, s.D, requires_grad=True)
        self.w_up_DG = (torch.randn(s.D, 2 * s.F) * s.D ** -0.5).requires_grad_()
        self.w_down_FD = (torch.randn(s.F, s.D) * s.F ** -0.5).requires_grad_()

    def __call__(self) -> Tensor:
        return mlp(self.x_ND, ExpertTensors(self.w_up_DG, self.w_down_FD), lambda h: activate(h, "swiglu"))


class Floor:
    """The GEMM floor: the same expert GEMMs on pre-sorted, unpadded rows, exactly C = T*K/E rows per expert, as
    one bmm each (what a perfect dispatcher would leave to do)."""

    def __init__(self, s: Shape):
        C = s.T * s.k // s.E
        self.x_ECD = torch.randn(s.E, C, s.D, requires_grad=True)
        self.w_up_EDG = (torch.randn(s.E, s.D, 2 * s.F) * s.D ** -0.5).requires_grad_()
        self.w_down_EFD = (torch.randn(s.E, s.F, s.D) * s.F ** -0.5).requires_grad_()

    def __call__(self) -> Tensor:
        return bmm_mlp(self.x_ECD, ExpertTensors(self.w_up_EDG, self.w_down_EFD), lambda h: activate(h, "swiglu"))


def skew_gate(layer: MoELayer, x_TD: Tensor, max_vio: float, scale: float = 4.0) -> tuple[Tensor, float]:
    """Skews the gate to Zipf-like loads (expert e's logit + b_e, b_e = -a log(e + 1)) as an unbalanced
    early-training router gives: x gets a constant component `scale` * u (unit u) and the gate b u^T / scale, so
    transformers' block (same gate weight) routes the same; `a` bisected until MaxVio = max_vio. Returns
    (x_TD with the component, the MaxVio reached)."""
    D, E = x_TD.shape[1], layer.cfg.n_experts
    u_D = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(7)), dim=0)
    x_TD = (x_TD.detach() + scale * u_D).requires_grad_(x_TD.requires_grad)
    w0 = layer.gate.weight.detach().clone()
    rank_E = torch.log(torch.arange(1, E + 1, dtype=torch.float32))

    def vio(a: float) -> float:
        with torch.no_grad():
            layer.gate.weight.copy_(w0)
            layer.gate.weight[:E] -= torch.outer(a * rank_E, u_D) / scale
            idx = layer.route(x_TD, None, None).expert_idx_TK
        c = torch.bincount(idx[idx >= 0], minlength=E).float()
        return float(c.max() / c.mean() - 1)

    lo, hi = 0.0, 4.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if vio(mid) < max_vio else (lo, mid)
    return x_TD, vio((lo + hi) / 2)


def _fwd(f):
    def run():
        with torch.no_grad():
            f()
    return run


def _fwd_bwd(f, params):
    def run():
        for p in params:
            p.grad = None
        f().float().sum().backward()
    return run


def peak_bytes(fn) -> int:
    """Peak CPU bytes allocated above the starting point while fn runs (torch.profiler memory events), on one
    intra-op thread: the profiler counts only the calling thread's allocations, and on one thread the fused
    kernel runs on it (on more, each extra worker adds one expert's temporaries and one (T, D) buffer)."""
    from torch.profiler import ProfilerActivity, profile
    with scoped_threads(1), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    finally:
        os.remove(path)
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


def layout_stats(layer: MoELayer, x_TD: Tensor) -> dict:
    """Rows the experts path computes for these tokens: the kernel, block rows C, padding and tail shares of the
    real rows (the fused kernel: every expert's own rows, no padding, no tail)."""
    with torch.no_grad():
        idx = layer.route(x_TD, None, None).expert_idx_TK
    c_E = torch.bincount(idx[idx >= 0], minlength=layer.cfg.n_experts)
    path, w = layer.experts.path, layer.experts.weights
    fused = path.fuses(x_TD, int((idx >= 0).sum()), w)
    C = 0 if fused else path.block_rows(c_E, G=w.w_up_EDG.shape[2], itemsize=4)
    R, E = int(c_E.sum()), c_E.numel()
    over = (c_E - C).clamp_min(0)
    rows = E * C + int(over.sum()) if C else R
    return {"max_vio": float(c_E.max() / c_E.float().mean() - 1), "min_count": int(c_E.min()),
            "max_count": int(c_E.max()), "kernel": "fused" if fused else ("blocked" if C else "compact"),
            "block_rows": C, "padding_share": (rows - R) / R, "tail_share": int(over.sum()) / R if C else 0.0,
            "tail_experts": int((over > 0).sum()) if C else 0}


def bench_shape(s: Shape, rounds: int, budget_s: float, impl: str, with_hf: bool, prof: bool = False,
                compiled: bool = False) -> dict:
    torch.manual_seed(0)
    layer = moelab_layer(s, impl)
    x_TD = torch.randn(s.T, s.D, requires_grad=True)
    reached = None
    if s.max_vio:
        x_TD, reached = skew_gate(layer, x_TD, s.max_vio)
    dense, floor = Dense(s), Floor(s)

    def moe(fn=layer):
        r = fn(x_TD)
        return r.y + r.aux_loss  # the aux loss's backward is part of the layer's cost

    cands = {"dense": (dense, [dense.x_ND, dense.w_up_DG, dense.w_down_FD]),
             "floor": (floor, [floor.x_ECD, floor.w_up_EDG, floor.w_down_EFD]),
             "moelab": (moe, [x_TD, *layer.parameters()])}
    if compiled:
        fn = torch.compile(layer)
        cands["moelab_compiled"] = (lambda: moe(fn), cands["moelab"][1])
    check = {"layout": layout_stats(layer, x_TD), "max_vio_reached": reached}
    if with_hf:
        for hf_impl in ("eager", "grouped_mm"):
            block = hf_block(s, layer, hf_impl)
            x_1TD = x_TD.unsqueeze(0)
            cands[f"hf_{hf_impl}"] = (lambda b=block, x=x_1TD: b(x), [x_TD, *block.parameters()])
            with torch.no_grad():
                check[f"max_abs_diff_vs_hf_{hf_impl}"] = (block(x_1TD)[0] - layer(x_TD).y).abs().max().item()
    out = {"shape": asdict(s), "check": check}
    for mode, wrap in (("fwd", lambda f, p: _fwd(f)), ("fwd_bwd", _fwd_bwd)):
        times = interleaved({n: wrap(f, p) for n, (f, p) in cands.items()}, rounds, budget_s)
        res = {f"{n}_ms": 1e3 * statistics.median(t) for n, t in times.items()}
        res["rounds"] = len(times["dense"])
        res["moelab_over_dense"] = median_ratio(times["moelab"], times["dense"])
        res["moelab_over_floor"] = median_ratio(times["moelab"], times["floor"])
        res["floor_over_dense"] = median_ratio(times["floor"], times["dense"])
        if compiled:
            res["compiled_over_floor"] = median_ratio(times["moelab_compiled"], times["floor"])
            res["compiled_over_moelab"] = median_ratio(times["moelab_compiled"], times["moelab"])
        hf_names = [n for n in times if n.startswith("hf_")]
        if hf_names:
            best_hf = [min(ts) for ts in zip(*(times[n] for n in hf_names))]
            res["best_hf_over_moelab"] = median_ratio(best_hf, times["moelab"])
            res["best_hf_over_floor"] = median_ratio(best_hf, times["floor"])
            res["hf_eager_over_floor"] = median_ratio(times["hf_eager"], times["floor"]) if "hf_eager" in times else None
            res["hf_timed"] = hf_names
        out[mode] = res
        if with_hf and mode == "fwd":
            fastest_hf = min(statistics.median(times[n]) for n in hf_names)
            for n in hf_names:  # >2x slower than the other HF impl in fwd: it will not be the best, spare minutes
                if statistics.median(times[n]) > 2 * fastest_hf:
                    del cands[n]
    mem = {n: peak_bytes(_fwd_bwd(*cands[n])) for n in ("dense", "moelab")}
    out["peak_mem_fwd_bwd_bytes"] = mem
    out["peak_mem_moelab_over_dense"] = mem["moelab"] / mem["dense"]
    # The E experts' weight gradients are E x the dense MLP's and inherent to MoE; without them, activations only.
    grads = {n: sum(p.numel() * p.element_size() for p in cands[n][1][1:]) for n in ("dense", "moelab")}
    out["param_grad_bytes"] = grads
    out["peak_act_mem_moelab_over_dense"] = (mem["moelab"] - grads["moelab"]) / (mem["dense"] - grads["dense"])
    if prof:
        out["profile"] = {mode: {n: profile_top(wrap(*cands[n])) for n in ("moelab", "floor")}
                          for mode, wrap in (("fwd", lambda f, p: _fwd(f)), ("fwd_bwd", _fwd_bwd))}
    return out


def profile_top(fn, n_ops: int = 12) -> list[dict]:
    """Where the time goes: the n_ops ops with the most self CPU time over one call of fn (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    evs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in evs)
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in evs[:n_ops]]


def copy_bandwidth(nbytes: int = 512 << 20, rounds: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write both counted)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(ts)


def bench_decode(s: Shape, rounds: int, budget_s: float, impl: str, with_hf: bool, flush_mb: int) -> dict:
    """Decode: T tokens per call, forward only; floor = expert bytes touched / copy bandwidth.
    A cache-sized buffer is rewritten before every call so the weights come from memory, as in a real model."""
    torch.manual_seed(1)
    layer = moelab_layer(s, impl)
    batches = [torch.randn(s.T, s.D) for _ in range(8)]
    flush = torch.empty(flush_mb << 18)
    step = {"i": 0}

    def before():
        flush.fill_(step["i"])
        step["i"] += 1

    def moe():
        layer(batches[step["i"] % len(batches)])

    auto = layer.experts.path

    def moe_all_threads():  # the experts on every thread (no small-call thread choice)
        layer.experts.path = replace(auto, few_threads=0)
        try:
            moe()
        finally:
            layer.experts.path = auto

    cands = {"moelab": _fwd(moe), "moelab_all_threads": _fwd(moe_all_threads)}
    if with_hf:
        for hf_impl in ("eager", "grouped_mm"):
            block = hf_block(s, layer, hf_impl)
            cands[f"hf_{hf_impl}"] = _fwd(lambda b=block: b(batches[step["i"] % len(batches)].unsqueeze(0)))
    times = interleaved(cands, rounds, budget_s, before=before)
    w = layer.experts.weights
    bytes_per_expert = (w.w_up_EDG[0].numel() + w.w_down_EFD[0].numel()) * 4
    with torch.no_grad():
        touched = [layer.route(b, None, None).expert_idx_TK.unique().numel() for b in batches]
    bytes_touched = statistics.mean(touched) * bytes_per_expert + layer.gate.weight.numel() * 4
    bw = copy_bandwidth()
    floor_s = bytes_touched / bw
    res = {f"{n}_ms": 1e3 * statistics.median(t) for n, t in times.items()}
    res.update(shape=asdict(s), rounds=len(times["moelab"]), experts_touched=statistics.mean(touched),
               bytes_touched=bytes_touched, copy_bandwidth_GBps=bw / 1e9, floor_ms=1e3 * floor_s,
               moelab_over_floor=statistics.median(t / floor_s for t in times["moelab"]),
               moelab_all_threads_over_floor=statistics.median(t / floor_s for t in times["moelab_all_threads"]),
               experts_threads=auto.few_threads if s.T * s.k <= auto.few_rows else torch.get_num_threads(),
               loadavg_1min=os.getloadavg()[0])
    if with_hf:
        best_hf = [min(a, b) for a, b in zip(times["hf_eager"], times["hf_grouped_mm"])]
        res["best_hf_over_moelab"] = median_ratio(best_hf, times["moelab"])
    return res


COLUMNS = ("shape", "mode", "moelab ms", "floor ms", "moelab / floor", "dense-eq ms", "moelab / dense-eq",
           "best HF / moelab", "target")


def shape_label(s: dict) -> str:
    """A shape's name in the tables, with the MaxVio its router reached."""
    sh = s["shape"]
    return f"{sh['name']} E={sh['E']} k={sh['k']} F={sh['F']} T={sh['T']} (MaxVio {s['check']['layout']['max_vio']:.2f})"


def table_rows(results: dict) -> list[tuple[str, ...]]:
    """One row per shape and mode (compiled and memory rows too): what the table and the markdown show."""
    rows = []
    for s in results["shapes"]:
        lay, name = s["check"]["layout"], shape_label(s)
        for mode, target in (("fwd", "<= 1.10 floor, HF >= 1.05x"), ("fwd_bwd", "<= 1.10 floor, HF >= 1.2x")):
            r = s[mode]
            hf = f"{r['best_hf_over_moelab']:.2f}x" if "best_hf_over_moelab" in r else "-"
            rows.append((name, mode, f"{r['moelab_ms']:.1f}", f"{r['floor_ms']:.1f}", f"{r['moelab_over_floor']:.2f}",
                         f"{r['dense_ms']:.1f}", f"{r['moelab_over_dense']:.2f}", hf, target))
            if "compiled_over_floor" in r:
                rows.append((name, f"{mode} compiled", f"{r['moelab_compiled_ms']:.1f}", f"{r['floor_ms']:.1f}",
                             f"{r['compiled_over_floor']:.2f}", "", f"{r['compiled_over_moelab']:.2f} x eager", "",
                             ""))
        m = s["peak_mem_fwd_bwd_bytes"]
        rows.append((name, "peak mem fwd+bwd", f"{m['moelab'] / 2**20:.0f} MiB", "", "",
                     f"{m['dense'] / 2**20:.0f} MiB", f"{s['peak_mem_moelab_over_dense']:.2f}", "", "(full)"))
        rows.append((name, "activation mem", "", "", "", "", f"{s['peak_act_mem_moelab_over_dense']:.2f}", "",
                     "<= 1.2"))
        split = {"fused": "fused per expert: each expert's own rows, pad 0%",
                 "compact": "compact, expert by expert (big blocks)"}.get(
            lay.get("kernel"), f"pad {100 * lay['padding_share']:.1f}%, tail {100 * lay['tail_share']:.1f}% / "
                               f"{lay['tail_experts']} experts")
        rows.append((name, "rows", f"C={lay['block_rows']}", "", "", "", split, "", "pad <= 5%"))
    d = results["decode"]
    hf = f"{d['best_hf_over_moelab']:.2f}x" if "best_hf_over_moelab" in d else "-"
    rows.append((f"decode T={d['shape']['T']} (fine)", f"fwd, {d['experts_threads']} thread(s)",
                 f"{d['moelab_ms']:.2f}", f"{d['floor_ms']:.2f}", f"{d['moelab_over_floor']:.2f}", "", "", hf,
                 "<= 1.5 floor"))
    rows.append((f"decode T={d['shape']['T']} (fine)", "fwd, all threads", f"{d['moelab_all_threads_ms']:.2f}",
                 f"{d['floor_ms']:.2f}", f"{d['moelab_all_threads_over_floor']:.2f}", "", "", "", ""))
    return rows


def summary_markdown(results: dict) -> str:
    """The README's table: per shape, moelab over the GEMM floor, transformers' best over moelab and the
    activation memory over dense-eq; decode over its weight-read floor."""
    lines = ["| shape | fwd / floor | fwd+bwd / floor | best HF / moelab fwd | fwd+bwd | activation mem / dense-eq |",
             "|---|---|---|---|---|---|"]
    for s in results["shapes"]:
        f, fb = s["fwd"], s["fwd_bwd"]
        hf = [f"{r['best_hf_over_moelab']:.2f}x" if "best_hf_over_moelab" in r else "-" for r in (f, fb)]
        lines.append(f"| {shape_label(s)} | {f['moelab_over_floor']:.2f} | {fb['moelab_over_floor']:.2f} | {hf[0]} | "
                     f"{hf[1]} | {s['peak_act_mem_moelab_over_dense']:.2f} |")
    d = results["decode"]
    hf = f"{d['best_hf_over_moelab']:.2f}x" if "best_hf_over_moelab" in d else "-"
    lines.append(f"| decode T={d['shape']['T']} (fine) | {d['moelab_over_floor']:.2f} (weight-read floor) | - | "
                 f"{hf} | - | - |")
    return "\n".join(lines)


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    load = f"load {results['loadavg_1min_start']:.1f} -> {results['loadavg_1min_end']:.1f}"
    load += f", {results['busy_processes']} busy processes" if results.get("busy_processes") else ""
    t = Table(title=f"moelab MoE layer, fp32, {results['threads']} threads ({results['date']}, {load})")
    for col in COLUMNS:
        t.add_column(col, justify="right")
    for row in table_rows(results):
        t.add_row(*row)
    Console(width=160).print(t)


def to_markdown(results: dict) -> str:
    """The same numbers as a markdown table (what docs/speed.md shows)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table_rows(results)])


@contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """n other processes spinning on the CPU while the block runs (the cores shared, reproducibly)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(1.0 if n else 0.0)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run(*, quick: bool = False, rounds: int = 15, budget_s: float = 200.0, impl: str = "grouped",
        out: str | None = None, hf: bool = True, prof: bool = False, compiled: bool = False, busy: int = 0) -> dict:
    """Runs every measurement, prints the table, writes the JSON; returns the results dict.
    `budget_s` is the timing budget of the whole run (each measurement stops early past its share; at least
    3 rounds each); warm-up and the memory profiles come on top. `busy` other processes spin meanwhile."""
    torch.set_num_threads(2)
    with_hf = hf and have_transformers()
    shapes, decode = (QUICK_SHAPES, QUICK_DECODE) if quick else (SHAPES, DECODE)
    if quick:
        print("--quick: tiny shapes, a smoke test; its ratios are not comparable with the real shapes'")
    share = budget_s / (2 * len(shapes) + 1)  # fwd and fwd+bwd of each shape, and decode
    t0 = time.perf_counter()
    results = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "threads": 2, "dtype": "float32",
               "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}",
               "impl": impl, "quick": quick, "busy_processes": busy}
    with busy_processes(busy):
        results["loadavg_1min_start"] = os.getloadavg()[0]
        results["shapes"] = [bench_shape(s, rounds, share, impl, with_hf, prof, compiled) for s in shapes]
        results["decode"] = bench_decode(decode, 3 * rounds, share, impl, with_hf, 8 if quick else 320)
        results["loadavg_1min_end"] = os.getloadavg()[0]  # other processes on the 2 cores while we measured
    results["wall_s"] = time.perf_counter() - t0
    results["noisy"] = max(results["loadavg_1min_start"], results["loadavg_1min_end"]) > 1.5
    print_table(results)
    print(to_markdown(results))
    print(summary_markdown(results))
    for s in results["shapes"] if prof else ():
        for mode, by_impl in s["profile"].items():
            top = ", ".join(f"{r['op']} {100 * r['share']:.0f}%" for r in by_impl["moelab"][:8])
            print(f"profile {s['shape']['name']} {mode} moelab: {top}")
    path = Path(out) if out else RESULTS_DIR / f"bench_moe{'_quick' if quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path} ({results['wall_s']:.0f} s)")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds (smoke test)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per measurement at most (default 15)")
    p.add_argument("--budget", type=float, default=200.0, help="timing seconds for the whole run (default 200)")
    p.add_argument("--impl", default="grouped", choices=list(EXPERT_IMPLS), help="moelab expert path (default "
                   "grouped)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_moe.json under the "
                   "current folder)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    p.add_argument("--profile", action="store_true", help="also record the top ops of moelab and dense (torch.profiler)")
    p.add_argument("--compile", action="store_true", help="also time the layer under torch.compile (inductor; "
                   "compiling takes minutes)")
    p.add_argument("--busy", type=int, default=0, metavar="N", help="N other processes spin on the CPU during the "
                   "run (how the layer fares on shared cores)")


def run_args(a: argparse.Namespace) -> int:
    run(quick=a.quick, rounds=a.rounds, budget_s=a.budget, impl=a.impl, out=a.out, hf=not a.no_hf, prof=a.profile,
        compiled=a.compile, busy=a.busy)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_args(p.parse_args(argv))
