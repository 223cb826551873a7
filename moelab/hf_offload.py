"""Offloaded experts inside transformers models: each MoE block's experts module runs moelab's RoutedExperts
(experts_implementation="moelab", moelab.hf_backend) over an OffloadedExperts provider whose experts are read from
the model folder's safetensors files, one expert at a time (moelab.offload_store's cache and policies).

On disk, transformers checkpoints keep experts either per expert (`{prefix}.{e}.gate_proj.weight` (F, D),
`up_proj` (F, D), `down_proj` (D, F); names from PER_EXPERT_NAMES) or fused 3-D as the module holds them
(`{prefix}.gate_up_proj` (E, 2F, D) or, transposed, (E, D, 2F); `{prefix}.down_proj`; optional `_bias`).
E=routed experts, D=hidden size, F=expert hidden, G=fused gate|up width.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from torch import nn

from moelab.expert_kernels import ExpertTensors
from moelab.experts import RoutedExperts
from moelab.offload_store import ExpertStore, attach, parse_cache_experts, trim_heap

# per-expert tensor names (gate, up, down) as checkpoints store them; a table, not model-name branches
PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def weight_files(folder: str | Path) -> dict[str, str]:
    """Tensor name -> safetensors file of a transformers model folder (single file or sharded with an index)."""
    from safetensors import safe_open
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: str(folder / f) for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"--hf {str(folder)!r} has no model.safetensors (or index): offloading reads experts there")
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), str(single))


class HFSafetensorsExperts:
    """One HF experts module's weights on disk, read one expert at a time in moelab's layout: (D, G) with gate|up
    concatenated, (F, D), plus biases when the module has them; copied out of the memory-mapped file."""

    def __init__(self, files: dict[str, str], prefix: str, module: nn.Module):
        self.files, self._local = files, threading.local()
        self.module_flags = {f: getattr(module, f, None) for f in ("is_transposed", "is_concatenated", "has_bias",
                                                                   "has_gate")}
        up = "gate_up_proj" if module.has_gate else "up_proj"
        self.n_experts = getattr(module, up).shape[0]
        if f"{prefix}.{up}" in files:  # fused, as the module holds it
            self.fused = (f"{prefix}.{up}", f"{prefix}.down_proj")
            self.bias = (f"{prefix}.{up}_bias", f"{prefix}.down_proj_bias") if module.has_bias else None
        else:
            names = next((n for n in PER_EXPERT_NAMES if f"{prefix}.0.{n[0]}.weight" in files), None)
            if names is None or not module.has_gate or not module.is_concatenated:
                raise ValueError(f"weights of {prefix} not found on disk as {prefix}.{up} or per expert "
                                 f"({', '.join('/'.join(n) for n in PER_EXPERT_NAMES)}): cannot offload")
            self.fused, self.names, self.prefix = None, names, prefix
            self.bias = None
            if module.has_bias:
                raise ValueError(f"{prefix}: per-expert weights with biases are not supported for offloading")
        t = self.read(0)
        self.expert_bytes = sum(x.numel() * x.element_size() for x in t if x is not None)

    def _get(self, key: str):
        from safetensors import safe_open
        handles = self._local.__dict__.setdefault("h", {})
        path = self.files[key]
        if path not in handles:
            handles[path] = safe_open(path, "pt")
        return handles[path].get_slice(key)

    def read(self, e: int) -> ExpertTensors:
        if self.fused is None:
            p, (g, u, d) = self.prefix, self.names
            gate_FD, up_FD = (self._get(f"{p}.{e}.{n}.weight")[:] for n in (g, u))
            return ExpertTensors(torch.cat([gate_FD, up_FD]).T.contiguous(),
                                 self._get(f"{p}.{e}.{d}.weight")[:].T.contiguous())
        w_up, w_down = (self._get(k)[e:e + 1][0].clone() for k in self.fused)
        if not self.module_flags["is_transposed"]:  # stored (out, in) per expert, as nn.Linear
            w_up, w_down = w_up.T, w_down.T
        if self.bias is None:
            return ExpertTensors(w_up, w_down)
        b_up, b_down = (self._get(k)[e:e + 1][0].clone() for k in self.bias)
        return ExpertTensors(w_up, w_down, b_up, b_down)


def _gate_weight(block) -> torch.Tensor | None:
    """The router's (N, D) weight of an HF MoE block (for pre-gating), or None."""
    router = getattr(block.module, block.adapter.router)
    w = getattr(router, "weight", None)
    return w.detach() if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def offload_hf(model: nn.Module, folder: str | Path, *, capacity: int | str, policy: str = "lru") -> ExpertStore:
    """Run every MoE block's experts through moelab's RoutedExperts (experts_implementation="moelab") over an
    offloaded provider reading `folder`'s safetensors; the module's own expert tensors are freed (replaced by
    empty ones). Returns the store (its .stats)."""
    from moelab.hf import moe_blocks
    from moelab.hf_backend import _ATTR, HFExpertsWeights, register
    files = weight_files(folder)
    blocks = moe_blocks(model)
    sources, acts, mods = [], [], []
    for b in blocks:
        mod = getattr(b.module, b.adapter.experts)
        prefix = next(n for n, m in model.named_modules() if m is mod)
        sources.append(HFSafetensorsExperts(files, prefix, mod))
        acts.append(HFExpertsWeights(mod).act)
        mods.append(mod)
    top_k = max(int(getattr(getattr(b.module, b.adapter.router), "top_k", 1)) for b in blocks)
    if isinstance(capacity, str):
        capacity = parse_cache_experts(capacity, len(sources), sources[0].expert_bytes, top_k)
    store = ExpertStore(sources, capacity, policy, gates=[_gate_weight(b) for b in blocks], top_k=top_k)
    for i, (mod, act) in enumerate(zip(mods, acts)):
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dim() == 3 or name.endswith("_bias"):  # the expert tensors: freed, shapes kept but the last dim
                setattr(mod, name, nn.Parameter(p.new_empty(*p.shape[:-1], 0), requires_grad=False))
        routed = RoutedExperts(_Stub(sources[i].n_experts))
        attach(routed, store, i, act)
        mod.__dict__[_ATTR] = routed  # what moelab.hf_backend.routed_experts_of returns for this module
    register()
    model.set_experts_implementation("moelab")
    trim_heap()
    return store


class _Stub:
    """Placeholder provider for RoutedExperts' constructor (attach() replaces it)."""
    resident = False

    def __init__(self, n: int):
        self.n_experts = n


def generate_hf_offloaded(folder: str | Path, prompt: str, *, capacity: int | str, policy: str = "lru",
                          max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, seed: int = 0):
    """(text, new tokens, seconds, store): a local transformers model's generate (its own KV cache) with the
    experts offloaded (offload_hf). temperature 0 = greedy."""
    import time

    from moelab.hf import load_hf_causal_lm
    model, tok = load_hf_causal_lm(str(folder))
    store = offload_hf(model, folder, capacity=capacity, policy=policy)
    ids = tok(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    kw = {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature > 0 else {"do_sample": False}
    t0 = time.perf_counter()
    try:
        out = model.generate(ids, max_new_tokens=max_new_tokens, use_cache=True,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0, **kw)
    finally:
        store.close()
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True), new.numel(), dt, store
