"""moelab.hf.attach (metrics and balancing by hooks on transformers MoE models), its sidecar, the Trainer callback,
and `moelab finetune`; tiny random-weight models and a tokenizer built locally (nothing downloaded)."""
import argparse
import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

import moelab.hf as H
from moelab import balance
from moelab.data import builtin_documents, document_text
from moelab.hf_balance import SIDECAR
from moelab.hf_finetune import FinetuneConfig, finetune
from tests.test_hf_trace import _ids, tiny_model

V = 320
SKEW, EMB, GATE_STD = 0.5, 0.15, 0.125  # router skew (test data): shared direction, its weight, router init


def byte_bpe(folder=None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on a slice of the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [document_text(d.data)[:4000] for d in builtin_documents()[::40]]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=V, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def tiny_qwen3(seed=0, skew=True):
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                               num_experts=8, num_experts_per_tok=2, max_position_embeddings=256, norm_topk_prob=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    if skew:  # every token shares a direction u that experts 0 and 1 align with: they win most top-2 choices
        with torch.no_grad():
            u = torch.nn.functional.normalize(torch.randn(cfg.hidden_size), dim=0)
            model.model.embed_tokens.weight.add_(EMB * u)
            for layer in model.model.layers:
                layer.mlp.gate.weight.normal_(0.0, GATE_STD)
                layer.mlp.gate.weight[:2] += SKEW * u
    return model


def _max_vio(model, bal, ids) -> float:
    model.eval()
    bal.take_stats()
    with torch.no_grad():
        model(input_ids=ids)
    return max(float(s.max_vio) for s in bal.take_stats())


def test_loss_free_finetune_lowers_max_vio_on_held_out_batch(tmp_path):
    tok = byte_bpe()
    docs = builtin_documents()[::25]
    cfg = {"steps": 30, "batch_size": 4, "seq_len": 32, "lr": 3e-4, "max_tokens": 20000, "eval_batches": 1,
           "rate": 0.02}
    held_out = torch.tensor(tok(document_text(docs[-1].data)[-3000:])["input_ids"][:256]).view(4, 64)
    vio = {}
    for mode in ("none", "loss_free"):
        model = tiny_qwen3()
        bal = H.attach(model, mode, rate=cfg["rate"])
        vio[f"{mode}_start"] = _max_vio(model, bal, held_out)
        finetune(model, tok, docs, FinetuneConfig(balance=mode, **cfg), tmp_path / mode, verbose=False, bal=bal)
        vio[mode] = _max_vio(model, bal, held_out)
    assert vio["none_start"] == vio["loss_free_start"] > 2.0, vio   # skewed at the start (E=8: MaxVio <= 3)
    assert vio["loss_free"] < vio["none"] - 0.5, vio
    rows = [json.loads(x) for x in (tmp_path / "loss_free" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 31))
    assert len(rows[0]["max_vio"]) == 2 and len(rows[0]["load"][0]) == 8


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_attach_with_zero_bias_changes_nothing_and_counts_like_a_recorder(family):
    model = tiny_model(family)
    ids = _ids(2)
    with H.HFRecorder(model) as rec:
        ref = model(ids).logits
        routing = rec.take()
    bal = H.attach(model, "loss_free")
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-6, rtol=1e-6)
    for r, s in zip(routing, bal.take_stats()):
        counts_E = balance.expert_counts(expert_idx_TK=r.expert_idx_TK, n_experts=s.load_E.numel())
        torch.testing.assert_close(s.load_E, counts_E / counts_E.sum())
    bal.detach()


def test_bias_changes_selection_only_and_steps_by_sign_of_load():
    model = tiny_qwen3(skew=False)
    ids = _ids(4, S=16) % V
    bal = H.attach(model, "loss_free", rate=0.5)
    model.train()
    with H.HFRecorder(model) as rec:
        model(ids).logits.sum().backward()
        before = rec.take()
    bal.step()
    for r, (name, b) in zip(before, bal.biases().items()):
        load_E = balance.expert_counts(expert_idx_TK=r.expert_idx_TK, n_experts=8)
        torch.testing.assert_close(b, 0.5 * torch.sign(load_E.mean() - load_E))
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad(), H.HFRecorder(model) as rec:  # weights: unbiased softmax over the biased choice
        model(ids)
        r = rec.take()[0]
    probs_TE = torch.softmax(r.logits_TE, -1)
    want_idx = torch.topk(probs_TE + next(iter(bal.biases().values())), 2).indices
    assert torch.equal(r.expert_idx_TK.sort(-1).values, want_idx.sort(-1).values)
    w = probs_TE.gather(1, r.expert_idx_TK)
    torch.testing.assert_close(r.weight_TK, w / w.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    assert gate.norm_topk_prob
    bal.detach()
    with torch.no_grad(), H.HFRecorder(model) as rec:  # detached: the router's own choice again
        model(ids)
        r = rec.take()[0]
    assert torch.equal(r.expert_idx_TK, torch.topk(torch.softmax(r.logits_TE, -1), 2).indices)


def test_own_correction_bias_is_stepped_kept_after_detach_and_saved(tmp_path):
    model = tiny_model("deepseek_v3").train()
    bal = H.attach(model, "loss_free", rate=0.25)
    model(_ids(1)).logits.sum().backward()
    bal.step()
    slot = model.model.layers[0].mlp.gate.e_score_correction_bias
    assert slot.abs().sum() > 0 and set(slot.tolist()) <= {-0.25, 0.0, 0.25}
    bal.detach()
    model.save_pretrained(tmp_path)
    assert not (tmp_path / SIDECAR).exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(again.model.layers[0].mlp.gate.e_score_correction_bias, slot)


def test_sidecar_written_with_a_warning_and_read_back(tmp_path):
    model = tiny_qwen3(skew=False).train()
    bal = H.attach(model, "loss_free", rate=0.1)
    model(_ids(1) % V).logits.sum().backward()
    bal.step()
    learned = bal.biases()
    with pytest.warns(UserWarning, match="no slot for the learned loss-free bias"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / SIDECAR).is_file()
    ids = _ids(3) % V
    with torch.no_grad():
        ref = model.eval()(ids).logits  # routed with the learned bias
    bal.detach()
    assert "save_pretrained" not in model.__dict__
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    bal2 = H.attach(again, "none")
    assert bal2.biases().keys() == learned.keys()
    for k in learned:
        torch.testing.assert_close(bal2.biases()[k], learned[k])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids).logits, ref, atol=1e-5, rtol=1e-5)
        assert (model(ids).logits - ref).abs().max() > 1e-4  # detached: the bias no longer applies


def test_aux_and_global_losses_per_layer_and_hf_router_loss_off():
    model = tiny_model("mixtral").train()
    model.config.output_router_logits = True
    ids = _ids(6)
    bal = H.attach(model, "aux", aux_coef=0.1)
    assert model.config.output_router_logits is False
    with H.HFRecorder(model) as rec:
        out = model(ids, labels=ids)
        routing = rec.take()
    assert getattr(out, "aux_loss", None) is None
    losses = bal.losses()
    for d, r in zip(losses, routing):
        ref = balance.switch_aux_loss(probs_TE=torch.softmax(r.logits_TE, -1), expert_idx_TK=r.expert_idx_TK, n_experts=4)
        torch.testing.assert_close(d["aux"].detach(), ref)
    bal.detach()
    assert model.config.output_router_logits is True

    bal = H.attach(model, "global")
    with H.HFRecorder(model) as rec:
        model(_ids(7))
        model(_ids(8))
        r1 = rec.take()
    first = bal.losses()[0]["global"]  # two forwards: their losses summed per layer
    idx = r1[0].expert_idx_TK
    T = idx.shape[0] // 2
    c1 = balance.expert_counts(expert_idx_TK=idx[:T], n_experts=4)
    c2 = balance.expert_counts(expert_idx_TK=idx[T:], n_experts=4)
    p = torch.softmax(r1[0].logits_TE, -1)
    ref = (balance.switch_aux_loss(probs_TE=p[:T], expert_idx_TK=idx[:T], n_experts=4, counts_E=c1)
           + balance.switch_aux_loss(probs_TE=p[T:], expert_idx_TK=idx[T:], n_experts=4, counts_E=c1 + c2))
    torch.testing.assert_close(first.detach(), ref)
    bal.step()
    assert bal.layers[0].state.sum_E is None
    bal.detach()


def test_trainer_callback_steps_the_bias_and_add_to_loss():
    model = tiny_qwen3(skew=False).train()
    bal = H.attach(model, "aux", aux_coef=1.0, add_to_loss=True)
    ids = _ids(2) % V
    out = model(ids, labels=ids)
    bal.detach()
    plain = model(ids, labels=ids).loss
    assert float(out.loss.detach()) > float(plain.detach()) + 0.5  # + two layers' Switch loss (each >= 1)
    bal = H.attach(model, "loss_free", rate=0.3)
    model(ids).logits.sum().backward()
    cb = bal.callback()
    from transformers import TrainerCallback
    assert isinstance(cb, TrainerCallback)
    cb.on_step_end(None, None, None)
    assert all(b.abs().max() == 0.3 for b in bal.biases().values())
    bal.detach()


def test_moelab_finetune_cli_saves_a_loadable_model(tmp_path, capsys):
    from moelab.cli_hf import register
    src = tmp_path / "src"
    model = tiny_qwen3(skew=False)
    model.save_pretrained(src)
    byte_bpe(src)
    data = tmp_path / "notes"
    data.mkdir()
    for i, d in enumerate(builtin_documents()[::60][:6]):
        (data / f"f{i}.txt").write_text(document_text(d.data)[:6000])
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["finetune", "--hf", str(src), "--data", str(data), "--balance", "loss_free",
                              "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / "run"),
                              "--rate", "0.1", "--eval-batches", "1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert args.func(args) == 0
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train"] * 3 + ["val"]
    for png in ("loss.png", "expert_load.png", "max_vio.png"):
        assert (run / png).stat().st_size > 0
    out = AutoModelForCausalLM.from_pretrained(run / "model")
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / SIDECAR).is_file()
    sd = model.state_dict()
    assert any(not torch.equal(v, sd[k]) for k, v in out.state_dict().items())  # it trained
    assert "saved" in capsys.readouterr().out
