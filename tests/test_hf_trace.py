"""Tracing and replay of transformers MoE families, each built from a tiny random-weight config (no download)."""
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM

from moelab.hf import HF_ADAPTERS, HFRecorder, HFReplay, moe_blocks, trace_hf
from moelab.trace import RoutingCursor, load_trace

E, K, V = 4, 2, 64
_BASE = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64, "moe_intermediate_size": 16,
             "num_experts_per_tok": K, "num_experts": E, "num_local_experts": E, "n_routed_experts": E, "n_shared_experts": 1,
             "shared_expert_intermediate_size": 16, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
             "num_dense_layers": 0, "moe_k": K, "moe_num_experts": E, "moe_layer_start_index": 0, "moe_topk": K,
             "num_shared_experts": 1, "moe_num_shared_experts": 1, "pad_token_id": 0, "kv_lora_rank": 8, "q_lora_rank": 8,
             "qk_rope_head_dim": 4, "v_head_dim": 8, "qk_nope_head_dim": 4}
# Per-family fixes to the shared tiny config (test data only; the library has no per-family branches).
_EXTRA = {
    "deepseek_v3": {"head_dim": 4, "n_group": 2, "topk_group": 1},  # group-limited routing, 2 experts per group
    "deepseek_v2": {"head_dim": 4},
    "jamba": {"expert_layer_period": 1, "expert_layer_offset": 0, "attn_layer_period": 1, "attn_layer_offset": 0},
    "qwen3_next": {"layer_types": ["full_attention", "full_attention"]},
    "lfm2_moe": {"layer_types": ["full_attention", "full_attention"]},
    "minimax": {"layer_types": ["full_attention", "full_attention"]},
    "exaone_moe": {"layer_types": ["full_attention", "full_attention"], "mlp_layer_types": ["sparse", "sparse"]},
    "afmoe": {"layer_types": ["full_attention", "full_attention"]},
    "gpt_oss": {"layer_types": ["full_attention", "full_attention"]},
    "qwen2_moe": {"layer_types": ["full_attention", "full_attention"]},
    "dots1": {"layer_types": ["full_attention", "full_attention"]},
    "kimi_linear": dict(layer_types=["full_attention", "full_attention"], mlp_layer_types=["sparse", "sparse"]),
    "granitemoehybrid": {"layer_types": ["attention", "attention"], "mamba_n_heads": 4, "mamba_d_head": 16},
}
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2", "gpt_oss", "granitemoe",
            "granitemoeshared", "phimoe", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "minimax", "dots1",
            "flex_olmo", "minimax_m2", "exaone_moe", "afmoe", "qwen3_next", "jamba", "lfm2_moe", "dbrx",
            "bailing_hybrid", "cohere2_moe", "granitemoe_swa", "hy_v3", "kimi_linear",
            "kolibri1", "laguna", "mellum", "mimo_v2_flash", "solar_open", "granitemoehybrid", "llama4_text"]


_NESTED = {  # families whose config nests the MoE settings
    "dbrx": {"d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 64, "vocab_size": V,
                 "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": E, "moe_top_k": K}},
}


def tiny_model(family: str):
    if family in _NESTED:
        cfg = AutoConfig.for_model(family, **_NESTED[family])
    else:
        cfg0 = AutoConfig.for_model(family)
        known = set(cfg0.to_dict())
        kw = {k: v for k, v in {**_BASE, **_EXTRA.get(family, {})}.items() if k in known or hasattr(cfg0, k)}
        cfg = AutoConfig.for_model(family, **kw)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # some families init their router at zero: make routing input-dependent
        for b in moe_blocks(model):
            for name, w in getattr(b.module, b.adapter.router).named_parameters():
                if name.endswith("weight") and w.dim() == 2:
                    w.normal_(0.0, w.shape[-1] ** -0.5)
    return model.float().eval()


def _ids(seed: int, B=2, S=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (B, S), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_trace_equals_router_topk_and_replay_is_exact(family):
    model = tiny_model(family)
    blocks = moe_blocks(model)
    assert len(blocks) >= 1 and all(type(b.module).__name__ in HF_ADAPTERS for b in blocks)
    ids = _ids(1)
    # Independent view: the router module's own outputs, captured by a separate hook.
    seen = {}
    hooks = [getattr(b.module, b.adapter.router).register_forward_hook(
        lambda m, a, o, l=l: seen.setdefault(l, o)) for l, b in enumerate(blocks)]
    with torch.no_grad(), HFRecorder(model) as rec:
        out = model(input_ids=ids, use_cache=False).logits
        layers = rec.take()
    for h in hooks:
        h.remove()
    assert len(layers) == len(blocks)
    for l, (r, b) in enumerate(zip(layers, blocks)):
        o = seen[l]
        logits_TE = (o if b.adapter.logits_at is None else o[b.adapter.logits_at]).reshape(-1, E).float()
        assert r.expert_idx_TK.shape == (ids.numel(), K)
        torch.testing.assert_close(r.logits_TE, logits_TE, rtol=0, atol=0)
        # top-k of the router's own logits (softmax / sigmoid are monotone; no correction bias at init)
        want = torch.topk(logits_TE, K, dim=-1).indices.sort(-1).values
        if family == "deepseek_v3":  # group-limited: top-k inside the best group(s), checked by hand below
            s_TGe = logits_TE.sigmoid().view(-1, 2, E // 2)
            g_T = s_TGe.topk(2, dim=-1).values.sum(-1).argmax(-1)
            want = (torch.arange(E // 2)[None] + g_T[:, None] * (E // 2)).sort(-1).values
        assert torch.equal(r.expert_idx_TK.sort(-1).values, want), family
        if b.adapter.dense_at is not None:  # Llama-4: weights are the dense scores at the chosen experts
            dense_TE = o[b.adapter.dense_at].reshape(-1, E).float()
            torch.testing.assert_close(r.weight_TK, dense_TE.gather(1, r.expert_idx_TK), rtol=0, atol=0)
            assert ((dense_TE > 0).sum(-1) == K).all()
        elif not isinstance(o, torch.Tensor) and o[2].dtype in (torch.long, torch.int32, torch.int64):
            torch.testing.assert_close(r.weight_TK, o[1].reshape(-1, K).float(), rtol=0, atol=0)
    # Replaying the model's own routing reproduces its outputs exactly.
    with torch.no_grad(), HFReplay(model, [RoutingCursor(r.expert_idx_TK, r.weight_TK) for r in layers]):
        again = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(again, out)
    # Replaying another input's routing changes them.
    with torch.no_grad(), HFRecorder(model, logits=False) as rec:
        model(input_ids=_ids(2), use_cache=False)
        other = rec.take()
    assert any(not torch.equal(a.expert_idx_TK, b.expert_idx_TK) for a, b in zip(layers, other))
    with torch.no_grad(), HFReplay(model, [RoutingCursor(r.expert_idx_TK, r.weight_TK) for r in other]):
        changed = model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(changed, out)


def test_trace_hf_file_roundtrip_and_batches(tmp_path):
    model = tiny_model("qwen3_moe")
    docs = [(0, list(range(1, 9))), (1, list(range(9, 17))), (0, list(range(20, 28)))]
    tr = trace_hf(model, docs, ["code", "prose"], batch_size=2, decode=lambda t: f"<{t}>")
    assert tr.n_layers == 2 and tr.n_tokens == 24 and tr.top_k == K and tr.n_experts == E
    # the same tokens in one batch route identically (batching does not change routing)
    with torch.no_grad(), HFRecorder(model) as rec:
        model(input_ids=torch.tensor([d for _, d in docs]), use_cache=False)
        one = rec.take()
    for l in range(2):
        assert np.array_equal(tr.expert_idx_LNK[l], one[l].expert_idx_TK.numpy())
        np.testing.assert_allclose(tr.logits_LNE[l], one[l].logits_TE.numpy(), atol=2e-3, rtol=1e-3)  # float16
    assert tr.domains == ("code", "prose") and tr.domain_N.tolist() == [0] * 8 + [1] * 8 + [0] * 8
    assert tr.token_text(5) == "<5>"
    back = load_trace(tr.save(tmp_path / "t.npz"))
    assert np.array_equal(back.expert_idx_LNK, tr.expert_idx_LNK) and back.vocab == tr.vocab
    assert back.meta["model_class"] == "Qwen3MoeForCausalLM"


def test_missing_local_model_is_a_clear_error(tmp_path):
    from moelab.hf import load_hf_causal_lm
    with pytest.raises(ValueError, match="no local transformers model"):
        load_hf_causal_lm(str(tmp_path / "nothing"))


def test_unknown_model_lists_supported_blocks():
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock"):
        moe_blocks(torch.nn.Linear(2, 2))


def _save_tiny_hf(path, family="olmoe"):
    """A tiny model + a byte-level BPE tokenizer trained here, saved like a downloaded model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["def f(x): return x", "the cat sat on the mat"] * 4,
                           trainers.BpeTrainer(vocab_size=V + 256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(path)
    model = tiny_model(family)
    model.resize_token_embeddings(tk.get_vocab_size())
    model.save_pretrained(path)
    return model


def test_cli_trace_hf_local_folder(tmp_path):
    from moelab.cli import main
    from moelab.hf import load_hf_causal_lm
    _save_tiny_hf(tmp_path / "m")
    for dom, text in (("code", "def f(x):\n    return x + 1\n"), ("prose", "the cat sat on the mat. ")):
        (tmp_path / dom).mkdir()
        (tmp_path / dom / "a.txt").write_text(text * 20)
    out = tmp_path / "t.npz"
    assert main(["trace", "--hf", str(tmp_path / "m"), "--data", str(tmp_path / "code"), str(tmp_path / "prose"),
                 "--out", str(out), "--seq-len", "8", "--max-tokens", "32"]) == 0
    tr = load_trace(out)
    assert tr.domains == ("code", "prose") and tr.n_tokens == 32 and tr.n_layers == 2
    model, tok = load_hf_causal_lm(str(tmp_path / "m"))
    assert "".join(tr.token_text(t) for t in tr.token_ids_N[:8]) == tok.decode(tr.token_ids_N[:8].tolist())
    with torch.no_grad(), HFRecorder(model) as rec:  # the reloaded model routes the first window the same way
        model(input_ids=torch.as_tensor(tr.token_ids_N[:8]).long()[None], use_cache=False)
        first = rec.take()
    assert np.array_equal(tr.expert_idx_LNK[:, :8], np.stack([r.expert_idx_TK.numpy() for r in first]))
