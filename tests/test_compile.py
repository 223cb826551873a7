"""torch.compile on CPU: the MoE layer and MoELM compiled equal eager, forward and every gradient (1e-5), with
per-expert counts that change from call to call (dynamic shapes). The fused expert kernel (auto's choice for
big experts on a CPU) runs as one eager call inside the compiled graph; the traced kernels (blocked / padded
bmm, grouped_mm: what small experts, autocast and accelerators get) compile."""
import pytest
import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.model import MoELM
from moelab.moe import MoELayer

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _grads(out, tensors, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, tensors, g, allow_unused=True)


def _check_layer(layer, compiled, xs):
    params = list(layer.parameters())
    for x_TD in xs:  # different tokens -> different counts per expert: recompiles or dynamic shapes
        x_TD = x_TD.clone().requires_grad_()
        want, got = layer(x_TD), compiled(x_TD)
        torch.testing.assert_close(got.y, want.y, **TOL)
        assert torch.equal(got.counts_E, want.counts_E)
        for a, b in zip(_grads(got.y + got.aux_loss, [x_TD, *params]),
                        _grads(want.y + want.aux_loss, [x_TD, *params])):
            if a is None or b is None:
                assert a is None and b is None
            else:
                torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("impl", ["grouped", "fused", "padded", "grouped_mm"])
@pytest.mark.parametrize("max_vio_bias", [2.0])
def test_layer_compiled_aot_eager_equals_eager(max_vio_bias, impl):
    """Dynamo + AOT autograd (no codegen: fast): the traced graphs and their backward equal eager; a biased gate
    gives uneven counts (a tail past the equal block part)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_expert=8, n_experts=8, top_k=2, expert_impl=impl))
    with torch.no_grad():
        layer.gate.weight[0] += max_vio_bias  # with x having a mean along dim 0: expert 0 gets more tokens
    xs = [torch.randn(T, 16) + torch.eye(16)[0] for T in (48, 40, 48)]
    _check_layer(layer, torch.compile(layer, backend="aot_eager", dynamic=True), xs)


def _check_lm(backend, tol=TOL):
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(moe=MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2), d_model=32, n_layers=2,
                      n_heads=2, d_dense=32, max_seq_len=16)
    model = MoELM(cfg)
    compiled = torch.compile(model, backend=backend)
    params = list(model.parameters())
    for seed in (3, 4):  # other tokens, other counts per expert
        idx_BS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
        want, got = model(idx_BS), compiled(idx_BS)
        torch.testing.assert_close(got.logits_BSV, want.logits_BSV, **tol)
        for a, b in zip(_grads(got.logits_BSV.sum() + got.aux_loss, params),
                        _grads(want.logits_BSV.sum() + want.aux_loss, params)):
            if a is not None or b is not None:
                torch.testing.assert_close(a, b, **tol)


def test_lm_compiled_aot_eager_equals_eager():
    _check_lm("aot_eager")


@pytest.mark.slow
def test_layer_compiled_inductor_equals_eager():
    """Inductor (C++ codegen with gcc): forward and all gradients to 1e-5, counts changing between calls."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_expert=8, n_experts=8, top_k=2))
    _check_layer(layer, torch.compile(layer), [torch.randn(T, 16) for T in (48, 48, 40)])


@pytest.mark.slow
def test_lm_compiled_inductor_equals_eager():
    """The whole LM under inductor: its fused attention/norm kernels sum in another order, so a few embedding
    gradients (a sum over every token) differ by ~1.3e-5 absolute (seen once): 1e-5 relative, 5e-5 absolute."""
    _check_lm("inductor", {"atol": 5e-5, "rtol": 1e-5})
