"""LoRATrainer / trainer_from_args: only adapters train, the base (weights and router state) stays as the init
run left it, the LoRA balance loss reaches the loss, exact resume, adapters reload, CLI flags."""
import argparse
import json

import pytest
import torch
from peft_runs import model_cfg as tiny_moe
from peft_runs import synthetic_corpus, tcfg, train_base

from moelab import checkpoint
from moelab.lora import LoRAConfig, find_targets, load_lora, lora_modules, merge_lora
from moelab.model import MoELM
from moelab.peft_train import (
    PEFT_CLAIMS,
    LoRATrainer,
    add_peft_flags,
    domain_corpus,
    load_peft_model,
    trainer_from_args,
)


def model_cfg(balance="loss_free"):
    return tiny_moe(balance=balance, bias_update_rate=0.05)


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus):
    return train_base(tmp_path_factory.mktemp("base"), model_cfg(), corpus)


def base_model(run):
    m, _ = checkpoint.load_model(run)
    return m


def mix(**kw) -> LoRAConfig:
    return LoRAConfig(**{"variant": "mixlora", "n_experts": 3, "top_k": 2, "rank": 2, "targets": "all", **kw})


def test_targets_ffn_attn_on_moelab(base_run):
    m = base_model(base_run)
    assert find_targets(m, "ffn") == ["blocks.0.ffn.up", "blocks.0.ffn.down", "blocks.1.ffn.shared.up",
                                      "blocks.1.ffn.shared.down"]  # dense FFN + shared expert, no routed experts
    assert find_targets(m, "attn") == ["blocks.0.attn.qkv", "blocks.0.attn.out", "blocks.1.attn.qkv",
                                       "blocks.1.attn.out"]


def test_only_adapters_train_base_and_router_state_frozen(base_run, corpus, tmp_path):
    init = base_model(base_run)
    tr = LoRATrainer(base_run, mix(balance="loss_free", bias_update_rate=0.1), tcfg(), tmp_path / "ft",
                     corpus=corpus, verbose=False)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.fit()
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(".B_EOR" in n or ".A_ERI" in n or ".gate.weight" in n and "ffn.gate" not in n for n in trainable)
    # every base tensor (weights and the base router's loss-free bias) equals the init run's
    sd = tr.model.state_dict()
    for k, v in init.state_dict().items():
        k2 = k if k in sd else k.rsplit(".", 1)[0] + ".base." + k.rsplit(".", 1)[1]
        assert torch.equal(sd[k2], v), k
    assert init.blocks[1].ffn.state["loss_free"].bias_E.abs().sum() > 0  # the check above is not vacuous
    # LoRA loss-free biases did move
    assert any(m.route_bias.abs().sum() > 0 for m in lora_modules(tr.model).values())
    s = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert s["trainable_params"] == sum(p.numel() for p in tr.model.parameters() if p.requires_grad)


def test_lora_balance_loss_reaches_aux_loss(base_run, corpus, tmp_path):
    tr = LoRATrainer(base_run, mix(aux_loss_coef=0.5), tcfg(), tmp_path / "ft", corpus=corpus, verbose=False)
    b = corpus.sample(2, 16, torch.Generator().manual_seed(3))
    tr.model.train()
    out = tr.model(b.idx_BS, valid_BS=b.valid_BS)
    lora = sum(m.aux_loss for m in lora_modules(tr.model).values())
    base = sum(r.aux_loss for r in out.moe.values())
    assert float(lora.detach()) > 0
    torch.testing.assert_close(out.aux_loss, base + lora)


def test_exact_resume(base_run, corpus, tmp_path):
    cfg = tcfg(steps=4, ckpt_every=2, keep_last=5)
    a = LoRATrainer(base_run, mix(), cfg, tmp_path / "a", corpus=corpus, verbose=False)
    a.fit()
    b = LoRATrainer(base_run, mix(), cfg, tmp_path / "b", corpus=corpus, verbose=False)
    b.fit(stop_at=2)
    b2 = LoRATrainer(base_run, mix(), cfg, tmp_path / "b", corpus=corpus, verbose=False)
    b2.fit(resume=True)
    for (n, p), q in zip(a.model.state_dict().items(), b2.model.state_dict().values()):
        assert torch.equal(p, q), n
    rows = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()
                      if json.loads(x)["kind"] == "train"]
    assert rows(tmp_path / "a") == rows(tmp_path / "b")


def test_reload_adapter_and_merge(base_run, corpus, tmp_path):
    tr = LoRATrainer(base_run, LoRAConfig(variant="lora", rank=2, targets="attn"), tcfg(), tmp_path / "ft",
                     corpus=corpus, verbose=False)
    tr.fit()
    b = corpus.sample(2, 16, torch.Generator().manual_seed(4))
    tr.model.eval()
    want = tr.model(b.idx_BS, valid_BS=b.valid_BS).logits_BSV
    m, meta = load_peft_model(tmp_path / "ft")
    torch.testing.assert_close(m(b.idx_BS, valid_BS=b.valid_BS).logits_BSV, want)
    assert json.loads((tmp_path / "ft" / "peft.json").read_text())["init_from"] == str(base_run)
    assert meta["step"] == 4
    # the PEFT folder on the init run, merged into plain weights: same logits
    m2 = base_model(base_run)
    load_lora(m2, tmp_path / "ft" / "adapter")
    merge_lora(m2)
    assert not lora_modules(m2)
    torch.testing.assert_close(m2(b.idx_BS, valid_BS=b.valid_BS).logits_BSV, want, atol=1e-5, rtol=1e-5)
    # a plain run reads through load_peft_model too
    assert isinstance(load_peft_model(base_run)[0], MoELM)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--resume", action="store_true")
    add_peft_flags(p)
    return p


def test_trainer_from_args(base_run, corpus, tmp_path, monkeypatch):
    p = parser()
    assert trainer_from_args(p.parse_args([]), tcfg(), tmp_path / "x") is None
    with pytest.raises(ValueError, match="--init-from"):
        trainer_from_args(p.parse_args(["--lora-rank", "4"]), tcfg(), tmp_path / "x")
    with pytest.raises(ValueError, match="exclusive"):
        trainer_from_args(p.parse_args(["--init-from", str(base_run), "--lora-rank", "4", "--esft"]), tcfg(),
                          tmp_path / "x")
    monkeypatch.setattr("moelab.train.build_corpus", lambda *a, **k: corpus)
    args = p.parse_args(["--init-from", str(base_run), "--lora-experts", "3", "--lora-rank", "4", "--lora-top-k",
                         "1", "--lora-targets", "attn"])
    t = trainer_from_args(args, tcfg(steps=2), tmp_path / "x", verbose=False)
    assert isinstance(t, LoRATrainer)
    assert (t.lora_cfg.variant, t.lora_cfg.n_experts, t.lora_cfg.rank, t.lora_cfg.top_k, t.lora_cfg.targets) == \
        ("mixlora", 3, 4, 1, "attn")
    assert set(lora_modules(t.model)) == set(find_targets(base_model(base_run), "attn"))
    t.fit()
    # resume: the saved method and config are used; a different LoRA config is refused
    r = trainer_from_args(p.parse_args(["--resume"]), tcfg(steps=3), tmp_path / "x", verbose=False)
    assert isinstance(r, LoRATrainer) and r.lora_cfg == t.lora_cfg
    with pytest.raises(ValueError, match="resume keeps"):
        trainer_from_args(p.parse_args(["--resume", "--lora-rank", "8"]), tcfg(steps=3), tmp_path / "x")
    plain = trainer_from_args(p.parse_args(["--init-from", str(base_run), "--lora-rank", "2"]), tcfg(),
                              tmp_path / "y", verbose=False)
    assert (plain.lora_cfg.variant, plain.lora_cfg.n_experts, plain.lora_cfg.targets) == ("lora", 1, "all")


def test_domain_corpus(corpus):
    c = domain_corpus(corpus, "b")
    assert c.domains == ["b"] and torch.equal(c.train["b"], corpus.train["b"])
    assert int(c.sample(4, 8, torch.Generator().manual_seed(0)).idx_BS.max()) < 58
    with pytest.raises(ValueError, match="allowed a, b"):
        domain_corpus(corpus, "z")


def test_peft_claims_shape():
    from moelab.compare_claims import Claim
    from moelab.compare_stats import KINDS
    for name, c in PEFT_CLAIMS.items():
        assert isinstance(c, Claim)
        for t in c.tests:
            assert t.arm in c.arms and t.baseline in c.arms and t.kind in KINDS, name


def test_refuses_existing_run_without_touching_it(base_run, corpus, tmp_path):
    cfg = tcfg(steps=2)
    LoRATrainer(base_run, mix(), cfg, tmp_path / "ft", corpus=corpus, verbose=False).fit()
    before = (tmp_path / "ft" / "peft.json").read_text()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        LoRATrainer(base_run, mix(rank=3), cfg, tmp_path / "ft", corpus=corpus, verbose=False).fit()
    assert (tmp_path / "ft" / "peft.json").read_text() == before
