"""Trace file format (versioned, validated) and tracing/replay through moelab MoELayers."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from moelab.config import MoEConfig
from moelab.moe import MoELayer
from moelab.routers import ROUTERS
from moelab.trace import TRACE_VERSION, Trace, load_trace, record_moelab, replay_moelab, trace_moelab, windows


class TinyLM(nn.Module):
    """Embedding + 2 residual MoE layers + head: enough to trace and replay without moelab.model."""

    def __init__(self, cfg: MoEConfig, vocab: int = 256):
        super().__init__()
        self.emb = nn.Embedding(vocab, cfg.d_model)
        self.layers = nn.ModuleList([MoELayer(cfg), MoELayer(cfg)])
        self.head = nn.Linear(cfg.d_model, vocab)

    def forward(self, ids_BS):
        h = self.emb(ids_BS)
        for layer in self.layers:
            h = h + layer(h, token_ids=ids_BS).y
        return self.head(h)


CFGS = [MoEConfig(d_model=16, d_expert=32, n_experts=6, top_k=2),
        MoEConfig(d_model=16, d_expert=32, n_experts=8, top_k=3, router="sigmoid_group", n_group=2, topk_group=1,
                  n_shared=1, routed_scaling_factor=2.5, expert_impl="loop"),
        MoEConfig(d_model=16, d_expert=32, n_experts=6, top_k=2, router="moepp", n_zero=1, n_copy=1, n_const=1,
                  capacity_factor=1.0)]


def _docs():
    return [("code", list(b"def f(x):\n    return x + 1\n" * 3)), ("prose", list(b"The cat sat on the mat. " * 4))]


@pytest.mark.parametrize("cfg", CFGS, ids=["topk", "sigmoid_group", "moepp_capacity"])
def test_trace_moelab_matches_layer_routing_and_replay_is_exact(cfg, tmp_path):
    torch.manual_seed(0)
    model = TinyLM(cfg).eval()
    domains, wins = windows(_docs(), seq_len=16, max_tokens=96)
    tr = trace_moelab(model, wins, domains, batch_size=2)
    assert tr.n_layers == 2 and tr.top_k == cfg.top_k and tr.n_experts == cfg.n_experts + cfg.n_special
    assert tr.meta["layer_names"] == ["layers.0", "layers.1"]
    assert tr.n_tokens == 16 * len(wins) and set(tr.domain_N.tolist()) == {0, 1}
    if cfg.n_special:  # special experts trace as E..E+n_special-1, and the replay below must reproduce them
        assert (tr.expert_idx_LNK >= cfg.n_experts).any()
    # independent: run each window alone, recompute the router by hand for layer 0 (top-k of its logits)
    ids = torch.tensor(wins[0][1])[None]
    with torch.no_grad():
        x0 = model.emb(ids).reshape(-1, cfg.d_model)
        logits_TE = x0 @ model.layers[0].gate.weight.T
    assert np.allclose(tr.logits_LNE[0, :16], logits_TE.numpy(), atol=5e-3)  # float16 storage
    if cfg.router in ("topk", "moepp"):
        want = torch.topk(logits_TE, cfg.top_k, dim=-1).indices.sort(-1).values.numpy()
        assert np.array_equal(np.sort(tr.expert_idx_LNK[0, :16], -1), want)
    # round trip through the file, then replay: same outputs exactly
    tr2 = load_trace(tr.save(tmp_path / "t.npz"))
    all_ids = torch.tensor(np.stack([w for _, w in wins]))

    def run():  # the same batches as the trace (batching changes GEMM rounding, not routing)
        return torch.cat([model(all_ids[b: b + 2]) for b in range(0, len(wins), 2)])
    with torch.no_grad():
        ref = run()
        with replay_moelab(model, tr2):
            again = run()
    assert torch.equal(again, ref)
    # replaying another model's trace changes the outputs (same tokens, different routes)
    torch.manual_seed(1)
    other = trace_moelab(TinyLM(cfg).eval(), wins, domains)
    assert not np.array_equal(other.expert_idx_LNK, tr.expert_idx_LNK)
    with torch.no_grad(), replay_moelab(model, other):
        changed = run()
    assert not torch.allclose(changed, ref)
    assert all(m.routing_override is None for m in model.layers)  # replay is undone


_ROUTER_EXTRA = {"sigmoid_group": {"n_group": 2}, "adamoe": {"n_null": 2}, "moepp": {"n_zero": 1, "n_copy": 1}}


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_replay_exact_for_every_router(router):
    cfg = MoEConfig(d_model=16, d_expert=32, n_experts=6, top_k=2, router=router, **_ROUTER_EXTRA.get(router, {}))
    torch.manual_seed(0)
    model = TinyLM(cfg).eval()
    domains, wins = windows(_docs(), seq_len=16, max_tokens=64)
    tr = trace_moelab(model, wins, domains, batch_size=2)
    ids = torch.tensor(np.stack([w for _, w in wins]))
    with torch.no_grad():
        ref = [model(ids[b: b + 2]) for b in range(0, len(wins), 2)]
        with replay_moelab(model, tr):
            again = [model(ids[b: b + 2]) for b in range(0, len(wins), 2)]
    assert all(torch.equal(a, b) for a, b in zip(again, ref))


def test_replay_errors_are_clear():
    torch.manual_seed(0)
    model = TinyLM(CFGS[0]).eval()
    domains, wins = windows(_docs(), seq_len=8, max_tokens=16)
    tr = trace_moelab(model, wins, domains)
    ids = torch.tensor(np.stack([w for _, w in wins]))
    with torch.no_grad(), replay_moelab(model, tr):
        model(ids)
        with pytest.raises(ValueError, match="replay the same inputs"):
            model(ids)  # the trace is used up
    one = torch.nn.Sequential(MoELayer(CFGS[0]))
    with pytest.raises(ValueError, match="MoE layers"), replay_moelab(one, tr):
        pass


def test_record_gives_the_router_choice_before_capacity():
    torch.manual_seed(0)
    layer = MoELayer(CFGS[0]).eval()
    x = torch.randn(5, 16)
    with torch.no_grad(), record_moelab(layer) as rec:
        r = layer(x)
    assert torch.equal(rec[0][0].expert_idx_TK, r.routing.expert_idx_TK)
    tight = MoELayer(CFGS[0].replace(capacity_factor=0.5)).eval()
    with torch.no_grad(), record_moelab(tight) as rec:
        r = tight(torch.randn(12, 16))
    got, used = rec[0][0].expert_idx_TK, r.routing.expert_idx_TK
    assert (got >= 0).all() and (used == -1).any()  # drops happen after the recorded router choice
    assert torch.equal(torch.where(used >= 0, got, -1), used)


def _arrays(tr: Trace):
    return {"version": np.array(TRACE_VERSION), "expert_idx_LNK": tr.expert_idx_LNK, "weight_LNK": tr.weight_LNK,
                "token_ids_N": tr.token_ids_N, "seq_ids_N": tr.seq_ids_N, "positions_N": tr.positions_N,
                "domain_N": tr.domain_N, "domains": np.array(tr.domains), "meta": np.array(json.dumps({"n_experts": 4}))}


def _small():
    return Trace(expert_idx_LNK=np.array([[[0, 1], [2, 3], [1, -1]]], np.int16),
                 weight_LNK=np.full((1, 3, 2), 0.5, np.float32), token_ids_N=np.array([104, 105, 33]),
                 seq_ids_N=np.zeros(3, np.int32), positions_N=np.arange(3), domain_N=np.zeros(3, np.int16),
                 domains=("x",), n_experts=4)


def test_file_roundtrip_without_logits(tmp_path):
    tr = _small()
    back = load_trace(tr.save(tmp_path / "a.npz"))
    assert back.logits_LNE is None and back.domains == ("x",) and back.n_experts == 4
    assert np.array_equal(back.expert_idx_LNK, tr.expert_idx_LNK) and back.token_text(104) == "h"


@pytest.mark.parametrize("change, match", [
    ({"version": np.array(99)}, "version=99"),
    ({"expert_idx_LNK": np.array([[[0, 9], [2, 3], [1, -1]]], np.int16)}, "expert_idx_LNK has values"),
    ({"token_ids_N": np.arange(2)}, "token_ids_N shape"),
    ({"weight_LNK": np.zeros((1, 3, 3), np.float32)}, "weight_LNK shape"),
    ({"domain_N": np.array([0, 0, 1], np.int16)}, "domain_N indexes"),
])
def test_load_rejects_bad_files(tmp_path, change, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **{**_arrays(_small()), **change})
    with pytest.raises(ValueError, match=match):
        load_trace(p)


def test_load_rejects_missing_fields_and_non_npz(tmp_path):
    p = tmp_path / "m.npz"
    a = _arrays(_small())
    del a["seq_ids_N"]
    np.savez(p, **a)
    with pytest.raises(ValueError, match="seq_ids_N"):
        load_trace(p)
    q = tmp_path / "x.npz"
    q.write_text("hello")
    with pytest.raises(ValueError, match="not a readable"):
        load_trace(q)
    with pytest.raises(ValueError, match="does not exist"):
        load_trace(tmp_path / "nope.npz")


def test_windows_round_robin_and_errors():
    domains, wins = windows([("b", list(range(10))), ("a", list(range(100, 130)))], seq_len=5, max_tokens=20)
    assert domains == ["a", "b"]
    assert [d for d, _ in wins] == [1, 0, 1, 0]  # alternate between documents
    with pytest.raises(ValueError, match="seq_len"):
        windows([("a", [1, 2])], seq_len=1, max_tokens=10)
    with pytest.raises(ValueError, match="no document"):
        windows([("a", [1, 2])], seq_len=5, max_tokens=10)


def _user_data(root):
    for dom, text in (("code", "def f(x):\n    return x * 2\n"), ("prose", "The cat sat on the mat, then slept.\n")):
        for i in range(2):
            (root / dom).mkdir(parents=True, exist_ok=True)
            (root / dom / f"{dom}{i}.txt").write_text(text * (8 + i))
    return [str(root / "code"), str(root / "prose")]


def test_cli_trace_run_then_analyze(tmp_path, capsys):
    from moelab.checkpoint import load_model
    from moelab.cli import main
    from moelab.config import ModelConfig, TrainConfig
    from moelab.train import Trainer
    data = _user_data(tmp_path / "data")
    mcfg = ModelConfig(moe=MoEConfig(d_model=16, d_expert=16, n_experts=4, top_k=2), d_model=16, n_layers=2,
                       n_heads=2, d_dense=16, max_seq_len=32)
    Trainer(mcfg, TrainConfig(steps=1, batch_size=2, seq_len=16, data=tuple(data)), tmp_path / "run",
            verbose=False).save_checkpoint()
    out = tmp_path / "t.npz"
    assert main(["trace", str(tmp_path / "run"), "--data", *data, "--out", str(out), "--seq-len", "16",
                 "--max-tokens", "64"]) == 0
    tr = load_trace(out)
    assert tr.n_layers == 2 and tr.n_tokens == 64 and tr.domains == ("code", "prose")
    # the traced routing is what the checkpointed model does on those windows
    model, _ = load_model(tmp_path / "run")
    ids = torch.as_tensor(tr.token_ids_N[:16]).long()[None]
    with torch.no_grad():
        res = model(ids).moe
    assert np.array_equal(tr.expert_idx_LNK[:, :16], np.stack([r.routing.expert_idx_TK.numpy() for r in res.values()]))
    # without --data the run is traced on its own data's validation split (same val_fraction), not the built-in corpus
    assert main(["trace", str(tmp_path / "run"), "--out", str(tmp_path / "own.npz"), "--seq-len", "16",
                 "--max-tokens", "64"]) == 0
    own = load_trace(tmp_path / "own.npz")
    assert own.domains == ("code", "prose") and np.array_equal(own.token_ids_N, tr.token_ids_N)
    assert main(["analyze", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "index.html").is_file() and "report:" in capsys.readouterr().out
    assert main(["trace", "--out", str(out)]) == 2  # neither RUN nor --hf: clear error, no traceback
    assert "exactly one of RUN" in capsys.readouterr().err


@pytest.mark.parametrize("cfg", CFGS[:2] + [CFGS[0].replace(score_order="topk_softmax"),
                                            CFGS[0].replace(renormalize=False)],
                         ids=["softmax_topk", "sigmoid_group", "topk_softmax", "no_renorm"])
def test_replay_with_router_weights_matches_and_trains_the_router(cfg):
    torch.manual_seed(0)
    model = TinyLM(cfg)
    domains, wins = windows(_docs(), seq_len=16, max_tokens=32)
    tr = trace_moelab(model, wins, domains, batch_size=2)
    ids = torch.tensor(np.stack([w for _, w in wins]))
    with torch.no_grad():
        ref = model(ids)
    # own experts + the router's own weights for them: the same function of the logits as the router's
    with replay_moelab(model, tr, weights="router"):
        out = model(ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    assert all(layer.gate.weight.grad.abs().sum() > 0 for layer in model.layers)
    # recorded weights are constants: the LM output gives the router no gradient
    model.zero_grad()
    with replay_moelab(model, tr):
        model(ids).square().mean().backward()
    assert all(layer.gate.weight.grad is None or layer.gate.weight.grad.abs().sum() == 0 for layer in model.layers)
    with pytest.raises(ValueError, match="weights"), replay_moelab(model, tr, weights="both"):
        pass
    hashed = TinyLM(CFGS[0].replace(router="hash"))
    with pytest.raises(ValueError, match="allowed routers"), replay_moelab(hashed, tr, weights="router"):
        pass
