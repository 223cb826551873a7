"""experts_implementation="moelab" inside transformers models: forward, every gradient and greedy generation equal
transformers' own eager experts on tiny random-weight models of each family (no download)."""
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from moelab.hf import moe_blocks
from moelab.hf_backend import HFExpertsWeights, moelab_experts_forward, register
from tests.test_hf_trace import _ids, tiny_model

# Families and the layout each exercises: concatenated SwiGLU (Qwen3-MoE, Mixtral, OLMoE), + shared expert
# (Qwen2-MoE), group-limited sigmoid routing + shared (DeepSeek-V3), transposed + biases + interleaved custom gate
# (GPT-OSS).
FAMILIES = ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"]


def _model(family: str):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every expert weight and bias non-trivial (some families init biases at zero)
        for b in moe_blocks(model):
            for p in getattr(b.module, b.adapter.experts).parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 3 else 0.1))
    return model


def _fwd_bwd(model, impl: str, ids):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits.float().square().mean() + logits.float().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_every_gradient_equal_eager(family):
    register()
    model = _model(family)
    ids = _ids(3, B=2, S=7)
    ref_logits, ref_grads = _fwd_bwd(model, "eager", ids)
    logits, grads = _fwd_bwd(model, "moelab", ids)
    for b in moe_blocks(model):  # the moelab path really ran (its RoutedExperts is cached on the module)
        assert "_moelab_routed_experts" in getattr(b.module, b.adapter.experts).__dict__
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    expert_grads = [n for n in grads if "experts." in n]
    assert expert_grads and all(grads[n].abs().sum() > 0 for n in expert_grads)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_greedy_generate_with_kv_cache_equals_eager(family):
    register()
    model = _model(family)
    ids = _ids(5, B=2, S=5)
    out = {}
    for impl in ("eager", "moelab"):
        model.set_experts_implementation(impl)
        out[impl] = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert out["moelab"].shape == (2, 13)
    assert torch.equal(out["moelab"], out["eager"])


def test_register_is_idempotent_and_selectable_by_name(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    assert register() == register() == "moelab"
    assert ALL_EXPERTS_FUNCTIONS["moelab"] is moelab_experts_forward
    model = _model("qwen3_moe")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moelab")
    assert loaded.config._experts_implementation == "moelab"
    ids = _ids(1)
    model.set_experts_implementation("eager")
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_provider_gives_views_of_the_module_weights():
    model = _model("qwen3_moe")
    ex = moe_blocks(model)[0].module.experts
    w = HFExpertsWeights(ex).stacked()
    assert w.w_up.data_ptr() == ex.gate_up_proj.data_ptr() and w.w_up.shape == ex.gate_up_proj.transpose(1, 2).shape
    assert HFExpertsWeights(ex)._silu  # transformers' SiLU recognised: moelab's fused SwiGLU runs
    assert w.w_down.data_ptr() == ex.down_proj.data_ptr() and w.w_down.shape[1:] == (ex.down_proj.shape[2],
                                                                                  ex.down_proj.shape[1])


def test_expert_parallel_sentinel_ids_contribute_nothing():
    model = _model("mixtral")
    ex = moe_blocks(model)[0].module.experts
    E = ex.num_experts
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(5, ex.hidden_dim, generator=g)
    idx_TK = torch.tensor([[0, E], [1, 2], [E, E], [3, 0], [2, E]])
    w_TK = torch.rand(5, 2, generator=g)
    y_TD = moelab_experts_forward(ex, x_TD, idx_TK, w_TK)
    ref_TD = torch.zeros_like(x_TD)  # loop reference over the real slots only
    for t in range(5):
        for k in range(2):
            e = int(idx_TK[t, k])
            if e < E:
                gate, up = (x_TD[t] @ ex.gate_up_proj[e].T).chunk(2)
                ref_TD[t] += w_TK[t, k] * ((nn.functional.silu(gate) * up) @ ex.down_proj[e].T)
    torch.testing.assert_close(y_TD, ref_TD, atol=1e-5, rtol=1e-5)
    assert y_TD[2].abs().max() == 0


def test_no_gate_and_interleaved_default_gate_layouts_match_a_loop():
    class Fake(nn.Module):  # transformers' flags set by hand: Nemotron-H style (no gate) and interleaved SwiGLU
        def __init__(self, has_gate: bool, is_concatenated: bool):
            super().__init__()
            self.has_gate, self.is_concatenated, self.is_transposed, self.has_bias = has_gate, is_concatenated, False, False
            G = 12 if has_gate else 6
            name = "gate_up_proj" if has_gate else "up_proj"
            setattr(self, name, nn.Parameter(torch.randn(3, G, 8)))
            self.down_proj = nn.Parameter(torch.randn(3, 8, 6))
            self.act_fn = nn.GELU() if not has_gate else nn.SiLU()
            self.num_experts = 3

    from transformers.integrations import moe
    for has_gate, concat in ((False, True), (True, False)):
        Fake._apply_gate = moe._default_apply_gate
        m = Fake(has_gate, concat)
        x_TD, idx_TK, w_TK = torch.randn(4, 8), torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1]]), torch.rand(4, 2)
        y_TD = moelab_experts_forward(m, x_TD, idx_TK, w_TK)

        def expert(e, x_D, m=m, has_gate=has_gate):
            h = x_D @ (m.gate_up_proj if has_gate else m.up_proj)[e].T
            a = m.act_fn(h) if not has_gate else nn.functional.silu(h[::2]) * h[1::2]
            return a @ m.down_proj[e].T

        torch.testing.assert_close(y_TD, _per_slot(x_TD, idx_TK, w_TK, expert), atol=1e-4, rtol=1e-4)


def _per_slot(x_TD, idx_TK, w_TK, expert):
    """Reference by hand, token by token and slot by slot: sum_k w[t, k] * expert(idx[t, k], x[t])."""
    ref = torch.zeros_like(x_TD)
    for t in range(idx_TK.shape[0]):
        for k in range(idx_TK.shape[1]):
            ref[t] += w_TK[t, k] * expert(int(idx_TK[t, k]), x_TD[t])
    return ref


def test_unsupported_layout_names_the_module_class():
    class NotDecorated(nn.Module):
        pass

    with pytest.raises(ValueError, match="NotDecorated"):
        moelab_experts_forward(NotDecorated(), torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))


def test_post_expert_norm_runs_on_each_expert_output_before_the_weight():
    from transformers.integrations import moe

    class Normed(nn.Module):  # a has_post_expert_norm module built by hand (transformers' flags set directly)
        _apply_gate = moe._default_apply_gate

        def __init__(self):
            super().__init__()
            self.has_gate, self.is_concatenated, self.is_transposed, self.has_bias = True, True, False, False
            self.has_post_expert_norm = True
            self.gate_up_proj = nn.Parameter(torch.randn(3, 12, 8))
            self.down_proj = nn.Parameter(torch.randn(3, 8, 6))
            self.act_fn = nn.SiLU()
            self.post_expert_norm = nn.LayerNorm(8)
            self.num_experts = 3

    m = Normed()
    x_TD, idx_TK, w_TK = torch.randn(4, 8), torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1]]), torch.rand(4, 2)
    y_TD = moelab_experts_forward(m, x_TD, idx_TK, w_TK)

    def expert(e, x_D):
        gate, up = (x_D @ m.gate_up_proj[e].T).chunk(2)
        return m.post_expert_norm((nn.functional.silu(gate) * up) @ m.down_proj[e].T)

    torch.testing.assert_close(y_TD, _per_slot(x_TD, idx_TK, w_TK, expert), atol=1e-4, rtol=1e-4)
