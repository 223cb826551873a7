"""LoRA experts: exactness against plain LoRA / the base model, targets, PEFT folders, merge, gradients."""
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from moelab.config import ModelConfig, MoEConfig
from moelab.lora import (
    LoRAConfig,
    attach_lora_experts,
    find_targets,
    fit_centroids,
    load_lora,
    lora_aux_loss,
    lora_modules,
    lora_param_count,
    lora_state_dict,
    merge_lora,
    save_lora,
    update_lora_biases,
)
from moelab.model import MoELM


def tiny_model(seed=0) -> MoELM:
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2)
    return MoELM(ModelConfig(moe=moe, d_model=32, n_layers=2, n_heads=2, d_dense=32, max_seq_len=16)).eval()


def ids(B=2, S=8, seed=1):
    return torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(seed))


def randomize_b(model, std=0.05):
    for m in lora_modules(model).values():
        if isinstance(m.B_EOR, nn.Parameter):
            nn.init.normal_(m.B_EOR, std=std)


def write_peft(path, names, d_in_out, rank, alpha, seed):
    """A PEFT-format folder written by hand (what peft's save_pretrained produces for LoRA)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, (i, o) in zip(names, d_in_out):
        sd[f"base_model.model.{n}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.2
        sd[f"base_model.model.{n}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.2
    path.mkdir(parents=True)
    save_file(sd, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
                                                          "target_modules": names}))
    return sd


def manual_merge(model, sd, scale):
    """Independent reference: W += scale * B A for every adapter entry, on a copy of the model."""
    with torch.no_grad():
        for k, a in sd.items():
            if k.endswith("lora_A.weight"):
                name = k[len("base_model.model."):-len(".lora_A.weight")]
                b = sd[k.replace("lora_A", "lora_B")]
                model.get_submodule(name).weight += scale * b @ a
    return model


ATTN = ["blocks.0.attn.qkv", "blocks.0.attn.out", "blocks.1.attn.qkv", "blocks.1.attn.out"]


def test_targets_attn_ffn_and_names():
    m = tiny_model()
    assert find_targets(m, "attn") == ATTN
    assert find_targets(m, "out") == ["blocks.0.attn.out", "blocks.1.attn.out"]
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        find_targets(m, "ffn")  # today's moelab FFNs are Experts slabs, not nn.Linear

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(4, 8), nn.Linear(4, 4)

    class Toy(nn.Module):  # the lead's coming layout: dense MLP + shared MLP + routed experts + router gate
        def __init__(self):
            super().__init__()
            self.ffn = MLP()
            self.moe = nn.Module()
            self.moe.shared, self.moe.gate = MLP(), nn.Linear(4, 3)
            self.moe.experts = nn.ModuleList([MLP()])
            self.attn = nn.Module()
            self.attn.qkv = nn.Linear(4, 12)
    t = Toy()
    assert find_targets(t, "ffn") == ["ffn.up", "ffn.down", "moe.shared.up", "moe.shared.down"]
    assert find_targets(t, "all") == ["ffn.up", "ffn.down", "moe.shared.up", "moe.shared.down", "attn.qkv"]


@pytest.mark.parametrize("variant", ["lora", "mixlora", "smora", "flylora"])
def test_zero_b_leaves_base_output_exactly(variant):
    m = tiny_model()
    ref = m(ids()).logits_BSV
    attach_lora_experts(m, LoRAConfig(variant=variant, targets="attn", n_experts=3, rank=4, top_k=2))
    assert torch.equal(m(ids()).logits_BSV, ref)


def test_one_expert_top1_equals_plain_lora():
    m1, m2 = tiny_model(), tiny_model()
    attach_lora_experts(m1, LoRAConfig(variant="mixlora", n_experts=1, top_k=1, targets="attn", rank=4))
    attach_lora_experts(m2, LoRAConfig(variant="lora", targets="attn", rank=4))
    randomize_b(m1)
    for (n, a), (_, b) in zip(lora_modules(m1).items(), lora_modules(m2).items()):
        b.A_ERI.data.copy_(a.A_ERI), b.B_EOR.data.copy_(a.B_EOR)
    torch.testing.assert_close(m1(ids()).logits_BSV, m2(ids()).logits_BSV, rtol=0, atol=1e-6)
    # and plain LoRA equals W + scale * B A folded by hand
    sd = {k: v for k, v in lora_state_dict(m2).items()}
    ref = manual_merge(tiny_model(), sd, 16.0 / 4)
    torch.testing.assert_close(m2(ids()).logits_BSV, ref(ids()).logits_BSV, rtol=1e-5, atol=1e-5)


def test_mixlora_matches_loop_reference():
    m = tiny_model()
    attach_lora_experts(m, LoRAConfig(variant="mixlora", n_experts=4, top_k=2, targets="blocks.0.attn.out", rank=3))
    randomize_b(m, 0.3)
    mod = lora_modules(m)["blocks.0.attn.out"]
    x = torch.randn(5, 32)
    y = mod(x)
    probs = torch.softmax(x @ mod.gate.weight.t(), -1)
    ref = mod.base(x)
    for t in range(5):
        top = torch.topk(probs[t], 2)
        w = top.values / top.values.sum()
        for e, we in zip(top.indices.tolist(), w):
            ref[t] += we * 16.0 / 3 * mod.B_EOR[e] @ (mod.A_ERI[e] @ x[t])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert mod.stats().experts_per_token == 2


def test_rankwise_all_ranks_equal_full_lora():
    for variant in ("smora", "flylora"):
        m1, m2 = tiny_model(), tiny_model()
        attach_lora_experts(m1, LoRAConfig(variant=variant, targets="attn", rank=4, top_k=4))
        attach_lora_experts(m2, LoRAConfig(variant="lora", targets="attn", rank=4))
        randomize_b(m1)
        for a, b in zip(lora_modules(m1).values(), lora_modules(m2).values()):
            b.A_ERI.data.copy_(a.A_ERI), b.B_EOR.data.copy_(a.B_EOR)
        torch.testing.assert_close(m1(ids()).logits_BSV, m2(ids()).logits_BSV, rtol=1e-5, atol=1e-5)


def test_flylora_projection_sparse_and_topk():
    m = tiny_model()
    attach_lora_experts(m, LoRAConfig(variant="flylora", targets="blocks.0.attn.qkv", rank=8, top_k=2,
                                      fly_sparsity=0.25))
    mod = lora_modules(m)["blocks.0.attn.qkv"]
    assert ((mod.A_ERI[0] != 0).sum(1) == 8).all()     # 0.25 * 32 non-zeros per rank
    assert not mod.A_ERI.requires_grad
    x = torch.randn(6, 32)
    mod(x)
    h = x @ mod.A_ERI[0].t()
    assert torch.equal(mod.last_routing.expert_idx_TK.sort(-1).values, h.abs().topk(2).indices.sort(-1).values)


def _two_adapters(tmp_path):
    m = tiny_model()
    shapes = [(m.get_submodule(n).in_features, m.get_submodule(n).out_features) for n in ATTN]
    sds = [write_peft(tmp_path / f"a{i}", ATTN, shapes, rank=2 + i, alpha=4.0, seed=i) for i in range(2)]
    return sds, [str(tmp_path / "a0"), str(tmp_path / "a1")]


def test_xlora_one_hot_equals_chosen_adapter(tmp_path):
    sds, paths = _two_adapters(tmp_path)
    for k in range(2):
        m = tiny_model()
        onehot = tuple(1.0 if i == k else 0.0 for i in range(2))
        attach_lora_experts(m, LoRAConfig(variant="xlora", targets="attn", adapters=tuple(paths), scalings=onehot))
        ref = manual_merge(tiny_model(), sds[k], 4.0 / (2 + k))
        torch.testing.assert_close(m(ids()).logits_BSV, ref(ids()).logits_BSV, rtol=1e-5, atol=1e-5)
        merge_lora(m)  # fixed scalings fold into the weights
        assert not lora_modules(m)
        torch.testing.assert_close(m(ids()).logits_BSV, ref(ids()).logits_BSV, rtol=1e-5, atol=1e-5)


def test_xlora_classifier_two_passes_and_grads(tmp_path):
    _, paths = _two_adapters(tmp_path)
    m = tiny_model()
    attach_lora_experts(m, LoRAConfig(variant="xlora", targets="attn", adapters=tuple(paths)))
    nn.init.normal_(m.xlora_classifier.proj.weight, std=1.0)
    hid = []
    h = m.norm.register_forward_hook(lambda *a: hid.append(a[2]))
    out = m(ids())
    h.remove()
    assert len(hid) == 2  # scaling pass, then the real pass
    base = tiny_model()  # the scaling pass runs with every adapter off: the base model's last hidden state
    bh = []
    base.norm.register_forward_hook(lambda *a: bh.append(a[2]))
    base(ids())
    torch.testing.assert_close(hid[0], bh[0])
    s = m.xlora_classifier(hid[0].reshape(-1, 32))
    assert torch.allclose(lora_modules(m)["blocks.0.attn.qkv"].scalings_TE, s)
    out.logits_BSV.sum().backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None}
    assert trained == {"xlora_classifier.proj.weight", "xlora_classifier.proj.bias"}
    with pytest.raises(ValueError, match="mixes adapters per token"):
        merge_lora(m)


def test_similarity_router_picks_the_domain(tmp_path):
    _, paths = _two_adapters(tmp_path)
    m = tiny_model()
    attach_lora_experts(m, LoRAConfig(variant="similarity", targets="attn", adapters=tuple(paths), temperature=0.01))
    a, b = ids(seed=3) % 20, 200 + ids(seed=4) % 50      # two "domains" of token ids
    fit_centroids(m, [[a], [b]], lambda mod, x: mod(x))
    mod = lora_modules(m)["blocks.0.attn.qkv"]
    x_a = m.blocks[0].attn_norm(m.tok_emb(a)).reshape(-1, 32)
    torch.testing.assert_close(mod.centroids_EI[0], x_a.mean(0))
    w = torch.softmax(torch.nn.functional.cosine_similarity(x_a[:, None], mod.centroids_EI[None], dim=-1) / 0.01, -1)
    got = torch.nn.functional.normalize(x_a, dim=-1) @ torch.nn.functional.normalize(mod.centroids_EI, dim=-1).t()
    torch.testing.assert_close(torch.softmax(got / 0.01, -1), w, rtol=1e-4, atol=1e-5)
    assert (w[:, 0] > 0.5).float().mean() > 0.5
    assert lora_param_count(m).trainable == 0


@pytest.mark.parametrize("variant", ["lora", "mixlora", "smora", "flylora"])
def test_gradients_reach_only_adapters_and_routers(variant):
    m = tiny_model()
    m.train()
    cfg = LoRAConfig(variant=variant, targets="attn", n_experts=3, rank=4, top_k=2)
    attach_lora_experts(m, cfg)
    randomize_b(m)
    out = m(ids())
    (out.logits_BSV.square().mean() + lora_aux_loss(m)).backward()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    allowed = {n for n in with_grad if ".A_ERI" in n or ".B_EOR" in n or ".gate.weight" in n and "attn" in n}
    assert with_grad == allowed and with_grad
    assert all(p.grad is None for n, p in m.named_parameters() if "base." in n or "experts" in n)
    # the predicted trainable count equals the requires_grad parameters
    assert lora_param_count(m).trainable == sum(p.numel() for p in m.parameters() if p.requires_grad)
    if variant == "flylora":
        mod = lora_modules(m)["blocks.0.attn.qkv"]
        load = mod.route_load.clone()
        assert load.sum() == 2 * 16
        update_lora_biases(m)
        torch.testing.assert_close(mod.route_bias, 1e-3 * torch.sign(load.mean() - load))
        assert mod.route_load.sum() == 0


def test_mixlora_aux_loss_is_switch_loss():
    m = tiny_model().train()
    attach_lora_experts(m, LoRAConfig(variant="mixlora", targets="blocks.0.attn.out", n_experts=4, top_k=1))
    mod = lora_modules(m)["blocks.0.attn.out"]
    x = torch.randn(8, 32)
    mod(x)
    p = torch.softmax(x @ mod.gate.weight.t(), -1)
    f = torch.bincount(p.argmax(-1), minlength=4).float() / 8
    torch.testing.assert_close(lora_aux_loss(m), 1e-2 * 4 * (f * p.mean(0)).sum())


def test_save_load_roundtrip_and_merge_rules(tmp_path):
    m = tiny_model()
    cfg = LoRAConfig(variant="mixlora", targets="attn", n_experts=2, top_k=1, rank=2)
    attach_lora_experts(m, cfg)
    randomize_b(m)
    save_lora(m, cfg, tmp_path / "ad", base="RUN")
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["target_modules"] == ATTN
    m2 = tiny_model()
    load_lora(m2, tmp_path / "ad")
    assert torch.equal(m(ids()).logits_BSV, m2(ids()).logits_BSV)
    with pytest.raises(ValueError, match="mixes adapters per token"):
        merge_lora(m2)
    assert lora_modules(m2)  # nothing changed
    # a single adapter written by moelab is a PEFT folder: it loads as an X-LoRA adapter too
    m3 = tiny_model()
    cfg1 = LoRAConfig(variant="lora", targets="attn", rank=2)
    attach_lora_experts(m3, cfg1)
    randomize_b(m3)
    save_lora(m3, cfg1, tmp_path / "one")
    y = m3(ids()).logits_BSV
    m4 = tiny_model()
    attach_lora_experts(m4, LoRAConfig(variant="xlora", targets="attn", adapters=(str(tmp_path / "one"),),
                                       scalings=(1.0,)))
    torch.testing.assert_close(m4(ids()).logits_BSV, y, rtol=1e-5, atol=1e-5)
    assert merge_lora(m3) == ATTN
    assert isinstance(m3.blocks[0].attn.qkv, nn.Linear)
    torch.testing.assert_close(m3(ids()).logits_BSV, y, rtol=1e-5, atol=1e-5)


def test_param_counts_by_hand():
    m = tiny_model()
    attach_lora_experts(m, LoRAConfig(variant="mixlora", targets="blocks.0.attn.out", n_experts=4, top_k=2, rank=3))
    # one 32 -> 32 linear: 4 experts * 3 * (32 + 32) + router 32 * 4; active: 2 experts + router
    assert tuple(lora_param_count(m)) == (4 * 3 * 64 + 128, 2 * 3 * 64 + 128)


def test_config_errors():
    with pytest.raises(ValueError, match="LoRAConfig.variant"):
        LoRAConfig(variant="dora")
    with pytest.raises(ValueError, match="LoRAConfig.adapters"):
        LoRAConfig(variant="xlora")
    with pytest.raises(ValueError, match="LoRAConfig.top_k"):
        LoRAConfig(variant="smora", rank=4, top_k=5)


def test_cli_lora_merge(tmp_path):
    import argparse
    from dataclasses import asdict

    from moelab.checkpoint import load_model
    from moelab.cli_lora import register, save_run
    from moelab.config import TrainConfig
    base = tiny_model()
    save_run(base, {"train_config": asdict(TrainConfig(seq_len=8)), "step": 3, "domains": ["code"]}, tmp_path / "run")
    m, _ = load_model(tmp_path / "run")
    cfg = LoRAConfig(variant="lora", targets="attn", rank=2)
    attach_lora_experts(m, cfg)
    randomize_b(m)
    save_lora(m, cfg, tmp_path / "ad", base=str(tmp_path / "run"))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["lora", "merge", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")])
    assert args.func(args) == 0
    merged, _ = load_model(tmp_path / "merged")
    torch.testing.assert_close(merged(ids()).logits_BSV, m(ids()).logits_BSV, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged(ids()).logits_BSV, base(ids()).logits_BSV)
    cfg2 = LoRAConfig(variant="mixlora", targets="attn", rank=2, n_experts=2)
    m2, _ = load_model(tmp_path / "run")
    attach_lora_experts(m2, cfg2)
    save_lora(m2, cfg2, tmp_path / "ad2", base=str(tmp_path / "run"))
    args = parser.parse_args(["lora", "merge", str(tmp_path / "ad2"), "--out", str(tmp_path / "m2")])
    with pytest.raises(ValueError, match="variant 'mixlora' mixes adapters per token"):
        args.func(args)


def test_transformers_model_peft_target_names_and_merge():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    x = torch.randint(0, 64, (2, 6))
    ref = hf(x).logits
    assert find_targets(hf, "ffn") == [f"model.layers.{i}.mlp.{p}" for i in range(2)
                                       for p in ("gate_proj", "up_proj", "down_proj")]
    assert len(find_targets(hf, "attn")) == 8 and "lm_head" not in find_targets(hf, "all")
    names = attach_lora_experts(hf, LoRAConfig(variant="mixlora", targets="q_proj,v_proj", n_experts=2, top_k=1))
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")]
    assert torch.equal(hf(x).logits, ref)          # B = 0: unchanged
    torch.manual_seed(0)
    hf2 = transformers.LlamaForCausalLM(cfg).eval()
    assert torch.equal(hf2(x).logits, ref)
    c1 = LoRAConfig(variant="lora", targets="q_proj,v_proj", rank=2)
    attach_lora_experts(hf2, c1)
    randomize_b(hf2)
    y = hf2(x).logits
    assert not torch.allclose(y, ref, atol=1e-4)
    merge_lora(hf2)
    torch.testing.assert_close(hf2(x).logits, y, rtol=1e-4, atol=1e-5)
