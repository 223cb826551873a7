"""Checkpoints in and out of the Hugging Face ecosystem: `export_hf` (a moelab run -> a transformers folder:
config.json, generation_config.json, sharded safetensors + index, a byte tokenizer) and `import_hf` (a
transformers folder -> a moelab run), for the architectures of moelab.hf_archs.

Memory: tensors are read one at a time through safe_open and written by a streaming safetensors writer
(header first, then each tensor's bytes), so converting holds one output tensor (at most one layer's
experts) plus the source slices it is made of, never a whole model or shard. A progress bar says what is done.
E=experts, D=d_model, F=expert hidden, G=2F (gate|up), V=vocab, H/Hkv=query/key-value heads, Dh=head dim.
"""
from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console
from rich.progress import Progress
from safetensors import safe_open
from torch import Tensor

from moelab.config import ModelConfig, TrainConfig
from moelab.hf_archs import ARCHS, HFArch, pick_arch
from moelab.hf_tokenizer import write_byte_tokenizer
from moelab.model import MoELM

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class Spec(NamedTuple):
    """One output tensor: its name, shape, dtype and how to make it (called once, when it is written)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], Tensor]


# ---- reading: one file or a sharded folder, tensor by tensor ------------------------------------------
class Source:
    """Tensors of a safetensors file or of a folder with model.safetensors(.index.json), read lazily."""

    def __init__(self, path: str | Path, stack: ExitStack):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if path.is_file():
            files = {None: path}
        elif index.exists():
            files = {f: path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))}
        elif (path / "model.safetensors").exists():
            files = {None: path / "model.safetensors"}
        else:
            raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self.handles = [stack.enter_context(safe_open(str(f), "pt")) for f in files.values()]
        self.where = {k: h for h in self.handles for k in h.keys()}  # noqa: SIM118 (a safe_open handle)

    def keys(self) -> set[str]:
        return set(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> Tensor:
        if name not in self.where:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint")
        return self.where[name].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def rows(self, name: str, a: int, b: int) -> Tensor:
        """Rows a:b of a tensor (first dim), reading only them."""
        return self.where[name].get_slice(name)[a:b]


# ---- writing: streaming safetensors, sharded like save_pretrained -----------------------------------
def _nbytes(s: Spec) -> int:
    n = 1
    for d in s.shape:
        n *= d
    return n * torch.empty((), dtype=s.dtype).element_size()


def write_safetensors(path: Path, specs: list[Spec], metadata: dict[str, str], tick: Callable[[str], None]) -> None:
    """A safetensors file written tensor by tensor (the header is known from the specs): same bytes layout
    as safetensors.torch.save_file, one tensor in memory at a time."""
    header: dict = {"__metadata__": metadata}
    off = 0
    for s in specs:
        header[s.name] = {"dtype": DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + _nbytes(s)]}
        off += _nbytes(s)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for s in specs:
            t = s.make()
            if tuple(t.shape) != s.shape or t.dtype != s.dtype:
                raise ValueError(f"tensor {s.name}: made {tuple(t.shape)} {t.dtype}, planned {s.shape} {s.dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            tick(s.name)


def write_sharded(out: Path, specs: list[Spec], max_shard_bytes: int, tick: Callable[[str], None]) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json (total_size,
    total_parameters, weight_map) when the tensors exceed max_shard_bytes, as save_pretrained names them."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + _nbytes(s) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += _nbytes(s)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, group in zip(names, shards):
        write_safetensors(out / name, group, {"format": "pt"}, tick)
    if n > 1:
        index = {"metadata": {"total_parameters": sum(_nbytes(s) // s.dtype.itemsize for s in specs),
                              "total_size": sum(_nbytes(s) for s in specs)},
                 "weight_map": {s.name: name for name, group in zip(names, shards) for s in group}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _progress(total: int, what: str, verbose: bool):
    """A transient bar on stderr naming the tensor being written (only on a terminal, as moelab.progress)."""
    bar = Progress(transient=True, console=Console(stderr=True), disable=not verbose or not sys.stderr.isatty())
    task = bar.add_task(what, total=total)
    return bar, lambda name: bar.update(task, advance=1, description=f"{what} {name}")


# ---- the name map: moelab <-> transformers, one layer at a time -------------------------------------
def _t(x: Tensor) -> Tensor:
    return x.t().contiguous()


def hf_specs(cfg: ModelConfig, arch: HFArch, src: Source) -> list[Spec]:
    """The transformers tensors (names as save_pretrained writes them) made from a moelab state dict `src`."""
    m, D, F = cfg.moe, cfg.d_model, cfg.moe.d_expert
    H, Hkv, Dh = cfg.n_heads, cfg.kv_heads, cfg.d_head
    g, u, d = arch.expert_linears
    dt = src.get("norm.weight").dtype
    specs = [Spec("model.embed_tokens.weight", (cfg.vocab_size, D), dt, lambda: src.get("tok_emb.weight")),
             Spec("model.norm.weight", (D,), dt, lambda: src.get("norm.weight"))]
    if not cfg.tie_embeddings:
        specs.append(Spec("lm_head.weight", (cfg.vocab_size, D), dt, lambda: src.get("lm_head.weight")))
    for i in range(cfg.n_layers):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        specs += [Spec(p + "input_layernorm.weight", (D,), dt, lambda b=b: src.get(b + "attn_norm.weight")),
                  Spec(p + "post_attention_layernorm.weight", (D,), dt, lambda b=b: src.get(b + "ffn_norm.weight")),
                  Spec(p + "self_attn.o_proj.weight", (D, H * Dh), dt, lambda b=b: src.get(b + "attn.out.weight"))]
        bounds = {"q": (0, H * Dh), "k": (H * Dh, (H + Hkv) * Dh), "v": ((H + Hkv) * Dh, (H + 2 * Hkv) * Dh)}
        for n, (lo, hi) in bounds.items():
            specs.append(Spec(p + f"self_attn.{n}_proj.weight", (hi - lo, D), dt,
                              lambda b=b, lo=lo, hi=hi: src.rows(b + "attn.qkv.weight", lo, hi)))
            if cfg.qkv_bias:
                specs.append(Spec(p + f"self_attn.{n}_proj.bias", (hi - lo,), dt,
                                  lambda b=b, lo=lo, hi=hi: src.rows(b + "attn.qkv.bias", lo, hi)))
        if cfg.qk_norm:
            for n in ("q", "k"):
                specs.append(Spec(p + f"self_attn.{n}_norm.weight", (Dh,), dt,
                                  lambda b=b, n=n: src.get(b + f"attn.{n}_norm.weight")))
        if not cfg.is_moe(i):
            specs += _mlp_specs(p + "mlp.", b + "ffn.", cfg.d_dense, D, dt, src)
            continue
        q = p + arch.moe_block + "."
        specs.append(Spec(q + "gate.weight", (m.n_experts, D), dt, lambda b=b: src.get(b + "ffn.gate.weight")))
        if arch.correction_bias:
            bias = b + "ffn.state.loss_free.bias_E"
            specs.append(Spec(q + "gate." + arch.correction_bias, (m.n_experts,), torch.float32,
                              lambda bias=bias: src.get(bias).float() if bias in src else torch.zeros(m.n_experts)))
        up, down = b + "ffn.experts.weights.w_up_EDG", b + "ffn.experts.weights.w_down_EFD"
        for e in range(m.n_experts):
            x = q + f"experts.{e}."
            specs += [Spec(x + g + ".weight", (F, D), dt, lambda up=up, e=e: _t(src.rows(up, e, e + 1)[0, :, :F])),
                      Spec(x + u + ".weight", (F, D), dt, lambda up=up, e=e: _t(src.rows(up, e, e + 1)[0, :, F:])),
                      Spec(x + d + ".weight", (D, F), dt, lambda down=down, e=e: _t(src.rows(down, e, e + 1)[0]))]
        if arch.shared:
            specs += _mlp_specs(q + arch.shared + ".", b + "ffn.shared.", m.d_shared_total, D, dt, src)
    return specs


def _mlp_specs(hf: str, ours: str, F: int, D: int, dt, src: Source) -> list[Spec]:
    """A SwiGLU MLP: moelab's fused up (gate rows first, then up rows) -> gate_proj / up_proj / down_proj.
    F=0 (no shared experts) gives the empty tensors transformers keeps for them."""
    if F == 0:
        return [Spec(hf + "gate_proj.weight", (0, D), dt, lambda: torch.zeros(0, D, dtype=dt)),
                Spec(hf + "up_proj.weight", (0, D), dt, lambda: torch.zeros(0, D, dtype=dt)),
                Spec(hf + "down_proj.weight", (D, 0), dt, lambda: torch.zeros(D, 0, dtype=dt))]
    return [Spec(hf + "gate_proj.weight", (F, D), dt, lambda: src.rows(ours + "up.weight", 0, F)),
            Spec(hf + "up_proj.weight", (F, D), dt, lambda: src.rows(ours + "up.weight", F, 2 * F)),
            Spec(hf + "down_proj.weight", (D, F), dt, lambda: src.get(ours + "down.weight"))]


def moelab_specs(cfg: ModelConfig, arch: HFArch, src: Source) -> list[Spec]:
    """The inverse of hf_specs: moelab's state dict (every key MoELM(cfg) has) made from transformers
    tensors; router-state counters start at zero, the loss-free bias from the correction bias."""
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in MoELM(cfg).state_dict().items()}
    dt = src.get("model.norm.weight").dtype
    m = cfg.moe
    g, u, d = arch.expert_linears
    make: dict[str, Callable[[], Tensor]] = {"tok_emb.weight": lambda: src.get("model.embed_tokens.weight"),
                                             "norm.weight": lambda: src.get("model.norm.weight"),
                                             "lm_head.weight": lambda: src.get("lm_head.weight")}
    for i in range(cfg.n_layers):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        a = p + "self_attn."
        make[b + "attn_norm.weight"] = lambda p=p: src.get(p + "input_layernorm.weight")
        make[b + "ffn_norm.weight"] = lambda p=p: src.get(p + "post_attention_layernorm.weight")
        make[b + "attn.out.weight"] = lambda a=a: src.get(a + "o_proj.weight")
        make[b + "attn.qkv.weight"] = lambda a=a: torch.cat([src.get(a + f"{n}_proj.weight") for n in "qkv"])
        make[b + "attn.qkv.bias"] = lambda a=a: torch.cat([src.get(a + f"{n}_proj.bias") for n in "qkv"])
        make[b + "attn.q_norm.weight"] = lambda a=a: src.get(a + "q_norm.weight")
        make[b + "attn.k_norm.weight"] = lambda a=a: src.get(a + "k_norm.weight")
        if not cfg.is_moe(i):
            make[b + "ffn.up.weight"], make[b + "ffn.down.weight"] = _mlp_makers(p + "mlp.", src)
            continue
        q = p + arch.moe_block + "."
        make[b + "ffn.gate.weight"] = lambda q=q: src.get(q + "gate.weight")
        make[b + "ffn.experts.weights.w_up_EDG"] = lambda q=q: torch.stack(
            [torch.cat([src.get(q + f"experts.{e}.{g}.weight"), src.get(q + f"experts.{e}.{u}.weight")]).t()
             for e in range(m.n_experts)])
        make[b + "ffn.experts.weights.w_down_EFD"] = lambda q=q: torch.stack(
            [src.get(q + f"experts.{e}.{d}.weight").t() for e in range(m.n_experts)])
        if arch.shared:
            make[b + "ffn.shared.up.weight"], make[b + "ffn.shared.down.weight"] = _mlp_makers(
                q + arch.shared + ".", src)
        if arch.correction_bias:
            make[b + "ffn.state.loss_free.bias_E"] = lambda q=q: src.get(q + "gate." + arch.correction_bias)
    specs = []
    for k, (shape, kdt) in shapes.items():
        if k in make:
            specs.append(Spec(k, shape, dt if kdt.is_floating_point and "state." not in k else kdt, make[k]))
        elif ".state." in k:  # router-state counters (loss-free load, global counts, ReMoE coefficient)
            specs.append(Spec(k, shape, kdt, lambda shape=shape, kdt=kdt: torch.zeros(shape, dtype=kdt)))
        else:
            raise ValueError(f"moelab tensor {k} has no source in --arch {arch.name} (a converter gap)")
    return specs


def _mlp_makers(hf: str, src: Source) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    return (lambda: torch.cat([src.get(hf + "gate_proj.weight"), src.get(hf + "up_proj.weight")]),
            lambda: src.get(hf + "down_proj.weight"))


# ---- tokenizer and generation config of an exported byte-level run ----------------------------------
def _hf_config(arch: HFArch, cfg: ModelConfig, dtype: torch.dtype, tok):
    import transformers
    kw = {**arch.to_hf(cfg), "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    hf = getattr(transformers, arch.config_class)(**kw)
    hf.architectures = [arch.model_class]
    hf.dtype = dtype
    return hf


def export_hf(run: str | Path, out: str | Path, *, arch: str | None = None, ckpt: str | Path | None = None,
              max_shard_bytes: int = 2 * 1024 ** 3, verbose: bool = True) -> HFArch:
    """A moelab run's latest (or `ckpt`) checkpoint -> a transformers folder `out` that
    AutoModelForCausalLM / AutoTokenizer.from_pretrained load without custom code: the run's tokenizer
    (moelab's bytes as a byte-level tokenizer.json, or its transformers tokenizer folder) and a generation
    config that never samples what moelab never samples. Returns the architecture."""
    from transformers import GenerationConfig

    from moelab.checkpoint import latest, read_state
    from moelab.hf_tokenizer import BYTES, copy_tokenizer, load_tokenizer
    path = latest(run, ckpt)
    cfg = ModelConfig.from_dict(read_state(path)["model_config"])
    a = pick_arch(cfg, arch)
    tok = load_tokenizer(cfg.tokenizer, run)
    out = Path(out)
    if any(out.glob("model*.safetensors*")):
        raise ValueError(f"--to-hf {str(out)!r} already holds model weights: allowed a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        src = Source(path / "model.safetensors", stack)
        specs = hf_specs(cfg, a, src)
        dtype = src.get("norm.weight").dtype
        bar, tick = _progress(len(specs), f"export {a.name}", verbose)
        with bar:
            write_sharded(out, specs, max_shard_bytes, tick)
    _hf_config(a, cfg, dtype, tok).save_pretrained(str(out))
    GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                     suppress_tokens=tok.never_sampled(cfg.vocab_size).tolist() or None).save_pretrained(str(out))
    if cfg.tokenizer == BYTES:
        write_byte_tokenizer(out, cfg.vocab_size)
    else:
        copy_tokenizer(tok.name, out)
    return a


class HFView:
    """A transformers config read as a mapping (attribute_map aliases resolve: qwen3's num_experts)."""

    def __init__(self, hf):
        self.hf = hf

    def __getitem__(self, k: str):
        return getattr(self.hf, k)

    def get(self, k: str, default=None):
        v = getattr(self.hf, k, default)
        return default if v is None and default is not None else v


def hf_model_config(hf_dir: str | Path) -> tuple[HFArch, ModelConfig]:
    """The architecture and ModelConfig of a transformers folder (its config.json only)."""
    from transformers import AutoConfig
    hf = AutoConfig.from_pretrained(str(hf_dir))
    if hf.model_type not in ARCHS:
        raise ValueError(f"{hf_dir}/config.json: model_type={hf.model_type!r} is not convertible: allowed "
                         f"{', '.join(ARCHS)}")
    a = ARCHS[hf.model_type]
    return a, a.from_hf(HFView(hf))


def write_run(out: str | Path, cfg: ModelConfig, specs: list[Spec], *, train: TrainConfig | None = None,
              source: dict, what: str, tokenizer_from: str | Path | None = None, verbose: bool = True) -> Path:
    """A moelab run folder at step 0 from tensor specs: config.json (model_config, train_config),
    source.json (where it came from), ckpt/step_00000000/{model.safetensors, state.json}, no optimizer state;
    with `tokenizer_from`, its tokenizer files go to OUT/tokenizer and cfg.tokenizer becomes "tokenizer"."""
    from moelab.hf_tokenizer import copy_tokenizer
    train = train or TrainConfig(seq_len=min(TrainConfig().seq_len, cfg.max_seq_len))
    out = Path(out)
    ck = out / "ckpt" / "step_00000000"
    if (out / "ckpt").exists() or (out / "config.json").exists():
        raise ValueError(f"--out {str(out)!r} already holds a run: choose another --out")
    ck.mkdir(parents=True)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, out / "tokenizer")
        cfg = cfg.replace(tokenizer="tokenizer")
    bar, tick = _progress(len(specs), what, verbose)
    with bar:
        write_safetensors(ck / "model.safetensors", specs, {"format": "pt"}, tick)
    meta = {"model_config": cfg.to_dict(), "train_config": asdict(train)}
    (ck / "state.json").write_text(json.dumps({"step": 0, **meta, "source": source}, indent=1))
    (out / "config.json").write_text(json.dumps(meta, indent=1))
    (out / "source.json").write_text(json.dumps(source, indent=1))
    return ck


def import_hf(hf_dir: str | Path, out: str | Path, *, verbose: bool = True) -> Path:
    """A transformers folder -> a moelab run `out` at step 0 (no optimizer state): eval / generate / trace
    read it, `moelab train --init-from OUT` trains from it. Its tokenizer comes along (OUT/tokenizer), unless
    it is moelab's byte tokenizer (or there is none: bytes assumed). Returns the checkpoint folder."""
    from moelab.hf_tokenizer import has_tokenizer, is_byte_tokenizer
    a, cfg = hf_model_config(hf_dir)
    own = has_tokenizer(hf_dir) and not is_byte_tokenizer(hf_dir)
    source = {"imported_from": str(hf_dir), "arch": a.name,
              "tokenizer": "the folder's" if own else "bytes" + ("" if has_tokenizer(hf_dir) else " (none found)")}
    with ExitStack() as stack:
        src = Source(hf_dir, stack)
        return write_run(out, cfg, moelab_specs(cfg, a, src), source=source, what=f"import {a.name}",
                         tokenizer_from=hf_dir if own else None, verbose=verbose)
