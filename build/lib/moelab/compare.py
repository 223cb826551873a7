"""`moelab compare` runner: trains every arm x seed of the claims in compare_claims.py (parallel processes,
one torch thread each, resumable), measures each run on the validation set, and evaluates the tests.

L=MoE layers, D=domains, E=routed experts. Per run: DIR/<claim>/<arm>/seed<k>/ with metrics.jsonl,
summary.json and result.json (written last, atomically: its presence with a matching key = finished).
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from moelab import compare_stats as st
from moelab.compare_claims import CLAIMS, DEFAULT_PRESET, DEFAULT_SCALE, DEFAULT_STEPS, Claim, Rel

# ======================================================================== the one place that builds and trains
# (the lead's config resolver replaces base_config / run_arm at merge)

def _split(overrides: dict) -> tuple[dict, dict, dict]:
    """Dotted overrides -> (model, moe, train) field dicts; an unknown section raises a clear error."""
    out: dict[str, dict] = {"model": {}, "moe": {}, "train": {}}
    for key, v in overrides.items():
        sec, _, name = key.partition(".")
        if sec not in out or not name:
            raise ValueError(f"compare override {key!r} is invalid: allowed moe.FIELD, model.FIELD, train.FIELD")
        out[sec][name] = v
    return out["model"], out["moe"], out["train"]


def base_config(preset: str, overrides: dict):
    """(ModelConfig, TrainConfig) of `preset` with concrete dotted overrides applied (moelab.resolve)."""
    from moelab.resolver import resolve
    _split(overrides)  # compare's own check: every key names a section
    return tuple(resolve(preset, overrides=overrides))


def run_arm(arm_overrides: dict, seed: int, steps: int, preset: str, out: str | Path) -> dict:
    """Train one arm (dotted overrides, concrete values) for `steps` steps with `seed` in `out`; returns the
    metrics dict (validation pass included). Leaves metrics.jsonl and summary.json, no checkpoints."""
    from moelab.train import Trainer
    out = Path(out)
    over = {**arm_overrides, "train.steps": steps, "train.seed": seed, "train.eval_every": 0,
            "train.ckpt_every": 0, "train.keep_last": 1, "train.log_every": 10 ** 9}
    model_cfg, train_cfg = base_config(preset, over)
    t0 = time.perf_counter()
    trainer = Trainer(model_cfg, train_cfg, out, verbose=False)
    summary = trainer.fit()
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    res = validation_metrics(trainer.model, trainer.corpus, train_cfg)
    if model_cfg.moe.router == "expert_choice":
        native = validation_metrics(trainer.model, trainer.corpus, train_cfg, ec_eval="expert_choice")
        res["val_loss_native"] = native["val_loss"]
    res.update(curve_metrics(out / "metrics.jsonl"), params=summary["params"],
               active_params=summary["active_params"], train_time_s=round(time.perf_counter() - t0, 1),
               expert_mflops=expert_mflops(model_cfg, res["experts_per_token_L"]))
    return res


def validation_metrics(model, corpus, train_cfg, ec_eval: str | None = None) -> dict:
    """One pass over every domain's validation batches: loss (nats/byte, mean over domains), expert counts per
    layer -> MaxVio_global (Wang et al. 2024, arXiv 2408.15664, eq. 7, over the whole validation set, mean over
    layers), dead experts (zero selections, summed over layers), experts per token, domain specialization."""
    import numpy as np
    import torch

    from moelab import analysis
    from moelab.model import lm_loss
    from moelab.moe import MoELayer
    layers = [(i, b.ffn) for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)]
    saved = [m.cfg for _, m in layers]
    if ec_eval is not None:  # expert choice at eval time (MoELayer reads its cfg at every route)
        for _, m in layers:
            m.cfg = m.cfg.replace(ec_eval=ec_eval)
    E = model.cfg.moe.n_experts
    counts_LDE = np.zeros((len(layers), len(corpus.domains), E))
    tokens_D = np.zeros(len(corpus.domains))
    loss_D = {}
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for d, dom in enumerate(corpus.domains):
                tot = 0.0
                for b in corpus.val_batches(dom, train_cfg.batch_size, train_cfg.seq_len, train_cfg.eval_batches):
                    out = model(b.idx_BS, valid_BS=b.valid_BS)
                    k = float(b.valid_BS.sum())
                    tot += float(lm_loss(logits_BSV=out.logits_BSV, targets_BS=b.targets_BS,
                                         valid_BS=b.valid_BS)) * k
                    tokens_D[d] += k
                    for j, (i, _) in enumerate(layers):
                        counts_LDE[j, d] += out.moe[i].counts_E.float().numpy()
                loss_D[dom] = tot / max(tokens_D[d], 1.0)
    finally:
        model.train(was)
        for (_, m), c in zip(layers, saved):
            m.cfg = c
    counts_LE = counts_LDE.sum(1)
    dist_LDE = counts_LDE / np.maximum(counts_LDE.sum(-1, keepdims=True), 1e-300)
    glob_LE = counts_LE / np.maximum(counts_LE.sum(-1, keepdims=True), 1e-300)
    js_LD = analysis.js_divergence(dist_LDE, np.broadcast_to(glob_LE[:, None, :], dist_LDE.shape))
    ept_LD = counts_LDE.sum(-1) / np.maximum(tokens_D, 1.0)
    return {"val_loss": float(np.mean(list(loss_D.values()))), "val_loss_by_domain": loss_D,
            "max_vio_global": float(analysis.max_vio(counts_LE).mean()),
            "dead_experts": int((counts_LE == 0).sum()),
            "experts_per_token": float(counts_LE.sum() / max(tokens_D.sum(), 1.0) / max(len(layers), 1)),
            "experts_per_token_L": (counts_LE.sum(-1) / max(tokens_D.sum(), 1.0)).tolist(),
            "experts_per_token_by_domain": dict(zip(corpus.domains, ept_LD.mean(0).tolist())),
            "specialization": float(js_LD.mean()), "load_LE": glob_LE.tolist()}


def curve_metrics(metrics_path: Path) -> dict:
    """Train loss and MaxVio_batch (mean over layers) per step; MaxVio_batch averaged over steps."""
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r["kind"] == "train"]
    vio = [sum(r["max_vio"]) / max(len(r["max_vio"]), 1) for r in rows]
    return {"loss_curve": [round(r["loss"], 5) for r in rows], "max_vio_curve": [round(v, 5) for v in vio],
            "max_vio_batch": sum(vio) / max(len(vio), 1)}


def expert_mflops(model_cfg, ept_L: list[float]) -> float:
    """Expert FLOPs per token in MFLOPs, all MoE layers: 2 * matrices * D * F per routed expert used (measured
    experts per token) + the shared experts. Attention and the router are the same in every arm."""
    m = model_cfg.moe
    mats = 3 if m.activation == "swiglu" else 2
    per = 2 * mats * m.d_model
    return sum(per * (e * m.d_expert + m.d_shared_total) for e in ept_L) / 1e6


# ======================================================================== planning, running, resuming

@dataclass(frozen=True)
class Job:
    """One arm x seed, with the folders that share its exact configuration."""
    key: str               # hash of (preset, overrides, seed, steps)
    overrides: dict        # concrete dotted overrides
    seed: int              # TrainConfig.seed
    steps: int             # optimizer steps
    preset: str            # preset name
    dirs: tuple[str, ...]  # DIR/<claim>/<arm>/seed<k> folders this run fills (first = where it trains)


def claim_names(name: str) -> list[str]:
    if name == "all":
        return list(CLAIMS)
    if name not in CLAIMS:
        raise ValueError(f"claim {name!r} is unknown: allowed all, {', '.join(CLAIMS)}")
    return [name]


def resolve_rel(overrides: dict, preset: str) -> dict:
    """Replace Rel values by concrete ones computed from the base config (preset + the other overrides)."""
    plain = {k: v for k, v in overrides.items() if not isinstance(v, Rel)}
    if len(plain) == len(overrides):
        return dict(overrides)
    model_cfg, train_cfg = base_config(preset, plain)
    out = dict(plain)
    for k, v in overrides.items():
        if isinstance(v, Rel):
            sec, _, name = k.partition(".")
            obj = {"model": model_cfg, "moe": model_cfg.moe, "train": train_cfg}[sec]
            out[k] = round(getattr(obj, name) * v.times) + v.plus
    return out


def plan(names: list[str], *, seeds: int, steps: int, preset: str | None, out: str | Path) -> list[Job]:
    """Every (claim, arm, seed); identical configurations across claims train once (deduplicated by key)."""
    scale = DEFAULT_SCALE if preset is None else {}
    preset = preset or DEFAULT_PRESET
    jobs: dict[str, Job] = {}
    for name in names:
        c = CLAIMS[name]
        for arm, ov in c.arms.items():
            over = resolve_rel({**scale, **c.base, **ov}, preset)
            for s in range(seeds):
                key = hashlib.sha1(json.dumps([preset, sorted(over.items()), s, steps], default=str)
                                   .encode()).hexdigest()[:16]
                d = str(Path(out) / name / arm / f"seed{s}")
                j = jobs.get(key)
                jobs[key] = Job(key, over, s, steps, preset, (j.dirs if j else ()) + (d,))
    return list(jobs.values())


def is_done(d: str | Path, key: str) -> bool:
    """A folder is finished when its result.json exists and was made by this exact configuration."""
    p = Path(d) / "result.json"
    if not p.exists():
        return False
    try:
        return json.loads(p.read_text()).get("key") == key
    except json.JSONDecodeError:
        return False


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _worker_init() -> None:
    import torch
    torch.set_num_threads(1)


def _run_job(job: Job) -> dict:
    """Train the job in its first folder (wiped first: a half-finished run restarts) and write result.json last."""
    d = Path(job.dirs[0])
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    try:
        res = run_arm(job.overrides, job.seed, job.steps, job.preset, d)
    except Exception as e:  # noqa: BLE001 -- one failed arm must not lose the others; the report shows it
        res = {"error": f"{type(e).__name__}: {e}"}
    res.update(key=job.key, overrides={k: v for k, v in job.overrides.items()}, seed=job.seed, steps=job.steps,
               preset=job.preset)
    write_json_atomic(d / "result.json", res)
    return res


def _fan_out(job: Job, res: dict) -> None:
    """Copy the result to the other folders that share the configuration."""
    for d in job.dirs[1:]:
        Path(d).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(d) / "result.json", {**res, "trained_in": job.dirs[0]})


def run_all(name: str, *, seeds: int = 3, steps: int | None = None, preset: str | None = None,
            jobs: int | None = None, out: str | Path, log=print) -> dict:
    """Train every missing arm x seed (resume: finished folders are skipped), then load all results."""
    if seeds < 1:
        raise ValueError(f"--seeds={seeds} is invalid: allowed an integer >= 1")
    names = claim_names(name)
    steps = steps or DEFAULT_STEPS
    todo, n_done = [], 0
    for job in plan(names, seeds=seeds, steps=steps, preset=preset, out=out):
        done = [d for d in job.dirs if is_done(d, job.key)]
        if len(done) == len(job.dirs):
            n_done += 1
        elif done:  # trained already under another claim: copy
            _fan_out(Job(job.key, job.overrides, job.seed, job.steps, job.preset, (done[0],) + tuple(x for x in job.dirs if x != done[0])),
                     json.loads((Path(done[0]) / "result.json").read_text()))
            n_done += 1
        else:
            todo.append(job)
    n_jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo) or 1))
    log(f"compare {name}: {len(todo)} runs to train, {n_done} finished already; {n_jobs} processes")
    t0 = time.perf_counter()
    if n_jobs == 1:
        _worker_init()
        _drain(((j, _run_job(j)) for j in todo), len(todo), t0, log)
    else:
        with mp.get_context("spawn").Pool(n_jobs, initializer=_worker_init) as pool:
            _drain(zip_jobs(pool, todo), len(todo), t0, log)
    return load_results(names, seeds=seeds, out=out)


def _job_with_result(job: Job) -> tuple[Job, dict]:
    return job, _run_job(job)


def zip_jobs(pool, todo: list[Job]):
    """(job, result) pairs as the pool finishes them (longest jobs first: the expensive ones start early)."""
    order = sorted(todo, key=lambda j: -_cost(j))
    return pool.imap_unordered(_job_with_result, order)


def _cost(job: Job) -> float:
    o = job.overrides
    return job.steps * (o.get("train.grad_accum", 1) + (1 if o.get("moe.n_experts", 8) > 8 else 0))


def _drain(results, total: int, t0: float, log) -> None:
    for k, (job, res) in enumerate(results, 1):
        _fan_out(job, res)
        what = res.get("error") or f"val_loss {res['val_loss']:.4f}"
        log(f"[{k}/{total}] {job.dirs[0]}  {what}  ({time.perf_counter() - t0:.0f} s)")


def load_results(names: list[str], *, seeds: int, out: str | Path) -> dict:
    """{claim: {arm: [result dict or None per seed]}} with steps_to_target filled in where a claim asks."""
    data: dict = {}
    for name in names:
        c = CLAIMS[name]
        arms = {}
        for arm in c.arms:
            rows = []
            for s in range(seeds):
                p = Path(out) / name / arm / f"seed{s}" / "result.json"
                r = json.loads(p.read_text()) if p.exists() else None
                rows.append(None if r is None or "error" in r else r)
            arms[arm] = rows
        if c.target_arm:
            _fill_steps_to_target(arms, c.target_arm)
        data[name] = arms
    return data


def _fill_steps_to_target(arms: dict, target_arm: str) -> None:
    """Per seed: target = the target arm's final smoothed train loss (mean of its last 10% of steps); each
    arm's steps_to_target = first step its smoothed (10%-window) train loss is <= target."""
    for s, base in enumerate(arms[target_arm]):
        if base is None:
            continue
        curve = base["loss_curve"]
        w = max(1, len(curve) // 10)
        target = st.final_level(curve, w)
        for rows in arms.values():
            if rows[s] is not None:
                rows[s]["steps_to_target"] = st.steps_to_target(rows[s]["loss_curve"], target, w)
                rows[s]["target_loss"] = target


def metric_values(rows: list, metric: str) -> list:
    """Per-seed values of a metric (None where the seed is missing or the metric is undefined)."""
    out = []
    for r in rows:
        v = None if r is None else r.get(metric)
        if metric == "val_loss_native" and r is not None and v is None:
            v = r.get("val_loss")  # routers without a separate training-time eval mode
        out.append(v if v is None or isinstance(v, (int, float)) and math.isfinite(v) else None)
    return out


def evaluate_tests(claim: Claim, arms: dict) -> list[dict]:
    """Each test of the claim -> paired CI and verdict (compare_stats.RULE)."""
    out = []
    for t in claim.tests:
        a, b = metric_values(arms[t.arm], t.metric), metric_values(arms[t.baseline], t.metric)
        pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
        if t.kind == "ratio_at_least":
            vals = st.paired_ratio(xs, ys, lower_is_better=t.lower_is_better)
        else:
            vals = st.paired_gain(xs, ys, lower_is_better=t.lower_is_better)
        ci = st.mean_ci(vals)
        out.append({"test": t, "ci": ci, "verdict": st.verdict(t.kind, ci, t.margin), "values": vals})
    return out
