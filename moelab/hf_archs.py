"""The Hugging Face architectures moelab converts to and from: what each can express, its config.json fields,
and where its weights live in the files transformers' save_pretrained writes. No transformers import here.

One `HFArch` per architecture, in the preference order export uses without --arch (the first that expresses
the run's config): llama and qwen3 (dense models only: every layer a SwiGLU MLP; qwen3 with q/k RMSNorm),
mixtral (softmax top-k, renormalised, every layer MoE), qwen3_moe (softmax top-k with or
without renormalising, dense layers anywhere, q/k RMSNorm always on), glm4_moe (DeepSeek-V3 routing on standard
attention: sigmoid scores, group-limited top-k, routed scaling, shared experts, first dense layers, the
loss-free bias as e_score_correction_bias, partial RoPE, q/k/v biases, optional q/k norm), dots1 (the same
routing with q/k norm always on, full RoPE and an optional sliding window).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moelab.config import ModelConfig, MoEConfig
from moelab.model import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class HFArch:
    """One transformers architecture."""
    name: str                              # --arch value = the config's model_type
    config_class: str                      # transformers configuration class
    model_class: str                       # transformers *ForCausalLM class
    moe_block: str                         # a layer's MoE block in saved files ("block_sparse_moe" / "mlp")
    expert_linears: tuple[str, str, str]   # per-expert gate, up, down linear names in saved files
    shared: str | None                     # the shared experts' module under the MoE block; None = not expressible
    correction_bias: str | None            # the selection-bias buffer under the gate; None = not expressible
    check: Callable[[ModelConfig], None]   # raises ValueError naming the first field it cannot express
    to_hf: Callable[[ModelConfig], dict]   # ModelConfig -> kwargs of config_class
    from_hf: Callable[[dict], ModelConfig]  # config.json dict (defaults filled) -> ModelConfig


def _need(ok: bool, arch: str, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"--arch {arch} cannot express {field}={value!r}: it needs {allowed}")


def _check_common(arch: str, cfg: ModelConfig, routers: tuple[str, ...]) -> None:
    m = cfg.moe
    _need(m.router in routers, arch, "moe.router", m.router, " or ".join(routers))
    for f in ("n_null", "n_zero", "n_copy", "n_const"):
        _need(getattr(m, f) == 0, arch, f"moe.{f}", getattr(m, f), "0 (no null/zero/copy/constant experts)")
    _need(not m.gating_residual, arch, "moe.gating_residual", m.gating_residual, "False")
    _need(m.activation == "swiglu", arch, "moe.activation", m.activation, "swiglu")
    _need(m.capacity_factor is None, arch, "moe.capacity_factor", m.capacity_factor, "None (dropless)")


def _check_softmax_topk(arch: str, cfg: ModelConfig) -> None:
    m = cfg.moe
    _check_common(arch, cfg, ("topk",))
    _need(m.routed_scaling_factor == 1.0, arch, "moe.routed_scaling_factor", m.routed_scaling_factor, "1.0")
    _need(m.balance != "loss_free", arch, "moe.balance", m.balance, "not loss_free (no selection bias)")
    _need(m.n_shared == 0, arch, "moe.n_shared", m.n_shared, "0 (no shared experts)")
    _need(not cfg.qkv_bias, arch, "qkv_bias", cfg.qkv_bias, "False")
    _need(cfg.rope_fraction == 1.0, arch, "rope_fraction", cfg.rope_fraction, "1.0 (RoPE on all head dims)")


def _common_to_hf(cfg: ModelConfig) -> dict:
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.d_head,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tie_embeddings, "num_experts_per_tok": cfg.moe.top_k, "hidden_act": "silu",
            "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
            "router_aux_loss_coef": cfg.moe.aux_loss_coef}


def _common_from_hf(arch: str, hf: dict) -> dict:
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    _need(rope.get("rope_type", "default") == "default", arch, "rope_parameters.rope_type", rope.get("rope_type"),
          "default (moelab has no RoPE scaling)")
    _need(hf.get("hidden_act", "silu") == "silu", arch, "hidden_act", hf.get("hidden_act"), "silu (SwiGLU)")
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    hd = hf.get("head_dim") or D // H
    kv = hf.get("num_key_value_heads") or H
    return {"d_model": D, "n_layers": hf["num_hidden_layers"], "n_heads": H,
            "n_kv_heads": None if kv == H else kv, "head_dim": None if hd * H == D else hd,
            "max_seq_len": hf["max_position_embeddings"], "vocab_size": hf["vocab_size"],
            "rope_theta": float(rope["rope_theta"]), "norm_eps": hf["rms_norm_eps"],
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}


# ---- mixtral ----------------------------------------------------------------------------------------
def _mixtral_check(cfg: ModelConfig) -> None:
    _check_softmax_topk("mixtral", cfg)
    m = cfg.moe
    _need(m.renormalize or m.score_order == "topk_softmax", "mixtral", "moe.renormalize", m.renormalize, "True")
    _need(cfg.moe_layer_ids == list(range(cfg.n_layers)), "mixtral", "first_dense", cfg.first_dense,
          "0 with moe_every=1 (every layer MoE)")
    _need(not cfg.qk_norm, "mixtral", "qk_norm", cfg.qk_norm, "False")


def _mixtral_to_hf(cfg: ModelConfig) -> dict:
    return {**_common_to_hf(cfg), "intermediate_size": cfg.moe.d_expert, "num_local_experts": cfg.moe.n_experts,
            "sliding_window": cfg.sliding_window}


def _mixtral_from_hf(hf: dict) -> ModelConfig:
    base = _common_from_hf("mixtral", hf)
    moe = MoEConfig(d_model=base["d_model"], d_expert=hf["intermediate_size"], n_experts=hf["num_local_experts"],
                    top_k=hf["num_experts_per_tok"], score_order="topk_softmax",
                    aux_loss_coef=hf.get("router_aux_loss_coef", 0.02))
    return ModelConfig(moe=moe, d_dense=hf["intermediate_size"], sliding_window=hf.get("sliding_window"), **base)


# ---- qwen3_moe --------------------------------------------------------------------------------------
def _qwen3_check(cfg: ModelConfig) -> None:
    _check_softmax_topk("qwen3_moe", cfg)
    _need(cfg.qk_norm, "qwen3_moe", "qk_norm", cfg.qk_norm, "True (its attention always RMS-normalises q and k)")


def _qwen3_to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe
    return {**_common_to_hf(cfg), "intermediate_size": cfg.d_dense, "moe_intermediate_size": m.d_expert,
            "num_experts": m.n_experts, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.is_moe(i)],
            "norm_topk_prob": m.renormalize or m.score_order == "topk_softmax", "attention_bias": False,
            "use_sliding_window": cfg.sliding_window is not None, "sliding_window": cfg.sliding_window,
            "max_window_layers": cfg.n_layers}


def layer_pattern(arch: str, moe_ids: list[int], n_layers: int) -> tuple[int, int]:
    """(first_dense, moe_every) whose MoE layers are exactly `moe_ids`; refuses other patterns."""
    for fd in range(n_layers + 1):
        for every in range(1, n_layers + 1):
            if [i for i in range(n_layers) if i >= fd and (i - fd) % every == 0] == moe_ids:
                return fd, every
    raise ValueError(f"--arch {arch}: MoE layers {moe_ids} of {n_layers} are not expressible in moelab: it needs "
                     "the first m layers dense, then every n-th layer MoE (mlp_only_layers / decoder_sparse_step)")


def _qwen3_from_hf(hf: dict) -> ModelConfig:
    base = _common_from_hf("qwen3_moe", hf)
    _need(not hf.get("attention_bias", False), "qwen3_moe", "attention_bias", True, "False (moelab has no o_proj bias)")
    L, step, only = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
    moe_ids = [i for i in range(L) if i not in only and hf["num_experts"] > 0 and (i + 1) % step == 0]
    fd, every = layer_pattern("qwen3_moe", moe_ids, L)
    moe = MoEConfig(d_model=base["d_model"], d_expert=hf["moe_intermediate_size"], n_experts=hf["num_experts"],
                    top_k=hf["num_experts_per_tok"], renormalize=bool(hf.get("norm_topk_prob", False)),
                    aux_loss_coef=hf.get("router_aux_loss_coef", 1e-3))
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    return ModelConfig(moe=moe, d_dense=hf["intermediate_size"], first_dense=fd, moe_every=every, qk_norm=True,
                       sliding_window=window, **base)


# ---- glm4_moe ---------------------------------------------------------------------------------------
def _sigmoid_group_check(arch: str, cfg: ModelConfig) -> None:
    """What glm4_moe and dots1 share: DeepSeek-V3 routing, all MoE after the first dense layers, and shared
    experts as a whole number of routed-expert widths."""
    m = cfg.moe
    _check_common(arch, cfg, ("sigmoid_group",))
    _need(cfg.moe_every == 1, arch, "moe_every", cfg.moe_every, "1 (after the first dense layers, all MoE)")
    _need(m.d_shared_total % m.d_expert == 0, arch, "moe.d_shared", m.d_shared,
          f"n_shared * d_shared a multiple of d_expert={m.d_expert} (shared width = n * moe_intermediate_size)")


def _glm_check(cfg: ModelConfig) -> None:
    _sigmoid_group_check("glm4_moe", cfg)
    _need(cfg.sliding_window is None, "glm4_moe", "sliding_window", cfg.sliding_window, "None")


def _glm_to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe
    out = {**_common_to_hf(cfg), "intermediate_size": cfg.d_dense, "moe_intermediate_size": m.d_expert,
           "n_routed_experts": m.n_experts, "n_shared_experts": m.d_shared_total // m.d_expert,
           "first_k_dense_replace": cfg.first_dense, "n_group": m.n_group, "topk_group": m.topk_group,
           "routed_scaling_factor": m.routed_scaling_factor, "norm_topk_prob": m.renormalize,
           "use_qk_norm": cfg.qk_norm, "attention_bias": cfg.qkv_bias, "num_nextn_predict_layers": 0}
    out["rope_parameters"] = {**out["rope_parameters"], "partial_rotary_factor": cfg.rope_fraction}
    return out


def _glm_from_hf(hf: dict, arch: str = "glm4_moe", frac: float | None = None) -> ModelConfig:
    base = _common_from_hf(arch, hf)
    rope = hf.get("rope_parameters") or {}
    if frac is None:
        frac = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    E = hf["n_routed_experts"]
    moe = MoEConfig(d_model=base["d_model"], d_expert=hf["moe_intermediate_size"], n_experts=E,
                    top_k=hf["num_experts_per_tok"], n_shared=hf["n_shared_experts"], router="sigmoid_group",
                    n_group=hf["n_group"], topk_group=hf["topk_group"],
                    routed_scaling_factor=float(hf["routed_scaling_factor"]), renormalize=bool(hf["norm_topk_prob"]),
                    balance="loss_free")  # the correction bias is the loss-free bias
    return ModelConfig(moe=moe, d_dense=hf["intermediate_size"], first_dense=min(hf["first_k_dense_replace"],
                       hf["num_hidden_layers"]), qk_norm=bool(hf.get("use_qk_norm", False)),
                       qkv_bias=bool(hf.get("attention_bias", False)), rope_fraction=float(frac), **base)


# ---- dots1: the same routing with q/k norm always on, full RoPE, optional sliding window -----------------
def _dots1_check(cfg: ModelConfig) -> None:
    _sigmoid_group_check("dots1", cfg)
    _need(cfg.qk_norm, "dots1", "qk_norm", cfg.qk_norm, "True (its attention always RMS-normalises q and k)")
    _need(not cfg.qkv_bias, "dots1", "qkv_bias", cfg.qkv_bias, "False (its attention_bias also biases o_proj)")
    _need(cfg.rope_fraction == 1.0, "dots1", "rope_fraction", cfg.rope_fraction, "1.0 (RoPE on all head dims)")


def _dots1_to_hf(cfg: ModelConfig) -> dict:
    out = _glm_to_hf(cfg)
    for k in ("use_qk_norm", "num_nextn_predict_layers"):
        out.pop(k)
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {**out, "sliding_window": cfg.sliding_window, "max_window_layers": 0}


def _dots1_from_hf(hf: dict) -> ModelConfig:
    types = set(hf.get("layer_types") or ["full_attention"])
    _need(len(types) == 1, "dots1", "layer_types", sorted(types), "one attention type for every layer")
    window = hf.get("sliding_window") if types == {"sliding_attention"} else None
    _need(not hf.get("attention_bias", False), "dots1", "attention_bias", True, "False (moelab has no o_proj bias)")
    return _glm_from_hf(hf, "dots1", 1.0).replace(qk_norm=True, sliding_window=window)


# ---- dense: llama, qwen3 (what `moelab upcycle` starts from; dense moelab runs export to them) --------
def _dense_check(arch: str, cfg: ModelConfig, qk_norm: bool) -> None:
    _need(not cfg.moe_layer_ids, arch, "first_dense", cfg.first_dense, f"n_layers={cfg.n_layers} (a dense model)")
    _need(cfg.qk_norm == qk_norm, arch, "qk_norm", cfg.qk_norm, str(qk_norm))
    _need(not cfg.qkv_bias, arch, "qkv_bias", cfg.qkv_bias, "False (its attention_bias also biases o_proj)")
    _need(cfg.rope_fraction == 1.0, arch, "rope_fraction", cfg.rope_fraction, "1.0 (RoPE on all head dims)")
    _need(cfg.sliding_window is None, arch, "sliding_window", cfg.sliding_window, "None")


def _dense_to_hf(cfg: ModelConfig) -> dict:
    out = {k: v for k, v in _common_to_hf(cfg).items() if k not in ("num_experts_per_tok", "router_aux_loss_coef")}
    return {**out, "intermediate_size": cfg.d_dense, "attention_bias": False}


def _dense_from_hf(arch: str, hf: dict, qk_norm: bool) -> ModelConfig:
    base = _common_from_hf(arch, hf)
    _need(not hf.get("attention_bias", False), arch, "attention_bias", True, "False (moelab has no o_proj bias)")
    _need(not hf.get("mlp_bias", False), arch, "mlp_bias", True, "False")
    _need(hf.get("sliding_window") is None, arch, "sliding_window", hf.get("sliding_window"), "None")
    F = hf["intermediate_size"]
    return ModelConfig(moe=MoEConfig(d_model=base["d_model"], d_expert=F), d_dense=F, first_dense=base["n_layers"],
                       qk_norm=qk_norm, **base)


_EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")
ARCHS: dict[str, HFArch] = {a.name: a for a in (  # export's preference order (dense ones take no MoE model)
    HFArch("llama", "LlamaConfig", "LlamaForCausalLM", "mlp", _EXPERT_LINEARS, None, None,
           lambda c: _dense_check("llama", c, False), _dense_to_hf, lambda h: _dense_from_hf("llama", h, False)),
    HFArch("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "mlp", _EXPERT_LINEARS, None, None,
           lambda c: _dense_check("qwen3", c, True), _dense_to_hf, lambda h: _dense_from_hf("qwen3", h, True)),
    HFArch("mixtral", "MixtralConfig", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), None, None,
           _mixtral_check, _mixtral_to_hf, _mixtral_from_hf),
    HFArch("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "mlp", _EXPERT_LINEARS, None, None,
           _qwen3_check, _qwen3_to_hf, _qwen3_from_hf),
    HFArch("glm4_moe", "Glm4MoeConfig", "Glm4MoeForCausalLM", "mlp", _EXPERT_LINEARS, "shared_experts",
           "e_score_correction_bias", _glm_check, _glm_to_hf, _glm_from_hf),
    HFArch("dots1", "Dots1Config", "Dots1ForCausalLM", "mlp", _EXPERT_LINEARS, "shared_experts",
           "e_score_correction_bias", _dots1_check, _dots1_to_hf, _dots1_from_hf),
)}


def pick_arch(cfg: ModelConfig, name: str | None = None) -> HFArch:
    """The named architecture (its check raises naming the field it cannot express), or the first in ARCHS'
    order that expresses `cfg`; when none does, the error lists why each refused."""
    if name is not None:
        if name not in ARCHS:
            raise ValueError(f"--arch={name!r} is unknown: allowed {', '.join(ARCHS)}")
        ARCHS[name].check(cfg)
        return ARCHS[name]
    why = []
    for arch in ARCHS.values():
        try:
            arch.check(cfg)
            return arch
        except ValueError as e:
            why.append(str(e))
    raise ValueError("no architecture expresses this run: " + "; ".join(why))
