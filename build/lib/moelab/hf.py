"""transformers interop for traces: where each HF MoE family keeps its routing, hooks to record it and
to replay a recorded routing instead of the router.

T=tokens of one forward call (batch * seq, row-major), E=routed experts, K=experts per token.

In transformers 5.x every sparse MoE block below calls its router/gate module, which returns
`(logits_TE, weight_TK, expert_idx_TK)` (DBRX: just the logits), then `experts(x_TD, expert_idx_TK,
weight_TK)`. So the chosen experts and weights are read (and replaced, for replay) at the experts
call, and the raw logits at the router's output. The only per-family knowledge is the table below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Self

import numpy as np
import torch
from torch import Tensor, nn

from moelab.progress import progress
from moelab.trace import RoutingCursor, Trace, trace_from, windows


@dataclass(frozen=True)
class HFAdapter:
    """Where one HF MoE block class keeps its routing."""
    router: str                 # attribute of the block holding the router / gate module
    logits_at: int | None = 0   # index of the raw logits in the router's output tuple; None = the output is the logits
    experts: str = "experts"    # attribute of the experts module, called as experts(x_TD, expert_idx_TK, weight_TK)
    dense_at: int | None = None  # Llama-4 style: index of dense (T, E) combine scores (0 = not chosen) in the
    #                              router's output; routing is then read and replayed there, k = router.top_k


_GATE = HFAdapter(router="gate")
_ROUTER = HFAdapter(router="router")

HF_ADAPTERS: dict[str, HFAdapter] = {  # HF MoE block class name -> where its routing lives
    "MixtralSparseMoeBlock": _GATE,
    "Qwen2MoeSparseMoeBlock": _GATE,
    "Qwen3MoeSparseMoeBlock": _GATE,
    "Qwen3NextSparseMoeBlock": _GATE,
    "OlmoeSparseMoeBlock": _GATE,
    "FlexOlmoSparseMoeBlock": _GATE,
    "DeepseekV2Moe": _GATE,
    "DeepseekV3MoE": _GATE,
    "Glm4MoeMoE": _GATE,
    "Dots1MoE": _GATE,
    "Ernie4_5_MoeSparseMoeBlock": _GATE,
    "HunYuanMoEV1Moe": _GATE,
    "MiniMaxSparseMoeBlock": _GATE,
    "MiniMaxM2SparseMoeBlock": _GATE,
    "ExaoneMoeSparseMoEBlock": _GATE,
    "Lfm2MoeSparseMoeBlock": _GATE,
    "BailingHybridMoE": _GATE,
    "Cohere2MoeSparseMoeBlock": _GATE,
    "HYV3MoE": _GATE,
    "KimiLinearMoE": _GATE,
    "Kolibri1SparseMoeBlock": _GATE,
    "LagunaSparseMoeBlock": _GATE,
    "MellumSparseMoeBlock": _GATE,
    "MiMoV2FlashMoE": _GATE,
    "SolarOpenMoE": _GATE,
    "GraniteMoeSWAMoE": _ROUTER,
    "GptOssMLP": _ROUTER,
    "GraniteMoeMoE": _ROUTER,
    "GraniteMoeSharedMoE": _ROUTER,
    "GraniteMoeHybridMoE": _ROUTER,
    "PhimoeSparseMoeBlock": _ROUTER,
    "JambaSparseMoeBlock": _ROUTER,
    "AfmoeSparseMoeBlock": _ROUTER,
    "DbrxFFN": HFAdapter(router="router", logits_at=None),
    "Llama4TextMoe": HFAdapter(router="router", logits_at=1, dense_at=0),
}


class HFBlock(NamedTuple):
    name: str           # qualified module name inside the model
    module: nn.Module   # the MoE block
    adapter: HFAdapter  # where its routing lives


def moe_blocks(model: nn.Module) -> list[HFBlock]:
    """The model's MoE blocks in forward order (module registration order)."""
    blocks = [HFBlock(n, m, HF_ADAPTERS[type(m).__name__]) for n, m in model.named_modules()
              if type(m).__name__ in HF_ADAPTERS]
    if not blocks:
        raise ValueError(f"model {type(model).__name__} has no known MoE block: moelab.hf.HF_ADAPTERS knows "
                         f"{', '.join(sorted(HF_ADAPTERS))}")
    return blocks


def n_experts_of(block: HFBlock) -> int:
    """Routed experts E of a block, read from its router's output width."""
    router = getattr(block.module, block.adapter.router)
    for attr in ("num_experts", "n_routed_experts"):
        if isinstance(getattr(router, attr, None), int):
            return getattr(router, attr)
    w = getattr(router, "weight", None)
    if w is None and hasattr(router, "layer"):  # DBRX keeps an nn.Linear inside its router
        w = router.layer.weight
    if w is None:
        raise ValueError(f"cannot read the number of experts of {type(block.module).__name__}")
    return int(w.shape[0])


def _split_call(args: tuple, kwargs: dict, where: str) -> tuple[Tensor, Tensor, Tensor]:
    if len(args) < 3:
        raise ValueError(f"{where}: expected experts(x_TD, expert_idx_TK, weight_TK) positionally, got "
                         f"{len(args)} positional and keywords {sorted(kwargs)}")
    return args[0], args[1], args[2]


def _from_dense(dense_TE: Tensor, router: nn.Module, where: str) -> tuple[Tensor, Tensor]:
    """Chosen experts and weights from dense combine scores (zero where not chosen), k = router.top_k."""
    k = getattr(router, "top_k", None)
    if not (isinstance(k, int) and 1 <= k <= dense_TE.shape[-1]):
        raise ValueError(f"{where}: router.top_k={k!r} is invalid: allowed an integer 1..{dense_TE.shape[-1]}")
    w_TK, idx_TK = torch.topk(dense_TE.detach().reshape(-1, dense_TE.shape[-1]), k, dim=-1)
    return idx_TK.long(), w_TK


class LayerRouting(NamedTuple):
    """One MoE block, one or more forward calls concatenated."""
    expert_idx_TK: Tensor        # long, chosen experts
    weight_TK: Tensor            # fp32 combine weights
    logits_TE: Tensor | None     # fp32 raw router logits (None if not recorded)


class _BlockHooks:
    """Context manager base: one hook per MoE block on its experts call (pre-hook) or, for blocks that
    combine with dense scores, on its router's output. Subclasses define _on_experts / _on_dense."""
    blocks: list

    def __init__(self) -> None:
        self._handles: list = []

    def _attach(self, extra=None) -> None:
        for layer, b in enumerate(self.blocks):
            router = getattr(b.module, b.adapter.router)
            if b.adapter.dense_at is None:
                experts = getattr(b.module, b.adapter.experts)
                self._handles.append(experts.register_forward_pre_hook(self._on_experts(layer), with_kwargs=True))
            else:
                self._handles.append(router.register_forward_hook(self._on_dense(layer)))
            if extra is not None:
                self._handles.append(router.register_forward_hook(extra(layer)))

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class HFRecorder(_BlockHooks):
    """Context manager: records every MoE block's routing on each forward call.

    with HFRecorder(model) as rec: model(ids); layers = rec.take()  # list (one per block) of LayerRouting
    """

    def __init__(self, model: nn.Module, *, logits: bool = True):
        self.blocks = moe_blocks(model)
        self.logits = logits
        self._idx: list[list[Tensor]] = [[] for _ in self.blocks]
        self._w: list[list[Tensor]] = [[] for _ in self.blocks]
        self._lg: list[list[Tensor]] = [[] for _ in self.blocks]
        super().__init__()

    def __enter__(self) -> Self:
        self._attach(self._on_router if self.logits else None)
        return self

    def _on_experts(self, layer: int):
        def hook(mod, args, kwargs):
            _, idx_TK, w_TK = _split_call(args, kwargs, self.blocks[layer].name)
            self._idx[layer].append(idx_TK.detach().reshape(-1, idx_TK.shape[-1]).long().cpu())
            self._w[layer].append(w_TK.detach().reshape(-1, w_TK.shape[-1]).float().cpu())
        return hook

    def _on_dense(self, layer: int):
        def hook(mod, args, out):
            idx_TK, w_TK = _from_dense(out[self.blocks[layer].adapter.dense_at], mod, self.blocks[layer].name)
            self._idx[layer].append(idx_TK.cpu())
            self._w[layer].append(w_TK.float().cpu())
        return hook

    def _on_router(self, layer: int):
        at = self.blocks[layer].adapter.logits_at

        def hook(mod, args, out):
            lg = out if at is None else out[at]
            self._lg[layer].append(lg.detach().reshape(-1, lg.shape[-1]).float().cpu())
        return hook

    def take(self) -> list[LayerRouting]:
        """Everything recorded since the last take, one LayerRouting per block; clears the buffers."""
        out = []
        for layer in range(len(self.blocks)):
            if not self._idx[layer]:
                raise ValueError(f"MoE block {self.blocks[layer].name} was not called: nothing recorded")
            lg = torch.cat(self._lg[layer]) if self._lg[layer] else None
            out.append(LayerRouting(torch.cat(self._idx[layer]), torch.cat(self._w[layer]), lg))
            self._idx[layer], self._w[layer], self._lg[layer] = [], [], []
        return out


class HFReplay(_BlockHooks):
    """Context manager: every MoE block uses the recorded experts and weights instead of its router's.

    `cursors[l]` hands out layer l's recorded rows in the order tokens reach the block, so a trace made
    over several forward calls replays over the same calls. The router still runs (its logits, e.g.
    for aux losses, are the model's own); only the experts call sees the recorded routing.
    """

    def __init__(self, model: nn.Module, cursors: list[RoutingCursor]):
        self.blocks = moe_blocks(model)
        if len(cursors) != len(self.blocks):
            raise ValueError(f"trace has {len(cursors)} MoE layers, the model has {len(self.blocks)} MoE blocks")
        self.cursors = cursors
        super().__init__()

    def __enter__(self) -> Self:
        self._attach()
        return self

    def _on_dense(self, layer: int):
        at = self.blocks[layer].adapter.dense_at

        def hook(mod, args, out):
            dense_TE = out[at]
            k = _from_dense(dense_TE, mod, self.blocks[layer].name)[0].shape[1]
            idx_TK, w_TK = self.cursors[layer].next(dense_TE.shape[0], k=k, where=self.blocks[layer].name)
            new_TE = torch.zeros_like(dense_TE).scatter_(1, idx_TK.to(dense_TE.device),
                                                        w_TK.to(dense_TE.device, dense_TE.dtype))
            return (*out[:at], new_TE, *out[at + 1:])
        return hook

    def _on_experts(self, layer: int):
        def hook(mod, args, kwargs):
            x_TD, idx_TK, w_TK = _split_call(args, kwargs, self.blocks[layer].name)
            T = idx_TK.reshape(-1, idx_TK.shape[-1]).shape[0]
            new_idx_TK, new_w_TK = self.cursors[layer].next(T, k=idx_TK.shape[-1], where=self.blocks[layer].name)
            new_idx_TK = new_idx_TK.to(device=idx_TK.device, dtype=idx_TK.dtype).reshape(idx_TK.shape)
            new_w_TK = new_w_TK.to(device=w_TK.device, dtype=w_TK.dtype).reshape(w_TK.shape)
            return (x_TD, new_idx_TK, new_w_TK, *args[3:]), kwargs
        return hook


def load_hf_causal_lm(path_or_name: str, dtype: str = "float32"):
    """A local (or cached) transformers causal LM and its tokenizer; never downloads (local_files_only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed {', '.join(dtypes)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_name, dtype=dtypes[dtype], local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path_or_name, local_files_only=True)
    except OSError as e:  # missing folder / files, or a name not in the local cache
        raise ValueError(f"--hf {path_or_name!r}: no local transformers model there (nothing is downloaded; "
                         f"give a folder with config.json, weights and tokenizer): {str(e).splitlines()[0]}") from e
    return model.eval(), tok


# ---- tracing transformers models ------------------------------------------------------------------

@torch.no_grad()
def trace_hf(model: nn.Module, wins: list, domains: list[str], *, batch_size: int = 8, logits: bool = True,
             decode=None, meta: dict | None = None) -> Trace:
    """Trace a transformers MoE model through the moelab.hf adapter table. `decode(id) -> str` fills vocab."""
    model.eval()
    dev = next(model.parameters()).device
    ids_all = [np.asarray(w, dtype=np.int64) for _, w in wins]
    with HFRecorder(model, logits=logits) as rec:
        for b in progress(range(0, len(wins), batch_size), "trace"):
            model(input_ids=torch.as_tensor(np.stack(ids_all[b: b + batch_size]), device=dev), use_cache=False)
        layers = rec.take()
    S = len(ids_all[0])
    vocab = {}
    if decode is not None:
        vocab = {int(t): decode(int(t)) for t in np.unique(np.concatenate(ids_all))}
    return trace_from([r.expert_idx_TK for r in layers], [r.weight_TK for r in layers],
                       [r.logits_TE for r in layers], ids_all, [np.full(S, i) for i in range(len(wins))],
                       [np.arange(S)] * len(wins), [np.full(S, d) for d, _ in wins], domains,
                       n_experts_of(moe_blocks(model)[0]),
                       vocab, {"source": "transformers", "model_class": type(model).__name__,
                               "layer_names": [b.name for b in moe_blocks(model)], **(meta or {})}, logits)


def trace_hf_path(path_or_name: str, data: list[str] | None = None, *, seq_len: int = 128,
                  max_tokens: int = 16384, batch_size: int = 4, logits: bool = True, dtype: str = "float32",
                  device: str = "cpu") -> Trace:
    """`moelab trace --hf PATH`: a local transformers MoE model over `data` text (None = the built-in corpus),
    domains as moelab.data labels them; each domain is tokenized only up to its share of max_tokens."""
    from moelab.data import builtin_documents, document_text, format_report, load_documents
    model, tok = load_hf_causal_lm(path_or_name, dtype)
    model = model.to(device)
    if not data or data == ["builtin"]:
        docs = builtin_documents()
    else:
        loaded = load_documents(data)
        print(format_report(loaded.report))
        docs = loaded.documents
    domains = sorted({d.domain for d in docs})
    want = max_tokens // max(len(domains), 1) + seq_len
    token_docs = []
    for dom in domains:
        ids: list[int] = []
        for d in (d for d in docs if d.domain == dom):
            if len(ids) >= want:
                break
            ids += tok(document_text(d.data), add_special_tokens=False)["input_ids"][: want]
        token_docs.append((dom, ids))
    if not any(ids for _, ids in token_docs):
        raise ValueError(f"--hf {path_or_name!r} has no tokenizer files (tokenizer.json / tokenizer_config.json): "
                         f"every text maps to no tokens; add the model's tokenizer to the folder")
    doms, wins = windows(token_docs, seq_len, max_tokens)
    return trace_hf(model, wins, doms, batch_size=batch_size, logits=logits, decode=lambda t: tok.decode([t]),
                    meta={"model": str(path_or_name), "seq_len": seq_len})


# ---- moelab inside transformers models: the experts backend (hf_backend.py) and balancing (hf_balance.py) ----

def register() -> str:
    """Register experts_implementation="moelab" with transformers (explicit, idempotent); returns the name."""
    from moelab.hf_backend import register as register_backend
    return register_backend()


def attach(model: nn.Module, balance: str = "loss_free", *, rate: float = 1e-3, aux_coef: float = 1e-2,
           add_to_loss: bool = False, bias_from: str | None = None):
    """Hook every MoE block of a transformers model for moelab's BalanceStats and balancing (loss_free | global |
    aux | none); returns the moelab.hf_balance.HFBalance (losses(), loss(), step(), take_stats(), callback(),
    detach()). Registers experts_implementation="moelab" too. Reads a saved loss-free bias sidecar back from
    `bias_from` or the model's own folder."""
    from moelab.hf_balance import HFBalance, HFBalanceConfig
    register()
    blocks = moe_blocks(model)
    return HFBalance(model, blocks, [n_experts_of(b) for b in blocks],
                     HFBalanceConfig(balance, rate, aux_coef, add_to_loss), bias_from)
