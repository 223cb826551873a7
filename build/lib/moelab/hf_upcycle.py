"""Sparse upcycling: a dense model (a moelab run, or a transformers llama / qwen3 folder) -> an MoE run whose
experts start as copies or slices of each dense SwiGLU MLP, plus a fresh router.

Step-0 equality (the upcycled model computes the dense model's function, up to float rounding):
- copies (granularity g=1): every expert is the dense MLP and the top-k weights are renormalised to sum to 1,
  so sum_k w_k MLP(x) = MLP(x) whatever the router picks;
- granular (g > 1): the dense hidden width F is cut into g slices of F/g (gate, up rows and down columns
  together); n of them (--shared n) become the always-on shared experts, the other g' = g - n are the routed
  experts, repeated E/g' times, each repeat's g' slices sharing one router row. With top-k a multiple of g',
  renormalised weights pick whole repeats with equal weight inside each, so the routed slices sum to
  (1/g') * (their share of the dense MLP); scaling each routed expert's down projection by g' restores it.
E=routed experts, D=d_model, F=dense hidden, Fe=F/g expert hidden, G=2Fe.
"""
from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor

from moelab.config import ModelConfig, MoEConfig, TrainConfig
from moelab.hf_convert import Source, Spec, hf_model_config, import_hf, write_run
from moelab.model import MoELM


def upcycled_config(dense: ModelConfig, *, n_experts: int, top_k: int, granularity: int = 1, shared: int = 0,
                    first_dense: int = 0) -> ModelConfig:
    """The MoE config of an upcycled dense model; refuses combinations without step-0 equality, naming the flag."""
    F, g = dense.d_dense, granularity
    if dense.moe_layer_ids:
        raise ValueError(f"upcycle source has MoE layers {dense.moe_layer_ids}: allowed a dense model "
                         f"(first_dense = n_layers = {dense.n_layers})")
    if not (isinstance(g, int) and g >= 1 and F % g == 0):
        raise ValueError(f"--granularity={g} is invalid: allowed a divisor of the dense hidden size {F}")
    if not 0 <= shared < g:
        raise ValueError(f"--shared={shared} is invalid: allowed 0..granularity-1={g - 1} (shared experts take "
                         f"that many of the {g} slices of the dense MLP)")
    routed = g - shared  # slices per repeat
    if n_experts < routed or n_experts % routed:
        raise ValueError(f"--experts={n_experts} is invalid: allowed a multiple of granularity - shared = {routed}")
    if not (top_k % routed == 0 and routed <= top_k <= n_experts):
        raise ValueError(f"--top-k={top_k} is invalid: allowed a multiple of granularity - shared = {routed}, "
                         f"at most --experts={n_experts} (whole repeats, for step-0 equality)")
    if not 0 <= first_dense < dense.n_layers:
        raise ValueError(f"--first-dense={first_dense} is invalid: allowed 0..{dense.n_layers - 1}")
    moe = MoEConfig(d_model=dense.d_model, d_expert=F // g, n_experts=n_experts, top_k=top_k, n_shared=shared,
                    d_shared=F // g if shared else None, router="topk", score_order="softmax_topk", renormalize=True)
    return dense.replace(moe=moe, first_dense=first_dense, moe_every=1)


def upcycle_specs(dense: ModelConfig, moe_cfg: ModelConfig, granularity: int, src: Source, seed: int) -> list[Spec]:
    """Komatsuzaki et al. 2022 (arXiv 2212.05055) sec. 3.1: experts initialised from the dense MLP, a new
    router; granular slices with weight scaling after He et al. 2024 (arXiv 2410.07524) sec. 3 and
    Megatron-Core's upcycling_utils.py (slice s of repeat j is expert j*g' + s; router rows repeated per
    repeat). Deviation: Megatron spreads the scale over fc1 and fc2 (scale^(1/3) each, approximate for SwiGLU);
    here the whole scale g' multiplies the down projection, which is exact for any activation."""
    m = moe_cfg.moe
    F, Fe, E, n = dense.d_dense, m.d_expert, m.n_experts, m.n_shared
    routed = granularity - n
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in MoELM(moe_cfg).state_dict().items()}
    dt = src.get("norm.weight").dtype

    def up_slices(b: str, s0: int, s1: int) -> Tensor:  # (2 (s1-s0) Fe, D): gate rows of slices, then up rows
        return torch.cat([src.rows(b + "ffn.up.weight", s0 * Fe, s1 * Fe),
                          src.rows(b + "ffn.up.weight", F + s0 * Fe, F + s1 * Fe)])

    def experts_up(b: str) -> Tensor:
        per_slice = [up_slices(b, s, s + 1).t() for s in range(n, granularity)]  # (D, G) each
        return torch.stack([per_slice[e % routed] for e in range(E)])

    def experts_down(b: str) -> Tensor:
        down_DF = src.get(b + "ffn.down.weight")
        per_slice = [down_DF[:, s * Fe:(s + 1) * Fe].t() * routed for s in range(n, granularity)]  # (Fe, D)
        return torch.stack([per_slice[e % routed] for e in range(E)])

    def router(i: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed * 100003 + i)
        rows_RD = torch.randn(E // routed, moe_cfg.d_model, generator=gen) * moe_cfg.d_model ** -0.5
        return rows_RD.repeat_interleave(routed, dim=0).to(dt)

    specs = []
    for k, (shape, kdt) in shapes.items():
        i = int(k.split(".")[1]) if k.startswith("blocks.") else -1
        b = f"blocks.{i}."
        fdt = dt if kdt.is_floating_point else kdt
        if i < 0 or not moe_cfg.is_moe(i) or not k.startswith(b + "ffn."):
            if k not in src or tuple(src.shape(k)) != shape:
                raise ValueError(f"tensor {k}: {src.shape(k) if k in src else 'missing'} in the dense model, "
                                 f"{shape} expected")
            specs.append(Spec(k, shape, fdt, lambda k=k: src.get(k)))
        elif k == b + "ffn.gate.weight":
            specs.append(Spec(k, shape, fdt, lambda i=i: router(i)))
        elif k == b + "ffn.experts.weights.w_up_EDG":
            specs.append(Spec(k, shape, fdt, lambda b=b: experts_up(b)))
        elif k == b + "ffn.experts.weights.w_down_EFD":
            specs.append(Spec(k, shape, fdt, lambda b=b: experts_down(b)))
        elif k == b + "ffn.shared.up.weight":
            specs.append(Spec(k, shape, fdt, lambda b=b: up_slices(b, 0, n)))
        elif k == b + "ffn.shared.down.weight":
            specs.append(Spec(k, shape, fdt, lambda b=b: src.get(b + "ffn.down.weight")[:, :n * Fe].contiguous()))
        elif ".state." in k:
            specs.append(Spec(k, shape, kdt, lambda shape=shape, kdt=kdt: torch.zeros(shape, dtype=kdt)))
        else:
            raise ValueError(f"moelab tensor {k} has no upcycling rule")
    return specs


def upcycle(source: str | Path, out: str | Path, *, n_experts: int, top_k: int, granularity: int = 1,
            shared: int = 0, first_dense: int = 0, seed: int = 0, verbose: bool = True) -> Path:
    """A dense moelab run (its latest checkpoint) or a transformers llama / qwen3 folder -> an upcycled MoE run
    at step 0 (`moelab train --init-from OUT` trains it). Returns the checkpoint folder."""
    from moelab.checkpoint import latest, list_checkpoints, read_state
    source = Path(source)
    if not list_checkpoints(source) and not (source / "config.json").exists():
        raise ValueError(f"--hf {str(source)!r}: allowed a moelab run folder (with ckpt/) or a transformers folder "
                         "(with config.json)")
    with ExitStack() as stack:
        if list_checkpoints(source):  # a moelab run
            ck = latest(source)
            state = read_state(ck)
            dense = ModelConfig.from_dict(state["model_config"])
            train = TrainConfig.from_dict(state["train_config"]) if "train_config" in state else None
            weights = ck / "model.safetensors"
        else:  # a transformers folder: import it (streaming) into a temporary run first
            hf_model_config(source)  # refuses an architecture moelab cannot import, before any work
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moelab_upcycle_"))) / "run"
            ck = import_hf(source, tmp, verbose=verbose)
            dense, train = ModelConfig.from_dict(read_state(ck)["model_config"]), None
            weights = ck / "model.safetensors"
        cfg = upcycled_config(dense, n_experts=n_experts, top_k=top_k, granularity=granularity, shared=shared,
                              first_dense=first_dense)
        src = Source(weights, stack)
        specs = upcycle_specs(dense, cfg, granularity, src, seed)
        info = {"upcycled_from": str(source), "experts": n_experts, "top_k": top_k, "granularity": granularity,
                "shared": shared, "first_dense": first_dense, "seed": seed}
        tok = None if dense.tokenizer == "bytes" else Path(ck).parent.parent / dense.tokenizer
        return write_run(out, cfg, specs, train=train, source=info, what="upcycle", tokenizer_from=tok,
                         verbose=verbose)
