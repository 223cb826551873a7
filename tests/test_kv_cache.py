"""KV-cache generation equals re-reading the context; attention options against a loop; top-p sampling."""
import math

import pytest
import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.model import BOS_ID, KVCache, MoELM, generate, param_count, sample_next


def cfg(**kw) -> ModelConfig:
    moe = MoEConfig(**{"d_model": 32, "d_expert": 16, "n_experts": 4, "top_k": 2, **kw.pop("moe", {})})
    return ModelConfig(**{"moe": moe, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_dense": 48,
                          "max_seq_len": 24, **kw})


CONFIGS = {
    "plain": cfg(),
    "gqa_qknorm_partial_bias_hd": cfg(n_kv_heads=2, head_dim=12, qk_norm=True, rope_fraction=0.5, qkv_bias=True,
                                      tie_embeddings=False),
    "window": cfg(sliding_window=5),
    "deepseek_routing": cfg(first_dense=1, moe={"router": "sigmoid_group", "n_group": 2, "topk_group": 1,
                                                "n_shared": 1, "routed_scaling_factor": 2.5,
                                                "balance": "loss_free"}),
}


def random_model(c: ModelConfig, seed: int = 0) -> MoELM:
    """Every parameter random (biases and norm gains too, so each option changes the output)."""
    torch.manual_seed(seed)
    model = MoELM(c)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim > 1 else 1.0)
    return model.eval()


def loop_attention(attn, x_SD: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """Per query, per head: softmax over the allowed keys, written out with Python loops (independent twin)."""
    S = x_SD.shape[0]
    H, Hkv, Dh, R = c.n_heads, c.kv_heads, c.d_head, c.d_rope
    w = attn.qkv.weight
    b = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(w.shape[0])
    proj = x_SD @ w.t() + b
    q, k, v = proj[:, :H * Dh].view(S, H, Dh), proj[:, H * Dh:(H + Hkv) * Dh].view(S, Hkv, Dh), \
        proj[:, (H + Hkv) * Dh:].view(S, Hkv, Dh)

    def rms(t, g):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + c.norm_eps) * g

    if c.qk_norm:
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)

    def rot(t, m):  # rotate pairs (i, i + R/2) of the first R dims by angle m * theta^(-2i/R)
        t = t.clone()
        for i in range(R // 2):
            a = m / c.rope_theta ** (2 * i / R)
            x1, x2 = t[..., i].clone(), t[..., i + R // 2].clone()
            t[..., i], t[..., i + R // 2] = x1 * math.cos(a) - x2 * math.sin(a), x2 * math.cos(a) + x1 * math.sin(a)
        return t

    q = torch.stack([rot(q[m], m) for m in range(S)])
    k = torch.stack([rot(k[m], m) for m in range(S)])
    out = torch.zeros(S, H, Dh)
    for i in range(S):
        for h in range(H):
            g = h // (H // Hkv)
            js = [j for j in range(i + 1) if c.sliding_window is None or i - j < c.sliding_window]
            sc = torch.stack([q[i, h] @ k[j, g] for j in js]) / math.sqrt(Dh)
            p = torch.softmax(sc, 0)
            out[i, h] = sum(p[n] * v[j, g] for n, j in enumerate(js))
    return out.reshape(S, H * Dh) @ attn.out.weight.t()


@pytest.mark.parametrize("name", ["plain", "gqa_qknorm_partial_bias_hd", "window"])
def test_attention_options_match_loop(name):
    c = CONFIGS[name]
    model = random_model(c)
    x_SD = torch.randn(9, c.d_model)
    attn = model.blocks[0].attn
    got = attn(x_SD[None], model.rope_cos[:9], model.rope_sin[:9])[0]
    assert torch.allclose(got, loop_attention(attn, x_SD, c), atol=1e-4, rtol=1e-4)


def test_param_count_with_attention_options():
    for c in CONFIGS.values():
        assert param_count(c).total == sum(p.numel() for p in MoELM(c).parameters())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_cache_forward_equals_full_forward(name):
    model = random_model(CONFIGS[name])
    idx = torch.randint(0, 256, (2, 13))
    full = model(idx).logits_BSV
    cache, parts, p = KVCache(model.cfg.n_layers), [], 0
    for n in (5, 3, 1, 4):  # prefill, a chunk (needs an offset causal mask), one token, a chunk
        parts.append(model(idx[:, p:p + n], cache=cache).logits_BSV)
        p += n
    assert cache.pos == 13
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_cache_equals_no_cache_within_and_beyond_max_seq_len(name):
    model = random_model(CONFIGS[name], seed=1)
    prompt = torch.tensor([BOS_ID, 104, 101, 108, 108, 111])
    for n in (10, 40):  # 6 + 10 fits max_seq_len=24; 6 + 40 slides
        a = generate(model, prompt, max_new_tokens=n, temperature=0, use_cache=True)
        b = generate(model, prompt, max_new_tokens=n, temperature=0, use_cache=False)
        assert a.numel() == n and torch.equal(a, b)
    ids = prompt.clone()  # independent greedy loop over bytes only, full re-read within max_seq_len
    for _ in range(10):
        ids = torch.cat([ids, model(ids[None]).logits_BSV[0, -1, :256].argmax().view(1)])
    assert torch.equal(generate(model, prompt, max_new_tokens=10, temperature=0), ids[6:])


@pytest.mark.parametrize("name", ["plain", "gqa_qknorm_partial_bias_hd"])
def test_sampling_cache_equals_no_cache_with_fixed_generator(name):
    model = random_model(CONFIGS[name], seed=2)
    prompt = torch.tensor([BOS_ID, 97])
    kw = {"max_new_tokens": 30, "temperature": 0.9, "top_k": 50, "top_p": 0.9}
    a = generate(model, prompt, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    b = generate(model, prompt, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert torch.equal(a, b) and int(a.max()) < 256


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    gen = torch.Generator().manual_seed(0)

    def drawn(**kw):
        return {int(sample_next(logits, temperature=1.0, generator=gen, **kw)) for _ in range(300)}

    assert drawn(top_k=None, top_p=0.7) == {1, 3}        # 0.5 < 0.7 <= 0.5 + 0.3
    assert drawn(top_k=None, top_p=0.8) == {1, 3}        # 0.8 reached exactly by {1, 3}
    assert drawn(top_k=None, top_p=0.81) == {1, 2, 3}
    assert drawn(top_k=None, top_p=0.3) == {1}
    assert drawn(top_k=None, top_p=1.0) == {0, 1, 2, 3}
    assert drawn(top_k=2, top_p=1.0) == {1, 3}


def test_generate_errors_name_the_argument():
    model = random_model(CONFIGS["plain"])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.tensor([BOS_ID]), max_new_tokens=1, top_p=0.0)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, torch.tensor([], dtype=torch.long), max_new_tokens=1)
    cache = KVCache(2)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=24"):  # 3 cached + 22 new
        model(torch.zeros(1, 22, dtype=torch.long), cache=cache)


def test_config_errors_for_attention_options():
    for kw, field in (({"n_kv_heads": 3}, "n_kv_heads"), ({"head_dim": 7}, "head_dim"),
                      ({"rope_fraction": 0.1}, "rope_fraction"), ({"sliding_window": 0}, "sliding_window")):
        with pytest.raises(ValueError, match=field):
            cfg(**kw)


def test_cli_generate_prompt_file_stdin_no_cache_and_speed_line(tmp_path, capsys, monkeypatch):
    import io

    from moelab.checkpoint import save_checkpoint
    from moelab.cli import main
    model = random_model(CONFIGS["plain"], seed=4)
    save_checkpoint(tmp_path, 1, model=model, opt=torch.optim.SGD(model.parameters(), lr=0.1), extra={},
                    meta={"model_config": model.cfg.to_dict()}, keep_last=1)
    (tmp_path / "p.txt").write_text("héllo", encoding="utf-8")
    base = ["generate", str(tmp_path), "--max-new-tokens", "30", "--temperature", "0.7", "--top-p", "0.9"]
    outs = []
    for extra in (["--prompt-file", str(tmp_path / "p.txt")], ["--prompt", "-"], ["--prompt", "-", "--no-cache"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("héllo"))
        assert main(base + extra) == 0
        cap = capsys.readouterr()
        outs.append(cap.out)
        assert "30 tokens in" in cap.err and "tokens/s)" in cap.err
        assert "slides" in cap.err  # 1 + 6 + 30 > max_seq_len=24
    assert outs[0] == outs[1] == outs[2] and outs[0].startswith("héllo")


@pytest.mark.parametrize("t", [float("nan"), float("inf"), -1.0])
def test_generate_refuses_a_temperature_that_is_not_finite_and_non_negative(t):
    from moelab.model import MoELM, generate
    from moelab.resolver import resolve
    model = MoELM(resolve("tiny", overrides={"model.n_layers": 1}).model)
    with pytest.raises(ValueError, match="temperature=.* is invalid: allowed a finite number >= 0"):
        generate(model, torch.tensor([257, 100]), max_new_tokens=2, temperature=t)
