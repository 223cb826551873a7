"""Tiny decoder-only MoE language model: byte vocabulary, RMSNorm, RoPE, causal SDPA, MoE FFN.

B=sequences, S=positions, D=d_model, V=vocab, H=heads, Dh=head dim, F=dense FFN hidden, E=experts.
Readable top to bottom: `ModelConfig` -> `Block` (attention + dense or MoE FFN) -> `MoELM` -> `generate`.
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
    attn = 4 * D * D + 2 * D  # q, k, v, o + two RMSNorm gains
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


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """RoFormer (Su et al. 2021) eq. 34: angles m * theta^(-2i/d) -> (cos_SDh, sin_SDh), halves repeated."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang_SDh2 = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    ang_SDh = torch.cat([ang_SDh2, ang_SDh2], dim=-1)
    return ang_SDh.cos(), ang_SDh.sin()


def apply_rope(x_BHSDh: Tensor, cos_SDh: Tensor, sin_SDh: Tensor) -> Tensor:
    """Rotate-half form of RoPE (as in GPT-NeoX / Llama)."""
    x1, x2 = x_BHSDh.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x_BHSDh * cos_SDh + rot * sin_SDh


class Attention(nn.Module):
    """Causal multi-head self-attention via scaled_dot_product_attention (right padding needs no mask)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: Tensor, cos_SDh: Tensor, sin_SDh: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos_SDh, sin_SDh), apply_rope(k, cos_SDh, sin_SDh)
        y_BHSDh = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y_BHSDh.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += ffn(norm(x)), the FFN dense or MoE."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoELayer(cfg.moe) if moe else MLP(cfg.d_model, cfg.d_dense, "swiglu")

    def forward(self, x_BSD: Tensor, cos_SDh: Tensor, sin_SDh: Tensor, *, valid_BS: Tensor | None,
                token_ids_BS: Tensor, prev_logits: Tensor | None = None) -> tuple[Tensor, MoEResult | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SDh, sin_SDh)
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
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe(i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
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

    def forward(self, idx_BS: Tensor, *, valid_BS: Tensor | None = None) -> LMOutput:
        """idx_BS: token ids (long). valid_BS: bool, False at (right) padding; padding goes to no expert."""
        _B, S = idx_BS.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds ModelConfig.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:S].to(self.tok_emb.weight.dtype), self.rope_sin[:S].to(self.tok_emb.weight.dtype)
        x_BSD = self.tok_emb(idx_BS)
        moe: dict[int, MoEResult] = {}
        prev_logits = None  # the previous MoE layer's router logits (MoE++ gating residual, when enabled)
        for i, block in enumerate(self.blocks):
            x_BSD, res = block(x_BSD, cos, sin, valid_BS=valid_BS, token_ids_BS=idx_BS, prev_logits=prev_logits)
            if res is not None:
                moe[i], prev_logits = res, res.routing.logits_TE
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


@torch.no_grad()
def generate(model: MoELM, prompt_S: Tensor, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Sample continuation ids (no KV cache: the tiny model re-reads its last max_seq_len tokens).
    temperature 0 = greedy; top_k keeps the k most likely ids."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid: allowed >= 0")
    if top_k is not None and not 1 <= top_k <= model.cfg.vocab_size:
        raise ValueError(f"top_k={top_k} is invalid: allowed 1..{model.cfg.vocab_size} or None")
    was_training = model.training
    model.eval()
    ids_S = prompt_S.clone()
    for _ in range(max_new_tokens):
        ctx_1S = ids_S[-model.cfg.max_seq_len:].unsqueeze(0)
        logits_V = model(ctx_1S).logits_BSV[0, -1].float()
        logits_V[N_BYTES:] = float("-inf")  # sample bytes only
        if temperature == 0:
            nxt = logits_V.argmax().view(1)
        else:
            logits_V = logits_V / temperature
            if top_k is not None:
                kth = torch.topk(logits_V, top_k).values[-1]
                logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits_V, -1), 1, generator=generator)
        ids_S = torch.cat([ids_S, nxt.to(ids_S.dtype)])
    model.train(was_training)
    return ids_S[prompt_S.numel():]
