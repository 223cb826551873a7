"""Fault injection: each case runs the failure and pins the exit status, one stderr line naming the file/field
and what to do, and that no file the user had changed. Read-only / full disks are simulated by raising
OSError(EROFS / ENOSPC) at the write (tests run as root: chmod would not stop them)."""
import errno
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moelab import checkpoint
from moelab.checkpoint import list_checkpoints
from moelab.cli import main
from moelab.config import ModelConfig, MoEConfig, TrainConfig
from moelab.data import build_corpus
from moelab.train import NonFiniteError, Trainer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model.n_layers", "1", "--model.d_model", "32", "--model.n_heads", "2", "--model.d_dense", "32",
         "--moe.d_expert", "16", "--moe.n_experts", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
         "--train.eval_batches", "1", "--train.warmup", "2", "--train.log_every", "1000", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text") / "notes"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.txt").write_text("hello moe world, the quick brown fox. " * (12 + i))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    """A finished 4-step one-process run with checkpoints at steps 2 and 4 (copied per test by `fresh`)."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(["train", "--steps", "4", "--ckpt-every", "2", "--data", str(data), "--out", str(out), *SMALL]) == 0
    return out


@pytest.fixture
def fresh(run, tmp_path) -> Path:
    import shutil
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(argv: list[str], capsys, code: int, *needles: str) -> str:
    """main(argv) exits with `code`, prints exactly one stderr line holding every needle; returns it."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def tiny_cfgs(**train):
    moe = MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2)
    model = ModelConfig(moe=moe, d_model=32, n_layers=1, n_heads=2, d_dense=32, max_seq_len=32)
    base = {"steps": 4, "batch_size": 2, "seq_len": 16, "warmup": 2, "log_every": 1000, "eval_every": 0,
            "ckpt_every": 1, "eval_batches": 1, "keep_last": 3}
    return model, TrainConfig(**{**base, **train})


@pytest.fixture(scope="module")
def corpus(data):
    return build_corpus([str(data)], val_fraction=0.3)


# ---- user data lost ---------------------------------------------------------------------------------

def test_ep_train_into_single_process_run_is_refused_before_any_process(fresh, data, capsys):
    before = snapshot(fresh)
    fails(["train", "--nproc", "2", "--steps", "4", "--data", str(data), "--out", str(fresh), *SMALL], capsys, 2,
          str(fresh), "single-process run", "another --out")
    fails(["train", "--nproc", "2", "--resume", "--out", str(fresh), "--threads", "1"], capsys, 2,
          "single-process run", "without --nproc")
    assert snapshot(fresh) == before


def test_single_process_resume_of_ep_run_says_use_nproc(fresh, capsys):
    (fresh / "rank0").mkdir()
    (fresh / "ckpt").rename(fresh / "rank0" / "ckpt")
    (fresh / "ep.json").write_text(json.dumps({"ep_size": 2, "placement": {}}))
    before = snapshot(fresh)
    fails(["train", "--resume", "--out", str(fresh), "--threads", "1"], capsys, 2, "expert-parallel", "--nproc")
    fails(["train", "--steps", "4", "--out", str(fresh), "--threads", "1"], capsys, 2, "another --out")
    fails(["train", "--nproc", "2", "--out", str(fresh), "--threads", "1"], capsys, 2, "--resume or another --out")
    fails(["train", "--nproc", "3", "--resume", "--out", str(fresh), "--threads", "1"], capsys, 2,
          "trained on 1 ranks", "--nproc 1")
    assert snapshot(fresh) == before


def test_merged_ep_checkpoint_without_optimizer_state_names_the_fix(fresh):
    ck = list_checkpoints(fresh)[-1]
    state = json.loads((ck / "state.json").read_text())
    (ck / "state.json").write_text(json.dumps({**state, "merged_from_ep_ranks": 2}))
    (ck / "trainer.safetensors").unlink()
    with pytest.raises(ValueError, match="merged model of an expert-parallel run.*--nproc 2"):
        checkpoint.load_checkpoint(ck, model=torch.nn.Linear(1, 1), opt=torch.optim.SGD([torch.zeros(1)], lr=1))


# ---- silently wrong ---------------------------------------------------------------------------------

def test_resume_with_more_steps_keeps_the_schedule(tmp_path, corpus):
    model, cfg = tiny_cfgs(steps=6, ckpt_every=0, lr=1e-2)
    Trainer(model, cfg, tmp_path / "r", corpus=corpus, verbose=False).fit()
    Trainer(model, cfg.replace(steps=9), tmp_path / "r", corpus=corpus, verbose=False).fit(resume=True)
    lrs = [r["lr"] for r in checkpoint.read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(lrs) == 9
    floor = cfg.lr * cfg.min_lr_ratio
    assert lrs[6:] == pytest.approx([floor] * 3)  # after the first 6 steps: the cosine floor, no jump back up
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(lrs[2:]))  # never rises after warm-up
    state = checkpoint.read_state(list_checkpoints(tmp_path / "r")[-1])
    assert state["schedule_steps"] == 6


def test_lr_inf_leaves_no_non_finite_checkpoint(tmp_path, corpus):
    model, cfg = tiny_cfgs(lr=float("inf"))
    with pytest.raises(NonFiniteError, match="no finite checkpoint"):
        Trainer(model, cfg, tmp_path / "r", corpus=corpus, verbose=False).fit()
    assert list_checkpoints(tmp_path / "r") == []


def test_non_finite_weights_keep_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    model, cfg = tiny_cfgs()
    tr = Trainer(model, cfg, tmp_path / "r", corpus=corpus, verbose=False)
    step = tr.train_step

    def poisoned():
        rec = step()
        if tr.step == 3:
            with torch.no_grad():
                next(tr.model.parameters()).fill_(float("inf"))
        return rec
    monkeypatch.setattr(tr, "train_step", poisoned)
    with pytest.raises(NonFiniteError, match="last good checkpoint: .*step_00000002"):
        tr.fit()
    for ck in list_checkpoints(tmp_path / "r"):
        for f in ("model.safetensors", "trainer.safetensors"):
            assert checkpoint.all_finite(load_file(str(ck / f))) == []
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step_00000001", "step_00000002"]


def test_booleans_parse_strictly(capsys):
    fails(["train", "--moe.renormalize", "maybe", "--out", "x"], capsys, 2, "moe.renormalize", "true/false")


@pytest.mark.parametrize("argv,needle", [
    (["train", "--nproc", "0", "--out", "{o}"], "--nproc=0"),
    (["train", "--threads", "0", "--out", "{o}"], "--threads=0"),
    (["train", "--threads", "-2", "--out", "{o}"], "--threads=-2"),
    (["train", "--threads", "-2", "--nproc", "2", "--out", "{o}"], "--threads=-2"),
    (["eval", "{r}", "--batches", "0"], "--batches=0"),
    (["eval", "{r}", "--threads", "0"], "--threads=0"),
    (["generate", "{r}", "--max-new-tokens", "-3"], "--max-new-tokens=-3"),
    (["trace", "{r}", "--seq-len", "1000", "--out", "{o}.npz"], "--seq-len=1000"),
])
def test_out_of_range_flags_are_refused(argv, needle, run, tmp_path, capsys):
    o = tmp_path / "new"
    fails([a.format(o=o, r=run) for a in argv], capsys, 2, needle)
    assert not o.exists()


def test_tokenizer_that_yields_nothing_is_named():
    from moelab.trace import windows
    with pytest.raises(ValueError, match="no tokenizer files"):
        windows([("a", []), ("b", [])], 8, 64)


# ---- tracebacks instead of errors ----------------------------------------------------------------------

def test_truncated_model_file_is_named(fresh, capsys):
    f = list_checkpoints(fresh)[-1] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    before = snapshot(fresh)
    fails(["eval", str(fresh)], capsys, 2, str(f), "step_00000002")
    assert snapshot(fresh) == before


def test_flipped_bytes_are_caught_by_the_checksum(fresh, capsys):
    f = list_checkpoints(fresh)[-1] / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[-5] ^= 0xFF  # inside the last tensor: still a valid safetensors file
    f.write_bytes(bytes(b))
    before = snapshot(fresh)
    fails(["eval", str(fresh)], capsys, 2, str(f), "corrupt")
    fails(["train", "--resume", "--out", str(fresh), "--steps", "6", "--threads", "1"], capsys, 2, str(f))
    assert snapshot(fresh) == before


def test_unknown_field_in_state_json_and_config_json(fresh, capsys):
    ck = list_checkpoints(fresh)[-1]
    st = json.loads((ck / "state.json").read_text())
    st["model_config"]["moe"]["warp_drive"] = 1
    (ck / "state.json").write_text(json.dumps(st))
    cfg = json.loads((fresh / "config.json").read_text())
    cfg["train_config"]["turbo"] = True
    (fresh / "config.json").write_text(json.dumps(cfg))
    before = snapshot(fresh)
    fails(["eval", str(fresh)], capsys, 2, "state.json", "warp_drive")
    fails(["train", "--resume", "--out", str(fresh), "--threads", "1"], capsys, 2, "config.json", "turbo")
    fails(["train", "--config", str(fresh / "config.json"), "--out", str(fresh.parent / "new")], capsys, 2, "turbo")
    cfg["model_config"]["n_wings"] = 2
    (fresh / "config.json").write_text(json.dumps(cfg))
    before = snapshot(fresh)
    fails(["plot", str(fresh)], capsys, 2, "config.json", "n_wings")
    assert snapshot(fresh) == before


def test_invalid_state_json_names_the_file_and_offers_the_previous(fresh, capsys):
    ck = list_checkpoints(fresh)[-1]
    (ck / "state.json").write_text('{"step": 4, "model_')
    before = snapshot(fresh)
    fails(["eval", str(fresh)], capsys, 2, str(ck / "state.json"), "--ckpt " + str(list_checkpoints(fresh)[0]))
    assert main(["eval", str(fresh), "--ckpt", str(list_checkpoints(fresh)[0])]) == 0  # the offer works
    assert snapshot(fresh) == before


def test_resume_with_a_changed_config_field_is_refused(fresh, capsys):
    before = snapshot(fresh)
    fails(["train", "--resume", "--out", str(fresh), "--moe.top_k", "1", "--threads", "1"], capsys, 2,
          "moe.top_k", "config.json")
    assert snapshot(fresh) == before


def test_disk_full_keeps_the_previous_checkpoint_and_cleans_up(fresh, capsys, monkeypatch):
    real = checkpoint.save_file

    def full(tensors, path):
        if "trainer" in path:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)
    monkeypatch.setattr(checkpoint, "save_file", full)
    last = list_checkpoints(fresh)[-1]
    before = snapshot(last)
    fails(["train", "--resume", "--steps", "6", "--ckpt-every", "2", "--out", str(fresh), "--threads", "1"],
          capsys, 1, "No space left on device", "MiB", "kept " + str(last))
    assert sorted(p.name for p in (fresh / "ckpt").iterdir()) == ["step_00000002", "step_00000004"]  # no temp
    assert snapshot(last) == before
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert main(["train", "--resume", "--steps", "6", "--out", str(fresh), "--threads", "1"]) == 0


def test_temp_folder_of_a_dead_process_is_removed_at_start_up(fresh, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = fresh / "ckpt" / f".tmp_step_00000006_{dead.pid}"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"torn")
    assert main(["train", "--resume", "--steps", "6", "--out", str(fresh), "--threads", "1"]) == 0
    assert not tmp.exists() and list_checkpoints(fresh)[-1].name == "step_00000006"


def test_read_only_out_and_out_that_is_a_file(tmp_path, data, capsys, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("mine")
    fails(["train", "--out", str(f), "--steps", "1", "--data", str(data), *SMALL], capsys, 2, str(f), "file")
    assert f.read_text() == "mine"

    def ro(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(Path, "mkdir", ro)
    fails(["train", "--out", str(tmp_path / "ro"), "--steps", "1", "--data", str(data), *SMALL], capsys, 1,
          str(tmp_path / "ro"), "Read-only", "writable")


def test_torn_last_metrics_line_is_tolerated_and_repaired(fresh, capsys):
    m = fresh / "metrics.jsonl"
    good = m.read_text()
    m.write_text(good + '{"kind": "train", "st')
    assert main(["plot", str(fresh)]) == 0
    assert m.read_text() == good + '{"kind": "train", "st'  # plot only reads
    assert main(["train", "--resume", "--steps", "5", "--out", str(fresh), "--threads", "1"]) == 0
    rows = checkpoint.read_metrics(m)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5]


def test_plot_on_empty_metrics(fresh, capsys):
    (fresh / "metrics.jsonl").write_text("")
    fails(["plot", str(fresh)], capsys, 2, "metrics.jsonl", "no training steps")


def test_eval_of_a_missing_checkpoint(run, capsys):
    fails(["eval", str(run), "--ckpt", "/nonexistent"], capsys, 2, "/nonexistent", "step_00000004")
    fails(["eval", "/nonexistent_run"], capsys, 2, "/nonexistent_run")


def test_replaying_a_trace_of_more_experts(run):
    from moelab.trace import Trace, replay_moelab
    model, _ = checkpoint.load_model(run)
    N, K = 8, 2
    tr = Trace(expert_idx_LNK=np.full((1, N, K), 15, np.int16), weight_LNK=np.ones((1, N, K), np.float32),
               token_ids_N=np.zeros(N, np.int32), seq_ids_N=np.zeros(N, np.int32),
               positions_N=np.arange(N, dtype=np.int32), domain_N=np.zeros(N, np.int16), domains=("a",), n_experts=16, logits_LNE=None, vocab={}, meta={})
    with pytest.raises(ValueError, match="n_experts=16"), replay_moelab(model, tr):
        pass


def test_corrupt_trace_field_is_named(tmp_path):
    from moelab.trace import load_trace
    p = tmp_path / "t.npz"
    np.savez(p, expert_idx_LNK=np.full((1, 4, 2), 99, np.int16), weight_LNK=np.ones((1, 4, 2), np.float32))
    with pytest.raises(ValueError):
        load_trace(p)


# ---- signals and kills (real processes) --------------------------------------------------------------

def _spawn_train(out: Path, data: Path, steps: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "moelab.cli", "train", "--steps", str(steps), "--data", str(data),
                             "--out", str(out), *SMALL, *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, limit_s: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        m = out / "metrics.jsonl"
        if m.exists() and sum(1 for r in checkpoint.read_metrics(m) if r.get("kind") == "train") >= n:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise TimeoutError


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130),
                                      pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow)])
def test_signal_saves_a_checkpoint_and_exits_128_plus_signal(tmp_path, data, sig, code):
    out = tmp_path / "r"
    proc = _spawn_train(out, data, 100000, "--ckpt-every", "0")
    _wait_for_steps(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert f"moelab train --resume --out {out}" in last and signal.Signals(sig).name in last
    done = [r["step"] for r in checkpoint.read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert list_checkpoints(out)[-1].name == f"step_{done[-1]:08d}"  # no step lost


@pytest.mark.slow
def test_sigkill_then_resume_equals_a_straight_run(tmp_path, data):
    out = tmp_path / "k"
    proc = _spawn_train(out, data, 10000, "--ckpt-every", "2")
    _wait_for_steps(out, 5, proc)
    proc.kill()
    proc.wait()
    m = out / "metrics.jsonl"
    m.write_text(m.read_text() + '{"kind": "tr')  # what a crash mid-write leaves
    ck = int(list_checkpoints(out)[-1].name[5:])
    from moelab.resolver import resolve
    cfg = resolve(file=out / "config.json")  # the same run, uninterrupted (schedule of 10000 steps), to ck + 3
    assert main(["train", "--resume", "--steps", str(ck + 3), "--out", str(out), "--threads", "1"]) == 0
    Trainer(cfg.model, cfg.train, tmp_path / "s", verbose=False).fit(stop_at=ck + 3)

    def losses(p):
        return [r["loss"] for r in checkpoint.read_metrics(p / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses(out)) == ck + 3 and losses(out) == losses(tmp_path / "s")  # bit for bit


# ---- distributed faults (real gloo processes) ------------------------------------------------------------

def _ep_fit(rank, world, model_cfg, cfg, out, kill_at, resume):
    """EPTrainer.fit on this rank; with kill_at, rank 1 dies (SIGKILL-like os._exit) while saving that step's
    checkpoint, after rank 0 has saved it: the ranks' latest checkpoints then differ."""
    from moelab.ep_train import EPTrainer

    class Dying(EPTrainer):
        def save_checkpoint(self, rng=None):
            if rank == 1 and self.step == kill_at:
                os._exit(9)
            return super().save_checkpoint(rng)
    t = Dying(model_cfg, cfg, out, timeout_s=20)
    t.fit(resume=resume)
    return [r["loss"] for r in checkpoint.read_metrics(t.out / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
def test_rank_killed_mid_step_fails_the_others_then_resume_from_the_common_checkpoint(tmp_path, data):
    import multiprocessing as std_mp
    import queue

    import torch.multiprocessing as mp
    from dist import _entry, free_port, run_distributed
    model, cfg = tiny_cfgs(steps=6, ckpt_every=1, keep_last=3, data=(str(data),))
    out = tmp_path / "ep"
    ctx = mp.get_context("spawn")
    q: std_mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, 2, port, _ep_fit, (model, cfg, str(out), 4, False), q, 20.0, {}),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        rank, status, _ = q.get(timeout=90)  # rank 0 must fail (not hang) once rank 1 is gone
    except queue.Empty:
        pytest.fail("rank 0 hung after rank 1 died")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert (rank, status) == (0, "error") and procs[1].exitcode == 9
    steps = {r: [p.name for p in list_checkpoints(out / f"rank{r}")] for r in (0, 1)}
    assert steps[0][-1] == "step_00000004" and steps[1][-1] == "step_00000003"  # rank 1 died before saving 4
    killed = [r["loss"] for r in checkpoint.read_metrics(out / "rank0" / "metrics.jsonl") if r["kind"] == "train"]
    got = run_distributed(_ep_fit, 2, args=(model, cfg, str(out), None, True), timeout_s=120,
                          collective_timeout_s=20)
    assert len(got[0]) == 6 and got[0][:4] == killed[:4]  # resumed at step 3 (the common one): step 4 redone exactly
    assert [p.name for p in list_checkpoints(out / "rank0")][-1] == "step_00000006"


@pytest.mark.slow  # importing transformers takes ~10 s
def test_hf_folder_without_tokenizer_files(tmp_path, capsys):
    pytest.importorskip("transformers")
    from test_hf_trace import tiny_model
    tiny_model("olmoe").save_pretrained(tmp_path / "m")  # weights + config.json, no tokenizer files
    before = snapshot(tmp_path / "m")
    capsys.readouterr()
    assert main(["trace", "--hf", str(tmp_path / "m"), "--seq-len", "8", "--max-tokens", "32", "--out",
                 str(tmp_path / "t.npz")]) == 2
    ours = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("moelab")]  # transformers logs too
    assert len(ours) == 1 and "no tokenizer files" in ours[0]
    assert snapshot(tmp_path / "m") == before and not (tmp_path / "t.npz").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,group", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)])
def test_ep_signal_stops_all_ranks_at_one_step_with_checkpoints(tmp_path, data, sig, code, group):
    """Ctrl-C reaches the whole process group; SIGTERM (preemption) the launcher, which forwards it: every rank
    stops after the same step with its checkpoint, the launcher exits 128+signal, and --resume continues."""
    out = tmp_path / "ep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "moelab.cli", "train", "--nproc", "2", "--steps", "100000",
                             "--ckpt-every", "0", "--data", str(data), "--out", str(out), *SMALL], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_steps(out / "rank0", 2, proc)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"--nproc 2 --resume --out {out}" in err.strip().splitlines()[-1]
    last = [list_checkpoints(out / f"rank{r}")[-1].name for r in (0, 1)]
    assert last[0] == last[1]
    assert main(["train", "--nproc", "2", "--resume", "--steps", str(int(last[0][5:]) + 1), "--out", str(out),
                 "--threads", "1"]) == 0
    assert list_checkpoints(out)[-1].name == f"step_{int(last[0][5:]) + 1:08d}"  # merged after the resumed run


def test_disk_full_while_rewriting_run_files_keeps_them(fresh, capsys, monkeypatch):
    """--resume rewrites metrics.jsonl (drops rows after the checkpoint) and config.json: via temp + rename, so a
    full disk leaves both as they were (a truncate-then-write would leave them empty)."""
    before = snapshot(fresh)

    def full(self, text, *a, **k):
        with open(self, "w") as f:
            f.write(text[:10])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    monkeypatch.setattr(Path, "write_text", full)
    fails(["train", "--resume", "--steps", "6", "--out", str(fresh), "--threads", "1"], capsys, 1,
          "No space left on device")
    assert snapshot(fresh) == before
