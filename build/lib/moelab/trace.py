"""Routing traces: who went where, per MoE layer and token, saved as a versioned, validated .npz.

L=MoE layers, N=traced tokens, K=slots per token, E=routed experts.
Works for moelab models (at `MoELayer.routing_override`); transformers models are traced by moelab.hf;
a trace can be replayed so a model uses the recorded experts instead of its router.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from moelab.config import TrainConfig
from moelab.moe import MoELayer, moe_layers
from moelab.progress import progress

TRACE_VERSION = 1
_REQUIRED = ("version", "expert_idx_LNK", "weight_LNK", "token_ids_N", "seq_ids_N", "positions_N",
             "domain_N", "domains", "meta")


@dataclass(frozen=True)
class Trace:
    """A routing trace. Arrays are numpy; -1 in expert_idx_LNK means no expert (dropped / padding)."""
    expert_idx_LNK: np.ndarray          # int16, chosen expert per layer, token, slot
    weight_LNK: np.ndarray              # float32, combine weight per slot
    token_ids_N: np.ndarray             # int32, token id of each traced token
    seq_ids_N: np.ndarray               # int32, which sequence (window) the token belongs to
    positions_N: np.ndarray             # int32, position inside its sequence
    domain_N: np.ndarray                # int16, index into `domains`
    domains: tuple[str, ...]            # domain label names (the --data folder each sequence came from)
    n_experts: int                      # E, router outputs per layer (moelab: + null/zero/copy/const experts)
    logits_LNE: np.ndarray | None = None  # float16 raw router logits, optional
    vocab: dict[int, str] = field(default_factory=dict)  # token id -> decoded text, for the ids in the trace
    meta: dict = field(default_factory=dict)  # source, model, top_k, ... (JSON-serialisable)

    @property
    def n_layers(self) -> int:
        return self.expert_idx_LNK.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.expert_idx_LNK.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_idx_LNK.shape[2]

    def token_text(self, token_id: int) -> str:
        """Decoded text of a token: the recorded vocab, else the byte itself for ids < 256."""
        if int(token_id) in self.vocab:
            return self.vocab[int(token_id)]
        return bytes([int(token_id)]).decode("latin-1") if 0 <= token_id < 256 else f"#{int(token_id)}"

    def validate(self) -> Trace:
        """Raise ValueError naming the field if shapes, dtypes or ranges are inconsistent."""
        idx, w = self.expert_idx_LNK, self.weight_LNK
        if idx.ndim != 3:
            raise ValueError(f"trace field expert_idx_LNK must be 3-D (layers, tokens, slots), got shape {idx.shape}")
        if w.shape != idx.shape:
            raise ValueError(f"trace field weight_LNK shape {w.shape} must equal expert_idx_LNK shape {idx.shape}")
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"trace field expert_idx_LNK must be integer, got {idx.dtype}")
        if not (isinstance(self.n_experts, int) and self.n_experts >= 1):
            raise ValueError(f"trace field n_experts={self.n_experts!r} must be an integer >= 1")
        if idx.size and (idx.min() < -1 or idx.max() >= self.n_experts):
            raise ValueError(f"trace field expert_idx_LNK has values in [{idx.min()}, {idx.max()}]: allowed -1 "
                             f"(no expert) and 0..{self.n_experts - 1}")
        N = idx.shape[1]
        for name in ("token_ids_N", "seq_ids_N", "positions_N", "domain_N"):
            a = getattr(self, name)
            if a.shape != (N,):
                raise ValueError(f"trace field {name} shape {a.shape} must be ({N},) = tokens in expert_idx_LNK")
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"trace field {name} must be integer, got {a.dtype}")
        if N and (self.domain_N.min() < 0 or self.domain_N.max() >= len(self.domains)):
            raise ValueError(f"trace field domain_N indexes outside domains (0..{len(self.domains) - 1})")
        if self.logits_LNE is not None and self.logits_LNE.shape != (*idx.shape[:2], self.n_experts):
            raise ValueError(f"trace field logits_LNE shape {self.logits_LNE.shape} must be "
                             f"{(*idx.shape[:2], self.n_experts)} (layers, tokens, n_experts)")
        return self

    def save(self, path: str | Path) -> Path:
        """Write a compressed .npz (no pickles; strings as unicode arrays, meta as JSON)."""
        self.validate()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "version": np.array(TRACE_VERSION), "expert_idx_LNK": self.expert_idx_LNK.astype(np.int16),
            "weight_LNK": self.weight_LNK.astype(np.float32), "token_ids_N": self.token_ids_N.astype(np.int32),
            "seq_ids_N": self.seq_ids_N.astype(np.int32), "positions_N": self.positions_N.astype(np.int32),
            "domain_N": self.domain_N.astype(np.int16), "domains": np.array(self.domains, dtype=np.str_),
            "meta": np.array(json.dumps({**self.meta, "n_experts": self.n_experts})),
            "vocab_ids": np.array(sorted(self.vocab), dtype=np.int64),
            "vocab_text": np.array([self.vocab[i] for i in sorted(self.vocab)], dtype=np.str_)}
        if self.logits_LNE is not None:
            arrays["logits_LNE"] = self.logits_LNE.astype(np.float16)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace written by Trace.save; clear errors for foreign or broken files."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise ValueError(f"trace file {str(path)!r} is not a readable .npz: not a zip archive")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip / not an npz
        raise ValueError(f"trace file {str(path)!r} is not a readable .npz: {e}") from e
    with z:
        missing = [k for k in _REQUIRED if k not in z.files]
        if missing:
            raise ValueError(f"trace file {str(path)!r} lacks field(s) {missing}: a moelab trace has {list(_REQUIRED)}")
        version = int(z["version"])
        if version != TRACE_VERSION:
            raise ValueError(f"trace file {str(path)!r} has version={version}: this moelab reads version {TRACE_VERSION}")
        meta = json.loads(str(z["meta"]))
        vocab = {}
        if "vocab_ids" in z.files:
            vocab = {int(i): str(t) for i, t in zip(z["vocab_ids"], z["vocab_text"])}
        tr = Trace(expert_idx_LNK=z["expert_idx_LNK"], weight_LNK=z["weight_LNK"], token_ids_N=z["token_ids_N"],
                   seq_ids_N=z["seq_ids_N"], positions_N=z["positions_N"], domain_N=z["domain_N"],
                   domains=tuple(str(d) for d in z["domains"]), n_experts=int(meta.pop("n_experts", 0)),
                   logits_LNE=z["logits_LNE"] if "logits_LNE" in z.files else None, vocab=vocab, meta=meta)
    return tr.validate()


def stack_layers(idx_list: list[Tensor], w_list: list[Tensor], logits_list: list[Tensor | None]):
    """Per-layer (N, K_l) tensors -> (L, N, K) numpy arrays, padding smaller K with expert -1 / weight 0."""
    K = max(t.shape[1] for t in idx_list)
    N = idx_list[0].shape[0]
    idx = np.full((len(idx_list), N, K), -1, dtype=np.int16)
    w = np.zeros((len(idx_list), N, K), dtype=np.float32)
    for l, (i, ww) in enumerate(zip(idx_list, w_list)):
        if i.shape[0] != N:
            raise ValueError(f"layer {l} routed {i.shape[0]} tokens, layer 0 routed {N}: cannot stack a trace")
        idx[l, :, : i.shape[1]] = i.numpy()
        w[l, :, : ww.shape[1]] = ww.numpy()
    logits = None
    if all(lg is not None for lg in logits_list):
        logits = np.stack([lg.float().numpy() for lg in logits_list]).astype(np.float16)
    return idx, w, logits


class RoutingCursor:
    """Hands out one layer's recorded rows in order: next(T) -> (expert_idx_TK, weight_TK)."""

    def __init__(self, expert_idx_NK: np.ndarray | Tensor, weight_NK: np.ndarray | Tensor):
        self.idx_NK = torch.as_tensor(np.asarray(expert_idx_NK)).long()
        self.w_NK = torch.as_tensor(np.asarray(weight_NK)).float()
        self.pos = 0

    def next(self, T: int, k: int, where: str = "layer") -> tuple[Tensor, Tensor]:
        if self.pos + T > self.idx_NK.shape[0]:
            raise ValueError(f"{where}: replay asked for tokens {self.pos}..{self.pos + T} but the trace holds "
                             f"{self.idx_NK.shape[0]}: replay the same inputs, in the same order, as the trace")
        idx, w = self.idx_NK[self.pos: self.pos + T], self.w_NK[self.pos: self.pos + T]
        if (idx[:, k:] >= 0).any():
            raise ValueError(f"{where}: the trace routes tokens to {idx.shape[1]} experts, the block takes k={k}")
        self.pos += T
        return idx[:, :k], w[:, :k]


def cursors(trace: Trace) -> list[RoutingCursor]:
    """One RoutingCursor per traced layer."""
    return [RoutingCursor(trace.expert_idx_LNK[l], trace.weight_LNK[l]) for l in range(trace.n_layers)]


# ---- moelab models ---------------------------------------------------------------------------------

def traced_layers(model: nn.Module) -> list[MoELayer]:
    """The model's moelab MoELayers in registration (= forward) order; an error when it has none."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no moelab.moe.MoELayer to trace")
    return layers


def _layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, MoELayer)]


@contextmanager
def record_moelab(model: nn.Module) -> Iterator[list[list]]:
    """Record each MoELayer's router output (its choice, before capacity drops and before special experts are
    split off; the point `replay_moelab` feeds back): yields per-layer lists of Routing records."""
    layers = traced_layers(model)
    records: list[list] = [[] for _ in layers]

    def recorder(rec: list):
        def fn(routing):
            rec.append(routing._replace(**{k: getattr(routing, k).detach() for k in routing._fields}))
            return routing
        return fn

    for l, m in enumerate(layers):
        if m.routing_override is not None:
            raise ValueError(f"MoE layer {l} is already being recorded or replayed")
        m.routing_override = recorder(records[l])
    try:
        yield records
    finally:
        for m in layers:
            m.routing_override = None


REPLAY_WEIGHTS = ("recorded", "router")
_DIFFERENTIABLE = ("topk", "sigmoid_group", "adamoe", "moepp")  # routers whose weights router_weights() re-derives


def _require_differentiable(routers: set[str]) -> None:
    bad = sorted(routers - set(_DIFFERENTIABLE))
    if bad:
        raise ValueError(f"replay weights='router' is invalid for router(s) {bad}: allowed routers "
                         f"{', '.join(_DIFFERENTIABLE)} (or weights='recorded')")


def router_weights(routing, idx_TK: Tensor, cfg) -> Tensor:
    """Combine weights the router itself would give experts `idx_TK`, differentiable in its logits: the
    router's scores at those experts, normalised over the k when the router normalises, times
    routed_scaling_factor (softmax over the k chosen logits == renormalised full softmax). Routing replay
    with the current policy's gates as in R3 (Ma et al. 2025, arXiv 2510.11370, §3)."""
    _require_differentiable({cfg.router})
    keep_TK = idx_TK >= 0
    w_TK = routing.probs_TE.gather(1, idx_TK.clamp_min(0)) * keep_TK
    if cfg.renormalize or (cfg.router != "sigmoid_group" and cfg.score_order == "topk_softmax"):
        w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return w_TK * cfg.routed_scaling_factor


@contextmanager
def replay_moelab(model: nn.Module, trace: Trace, weights: str = "recorded") -> Iterator[None]:
    """Every MoELayer uses the trace's experts instead of its router's choice (in token order), with the
    recorded combine weights (exact replay) or, weights="router", the weights its own router gives those
    experts now (gradients reach the router; for RL / two-engine consistency)."""
    if weights not in REPLAY_WEIGHTS:
        raise ValueError(f"replay weights={weights!r} is invalid: allowed {', '.join(REPLAY_WEIGHTS)}")
    layers = traced_layers(model)
    if len(layers) != trace.n_layers:
        raise ValueError(f"trace has {trace.n_layers} MoE layers, the model has {len(layers)}")
    if weights == "router":  # fail before any forward, not inside the first one
        _require_differentiable({m.cfg.router for m in layers})
    n_routes = layers[0].cfg.n_experts + layers[0].cfg.n_special
    if trace.n_experts > n_routes:
        raise ValueError(f"trace field n_experts={trace.n_experts} does not fit the model: allowed a trace of a "
                         f"model with {n_routes} router outputs (E={layers[0].cfg.n_experts})")
    curs = cursors(trace)

    def override(cursor: RoutingCursor, name: str, cfg):
        def fn(routing):
            idx_TK, w_TK = cursor.next(routing.expert_idx_TK.shape[0], routing.expert_idx_TK.shape[1], name)
            idx_TK = idx_TK.to(routing.expert_idx_TK.device)
            w_TK = (router_weights(routing, idx_TK, cfg) if weights == "router"
                    else w_TK.to(idx_TK.device, routing.weight_TK.dtype))
            return routing._replace(expert_idx_TK=idx_TK, weight_TK=w_TK)
        return fn

    for l, m in enumerate(layers):
        m.routing_override = override(curs[l], f"MoE layer {l}", m.cfg)
    try:
        yield
    finally:
        for m in layers:
            m.routing_override = None


def trace_from(idx_list, w_list, lg_list, token_ids, seq_ids, positions, domain_ids, domains, n_experts,
                vocab, meta, logits: bool) -> Trace:
    idx, w, lg = stack_layers(idx_list, w_list, lg_list if logits else [None])
    return Trace(expert_idx_LNK=idx, weight_LNK=w, token_ids_N=np.concatenate(token_ids).astype(np.int32),
                 seq_ids_N=np.concatenate(seq_ids).astype(np.int32),
                 positions_N=np.concatenate(positions).astype(np.int32),
                 domain_N=np.concatenate(domain_ids).astype(np.int16), domains=tuple(domains),
                 n_experts=n_experts, logits_LNE=lg if logits else None, vocab=vocab, meta=meta).validate()


def windows(docs: list[tuple[str, list[int]]], seq_len: int, max_tokens: int) -> tuple[list[str], list]:
    """Cut each (domain, token ids) document into full windows of seq_len tokens, at most max_tokens in all
    (taken round-robin over documents so every domain is represented). -> (domains, [(domain_idx, ids)])."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is invalid: allowed an integer >= 2")
    domains = sorted({d for d, _ in docs})
    per_doc = [[(domains.index(d), ids[i: i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
               for d, ids in docs]
    out, budget, r = [], max_tokens // seq_len, 0
    while len(out) < budget and any(r < len(p) for p in per_doc):
        out += [p[r] for p in per_doc if r < len(p)][: budget - len(out)]
        r += 1
    if docs and not any(len(ids) for _, ids in docs):
        raise ValueError("the tokenizer turned every document into no tokens: the model folder has no tokenizer "
                         "files (tokenizer.json / tokenizer_config.json); copy them in from the model's source")
    if not out:
        longest = max((len(ids) for _, ids in docs), default=0)
        fix = f"lower --seq-len to {longest} or less, or " if longest >= 2 else ""
        raise ValueError(f"no document holds seq_len={seq_len} tokens (the longest of {len(docs)} holds {longest}): "
                         f"{fix}give more text with --data")
    return domains, out


@torch.no_grad()
def trace_moelab(model: nn.Module, wins: list, domains: list[str], *, batch_size: int = 8,
                 logits: bool = True, meta: dict | None = None) -> Trace:
    """Trace a moelab LM: `model(ids_BS)` is called on batches of windows from `windows()`."""
    model.eval()
    dev = next(model.parameters()).device
    ids_all = [np.asarray(w, dtype=np.int64) for _, w in wins]
    with record_moelab(model) as rec:
        for b in progress(range(0, len(wins), batch_size), "trace"):
            model(torch.as_tensor(np.stack(ids_all[b: b + batch_size]), device=dev))
    idx = [torch.cat([r.expert_idx_TK.cpu() for r in recs]) for recs in rec]
    w = [torch.cat([r.weight_TK.float().cpu() for r in recs]) for recs in rec]
    lg = [torch.cat([r.logits_TE.float().cpu() for r in recs]) for recs in rec]
    S = len(ids_all[0])
    cfg = traced_layers(model)[0].cfg
    n_routes = lg[0].shape[1]  # E routed + special (null/zero/copy/const) experts, which trace as E..
    return trace_from(idx, w, lg, ids_all, [np.full(S, i) for i in range(len(wins))],
                       [np.arange(S)] * len(wins), [np.full(S, d) for d, _ in wins], domains, n_routes, {},
                       {"source": "moelab", "router": cfg.router, "n_routed_experts": cfg.n_experts,
                        "recorded": "router output, before capacity drops", "layer_names": _layer_names(model),
                        **(meta or {})}, logits)


def trace_run(run: str | Path, data: list[str] | None = None, *, seq_len: int = 128, max_tokens: int = 16384,
              batch_size: int = 8, logits: bool = True, device: str = "cpu") -> Trace:
    """`moelab trace RUN`: the run's latest checkpoint over validation windows of each domain of `data`
    (None = the run's own training data), split with the run's val_fraction: never text it trained on."""
    from moelab.checkpoint import load_model
    from moelab.model import BOS_ID, EOS_ID, PAD_ID
    from moelab.train import corpus_for
    model, state = load_model(run)
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len={seq_len} is invalid for {run}: allowed <= the model's max_seq_len "
                         f"{model.cfg.max_seq_len}")
    model = model.to(device)
    cfg = TrainConfig.from_dict(state["train_config"])
    corpus = corpus_for(model.cfg, cfg, run, paths=data)
    docs = [(d, corpus.val[d].long().tolist()) for d in corpus.domains]
    domains, wins = windows(docs, seq_len, max_tokens)
    tr = trace_moelab(model, wins, domains, batch_size=batch_size, logits=logits,
                      meta={"run": str(run), "step": state.get("step", -1), "seq_len": seq_len})
    vocab = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>"}
    if model.cfg.tokenizer != "bytes":  # a BPE vocabulary: decode the ids the trace holds
        from moelab.hf_tokenizer import load_tokenizer
        tok = load_tokenizer(model.cfg.tokenizer, run)
        vocab = {int(t): tok.decode([int(t)]) for t in np.unique(tr.token_ids_N)}
    return Trace(**{**tr.__dict__, "vocab": vocab})
