"""Tiny decoder-only MoE language model: byte vocabulary (or a run's tokenizer), RMSNorm, RoPE (optionally
partial), causal SDPA with optional GQA / q-k norm / q-k-v biases / sliding window, MoE FFN, KV-cache decoding.

B=sequences, S=positions, D=d_model, V=vocab, H=heads, Hkv=key/value heads, Dh=head dim, R=rotated dims,
F=dense FFN hidden, E=experts, P=cached positions.
Readable top to bottom: `ModelConfig` -> `Attention` (+ `KVCache`) -> `Block` (attention + dense or MoE FFN)
-> `MoELM` -> `sample_next` / `generate`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import N_BYTES, ModelConfig
from moelab.experts import MLP
from moelab.moe import MoELayer, MoEResult

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258  # specials after the 256 byte values


class ParamCount(NamedTuple):
    total: int     # every parameter
    active: int    # parameters one token touches: total minus the routed experts it skips (E - K per MoE layer)


def _mlp_params(d_model: int, d_hidden: int, activation: str) -> int:
    return d_model * d_hidden * (3 if activation == "swiglu" else 2)


def param_count(cfg: ModelConfig) -> ParamCount:
    """Parameter count predicted from the config alone (no module is built)."""
    D, m = cfg.d_model, cfg.moe
    per_expert = _mlp_params(D, m.d_expert, m.activation)
    n_routes = m.n_experts + m.n_special  # routed + null/zero/copy/const router outputs
    moe = n_routes * D + m.n_experts * per_expert + (_mlp_params(D, m.d_shared_total, m.activation)
                                                     if m.n_shared else 0)
    moe += m.n_const * 3 * D + (n_routes * n_routes if m.gating_residual else 0)  # const experts, MoE++ W_g
    dense = _mlp_params(D, cfg.d_dense, "swiglu")
    Dq, Dkv = cfg.n_heads * cfg.d_head, cfg.kv_heads * cfg.d_head
    attn = D * (Dq + 2 * Dkv) + Dq * D + 2 * D  # q, k, v, o + two RMSNorm gains
    attn += (Dq + 2 * Dkv if cfg.qkv_bias else 0) + (2 * cfg.d_head if cfg.qk_norm else 0)
    n_moe = len(cfg.moe_layer_ids)
    total = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + D  # embeddings (+ head) + final norm
    total += cfg.n_layers * attn + n_moe * moe + (cfg.n_layers - n_moe) * dense
    skipped = n_moe * (m.n_experts - min(m.top_k, m.n_experts)) * per_expert
    return ParamCount(total, total - skipped)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019, eq. 4)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq_len: int, rot_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """RoFormer (Su et al. 2021) eq. 34: angles m * theta^(-2i/d) -> (cos_SR, sin_SR), halves repeated
    (R = rotated dims; inverse frequencies computed as transformers computes them, 1 / theta^(2i/d))."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    ang_SR2 = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    ang_SR = torch.cat([ang_SR2, ang_SR2], dim=-1)
    return ang_SR.cos(), ang_SR.sin()


def apply_rope(x_BHSDh: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
    """Rotate-half form of RoPE (as in GPT-NeoX / Llama) on the first R dims of each head; the rest pass."""
    R = cos_SR.shape[-1]
    x_rot, x_pass = x_BHSDh[..., :R], x_BHSDh[..., R:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos_SR + rot * sin_SR, x_pass], dim=-1)


class KVCache:
    """Keys and values of the positions seen so far, per layer ((B, Hkv, P, Dh) each, after RoPE), and P.
    MoELM.forward appends to it; a fresh cache starts at position 0."""

    def __init__(self, n_layers: int):
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.pos = 0  # positions already cached (the RoPE offset of the next token)

    def update(self, layer: int, k_BHSDh: Tensor, v_BHSDh: Tensor) -> tuple[Tensor, Tensor]:
        """Append this layer's new keys/values; returns all of them."""
        if self.k[layer] is not None:
            k_BHSDh = torch.cat([self.k[layer], k_BHSDh], dim=2)
            v_BHSDh = torch.cat([self.v[layer], v_BHSDh], dim=2)
        self.k[layer], self.v[layer] = k_BHSDh, v_BHSDh
        return k_BHSDh, v_BHSDh


def attn_mask(q_pos: int, n_q: int, n_kv: int, window: int | None, device) -> Tensor | None:
    """Bool (n_q, n_kv) mask, True = may attend: causal (key pos <= query pos), and within `window` when set
    (key pos > query pos - window, as transformers' sliding-window masks). Query i sits at q_pos + i, key j at j.
    None when plain causal attention from position 0 (SDPA's is_causal) or a lone last query covers it."""
    if window is None and (q_pos == 0 or n_q == 1) and n_kv == q_pos + n_q:
        return None
    qp_Q1 = (q_pos + torch.arange(n_q, device=device))[:, None]
    kp_1K = torch.arange(n_kv, device=device)[None, :]
    ok = kp_1K <= qp_Q1
    return ok if window is None else ok & (kp_1K > qp_Q1 - window)


class Attention(nn.Module):
    """Causal self-attention via scaled_dot_product_attention (right padding needs no mask): grouped
    key/value heads (GQA), optional q/k/v biases, per-head q/k RMSNorm, partial RoPE and a sliding window.
    One fused projection `qkv` (q heads, then k heads, then v heads) and `out`."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.layer, self.window = layer, cfg.sliding_window
        self.n_heads, self.n_kv, self.d_head = cfg.n_heads, cfg.kv_heads, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.d_head, bias=cfg.qkv_bias)
        self.out = nn.Linear(self.n_heads * self.d_head, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(self.d_head, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d_head, cfg.norm_eps) if cfg.qk_norm else None
        if cfg.qkv_bias:
            nn.init.zeros_(self.qkv.bias)

    def forward(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor, cache: KVCache | None = None) -> Tensor:
        B, S, _ = x_BSD.shape
        H, Hkv, Dh = self.n_heads, self.n_kv, self.d_head
        q, k, v = self.qkv(x_BSD).view(B, S, H + 2 * Hkv, Dh).split([H, Hkv, Hkv], dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, Dh)
        q, k = apply_rope(q, cos_SR, sin_SR), apply_rope(k, cos_SR, sin_SR)
        pos = 0
        if cache is not None:
            pos = cache.pos
            k, v = cache.update(self.layer, k, v)
        if Hkv != H:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        mask = attn_mask(pos, S, k.shape[2], self.window, x_BSD.device)
        y_BHSDh = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and S > 1)
        return self.out(y_BHSDh.transpose(1, 2).reshape(B, S, H * Dh))


class Block(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += ffn(norm(x)), the FFN dense or MoE."""

    def __init__(self, cfg: ModelConfig, moe: bool, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoELayer(cfg.moe) if moe else MLP(cfg.d_model, cfg.d_dense, "swiglu")

    def forward(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor, *, valid_BS: Tensor | None,
                token_ids_BS: Tensor, prev_logits: Tensor | None = None,
                cache: KVCache | None = None) -> tuple[Tensor, MoEResult | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SR, sin_SR, cache)
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoELayer):
            res = self.ffn(h_BSD, valid=valid_BS, token_ids=token_ids_BS, prev_logits=prev_logits)
            return x_BSD + res.y, res
        return x_BSD + self.ffn(h_BSD), None


class LMOutput(NamedTuple):
    """What the model returns."""
    logits_BSV: Tensor             # next-token logits
    aux_loss: Tensor               # sum over MoE layers of each layer's weighted balance + z losses
    moe: dict[int, MoEResult]      # layer index -> that layer's MoEResult (routing, stats, losses)


class MoELM(nn.Module):
    """Decoder-only LM over bytes with MoE FFNs in the layers `cfg.is_moe` selects."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe(i), i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_rope, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)."""
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=0.02)
            nn.init.normal_(blk.attn.out.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def forward(self, idx_BS: Tensor, *, valid_BS: Tensor | None = None, cache: KVCache | None = None) -> LMOutput:
        """idx_BS: token ids (long). valid_BS: bool, False at (right) padding; padding goes to no expert.
        cache: keys/values of the earlier positions (KVCache), extended in place; idx_BS then holds only the
        new tokens, at positions cache.pos.. (the RoPE offset)."""
        _B, S = idx_BS.shape
        p0 = 0 if cache is None else cache.pos
        if p0 + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {p0 + S} exceeds ModelConfig.max_seq_len={self.cfg.max_seq_len}")
        dt = self.tok_emb.weight.dtype
        cos, sin = self.rope_cos[p0:p0 + S].to(dt), self.rope_sin[p0:p0 + S].to(dt)
        x_BSD = self.tok_emb(idx_BS)
        moe: dict[int, MoEResult] = {}
        prev_logits = None  # the previous MoE layer's router logits (MoE++ gating residual, when enabled)
        for i, block in enumerate(self.blocks):
            x_BSD, res = block(x_BSD, cos, sin, valid_BS=valid_BS, token_ids_BS=idx_BS, prev_logits=prev_logits,
                               cache=cache)
            if res is not None:
                moe[i], prev_logits = res, res.routing.logits_TE
        if cache is not None:
            cache.pos += S
        x_BSD = self.norm(x_BSD)
        w_VD = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        aux = sum((r.aux_loss for r in moe.values()), torch.zeros((), device=idx_BS.device))
        return LMOutput(x_BSD @ w_VD.t(), aux, moe)


def lm_loss(*, logits_BSV: Tensor, targets_BS: Tensor, valid_BS: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy (nats) over valid positions."""
    loss_BS = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten(), reduction="none")
    if valid_BS is None:
        return loss_BS.mean()
    w = valid_BS.flatten().float()
    return (loss_BS * w).sum() / w.sum().clamp_min(1.0)


def sample_next(logits_V: Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> Tensor:
    """One id from logits (fp32): temperature 0 = argmax; else divide by the temperature, keep the top_k most
    likely, then the nucleus (Holtzman et al. 2020, arXiv 1904.09751, sec. 3.1): the smallest set of the most
    likely ids whose probability sum reaches top_p (transformers' order: temperature, top-k, top-p)."""
    if temperature == 0:
        return logits_V.argmax().view(1)
    logits_V = logits_V / temperature
    if top_k is not None:
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs_V, order_V = torch.softmax(logits_V, -1).sort(descending=True)
        before_V = probs_V.cumsum(0) - probs_V  # mass of the more likely ids
        drop_V = before_V >= top_p  # the set already reached top_p without this id (the first is always kept)
        logits_V = logits_V.masked_fill(torch.zeros_like(drop_V).scatter(0, order_V, drop_V), float("-inf"))
    return torch.multinomial(torch.softmax(logits_V, -1), 1, generator=generator)


@torch.no_grad()
def generate(model: MoELM, prompt_S: Tensor, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, suppress_ids: Tensor | None = None) -> Tensor:
    """Sample continuation ids. temperature 0 = greedy; top_k keeps the k most likely ids; top_p the nucleus.
    suppress_ids: ids never sampled (default: everything above the 256 bytes, i.e. PAD/BOS/EOS).
    use_cache: prefill the prompt once, then feed one token per step against a KVCache; without it every step
    re-reads the last max_seq_len tokens. Both give the same tokens (greedy, or sampling with the same
    generator) for routers that route each token on its own (not expert_choice at eval, nor a
    capacity_factor, whose drops depend on the batch). Beyond max_seq_len the context slides: each new token
    re-prefills the last max_seq_len tokens (what no-cache does), so long generations are no faster there."""
    V, W = model.cfg.vocab_size, model.cfg.max_seq_len
    if not 0 <= temperature < math.inf:  # NaN fails this too
        raise ValueError(f"temperature={temperature} is invalid: allowed a finite number >= 0")
    if top_k is not None and not 1 <= top_k <= V:
        raise ValueError(f"top_k={top_k} is invalid: allowed 1..{V} or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is invalid: allowed 0 < top_p <= 1 or None")
    if prompt_S.numel() == 0:
        raise ValueError("prompt is empty: allowed a prompt of >= 1 token (moelab prompts start with BOS)")
    banned = (torch.arange(N_BYTES, V) if suppress_ids is None else suppress_ids).to(prompt_S.device)
    was_training = model.training
    model.eval()
    ids_S = prompt_S.clone()
    cache, new_S = None, ids_S  # new_S: tokens not yet in the cache
    for _ in range(max_new_tokens):
        if not use_cache:
            logits_V = model(ids_S[-W:].unsqueeze(0)).logits_BSV[0, -1].float()
        else:
            if cache is None or cache.pos + new_S.numel() > W:  # (re-)prefill the last W tokens
                cache, new_S = KVCache(model.cfg.n_layers), ids_S[-W:]
            logits_V = model(new_S.unsqueeze(0), cache=cache).logits_BSV[0, -1].float()
        logits_V[banned] = float("-inf")
        nxt = sample_next(logits_V, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        ids_S = torch.cat([ids_S, nxt.to(ids_S.dtype)])
        new_S = ids_S[-1:]
    model.train(was_training)
    return ids_S[prompt_S.numel():]
