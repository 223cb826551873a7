"""Named model configs: plain functions returning a ModelConfig. Toy-scale shapes that mirror real MoEs."""
from __future__ import annotations

from collections.abc import Callable

from moelab.config import ModelConfig, MoEConfig


def tiny() -> ModelConfig:
    """The `make demo` model: 4 layers, D=128, 8 experts top-2, ~1 M parameters; minutes on 2 CPU cores.
    Exports as mixtral (softmax top-2 renormalised, every layer MoE, full multi-head attention)."""
    moe = MoEConfig(d_model=128, d_expert=128, n_experts=8, top_k=2, balance="aux", aux_loss_coef=1e-2)
    return ModelConfig(moe=moe, d_model=128, n_layers=4, n_heads=4, d_dense=256, max_seq_len=256)


def small() -> ModelConfig:
    """A larger CPU model: 6 layers, D=256, 16 experts top-2, one shared expert."""
    moe = MoEConfig(d_model=256, d_expert=256, n_experts=16, top_k=2, n_shared=1, balance="aux")
    return ModelConfig(moe=moe, d_model=256, n_layers=6, n_heads=8, d_dense=512, max_seq_len=512)


def mixtral_like() -> ModelConfig:
    """Mixtral 8x7B shape at toy scale: 8 coarse experts, top-2, top-k logits then softmax, MoE every layer."""
    moe = MoEConfig(d_model=128, d_expert=448, n_experts=8, top_k=2, score_order="topk_softmax",
                    balance="aux", aux_loss_coef=2e-2)
    return ModelConfig(moe=moe, d_model=128, n_layers=4, n_heads=4, d_dense=448, max_seq_len=256,
                       tie_embeddings=False)


def deepseek_v3_like() -> ModelConfig:
    """DeepSeek-V3 shape at toy scale: first layer dense, 32 fine-grained sigmoid experts in 4 groups
    (2 kept), top-8, one shared expert, routed scale 2.5, aux-loss-free balancing."""
    moe = MoEConfig(d_model=128, d_expert=64, n_experts=32, top_k=8, n_shared=1, router="sigmoid_group",
                    n_group=4, topk_group=2, routed_scaling_factor=2.5, balance="loss_free",
                    bias_update_rate=1e-3)
    return ModelConfig(moe=moe, d_model=128, n_layers=4, n_heads=4, d_dense=512, first_dense=1,
                       max_seq_len=256, tie_embeddings=False)


def olmoe_like() -> ModelConfig:
    """OLMoE-1B-7B shape at toy scale: 64 fine-grained experts, top-8, softmax without renormalising,
    aux loss 1e-2 plus router z-loss 1e-3, every layer MoE."""
    moe = MoEConfig(d_model=128, d_expert=32, n_experts=64, top_k=8, renormalize=False, balance="aux",
                    aux_loss_coef=1e-2, z_loss_coef=1e-3)
    return ModelConfig(moe=moe, d_model=128, n_layers=4, n_heads=4, d_dense=256, max_seq_len=256,
                       tie_embeddings=False)


def qwen3_moe_like() -> ModelConfig:
    """Qwen3-MoE shape at toy scale (exports as qwen3_moe): 32 fine-grained experts, softmax top-4
    renormalised, q/k RMSNorm, grouped KV heads (4 query heads per KV head), every layer MoE."""
    moe = MoEConfig(d_model=128, d_expert=64, n_experts=32, top_k=4, renormalize=True, balance="global",
                    aux_loss_coef=1e-3)
    return ModelConfig(moe=moe, d_model=128, n_layers=4, n_heads=8, n_kv_heads=2, qk_norm=True, d_dense=256,
                       max_seq_len=256, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=False)


def glm4_moe_like() -> ModelConfig:
    """GLM-4.5 (GLM4-MoE) shape at toy scale (exports as glm4_moe): DeepSeek-V3 routing (sigmoid, 4 groups
    keep 2, top-8, routed scale 2.5, loss-free bias) on standard attention with GQA, q/k/v biases and RoPE on
    half of each head; first layer dense, one shared expert."""
    moe = MoEConfig(d_model=128, d_expert=64, n_experts=32, top_k=8, n_shared=1, router="sigmoid_group",
                    n_group=4, topk_group=2, routed_scaling_factor=2.5, balance="loss_free")
    return ModelConfig(moe=moe, d_model=128, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, qkv_bias=True,
                       rope_fraction=0.5, d_dense=512, first_dense=1, max_seq_len=256, tie_embeddings=False)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "small": small,
    "mixtral-like": mixtral_like,
    "deepseek-v3-like": deepseek_v3_like,
    "olmoe-like": olmoe_like,
    "qwen3-moe-like": qwen3_moe_like,
    "glm4-moe-like": glm4_moe_like,
}


def get_preset(name: str) -> ModelConfig:
    """Preset `name` (moelab.resolve applies overrides on top)."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown: allowed {', '.join(PRESETS)}")
    return PRESETS[name]()
