"""Tiny MoE LM: parameter formula, causality, attention vs a loop, padding, generation, config errors."""
import math

import pytest
import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.model import (
    BOS_ID,
    LMOutput,
    MoELM,
    apply_rope,
    generate,
    lm_loss,
    param_count,
    rope_tables,
)
from moelab.moe import MoELayer
from moelab.presets import PRESETS, get_preset
from moelab.resolver import resolve


def small_cfg(**kw) -> ModelConfig:
    moe = MoEConfig(**{"d_model": 32, "d_expert": 16, "n_experts": 4, "top_k": 2, **kw.pop("moe", {})})
    return ModelConfig(moe=moe, d_model=32, n_layers=3, n_heads=4, d_dense=48, max_seq_len=32, **kw)


CONFIGS = {
    "all_moe_tied": small_cfg(),
    "deepseek_style": small_cfg(first_dense=1, moe_every=2, tie_embeddings=False,
                                moe={"n_shared": 2, "d_shared": 8, "router": "sigmoid_group", "n_group": 2}),
    "gelu_every_layer": small_cfg(moe={"activation": "gelu", "top_k": 1}),
    "moepp_special_experts": small_cfg(moe={"router": "moepp", "n_zero": 1, "n_copy": 1, "n_const": 2,
                                            "gating_residual": True}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_count_matches_formula_and_active_params(name):
    cfg = CONFIGS[name]
    model = MoELM(cfg)
    total = sum(p.numel() for p in model.parameters())
    pc = param_count(cfg)
    assert pc.total == total
    # active = everything except the routed experts a token does not visit, counted from the tensors
    skipped = 0
    for blk in model.blocks:
        if isinstance(blk.ffn, MoELayer):
            e = blk.ffn.experts.weights
            per_expert = (e.w_up_EDG.numel() + e.w_down_EFD.numel()) // e.n_experts
            skipped += (e.n_experts - cfg.moe.top_k) * per_expert
    assert pc.active == total - skipped
    out = model(torch.randint(0, 256, (2, 5)))
    assert sorted(out.moe) == cfg.moe_layer_ids
    print(f"{name}: {total} parameters, {pc.active} active per token")


def test_presets_build_and_count():
    for name, fn in PRESETS.items():
        cfg = fn()
        assert param_count(cfg).total == sum(p.numel() for p in MoELM(cfg).parameters()), name


def test_layer_layout_and_outputs():
    cfg = CONFIGS["deepseek_style"]
    assert cfg.moe_layer_ids == [1]
    model = MoELM(cfg)
    idx = torch.randint(0, 256, (2, 10))
    out = model(idx)
    assert isinstance(out, LMOutput)
    assert out.logits_BSV.shape == (2, 10, cfg.vocab_size)
    assert sorted(out.moe) == cfg.moe_layer_ids
    assert torch.allclose(out.aux_loss, sum(r.aux_loss for r in out.moe.values()))
    assert out.moe[1].routing.expert_idx_TK.shape == (20, cfg.moe.top_k)


def test_causal_future_tokens_do_not_change_past_logits():
    model = MoELM(CONFIGS["all_moe_tied"]).eval()
    a = torch.randint(0, 256, (1, 12))
    b = a.clone()
    b[0, 8:] = torch.randint(0, 256, (4,))
    la, lb = model(a).logits_BSV, model(b).logits_BSV
    assert torch.allclose(la[0, :8], lb[0, :8], atol=1e-6)
    assert not torch.allclose(la[0, 8:], lb[0, 8:])


def test_attention_matches_loop_reference():
    cfg = small_cfg()
    model = MoELM(cfg)
    attn = model.blocks[0].attn
    x = torch.randn(2, 7, cfg.d_model, requires_grad=True)
    cos, sin = rope_tables(7, cfg.d_model // cfg.n_heads, cfg.rope_theta)
    y = attn(x, cos, sin)
    # loop reference: explicit rotation pairs (i, i + Dh/2) and a causal softmax per query
    H, Dh = cfg.n_heads, cfg.d_model // cfg.n_heads
    q, k, v = attn.qkv(x).view(2, 7, 3, H, Dh).unbind(2)
    ref = torch.zeros(2, 7, H, Dh)
    for bi in range(2):
        for h in range(H):
            def rot(t, pos):
                out = t.clone()
                for i in range(Dh // 2):
                    ang = pos * cfg.rope_theta ** (-2 * i / Dh)
                    c, s = math.cos(ang), math.sin(ang)
                    out[i] = t[i] * c - t[i + Dh // 2] * s
                    out[i + Dh // 2] = t[i + Dh // 2] * c + t[i] * s
                return out
            qs = [rot(q[bi, p, h], p) for p in range(7)]
            ks = [rot(k[bi, p, h], p) for p in range(7)]
            for p in range(7):
                scores = torch.stack([qs[p] @ ks[j] for j in range(p + 1)]) / math.sqrt(Dh)
                ref[bi, p, h] = torch.softmax(scores, 0) @ v[bi, :p + 1, h]
    ref = attn.out(ref.reshape(2, 7, cfg.d_model))
    assert torch.allclose(y, ref, atol=1e-5)
    g1 = torch.autograd.grad(y.sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref.sum(), x)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


def test_apply_rope_preserves_norm_and_is_identity_at_position_zero():
    cos, sin = rope_tables(5, 8, 10000.0)
    x = torch.randn(1, 1, 5, 8)
    r = apply_rope(x, cos, sin)
    assert torch.allclose(r.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(r[..., 0, :], x[..., 0, :])


def test_right_padding_changes_nothing_for_real_tokens_and_goes_to_no_expert():
    model = MoELM(CONFIGS["all_moe_tied"]).eval()
    idx = torch.randint(0, 256, (2, 10))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    idx2 = idx.clone()
    idx2[1, 6:] = torch.randint(0, 256, (4,))
    o1, o2 = model(idx, valid_BS=valid), model(idx2, valid_BS=valid)
    assert torch.allclose(o1.logits_BSV[valid], o2.logits_BSV[valid], atol=1e-6)
    for r in o1.moe.values():
        pad_slots = r.routing.expert_idx_TK.view(2, 10, -1)[1, 6:]
        assert (pad_slots == -1).all()
    tgt = torch.randint(0, 256, (2, 10))
    full = torch.nn.functional.cross_entropy(o1.logits_BSV[valid], tgt[valid])
    assert torch.allclose(lm_loss(logits_BSV=o1.logits_BSV, targets_BS=tgt, valid_BS=valid), full, atol=1e-6)


def test_generate_greedy_equals_top1_and_argmax_loop():
    model = MoELM(CONFIGS["all_moe_tied"])
    prompt = torch.tensor([BOS_ID, 104, 105])
    g = generate(model, prompt, max_new_tokens=5, temperature=0)
    t1 = generate(model, prompt, max_new_tokens=5, temperature=1.0, top_k=1)
    assert torch.equal(g, t1)
    ids = prompt.clone()  # independent greedy loop over bytes only
    for _ in range(5):
        nxt = model(ids[None]).logits_BSV[0, -1, :256].argmax()
        ids = torch.cat([ids, nxt.view(1)])
    assert torch.equal(g, ids[3:])
    s = generate(model, prompt, max_new_tokens=20, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert s.numel() == 20 and int(s.max()) < 256


def test_config_errors_name_field_and_allowed_values():
    with pytest.raises(ValueError, match="n_heads"):
        small_cfg().replace(n_heads=5)
    with pytest.raises(ValueError, match="moe.d_model"):
        small_cfg().replace(d_model=64)
    with pytest.raises(ValueError, match="first_dense"):
        small_cfg().replace(first_dense=9)
    with pytest.raises(ValueError, match="tiny, small, mixtral-like"):
        get_preset("huge")
    with pytest.raises(ValueError, match="router"):
        resolve("tiny", overrides={"moe.router": "nope"})
    with pytest.raises(ValueError, match="max_seq_len"):
        MoELM(small_cfg())(torch.zeros(1, 40, dtype=torch.long))


def test_gating_residual_receives_previous_layer_logits():
    cfg = CONFIGS["moepp_special_experts"]
    model = MoELM(cfg)
    seen = []
    for blk in model.blocks:
        blk.ffn.register_forward_hook(lambda m, a, kw, out: seen.append(kw["prev_logits"]), with_kwargs=True)
    out = model(torch.randint(0, 256, (1, 6)))
    assert seen[0] is None
    for i in range(1, cfg.n_layers):
        assert seen[i] is out.moe[i - 1].routing.logits_TE


def test_config_dict_roundtrip():
    cfg = CONFIGS["deepseek_style"]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_forward_allocates_nothing_on_a_hard_coded_device():
    """Every tensor the forward (and the loss, metrics and router-state step) creates follows its inputs: with
    the default device set to `meta`, a factory call without device= would make a meta tensor and the
    forward would fail or come out on meta. Built and run on CPU, it must give the CPU result exactly."""
    from moelab.moe import step_routers
    cfg = small_cfg().replace(moe=small_cfg().moe.replace(balance="loss_free", z_loss_coef=1e-3))
    torch.manual_seed(0)
    model = MoELM(cfg).train()
    ids = torch.randint(0, 256, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    want = model(ids, valid_BS=valid)
    torch.set_default_device("meta")
    try:
        got = model(ids, valid_BS=valid)
        (got.logits_BSV.sum() + got.aux_loss).backward()
        step_routers(model)
    finally:
        torch.set_default_device("cpu")
    assert got.logits_BSV.device.type == "cpu" and got.aux_loss.device.type == "cpu"
    torch.testing.assert_close(got.logits_BSV, want.logits_BSV)
    for r in got.moe.values():
        assert all(t.device.type == "cpu" for t in r.stats)
