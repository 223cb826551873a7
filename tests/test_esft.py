"""ESFT: scores against a slot-by-slot loop, the authors' top-p rule by hand, freezing (frozen experts' rows
bit-identical after AdamW with weight decay, chosen ones changed), flags, the trainer and its expert config."""
import argparse
import json

import pytest
import torch
from peft_runs import model_cfg, synthetic_corpus, tcfg, train_base

from moelab import checkpoint
from moelab.esft import (
    ESFTConfig,
    apply_esft,
    choose_experts,
    esft_param_groups,
    expert_config_json,
    expert_scores,
    read_expert_config,
    select_experts,
    tuned_slot_share,
)
from moelab.model import lm_loss
from moelab.peft_train import ESFTTrainer, add_peft_flags, trainer_from_args


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus):
    return train_base(tmp_path_factory.mktemp("base"), model_cfg(), corpus)


def load(run):
    return checkpoint.load_model(run)[0]


def test_select_experts_by_hand():
    s = torch.tensor([0.1, 0.3, 0.05, 0.55])
    assert select_experts(s, 0.5) == [3]          # 0.55 >= 0.5 after the first
    assert select_experts(s, 0.55) == [3]         # reaching p exactly stops
    assert select_experts(s, 0.6) == [1, 3]       # 0.55 < 0.6: the crossing expert 1 is kept
    assert select_experts(s, 0.9) == [0, 1, 3]
    assert select_experts(s, 1.0) == [0, 1, 2, 3]
    assert select_experts(torch.tensor([0.25, 0.25, 0.25, 0.25]), 0.3) == [0, 1]  # ties: lower id first


def test_scores_match_slot_loop(base_run, corpus):
    m = load(base_run)
    batches = [corpus.sample(2, 16, torch.Generator().manual_seed(s)) for s in range(2)]
    batches[1].valid_BS[1, 10:] = False  # some padding: not scored
    sc = expert_scores(m, batches)
    E, K = m.cfg.moe.n_experts, m.cfg.moe.top_k
    tok, gate, n = torch.zeros(E), torch.zeros(E), 0
    with torch.no_grad():
        for b in batches:
            r = m(b.idx_BS, valid_BS=b.valid_BS).moe[1].routing
            for t, ok in enumerate(b.valid_BS.reshape(-1).tolist()):
                if not ok:
                    continue
                n += 1
                for k in range(K):
                    e = int(r.expert_idx_TK[t, k])
                    tok[e] += 1 / K
                    gate[e] += float(r.weight_TK[t, k])
    assert list(sc) == [1]
    torch.testing.assert_close(sc[1].token_E, tok / n)
    torch.testing.assert_close(sc[1].gate_E, gate / n)
    torch.testing.assert_close(sc[1].token_E.sum(), torch.tensor(1.0))
    # n_sample_tokens: stop after the batch that reaches it
    one = expert_scores(m, batches, n_sample_tokens=5)
    torch.testing.assert_close(one[1].token_E, expert_scores(m, batches[:1])[1].token_E)


def train_steps(model, groups, corpus, steps=3):
    opt = torch.optim.AdamW(groups, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        b = corpus.sample(2, 16, g)
        out = model(b.idx_BS, valid_BS=b.valid_BS)
        opt.zero_grad()
        (lm_loss(logits_BSV=out.logits_BSV, targets_BS=b.targets_BS, valid_BS=b.valid_BS) + out.aux_loss).backward()
        opt.step()


def test_frozen_experts_unchanged_chosen_change(base_run, corpus):
    m = load(base_run)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    masks = apply_esft(m, {1: [0, 2]})
    train_steps(m, esft_param_groups(m, masks, weight_decay=0.1), corpus)
    for name in ("blocks.1.ffn.experts.weights.w_up_EDG", "blocks.1.ffn.experts.weights.w_down_EFD"):
        p, q = dict(m.named_parameters())[name], before[name]
        for e in (1, 3):
            assert torch.equal(p[e], q[e]), (name, e)
        for e in (0, 2):
            assert not torch.equal(p[e], q[e]), (name, e)
    for n, p in m.named_parameters():
        if "experts.weights" not in n:
            assert torch.equal(p, before[n]), n  # attention, gate, shared, dense FFN, embeddings
    per_expert = sum(t[0].numel() for t in (m.blocks[1].ffn.experts.weights.w_up_EDG,
                                            m.blocks[1].ffn.experts.weights.w_down_EFD))
    assert masks.trainable == 2 * per_expert


def test_weight_decay_would_leak_without_the_groups(base_run, corpus):
    """Control for the test above: the mask alone does not keep frozen rows under AdamW's decay."""
    m = load(base_run)
    w = m.blocks[1].ffn.experts.weights.w_up_EDG
    before = w.detach().clone()
    apply_esft(m, {1: [0]})
    train_steps(m, [{"params": [p for p in m.parameters() if p.requires_grad], "weight_decay": 0.1}], corpus)
    assert not torch.equal(w[1], before[1])


def test_flags_shared_and_non_expert(base_run, corpus):
    m = load(base_run)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    masks = apply_esft(m, {1: [1]}, ESFTConfig(train_shared=True))
    train_steps(m, esft_param_groups(m, masks, 0.0), corpus)
    ch = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert {"blocks.1.ffn.shared.up.weight", "blocks.1.ffn.shared.down.weight"} <= ch
    assert not any("attn" in n or "ffn.gate" in n for n in ch)
    m2 = load(base_run)
    masks = apply_esft(m2, {1: [1]}, ESFTConfig(train_non_expert=True))
    assert m2.blocks[0].attn.qkv.weight.requires_grad and m2.blocks[1].ffn.gate.weight.requires_grad
    assert not m2.blocks[1].ffn.shared.up.weight.requires_grad


def test_errors():
    with pytest.raises(ValueError, match="ESFTConfig.score"):
        ESFTConfig(score="x")
    with pytest.raises(ValueError, match="ESFTConfig.top_p"):
        ESFTConfig(top_p=0.0)


def test_bad_expert_ids(base_run):
    m = load(base_run)
    with pytest.raises(ValueError, match="not MoE layers"):
        apply_esft(m, {0: [1]})
    with pytest.raises(ValueError, match="allowed ids 0..3"):
        apply_esft(m, {1: [4]})


def test_trainer_cli_and_expert_config(base_run, corpus, tmp_path, monkeypatch):
    p = argparse.ArgumentParser()
    p.add_argument("--resume", action="store_true")
    add_peft_flags(p)
    monkeypatch.setattr("moelab.train.build_corpus", lambda *a, **k: corpus)
    args = p.parse_args(["--init-from", str(base_run), "--esft", "--esft-top-p", "0.4", "--esft-score", "gate",
                         "--esft-tokens", "64", "--esft-domain", "b"])
    t = trainer_from_args(args, tcfg(steps=3), tmp_path / "e", verbose=False)
    assert isinstance(t, ESFTTrainer)
    assert t.esft_cfg == ESFTConfig(score="gate", top_p=0.4, n_sample_tokens=64, domain="b")
    # the choice follows the rule on the scores it computed
    assert t.experts == {1: select_experts(t.scores[1].gate_E, 0.4)}
    w0 = load(base_run).blocks[1].ffn.experts.weights.w_up_EDG
    t.fit()
    experts, cfg = read_expert_config(tmp_path / "e" / "esft.json")
    assert experts == t.experts and cfg == t.esft_cfg
    w = load(tmp_path / "e").blocks[1].ffn.experts.weights.w_up_EDG  # a plain run: load_model reads it
    for e in range(4):
        assert torch.equal(w[e], w0[e]) != (e in t.experts[1])
    # resume reuses the saved choice
    r = trainer_from_args(p.parse_args(["--resume"]), tcfg(steps=4), tmp_path / "e", verbose=False)
    assert isinstance(r, ESFTTrainer) and r.experts == t.experts and r.scores is None


def test_expert_config_roundtrip_and_authors_format(tmp_path):
    d = expert_config_json({1: [0, 3], 3: [2]}, ESFTConfig(score="gate", top_p=0.1), None)
    (tmp_path / "a.json").write_text(json.dumps(d))
    assert read_expert_config(tmp_path / "a.json") == ({1: [0, 3], 3: [2]}, ESFTConfig(score="gate", top_p=0.1))
    (tmp_path / "b.json").write_text(json.dumps({"experts": {"1": [5]}, "shared_experts": True,
                                                 "non_expert_modules": False}))
    experts, cfg = read_expert_config(tmp_path / "b.json")
    assert experts == {1: [5]} and cfg.train_shared and not cfg.train_non_expert


def test_choose_and_share():
    from moelab.esft import ExpertScores
    sc = {1: ExpertScores(torch.tensor([0.5, 0.25, 0.15, 0.1]), torch.tensor([0.1, 0.2, 0.6, 0.1]))}
    assert choose_experts(sc, ESFTConfig(score="token", top_p=0.6)) == {1: [0, 1]}
    assert choose_experts(sc, ESFTConfig(score="gate", top_p=0.6)) == {1: [2]}
    assert tuned_slot_share(sc, {1: [0, 1]}) == pytest.approx(0.75)


def test_cli_lora_experts(base_run, corpus, tmp_path, monkeypatch, capsys):
    from moelab import cli_lora
    monkeypatch.setattr("moelab.data.build_corpus", lambda *a, **k: corpus)
    sub = argparse.ArgumentParser().add_subparsers()
    cli_lora.register(sub)
    args = sub.choices["lora"].parse_args(["experts", str(base_run), "--top-p", "0.3", "--tokens", "64",
                                           "--out", str(tmp_path / "x.json")])
    assert args.func(args) == 0
    experts, cfg = read_expert_config(tmp_path / "x.json")
    saved = json.loads((tmp_path / "x.json").read_text())
    assert experts == {1: select_experts(torch.tensor(saved["token_scores"]["1"]), 0.3)}
    assert cfg.top_p == 0.3 and "ESFT-token" in capsys.readouterr().out
