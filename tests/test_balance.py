"""Balance losses and metrics against hand-worked formulas, transformers, and a 200-step balancer run."""
import math

import pytest
import torch

from moelab import balance
from moelab.config import MoEConfig
from moelab.moe import MoELayer, step_routers


def test_switch_aux_loss_is_one_when_uniform_and_E_when_collapsed():
    E, T, K = 4, 8, 2
    uniform_probs = torch.full((T, E), 1 / E)
    round_robin = torch.arange(T * K).remainder(E).view(T, K)
    assert float(balance.switch_aux_loss(probs_TE=uniform_probs, expert_idx_TK=round_robin, n_experts=E)) \
        == pytest.approx(1.0)
    collapsed_probs = torch.zeros(T, E)
    collapsed_probs[:, 0] = 1.0
    all_to_0 = torch.zeros(T, 1, dtype=torch.long)
    assert float(balance.switch_aux_loss(probs_TE=collapsed_probs, expert_idx_TK=all_to_0, n_experts=E)) \
        == pytest.approx(E)


def test_switch_aux_loss_hand_example_4_tokens():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
    idx = torch.tensor([[0], [0], [1], [0]])
    # f = (3/4, 1/4, 0), P = (1.9/4, 1.55/4, 0.55/4); loss = 3 * (3/4*1.9/4 + 1/4*1.55/4)
    want = 3 * (0.75 * 1.9 / 4 + 0.25 * 1.55 / 4)
    assert float(balance.switch_aux_loss(probs_TE=probs, expert_idx_TK=idx, n_experts=3)) == pytest.approx(want)


def test_aux_loss_matches_transformers_load_balancing_loss_func_times_k():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    E, K, T = 8, 2, 32
    logits_layers = [torch.randn(T, E) * 2 for _ in range(2)]
    cfg = MoEConfig(d_model=4, n_experts=E, top_k=K, renormalize=True)
    from moelab.routers import ROUTERS, RouteContext

    def ours(logits):
        r = ROUTERS["topk"](logits, cfg, RouteContext())
        return balance.switch_aux_loss(probs_TE=r.probs_TE, expert_idx_TK=r.expert_idx_TK, n_experts=E)

    # one layer: transformers = K * ours
    hf_one = mixtral.load_balancing_loss_func((logits_layers[0],), E, K)
    torch.testing.assert_close(hf_one, K * ours(logits_layers[0]))
    # several layers: transformers pools tokens of all layers, i.e. K * ours on the concatenation,
    # which is not the mean of per-layer losses (moelab computes per layer)
    hf_two = mixtral.load_balancing_loss_func(tuple(logits_layers), E, K)
    torch.testing.assert_close(hf_two, K * ours(torch.cat(logits_layers)))
    per_layer_mean = (ours(logits_layers[0]) + ours(logits_layers[1])) / 2
    assert not torch.allclose(hf_two, K * per_layer_mean)


def test_seq_aux_loss_hand_example():
    # one sequence of 2 tokens, E=2, K=1: f_i = E/(K*S) * count_i, P_i = mean s'_i
    probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4]]])
    idx = torch.tensor([[[0], [0]]])
    want = (2 / 2 * 2) * (0.9 + 0.6) / 2 + 0.0
    got = balance.seq_aux_loss(probs_BSE=probs, expert_idx_BSK=idx, n_experts=2, top_k=1)
    assert float(got) == pytest.approx(want)
    # two sequences: the loss is the mean over sequences, not computed on the pooled batch
    probs2 = torch.cat([probs, torch.tensor([[[0.2, 0.8], [0.3, 0.7]]])])
    idx2 = torch.cat([idx, torch.tensor([[[1], [1]]])])
    want2 = (want + 2 * (0.8 + 0.7) / 2) / 2
    got2 = balance.seq_aux_loss(probs_BSE=probs2, expert_idx_BSK=idx2, n_experts=2, top_k=1)
    assert float(got2) == pytest.approx(want2)


def test_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    want = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert float(balance.z_loss(logits_TE=logits)) == pytest.approx(want, rel=1e-6)


def test_balance_metrics_hand_example():
    counts = torch.tensor([4.0, 2.0, 2.0, 0.0])  # mean 2
    s = balance.balance_stats(counts_E=counts, n_dropped=2, n_tokens=4)
    assert float(s.max_vio) == pytest.approx(4 / 2 - 1)
    assert float(s.cv) == pytest.approx(math.sqrt(((4 - 2) ** 2 + 0 + 0 + 4) / 4) / 2)
    p = [0.5, 0.25, 0.25]
    assert float(s.entropy) == pytest.approx(-sum(v * math.log(v) for v in p) / math.log(4))
    assert float(s.drop_rate) == pytest.approx(2 / 10)
    assert int(s.dead) == 1
    assert float(s.experts_per_token) == pytest.approx(8 / 4)
    assert s.load_E.tolist() == pytest.approx([0.5, 0.25, 0.25, 0.0])


def test_loss_free_bias_step_formula():
    bias = torch.zeros(4)
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    new = balance.loss_free_bias_step(bias_E=bias, load_E=load, rate=0.1)
    assert new.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])


def _skewed_layer(balance_mode: str) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=16, d_expert=8, n_experts=8, top_k=2, balance=balance_mode,
                               bias_update_rate=1e-2))
    with torch.no_grad():
        layer.gate.weight[:3] += 0.4  # experts 0-2 favoured for inputs with a positive mean
    return layer.train()


def test_loss_free_balancer_moves_load_toward_uniform_over_200_steps():
    layer = _skewed_layer("loss_free")
    static = _skewed_layer("none")
    gen = torch.Generator().manual_seed(1)
    vio = []
    for step in range(200):
        x = torch.randn(128, 16, generator=gen) + 0.5
        vio.append(float(layer(x).stats.max_vio))
        step_routers(layer)  # router weights never change: only the bias balances
    start = float(static(torch.randn(128, 16, generator=gen) + 0.5).stats.max_vio)
    assert vio[0] == pytest.approx(start, rel=0.3) and start > 1.0
    assert sum(vio[-20:]) / 20 < 0.35 * vio[0]
    # the bias pushed the favoured experts down and the others up
    assert layer.state["loss_free"].bias_E[:3].mean() < layer.state["loss_free"].bias_E[3:].mean()
