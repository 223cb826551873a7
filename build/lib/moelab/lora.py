"""Mixtures of LoRA experts on frozen nn.Linear layers of a moelab or transformers model.

T=tokens, I=input features, O=output features, E=LoRA experts / adapters, R=rank, K=slots per token.
`attach_lora_experts(model, LoRAConfig)` freezes the model and wraps the target linears in `LoRAExperts`
(base(x) + sum over the token's experts of weight * scale * B_e A_e x); only adapters and routers train.
Variants (rules in moelab.lora_variants): lora (one adapter), mixlora (top-k LoRA experts), xlora (dense learned
scalings over frozen adapters, two passes), smora (each rank an expert), flylora (frozen sparse random
router), similarity (gradient-free cosine router over per-domain adapters). Adapters read and write the PEFT
folder format (adapter_config.json + adapter_model.safetensors).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moelab import lora_variants as lv
from moelab.balance import BalanceStats, balance_stats, expert_counts, loss_free_bias_step
from moelab.config import replace_fields
from moelab.lora_variants import fit_centroids, load_peft_adapter  # noqa: F401  (re-exported)
from moelab.routers import Routing

VARIANTS = ("lora", "mixlora", "xlora", "smora", "flylora", "similarity")
FROZEN_ADAPTERS = ("xlora", "similarity")          # variants mixing adapters loaded with LoRAConfig.adapters
RANK_EXPERTS = ("smora", "flylora")                # variants whose experts are the ranks of one LoRA
FFN_NAMES = ("up", "down", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "fc1", "fc2", "c_fc")
PEFT_PREFIX = "base_model.model."  # PEFT key prefix of every adapter tensor


@dataclass(frozen=True)
class LoRAConfig:
    variant: str = "mixlora"          # lora | mixlora | xlora | smora | flylora | similarity
    n_experts: int = 4                # E, LoRA experts per linear (mixlora); xlora/similarity: len(adapters)
    rank: int = 8                     # r of each expert; smora/flylora: the total rank, every rank an expert
    top_k: int = 2                    # experts (mixlora) or ranks (smora, flylora) per token
    alpha: float = 16.0               # LoRA scale = alpha / rank
    targets: str = "ffn"              # ffn | attn | all | comma-separated module names (PEFT target_modules)
    router: str = "topk"              # mixlora/smora: key of moelab.routers.ROUTERS
    balance: str = "aux"              # mixlora/smora: aux (Switch loss) | loss_free (bias) | none
    aux_loss_coef: float = 1e-2       # weight of the balance loss (MixLoRA uses 0.01)
    bias_update_rate: float = 1e-3    # loss_free and flylora: u in d_i += u * sign(mean_load - load_i)
    fly_sparsity: float = 0.25        # flylora: share of non-zeros per row of the frozen projection A
    adapters: tuple[str, ...] = ()    # xlora/similarity: PEFT adapter folders, one per domain
    scalings: tuple[float, ...] | None = None  # xlora: fixed scalings instead of the classifier (mergeable)
    xlora_hidden: str = "norm"        # xlora: module whose output (last hidden state) feeds the classifier
    temperature: float = 1.0          # xlora classifier softmax / similarity router softmax temperature
    seed: int = 0                     # seeds adapter init and flylora's projection

    def __post_init__(self) -> None:
        def need(ok: bool, f: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"LoRAConfig.{f}={getattr(self, f)!r} is invalid: allowed {allowed}")
        need(self.variant in VARIANTS, "variant", "one of " + ", ".join(VARIANTS))
        for f in ("n_experts", "rank", "top_k"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, f, "an integer >= 1")
        need(self.balance in ("aux", "loss_free", "none"), "balance", "aux, loss_free or none")
        need(self.variant not in RANK_EXPERTS or self.top_k <= self.rank, "top_k", f"1..rank={self.rank}")
        need(self.variant != "mixlora" or self.top_k <= self.n_experts, "top_k", f"1..n_experts={self.n_experts}")
        need(self.variant not in FROZEN_ADAPTERS or len(self.adapters) >= 1, "adapters",
             "one or more PEFT adapter folders with variant xlora / similarity")
        need(self.scalings is None or len(self.scalings) == len(self.adapters), "scalings",
             f"None or one value per adapter ({len(self.adapters)})")
        need(0 < self.fly_sparsity <= 1, "fly_sparsity", "0 < fly_sparsity <= 1")
        need(self.temperature > 0 and self.alpha > 0, "temperature", "> 0 (and alpha > 0)")
        for f in ("aux_loss_coef", "bias_update_rate"):
            need(getattr(self, f) >= 0, f, ">= 0")

    @property
    def n_mix(self) -> int:
        """Experts a LoRAExperts mixes: adapters, experts, or 1 (the rank-wise variants route ranks)."""
        if self.variant in FROZEN_ADAPTERS:
            return len(self.adapters)
        return self.n_experts if self.variant == "mixlora" else 1

    def replace(self, **changes) -> LoRAConfig:
        return replace_fields(self, changes)

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["adapters"] = tuple(d.get("adapters", ()))
        if d.get("scalings") is not None:
            d["scalings"] = tuple(d["scalings"])
        return cls(**d)


class LoRAExperts(nn.Module):
    """A frozen nn.Linear plus LoRA experts: y = base(x) + sum_e w_e(x) * scale_e * B_e A_e x.

    A_ERI (E, R, I) and B_EOR (E, O, R); trainable for lora/mixlora/smora, B only for flylora, frozen
    buffers for xlora/similarity. After each forward `aux_loss` holds this layer's weighted balance loss
    and `last_routing` the routing used (None for dense variants)."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig, adapters: list[tuple[Tensor, Tensor, float]] | None = None):
        super().__init__()
        self.base, self.cfg = base, cfg
        I, O, E, R = base.in_features, base.out_features, cfg.n_mix, cfg.rank
        base.requires_grad_(False)
        gen = torch.Generator().manual_seed(cfg.seed)
        if cfg.variant in FROZEN_ADAPTERS:  # adapters of any ranks: zero-padded to the largest (same product)
            R = max(a.shape[0] for a, _, _ in adapters)
            a_ERI, b_EOR = torch.zeros(E, R, I), torch.zeros(E, O, R)
            for e, (a_RI, b_OR, _) in enumerate(adapters):
                a_ERI[e, :a_RI.shape[0]], b_EOR[e, :, :b_OR.shape[1]] = a_RI, b_OR
            self.register_buffer("A_ERI", a_ERI)
            self.register_buffer("B_EOR", b_EOR)
            self.register_buffer("scale_E", torch.tensor([s for _, _, s in adapters], dtype=torch.float32))
        else:
            self.register_buffer("scale_E", torch.full((E,), cfg.alpha / R))
            self.B_EOR = nn.Parameter(torch.zeros(E, O, R))
            if cfg.variant == "flylora":
                self.register_buffer("A_ERI", lv.flylora_projection(R, I, cfg.fly_sparsity, gen).unsqueeze(0))
            else:
                a_ERI = torch.empty(E, R, I)
                with torch.random.fork_rng():
                    torch.manual_seed(cfg.seed)
                    lv.lora_init(a_ERI)
                self.A_ERI = nn.Parameter(a_ERI)
        n_routes = {"mixlora": E, "smora": R}.get(cfg.variant)
        self.gate = nn.Linear(I, n_routes, bias=False) if n_routes else None
        if self.gate is not None:  # smora: zero (uniform) router, so all ranks active = the plain LoRA
            nn.init.normal_(self.gate.weight, std=0.0 if cfg.variant == "smora" else I ** -0.5)
        self.moe_cfg = lv.moe_config_for(n_routes, I, cfg.top_k, cfg.router, cfg.balance) if n_routes else None
        if cfg.variant in ("flylora", "smora", "mixlora"):  # loss-free state, persistent like MoELayer's
            self.register_buffer("route_bias", torch.zeros(n_routes or R))
            self.register_buffer("route_load", torch.zeros(n_routes or R))
        if cfg.variant == "similarity":
            self.register_buffer("centroids_EI", torch.zeros(E, I))
        if cfg.scalings is not None:
            self.register_buffer("fixed_scalings_E", torch.tensor(cfg.scalings, dtype=torch.float32))
        self.scalings_TE: Tensor | None = None   # xlora: set by the classifier pass before each forward
        self.scaling_pass = False                 # xlora: True during the no-adapter scaling pass
        self.aux_loss: Tensor | None = None
        self.last_routing: Routing | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.scaling_pass:
            return y
        x_TI = x.reshape(-1, x.shape[-1])
        return y + self.delta(x_TI).to(y.dtype).reshape(y.shape)

    def mix_weights(self, x_TI: Tensor) -> Tensor:
        """(T, E) weight of each expert / adapter per token for the expert-level variants (lora, mixlora,
        xlora, similarity); sets last_routing and aux_loss."""
        cfg, T = self.cfg, x_TI.shape[0]
        self.aux_loss, self.last_routing = None, None
        if cfg.variant == "lora":
            return x_TI.new_ones(T, 1, dtype=torch.float32)
        if cfg.variant == "xlora":
            if cfg.scalings is not None:
                return self.fixed_scalings_E.expand(T, -1)
            if self.scalings_TE is None or self.scalings_TE.shape[0] != T:
                raise ValueError("xlora LoRAExperts has no scalings for this input: call the model itself "
                                 "(its X-LoRA pre-hook runs the scaling pass), not the layer alone")
            return self.scalings_TE
        if cfg.variant == "similarity":
            return lv.similarity_weights(x_TI, self.centroids_EI, cfg.temperature)
        routing = self._route(x_TI, lv.route_mixlora)
        return lv.dense_weights(routing, cfg.n_mix)

    def _route(self, x_TI: Tensor, rule) -> Routing:
        cfg = self.cfg
        logits = self.gate(x_TI.float()) if self.gate is not None else None
        bias = self.route_bias if cfg.balance == "loss_free" else None
        routing = rule(logits, self.moe_cfg, bias, self.training)
        self._account(routing, routing.logits_TE.shape[1])
        if cfg.balance == "aux" and cfg.aux_loss_coef > 0 and self.training:
            self.aux_loss = cfg.aux_loss_coef * lv.balance_loss(routing, routing.logits_TE.shape[1])
        return routing

    def _account(self, routing: Routing, n: int) -> None:
        self.last_routing = routing
        if self.training and torch.is_grad_enabled() and hasattr(self, "route_load"):
            with torch.no_grad():
                self.route_load += expert_counts(expert_idx_TK=routing.expert_idx_TK, n_experts=n)

    def delta(self, x_TI: Tensor) -> Tensor:
        """The adapters' contribution (T, O) in fp32. Every expert (or rank) is computed for every token and
        unchosen ones get weight 0: exact and simple at adapter sizes; no sorted dispatch yet."""
        cfg, x = self.cfg, x_TI.float()
        if cfg.variant in RANK_EXPERTS:  # one LoRA (E=1), ranks gated: B diag(w) A x
            h_TR = x @ self.A_ERI[0].t()
            self.aux_loss = None
            if cfg.variant == "flylora":
                routing = lv.route_flylora(h_TR, cfg.top_k, self.route_bias)
                self._account(routing, cfg.rank)
            else:
                routing = self._route(x, lv.route_smora)
            w_TR = lv.dense_weights(routing, cfg.rank)
            return (h_TR * w_TR) @ self.B_EOR[0].t() * self.scale_E[0]
        w_TE = self.mix_weights(x_TI) * self.scale_E
        h_TER = torch.einsum("ti,eri->ter", x, self.A_ERI)
        return torch.einsum("ter,eor,te->to", h_TER, self.B_EOR, w_TE)

    def stats(self) -> BalanceStats | None:
        """Balance metrics of the last forward's routing (None for the dense variants)."""
        r = self.last_routing
        if r is None:
            return None
        counts = expert_counts(expert_idx_TK=r.expert_idx_TK, n_experts=r.logits_TE.shape[1])
        return balance_stats(counts_E=counts, n_tokens=r.expert_idx_TK.shape[0])

    def delta_weight(self) -> Tensor:
        """(O, I) dense weight change when the mixture is input-independent; ValueError otherwise."""
        cfg = self.cfg
        if cfg.variant == "lora" or (cfg.variant == "flylora" and cfg.top_k == cfg.rank):
            w_E = self.scale_E
        elif cfg.variant == "xlora" and cfg.scalings is not None:
            w_E = self.fixed_scalings_E * self.scale_E
        else:
            raise ValueError(f"lora merge: variant {cfg.variant!r} mixes adapters per token (its router depends "
                             "on the input), so it has no single dense weight; mergeable: lora, xlora with fixed "
                             "scalings, flylora with top_k == rank")
        return torch.einsum("e,eor,eri->oi", w_E, self.B_EOR.float(), self.A_ERI.float())


# ---------------------------------------------------------------- targets, attach, counts

def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_targets(model: nn.Module, targets: str) -> list[str]:
    """Names of the nn.Linear modules `targets` selects. ffn: dense-FFN / shared-expert linears named like
    FFN_NAMES, never inside routed experts ('experts' in the path); attn: linears under a module whose name
    contains 'attn' or 'attention' (moelab: the fused qkv and out); all: both; else PEFT's rule for a list:
    a name equal to an entry or ending in '.' + entry."""
    names = _linear_names(model)
    parts = lambda n: n.split(".")
    ffn = [n for n in names if parts(n)[-1] in FFN_NAMES and "experts" not in parts(n)
           and not any(re.search("attn|attention", p) for p in parts(n)[:-1])]
    attn = [n for n in names if any(re.search("attn|attention", p) for p in parts(n)[:-1])]
    if targets in ("ffn", "attn", "all"):
        found = {"ffn": ffn, "attn": attn, "all": [n for n in names if n in set(ffn) | set(attn)]}[targets]
    else:
        want = [t.strip() for t in targets.split(",") if t.strip()]
        found = [n for n in names if any(n == t or n.endswith("." + t) for t in want)]
    if not found:
        raise ValueError(f"LoRAConfig.targets={targets!r} matches no nn.Linear: allowed ffn, attn, all or names "
                         f"among {names[:8]}{' ...' if len(names) > 8 else ''}")
    return found


def lora_modules(model: nn.Module) -> dict[str, LoRAExperts]:
    """Wrapped linear name (as in the unwrapped model) -> its LoRAExperts."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAExperts)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def attach_lora_experts(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model`, wrap the target linears in LoRAExperts (in place) and return their
    names. xlora (learned scalings) also adds `model.xlora_classifier` and a forward pre-hook that runs the
    no-adapter scaling pass (X-LoRA arXiv 2402.07148 sec. 2); similarity needs fit_centroids afterwards."""
    if lora_modules(model):
        raise ValueError("attach_lora_experts: the model already has LoRA experts; merge_lora it first")
    model.requires_grad_(False)
    names = find_targets(model, cfg.targets)
    loaded = [load_peft_adapter(p) for p in cfg.adapters]
    for name in names:
        adapters = None
        if cfg.variant in FROZEN_ADAPTERS:
            missing = [p for p, (w, _) in zip(cfg.adapters, loaded) if name not in w]
            if missing:
                raise ValueError(f"LoRAConfig.adapters: {missing[0]} has no weights for target {name!r}")
            adapters = [(*w[name], s) for w, s in loaded]
        base = model.get_submodule(name)
        _set_module(model, name, LoRAExperts(base, cfg, adapters).to(base.weight.device))
    if cfg.variant == "xlora" and cfg.scalings is None:
        _attach_xlora_classifier(model, cfg)
    return names


def _attach_xlora_classifier(model: nn.Module, cfg: LoRAConfig) -> None:
    """The two-pass rule of X-LoRA (as PEFT's XLoraModel): a pre-hook on the model runs it once under no_grad
    with every adapter off, reads the last hidden state (the output of module cfg.xlora_hidden), and sets
    each LoRAExperts' per-token scalings for the real forward that follows."""
    hidden_mod = model.get_submodule(cfg.xlora_hidden)
    d = hidden_mod.weight.shape[0] if hasattr(hidden_mod, "weight") else None
    if d is None:
        raise ValueError(f"LoRAConfig.xlora_hidden={cfg.xlora_hidden!r} has no weight to size the classifier")
    model.xlora_classifier = lv.XLoRAClassifier(d, len(cfg.adapters), cfg.temperature)
    model.xlora_classifier.to(next(model.parameters()).device)

    def pre_hook(mod: nn.Module, args, kwargs):
        mods = list(lora_modules(mod).values())
        seen: list[Tensor] = []
        h = hidden_mod.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            for m in mods:
                m.scaling_pass = True
            with torch.no_grad():
                mod.forward(*args, **kwargs)
        finally:
            h.remove()
            for m in mods:
                m.scaling_pass = False
        s_TE = mod.xlora_classifier(seen[-1].reshape(-1, seen[-1].shape[-1]))
        for m in mods:
            m.scalings_TE = s_TE
    model._xlora_hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)


class LoRAParams(NamedTuple):
    trainable: int   # adapter + router parameters that train (the base is frozen)
    active: int      # adapter + router parameters one token uses (frozen adapters included)


def lora_param_count(model: nn.Module) -> LoRAParams:
    """Trainable and active-per-token adapter parameters, predicted from each layer's shapes and config
    (tested against requires_grad parameters)."""
    trainable = active = 0
    for m in lora_modules(model).values():
        cfg, I, O = m.cfg, m.base.in_features, m.base.out_features
        E, R = m.A_ERI.shape[0], m.A_ERI.shape[1]
        gate = m.gate.weight.numel() if m.gate is not None else 0
        per = R * (I + O)
        if cfg.variant in ("lora", "mixlora"):
            trainable += E * per + gate
            active += min(cfg.top_k, E) * per + gate if cfg.variant == "mixlora" else per
        elif cfg.variant == "smora":
            trainable += per + gate
            active += cfg.top_k * (I + O) + gate
        elif cfg.variant == "flylora":      # A frozen (its p non-zeros per rank are all read), B trains
            trainable += O * R
            active += R * max(1, round(cfg.fly_sparsity * I)) + cfg.top_k * O
        else:                               # xlora / similarity: every adapter on every token
            active += E * per
    if hasattr(model, "xlora_classifier"):
        n = sum(p.numel() for p in model.xlora_classifier.parameters())
        trainable += n
        active += n
    return LoRAParams(trainable, active)


def lora_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the LoRA routers' weighted balance losses of the last forward: add it to the LM loss."""
    losses = [m.aux_loss for m in lora_modules(model).values() if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())


@torch.no_grad()
def update_lora_biases(model: nn.Module) -> None:
    """After each optimizer step: loss-free bias step of flylora / loss_free layers, counters zeroed."""
    for m in lora_modules(model).values():
        if hasattr(m, "route_load") and (m.cfg.variant == "flylora" or m.cfg.balance == "loss_free"):
            if m.route_load.sum() > 0:
                m.route_bias.copy_(loss_free_bias_step(bias_E=m.route_bias, load_E=m.route_load,
                                                       rate=m.cfg.bias_update_rate))
            m.route_load.zero_()


# ---------------------------------------------------------------- state, PEFT folders, merge

def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Everything the adapters need, PEFT-named: `base_model.model.{name}.lora_A.weight` (R, I) and
    `.lora_B.weight` (O, R) for one adapter, `.lora_A.{e}.weight` per expert otherwise, and the routers and
    buffers under `base_model.model.{name}.{key}` (the frozen base weights are left out)."""
    out: dict[str, Tensor] = {}
    for name, m in lora_modules(model).items():
        pre = PEFT_PREFIX + name
        for k, v in m.state_dict().items():
            if k.startswith("base."):
                continue
            if k in ("A_ERI", "B_EOR"):
                ab = "lora_A" if k == "A_ERI" else "lora_B"
                for e in range(v.shape[0]):
                    out[f"{pre}.{ab}.weight" if v.shape[0] == 1 else f"{pre}.{ab}.{e}.weight"] = v[e].contiguous()
            else:
                out[f"{pre}.{k}"] = v.contiguous()
    if hasattr(model, "xlora_classifier"):
        out.update({f"xlora_classifier.{k}": v for k, v in model.xlora_classifier.state_dict().items()})
    return out


def load_lora_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Inverse of lora_state_dict onto a model that attach_lora_experts prepared the same way."""
    for name, m in lora_modules(model).items():
        pre = PEFT_PREFIX + name
        own = {}
        for k, v in m.state_dict().items():
            if k.startswith("base."):
                continue
            if k in ("A_ERI", "B_EOR"):
                ab = "lora_A" if k == "A_ERI" else "lora_B"
                keys = [f"{pre}.{ab}.weight"] if v.shape[0] == 1 else [f"{pre}.{ab}.{e}.weight"
                                                                       for e in range(v.shape[0])]
                own[k] = torch.stack([sd[x] for x in keys])
            else:
                own[k] = sd[f"{pre}.{k}"]
        m.load_state_dict({**{f"base.{k}": v for k, v in m.base.state_dict().items()}, **own})
    if hasattr(model, "xlora_classifier"):
        model.xlora_classifier.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("xlora_classifier.")})


def save_lora(model: nn.Module, cfg: LoRAConfig, out: str | Path, base: str = "") -> Path:
    """Write a PEFT-format folder: adapter_config.json (PEFT's LORA fields + `moelab_lora` = the LoRAConfig)
    and adapter_model.safetensors (lora_state_dict). A `lora` variant folder loads in PEFT as is."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(lora_modules(model))
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
            "target_modules": names, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "base_model_name_or_path": base, "moelab_lora": asdict(cfg)}
    save_file(lora_state_dict(model), str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(conf, indent=1))
    return out


def load_lora(model: nn.Module, path: str | Path) -> tuple[LoRAConfig, list[str]]:
    """Attach the LoRAConfig saved in a save_lora folder and load its weights; returns (config, names)."""
    conf = json.loads((Path(path) / "adapter_config.json").read_text())
    if "moelab_lora" not in conf:
        raise ValueError(f"adapter folder {str(path)!r} was not written by moelab (no moelab_lora config); "
                         "use it through LoRAConfig(variant='xlora' or 'similarity', adapters=(...))")
    cfg = LoRAConfig.from_dict(conf["moelab_lora"])
    names = attach_lora_experts(model, cfg)
    load_lora_state_dict(model, load_file(str(Path(path) / "adapter_model.safetensors")))
    return cfg, names


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every LoRAExperts into its base weight (W += delta_weight) and put the plain nn.Linear back.
    Raises ValueError, before changing anything, when a layer's mixture depends on the token."""
    mods = lora_modules(model)
    deltas = {n: m.delta_weight() for n, m in mods.items()}
    for n, m in mods.items():
        m.base.weight += deltas[n].to(m.base.weight.dtype)
        _set_module(model, n, m.base)
    if hasattr(model, "_xlora_hook"):
        model._xlora_hook.remove()
        del model._xlora_hook
    if hasattr(model, "xlora_classifier"):
        del model.xlora_classifier
    return list(mods)
