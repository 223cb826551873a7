"""Trainer: schedule, exact resume, safetensors checkpoints, NaN stop, distributed hooks."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelab.checkpoint import list_checkpoints, load_model, optimizer_from_tensors, optimizer_to_tensors
from moelab.config import ModelConfig, MoEConfig, TrainConfig
from moelab.data import build_corpus
from moelab.moe import MoELayer
from moelab.train import NonFiniteError, Trainer, lr_at


def tiny_model(balance="aux") -> ModelConfig:
    moe = MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2, balance=balance, bias_update_rate=1e-2,
                    z_loss_coef=1e-3)
    return ModelConfig(moe=moe, d_model=32, n_layers=2, n_heads=2, d_dense=32, max_seq_len=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    for dom, text in {"alpha": "the quick brown fox jumps over the lazy dog. ",
                      "digits": "3.14159 2.71828 1.41421 1.73205 "}.items():
        (root / dom).mkdir()
        for i in range(6):
            (root / dom / f"{i}.txt").write_text(text * (8 + i))
    return build_corpus([str(root / "alpha"), str(root / "digits")], val_fraction=0.3)


def train_cfg(**kw) -> TrainConfig:
    base = {"steps": 6, "batch_size": 4, "seq_len": 16, "warmup": 2, "lr": 1e-2, "log_every": 100, "eval_every": 0,
                "ckpt_every": 0, "eval_batches": 1, "keep_last": 2}
    return TrainConfig(**{**base, **kw})


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_lr_schedule_warmup_then_cosine():
    cfg = train_cfg(steps=110, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("balance,accum", [("aux", 1), ("loss_free", 2)])
def test_exact_resume_2n_equals_n_plus_n(tmp_path, corpus, balance, accum):
    cfg = train_cfg(grad_accum=accum)
    straight = Trainer(tiny_model(balance), cfg, tmp_path / "a", corpus=corpus, verbose=False)
    straight.fit()
    first = Trainer(tiny_model(balance), cfg, tmp_path / "b", corpus=corpus, verbose=False)
    first.fit(stop_at=3)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_00000003"]
    resumed = Trainer(tiny_model(balance), cfg, tmp_path / "b", corpus=corpus, verbose=False)
    resumed.fit(resume=True)
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(la) == 6 and la == lb  # identical floats, not approximately equal
    assert len(set(la)) > 1
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if balance == "loss_free":
        assert any(v.abs().sum() > 0 for k, v in sb.items() if k.endswith("bias_E"))


def test_checkpoints_are_safetensors_atomic_and_pruned(tmp_path, corpus):
    tr = Trainer(tiny_model(), train_cfg(ckpt_every=1, keep_last=2), tmp_path / "r", corpus=corpus, verbose=False)
    tr.fit()
    ck = tmp_path / "r" / "ckpt"
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000005", "step_00000006"]  # no temp folders left
    last = ck / "step_00000006"
    assert sorted(p.name for p in last.iterdir()) == ["model.safetensors", "state.json", "trainer.safetensors"]
    weights = load_file(str(last / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in tr.model.state_dict().items())
    meta = json.loads((last / "state.json").read_text())
    assert meta["step"] == 6 and meta["domains"] == corpus.domains
    model, _ = load_model(tmp_path / "r")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tr.model.state_dict().items())
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(tiny_model(), train_cfg(), tmp_path / "r", corpus=corpus, verbose=False).fit()


def test_optimizer_state_roundtrip(corpus, tmp_path):
    tr = Trainer(tiny_model(), train_cfg(), tmp_path, corpus=corpus, verbose=False)
    tr.train_step()
    tensors, meta = optimizer_to_tensors(tr.opt)
    back = optimizer_from_tensors(tensors, json.loads(json.dumps(meta)))
    sd = tr.opt.state_dict()
    assert set(back["state"]) == set(sd["state"])
    for pid, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][pid][k], v)


def _poison(module, at_call: int, counter: list):
    """Forward hook: from the at_call-th training forward on, the module outputs NaN."""
    def hook(m, args, out):
        if not m.training:
            return out
        counter[0] += 1
        if counter[0] >= at_call:
            return (out[0] * float("nan"),) + tuple(out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out
    return module.register_forward_hook(hook)


def test_nan_in_router_logits_stops_naming_step_and_layer(tmp_path, corpus):
    tr = Trainer(tiny_model(), train_cfg(ckpt_every=2), tmp_path / "n", corpus=corpus, verbose=False)
    _poison(tr.model.blocks[1].attn, at_call=4, counter=[0])  # layer 1 router sees NaN at step 4
    with pytest.raises(NonFiniteError, match=r"router logits at step 4 in layer 1.*last good checkpoint"):
        tr.fit()
    ckpts = list_checkpoints(tmp_path / "n")
    assert ckpts[-1].name == "step_00000003"
    good = load_file(str(ckpts[-1] / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    err = [json.loads(ln) for ln in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()][-1]
    assert err["kind"] == "error" and err["step"] == 4


def test_nan_after_last_router_names_the_block(tmp_path, corpus):
    tr = Trainer(tiny_model(), train_cfg(), tmp_path / "m", corpus=corpus, verbose=False)
    _poison(tr.model.blocks[1], at_call=2, counter=[0])  # block output NaN: router fine, loss NaN
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 2.*layer 1"):
        tr.fit()
    assert list_checkpoints(tmp_path / "m")[-1].name == "step_00000001"


def test_strategy_hooks_are_called_once_per_step(tmp_path, corpus):
    """A distributed strategy subclasses the Trainer: its hooks run once per optimizer step, in order."""
    calls = []

    class Hooked(Trainer):
        def sync_grads(self):
            assert all(p.grad is not None for p in self.model.parameters() if p.requires_grad)
            calls.append("sync")

        def reduce_metrics(self, flat):  # pretend two identical ranks: sums double, means stay
            calls.append("reduce")
            return flat * 2

        def step_routers(self):
            calls.append("routers")
            super().step_routers()

    tr = Hooked(tiny_model(), train_cfg(), tmp_path, corpus=corpus, verbose=False)
    ref = Trainer(tiny_model(), train_cfg(), tmp_path / "ref", corpus=corpus, verbose=False)
    r1, r2 = tr.train_step(), ref.train_step()
    assert calls == ["sync", "routers", "reduce"]
    assert r1["loss"] == pytest.approx(r2["loss"]) and r1["max_vio"] == pytest.approx(r2["max_vio"])
    assert r1["router/experts_per_token"] == pytest.approx(r2["router/experts_per_token"]) == [2.0, 2.0]


def test_train_metrics_and_eval(tmp_path, corpus):
    tr = Trainer(tiny_model(), train_cfg(), tmp_path, corpus=corpus, verbose=False)
    rec = tr.train_step()
    assert set(rec) >= {"loss", "aux_loss", "tok_per_s", "max_vio", "load", "aux/aux", "aux/z", "lr"}
    assert len(rec["load"]) == 2 and all(sum(l) == pytest.approx(1.0, abs=1e-4) for l in rec["load"])
    ev = tr.evaluate()
    assert set(ev["val_loss"]) == set(corpus.domains)
    for d, v in ev["val_loss"].items():
        assert ev["val_bpb"][d] == pytest.approx(v / math.log(2))
    # expert counts per (layer, domain): top-2 slots for every real validation token
    for rows in ev["expert_by_domain"].values():
        for d, row in zip(corpus.domains, rows):
            n_tok = sum(int(b.valid_BS.sum()) for b in corpus.val_batches(d, 4, 16, 1))
            assert sum(row) == 2 * n_tok


def test_cli_train_resume_eval_generate_plot(tmp_path, capsys):
    from moelab.cli import main
    data = tmp_path / "mytext"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.txt").write_text("hello moe world, " * (20 + i))
    run = str(tmp_path / "run")
    common = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0",
              "--ckpt-every", "0", "--data", str(data), "--out", run, "--threads", "1"]
    assert main(["train", "--steps", "2", "--balance", "loss_free", *common]) == 0
    assert "mytext" in capsys.readouterr().out
    assert main(["train", "--steps", "2", *common]) == 2  # refuses to overwrite checkpoints
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--steps", "3", "--resume", *common]) == 0
    saved = json.loads((Path(run) / "config.json").read_text())
    assert saved["model_config"]["moe"]["balance"] == "loss_free" and saved["train_config"]["steps"] == 3
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000003"]
    assert main(["eval", run, "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "step 3" in out and "mytext" in out
    assert main(["generate", run, "--prompt", "hello", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("hello")
    assert main(["plot", run]) == 0
    for name in ("loss.png", "expert_load.png", "max_vio.png", "specialization.png"):
        assert (Path(run) / name).stat().st_size > 1000


def test_cli_unknown_names_list_the_valid_ones(capsys):
    from moelab.cli import main
    for flag, bad, valid in (("--preset", "huge", "mixtral-like"), ("--router", "nope", "sigmoid_group"),
                             ("--balance", "magic", "loss_free")):
        with pytest.raises(SystemExit):
            main(["train", flag, bad, "--out", "x"])
        err = capsys.readouterr().err
        assert bad in err and valid in err


def test_cli_moe_set_overrides(tmp_path, capsys):
    from moelab.cli import build_parser, main
    from moelab.resolver import overrides_from_args, resolve
    args = build_parser().parse_args(["train", "--out", "x", "--moe-set", "n_zero=1", "gating_residual=true",
                                      "router=moepp", "capacity_factor=1.5"])
    moe = resolve("tiny", overrides=overrides_from_args(args)).model.moe
    assert (moe.n_zero, moe.gating_residual, moe.router, moe.capacity_factor) == (1, True, "moepp", 1.5)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        overrides_from_args(build_parser().parse_args(["train", "--out", "x", "--moe-set", "n_zero"]))
    data = tmp_path / "t"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.txt").write_text("some text to learn. " * 10)
    run = tmp_path / "pp"
    assert main(["train", "--router", "moepp", "--moe-set", "n_zero=1", "n_copy=1", "gating_residual=true",
                 "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--data", str(data), "--out", str(run),
                 "--threads", "1"]) == 0
    moe = json.loads((run / "config.json").read_text())["model_config"]["moe"]
    assert (moe["router"], moe["n_zero"], moe["n_copy"], moe["gating_residual"]) == ("moepp", 1, 1, True)
    capsys.readouterr()
    assert main(["train", "--moe-set", "bogus=1", "--out", str(tmp_path / "x")]) == 2
    assert "bogus" in capsys.readouterr().err


def test_demo_writes_summary_and_plots(tmp_path):
    from moelab.demo import run_demo
    run = tmp_path / "demo"
    code = run_demo(str(run), steps=2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2
    below = all(summary["val_loss"][d] < summary["unigram_loss"][d] for d in summary["val_loss"])
    assert code == (0 if below else 1)
    assert set(summary["val_loss"]) >= {"code", "prose"}
    for name in ("loss.png", "expert_load.png", "max_vio.png", "specialization.png"):
        assert (run / name).exists()


def test_nan_gradient_names_step_and_layer(tmp_path, corpus):
    tr = Trainer(tiny_model(), train_cfg(), tmp_path / "g", corpus=corpus, verbose=False)
    calls = [0]

    def poison_grad(g):
        calls[0] += 1
        return g * float("nan") if calls[0] >= 2 else g

    tr.model.blocks[0].attn.qkv.weight.register_hook(poison_grad)  # loss and router fine, gradient NaN
    with pytest.raises(NonFiniteError, match=r"gradient at step 2 in layer 0 \(blocks.0.attn.qkv.weight\)"):
        tr.fit()
    ck = list_checkpoints(tmp_path / "g")[-1]
    assert ck.name == "step_00000001"
    assert all(torch.isfinite(v).all() for v in load_file(str(ck / "model.safetensors")).values())


def test_global_balance_counts_span_the_micro_batches_of_one_step(tmp_path, corpus):
    """balance="global" in one process: micro-batch 2's f uses the counts of micro-batches 1+2 (Qiu et al.
    2025), and the sum restarts at each optimizer step."""
    tr = Trainer(tiny_model("global"), train_cfg(grad_accum=2), tmp_path, corpus=corpus, verbose=False)
    layers = [m for m in tr.model.modules() if isinstance(m, MoELayer)]
    assert layers and all("global" in m.state for m in layers)
    seen = []

    def recording(state):  # wraps the layer's GlobalBatchCounts: records (this micro-batch's counts, the sum used)
        inner = state.counts

        def counts(counts_E):
            seen.append((counts_E.clone(), inner(counts_E)))
            return seen[-1][1]
        return counts

    for m in layers:
        m.state["global"].counts = recording(m.state["global"])
    tr.train_step()
    tr.train_step()
    L = len(layers)
    assert len(seen) == 2 * 2 * L  # 2 steps x 2 micro-batches x L layers
    for step in range(2):
        for j in range(L):
            (c1, s1), (c2, s2) = seen[step * 2 * L + j], seen[step * 2 * L + L + j]
            torch.testing.assert_close(s1, c1.float())           # first micro-batch of a step: its own counts
            torch.testing.assert_close(s2, (c1 + c2).float())    # second: accumulated


def test_bfloat16_autocast_keeps_router_and_losses_in_float32(tmp_path, corpus):
    from moelab.runtime import Runtime
    tr = Trainer(tiny_model(), train_cfg(), tmp_path, corpus=corpus, verbose=False,
                 runtime=Runtime("cpu", "bfloat16"))
    batch = corpus.sample(2, 16, torch.Generator().manual_seed(0))
    with tr.runtime.autocast():
        out = tr.model(batch.idx_BS, valid_BS=batch.valid_BS)
    assert out.logits_BSV.dtype == torch.bfloat16  # the matmuls ran in bf16
    for r in out.moe.values():
        assert r.routing.logits_TE.dtype == torch.float32 and r.routing.weight_TK.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in r.losses.values())
    rec = tr.train_step()
    assert math.isfinite(rec["loss"]) and all(p.dtype == torch.float32 for p in tr.model.parameters())
    with pytest.raises(ValueError, match="--dtype='float16' is invalid"):
        Runtime("cpu", "float16")


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_the_same_keys(tmp_path, corpus):
    """TrainConfig.compile: the model compiled in place (inductor) trains to the eager losses (inductor's fused
    kernels sum in another order: 1e-4) and its checkpoint has the eager run's keys, loadable without compile."""
    torch._dynamo.reset()
    eager = Trainer(tiny_model("loss_free"), train_cfg(steps=4), tmp_path / "eager", corpus=corpus, verbose=False)
    eager.fit()
    comp = Trainer(tiny_model("loss_free"), train_cfg(steps=4, compile=True), tmp_path / "comp", corpus=corpus,
                   verbose=False)
    comp.fit()
    for a, b in zip(train_losses(tmp_path / "eager"), train_losses(tmp_path / "comp")):
        assert abs(a - b) < 1e-4
    want = eager.model.state_dict()
    got = load_model(tmp_path / "comp")[0].state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-4, msg=k)
