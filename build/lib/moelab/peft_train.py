"""Parameter-efficient fine-tuning of a trained moelab run: LoRA experts (`LoRATrainer`) and expert-specialised
fine-tuning (`ESFTTrainer`), both `moelab.train.Trainer` subclasses started from an init run's checkpoint.

L=MoE layers, E=routed experts, K=slots per token. Both keep the Trainer's loop, schedule, logging and exact
resume; they swap the model set-up (base weights from the init run, frozen), the optimizer (trainable
parameters only) and the router-state step (the frozen base's router state is not moved). CLI: `moelab train
--init-from RUN --lora-* | --esft ... --out NEW` via `add_peft_flags` / `trainer_from_args`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from moelab import checkpoint
from moelab import esft as es
from moelab.compare_claims import MARGIN, Check, Claim
from moelab.config import TrainConfig
from moelab.data import Corpus
from moelab.lora import (
    LoRAConfig,
    attach_lora_experts,
    lora_aux_loss,
    lora_modules,
    lora_param_count,
    save_lora,
    update_lora_biases,
)
from moelab.model import MoELM
from moelab.moe import moe_layers
from moelab.runtime import Runtime
from moelab.train import Trainer, to_device

PEFT_FILE = "peft.json"    # in the run folder: method, init run, the LoRAConfig or ESFT experts
CLI_VARIANTS = ("lora", "mixlora", "smora", "flylora")  # token-independent of other adapter folders


def _optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("fine-tuning has no trainable parameter: check the LoRA targets / ESFT experts")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False, foreach=False)


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The Trainer's rule over trainable parameters only: matrices (not the embedding) decay."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if p.dim() >= 2 and "tok_emb" not in n], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not (p.dim() >= 2 and "tok_emb" not in n)], "weight_decay": 0.0}]


def domain_corpus(corpus: Corpus, domain: str) -> Corpus:
    """The same corpus restricted to one domain ("" = unchanged)."""
    if not domain:
        return corpus
    if domain not in corpus.domains:
        raise ValueError(f"domain {domain!r} is not in the corpus: allowed {', '.join(corpus.domains)}")
    pick = lambda d: {domain: d[domain]} if domain in d else {}
    return dataclasses.replace(corpus, domains=[domain], train=pick(corpus.train), val=pick(corpus.val),
                               n_files=pick(corpus.n_files), files=pick(corpus.files))


class _FromRun(Trainer):
    """A Trainer whose model starts from another run's checkpoint; subclasses freeze and choose parameters."""

    method = ""

    def __init__(self, init_from: str | Path, cfg: TrainConfig, out: str | Path, *, corpus: Corpus | None = None,
                 verbose: bool = True, runtime: Runtime | None = None, ckpt: str | Path | None = None):
        path = checkpoint.latest(init_from, ckpt)
        model_cfg = checkpoint.model_config_from(checkpoint.read_state(path)["model_config"], path / "state.json")
        super().__init__(model_cfg, cfg, out, corpus=corpus, verbose=verbose, runtime=runtime or Runtime())
        checkpoint.load_checkpoint(path, model=self.model)  # base weights and router state of the init run
        self.init_from, self.init_ckpt = str(init_from), str(path)
        self.trainable = 0

    def _ready(self, groups: list[dict]) -> None:
        """Optimizer over `groups`; RNG re-seeded so a run does not depend on how the set-up used it.
        (Trainer internals touched here and only here: opt, _rng_state, _rng_at_step_start.)"""
        self.opt = _optimizer(groups, self.cfg)
        torch.manual_seed(self.cfg.seed)
        self._rng_at_step_start = self._rng_state()

    def peft_meta(self) -> dict:
        return {"method": self.method, "init_from": self.init_from, "init_ckpt": self.init_ckpt,
                "trainable_params": self.trainable}

    def fit(self, resume: bool = False, stop_at: int | None = None) -> dict:
        """Trainer.fit, with OUT/peft.json written first and trainable_params added to the summary."""
        if checkpoint.list_checkpoints(self.out) and not resume:  # Trainer.fit's refusal, before writing anything
            raise ValueError(f"--out {str(self.out)!r} already holds checkpoints: pass --resume or another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / PEFT_FILE).write_text(json.dumps(self.peft_meta(), indent=1))
        self.console.print(f"{self.method}: {self.trainable:,} trainable parameters, base {self.init_ckpt}")
        summary = super().fit(resume=resume, stop_at=stop_at)
        summary["trainable_params"] = self.trainable
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


class LoRATrainer(_FromRun):
    """LoRA experts on the frozen init run: only adapters and LoRA routers train; the loss adds their balance
    loss (lora_aux_loss); after each optimizer step their loss-free / FlyLoRA biases step; the base's router
    state stays as trained. Checkpoints hold the whole wrapped model (exact resume); OUT/adapter is the PEFT
    folder (save_lora) that `moelab lora merge` folds back where the mixture allows it."""

    method = "lora"

    def __init__(self, init_from: str | Path, lora_cfg: LoRAConfig, cfg: TrainConfig, out: str | Path, **kw):
        super().__init__(init_from, cfg, out, **kw)
        self.lora_cfg = lora_cfg
        attach_lora_experts(self.model, lora_cfg)
        self.model.register_forward_hook(_add_lora_aux)
        self.trainable = lora_param_count(self.model).trainable
        self._ready(_decay_groups(self.model, cfg.weight_decay))

    def peft_meta(self) -> dict:
        return {**super().peft_meta(), "lora": asdict(self.lora_cfg)}

    def step_routers(self) -> None:
        update_lora_biases(self.model)
        for m in moe_layers(self.model):  # the frozen base: its loss-free bias / coefficients do not move
            m.discard_observations()

    def save_checkpoint(self, rng=None) -> Path:
        path = super().save_checkpoint(rng)
        save_lora(self.model, self.lora_cfg, self.out / "adapter", base=self.init_from)
        return path


def _add_lora_aux(model: nn.Module, _args, out):
    """Forward hook: the LoRA routers' balance loss joins the model's aux_loss (the Trainer adds aux_loss)."""
    return out._replace(aux_loss=out.aux_loss + lora_aux_loss(model).to(out.aux_loss.device))


class ESFTTrainer(_FromRun):
    """ESFT (arXiv 2407.01906) on the init run: experts scored on the training corpus (or cfg.domain of it)
    with the init weights, the chosen ones train, everything else frozen (moelab.esft). The router state is
    not stepped unless the routers train (train_non_expert). Checkpoints are plain runs (`moelab eval` reads
    them); OUT/esft.json holds the expert choice in the authors' expert_cfg.json format plus the scores."""

    method = "esft"

    def __init__(self, init_from: str | Path, esft_cfg: es.ESFTConfig, cfg: TrainConfig, out: str | Path, *,
                 experts: dict[int, list[int]] | None = None, **kw):
        super().__init__(init_from, cfg, out, **kw)
        self.esft_cfg = esft_cfg
        self.scores = None
        if experts is None:
            src = domain_corpus(self.corpus, esft_cfg.domain)
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            n_batches = -(-esft_cfg.n_sample_tokens // (cfg.batch_size * cfg.seq_len))
            batches = [src.sample(cfg.batch_size, cfg.seq_len, gen) for _ in range(n_batches)]
            batches = [to_device(b, self.runtime.device) for b in batches]
            self.scores = es.expert_scores(self.model, batches, esft_cfg.n_sample_tokens)
            experts = es.choose_experts(self.scores, esft_cfg)
        self.experts = experts
        self.masks = es.apply_esft(self.model, experts, esft_cfg)
        self.trainable = self.masks.trainable
        self._ready(es.esft_param_groups(self.model, self.masks, cfg.weight_decay))

    def peft_meta(self) -> dict:
        return {**super().peft_meta(), "esft": asdict(self.esft_cfg),
                "experts": {str(i): v for i, v in self.experts.items()}}

    def step_routers(self) -> None:
        if self.esft_cfg.train_non_expert:
            super().step_routers()
        else:
            for m in moe_layers(self.model):
                m.discard_observations()

    def fit(self, resume: bool = False, stop_at: int | None = None) -> dict:
        if checkpoint.list_checkpoints(self.out) and not resume:
            return super().fit(resume=resume, stop_at=stop_at)  # refuses before anything is written
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "esft.json").write_text(json.dumps(es.expert_config_json(self.experts, self.esft_cfg,
                                                                              self.scores), indent=1))
        return super().fit(resume=resume, stop_at=stop_at)


def load_peft_model(run: str | Path, ckpt: str | Path | None = None) -> tuple[MoELM, dict]:
    """Model (eval mode) and state.json of a run: a LoRA run (RUN/peft.json names its LoRAConfig) rebuilt with
    its adapters (its checkpoints hold the wrapped model), ESFT and plain runs as checkpoint.load_model."""
    f = Path(run) / PEFT_FILE
    lora = json.loads(f.read_text()).get("lora") if f.is_file() else None
    if lora is None:
        return checkpoint.load_model(run, ckpt)
    path = checkpoint.latest(run, ckpt)
    model = MoELM(checkpoint.model_config_from(checkpoint.read_state(path)["model_config"], path / "state.json"))
    attach_lora_experts(model, LoRAConfig.from_dict(lora))
    meta, _ = checkpoint.load_checkpoint(path, model=model)
    return model.eval(), meta


# ---------------------------------------------------------------- CLI: flags and the trainer they ask for

def add_peft_flags(parser: argparse.ArgumentParser) -> None:
    """--lora-* and --esft-* flags of `moelab train` (and --init-from, when the parser lacks it)."""
    g = parser.add_argument_group("parameter-efficient fine-tuning of a trained run (with --init-from RUN)")
    if "--init-from" not in parser._option_string_actions:
        g.add_argument("--init-from", help="trained run folder whose latest checkpoint is the base")
    g.add_argument("--lora-variant", choices=CLI_VARIANTS, help="LoRA experts rule (default: mixlora with "
                   "--lora-experts > 1, else lora); see docs/peft.md")
    g.add_argument("--lora-experts", type=int, help="LoRA experts E per adapted linear (mixlora)")
    g.add_argument("--lora-rank", type=int, help="rank r of each LoRA expert (smora/flylora: total rank)")
    g.add_argument("--lora-top-k", type=int, help="LoRA experts (mixlora) or ranks (smora/flylora) per token")
    g.add_argument("--lora-targets", help="ffn (dense FFN + shared experts; routed experts excluded) | attn "
                   "(qkv counts as one, out) | all (default: works on every moelab model) | comma list of module names")
    g.add_argument("--lora-alpha", type=float, help="LoRA scale alpha / r (default 16)")
    g.add_argument("--lora-balance", choices=("aux", "loss_free", "none"), help="LoRA routers' balancing")
    g.add_argument("--esft", action="store_true", help="expert-specialised fine-tuning: train only the experts "
                   "the training data routes to most (ESFT, arXiv 2407.01906)")
    g.add_argument("--esft-score", choices=es.SCORES, help="token (selection ratio, default) | gate (mean score)")
    g.add_argument("--esft-top-p", type=float, help="cumulative score threshold per layer (default 0.2)")
    g.add_argument("--esft-shared", action="store_true", help="also train the shared experts")
    g.add_argument("--esft-non-expert", action="store_true", help="also train attention, norms, embeddings, routers")
    g.add_argument("--esft-domain", help="score experts on this domain of the training data (default: all)")
    g.add_argument("--esft-tokens", type=int, help="tokens scored (default 8192)")


def _lora_config(args: argparse.Namespace) -> LoRAConfig:
    d = LoRAConfig()
    E = args.lora_experts
    variant = args.lora_variant or ("mixlora" if (E or 1) > 1 else "lora")
    n = E if E is not None else (d.n_experts if variant == "mixlora" else 1)
    rank = args.lora_rank if args.lora_rank is not None else d.rank
    k = args.lora_top_k if args.lora_top_k is not None else min(d.top_k, n if variant == "mixlora" else rank)
    if variant == "lora" and n != 1:
        raise ValueError(f"--lora-experts={n} is invalid with --lora-variant lora: allowed 1 (or use mixlora)")
    return LoRAConfig(variant=variant, n_experts=n, rank=rank, top_k=k, targets=args.lora_targets or "all",
                      alpha=args.lora_alpha if args.lora_alpha is not None else d.alpha,
                      balance=args.lora_balance or d.balance)


def _esft_config(args: argparse.Namespace) -> es.ESFTConfig:
    d = es.ESFTConfig()
    return es.ESFTConfig(score=args.esft_score or d.score,
                         top_p=args.esft_top_p if args.esft_top_p is not None else d.top_p,
                         train_shared=args.esft_shared, train_non_expert=args.esft_non_expert,
                         n_sample_tokens=args.esft_tokens or d.n_sample_tokens, domain=args.esft_domain or "")


def _asked(args: argparse.Namespace) -> tuple[bool, bool]:
    lora = any(getattr(args, f, None) not in (None, False) for f in
               ("lora_variant", "lora_experts", "lora_rank", "lora_top_k", "lora_targets", "lora_alpha", "lora_balance"))
    esft = bool(getattr(args, "esft", False)) or any(getattr(args, f, None) not in (None, False) for f in
                                                    ("esft_score", "esft_top_p", "esft_shared", "esft_non_expert",
                                                     "esft_domain", "esft_tokens"))
    return lora, esft


def trainer_from_args(args: argparse.Namespace, train_cfg: TrainConfig, out: str | Path,
                      runtime: Runtime | None = None, verbose: bool = True) -> Trainer | None:
    """The LoRATrainer / ESFTTrainer the flags ask for, or None (no --lora-* / --esft flag: a plain run).
    With --resume and OUT/peft.json, the saved method and settings are used (differing flags are refused)."""
    lora, esft = _asked(args)
    saved = json.loads((Path(out) / PEFT_FILE).read_text()) if getattr(args, "resume", False) and \
        (Path(out) / PEFT_FILE).is_file() else None
    if not (lora or esft or saved):
        return None
    if lora and esft:
        raise ValueError("--lora-* and --esft are exclusive: choose one fine-tuning method")
    init_from = getattr(args, "init_from", None) or (saved or {}).get("init_from")
    if not init_from:
        raise ValueError("--lora-* / --esft need --init-from RUN (the trained base run folder)")
    if saved is not None:
        want = "lora" if lora else "esft" if esft else saved["method"]
        if want != saved["method"]:
            raise ValueError(f"--resume keeps the run's method: {out}/{PEFT_FILE} says {saved['method']!r}")
        if saved["method"] == "lora":
            cfg = LoRAConfig.from_dict(saved["lora"])
            if lora and _lora_config(args) != cfg:
                raise ValueError(f"--resume keeps the run's LoRA config ({out}/{PEFT_FILE}); drop the --lora-* flags")
            return LoRATrainer(saved["init_from"], cfg, train_cfg, out, runtime=runtime, verbose=verbose)
        ecfg = es.ESFTConfig(**saved["esft"])
        experts = {int(k): v for k, v in saved["experts"].items()}
        return ESFTTrainer(saved["init_from"], ecfg, train_cfg, out, experts=experts, runtime=runtime,
                           verbose=verbose)
    if lora:
        return LoRATrainer(init_from, _lora_config(args), train_cfg, out, runtime=runtime, verbose=verbose)
    return ESFTTrainer(init_from, _esft_config(args), train_cfg, out, runtime=runtime, verbose=verbose)


def lora_experts_per_token(model: nn.Module) -> float | None:
    """Mean LoRA experts (mixlora) or ranks (smora, flylora) per token in the last forward, over the adapted
    linears; None for dense variants."""
    st = [s for s in (m.stats() for m in lora_modules(model).values()) if s is not None]
    return sum(float(s.experts_per_token) for s in st) / len(st) if st else None


# ---------------------------------------------------------------- claims for `moelab compare`
# In compare's Claim / Check shape (moelab.compare_claims). Not in compare's CLAIMS yet: each arm has two stages,
# a base run (`init.*`: trained on one domain) and the arm's step on it (`peft.*` or `compress.*`) on the whole
# corpus, which compare's runner (one Trainer per arm) does not do; `train.*` keys are the adaptation run's.
# "match:esft_token" = the rank whose trainable parameters equal the esft_token arm's. Metric names follow
# compare.validation_metrics (val_loss, specialization, experts_per_token) plus trainable_params and
# lora_specialization (JS of the LoRA experts by domain, benchmarks/bench_peft.py).
PEFT_CLAIMS: dict[str, Claim] = {
    "peft_moe": Claim(
        title="Adapting an MoE to new domains: a mixture of LoRA experts vs one LoRA vs ESFT at equal trainable "
              "parameters",
        source="MixLoRA, arXiv 2404.15159 (mixture beats one LoRA of equal trainable parameters); ESFT, arXiv "
               "2407.01906 (tuning the top-p relevant experts matches full fine-tuning and beats LoRA)",
        matching="Base: the preset trained on one domain (init.domain); every arm adapts it on all domains for "
                 "the same steps, seed and data. ESFT-Token p=0.2 sets the budget: its trainable parameters "
                 "(chosen experts x expert size) fix the rank of the single LoRA (targets=all) and of the "
                 "mixture (E=4, top-2, router counted), equal to within one rank step. ESFT-Gate p=0.1 at its "
                 "own count.",
        base={"init.domain": "c", "init.steps": 300, "train.steps": 150, "train.lr": 3e-3,
              "train.weight_decay": 0.0},
        arms={"base": {"peft.method": "none"},
              "lora": {"peft.method": "lora", "peft.lora_variant": "lora", "peft.lora_targets": "all",
                       "peft.lora_rank": "match:esft_token"},
              "mixlora": {"peft.method": "lora", "peft.lora_variant": "mixlora", "peft.lora_experts": 4,
                          "peft.lora_top_k": 2, "peft.lora_targets": "all", "peft.lora_rank": "match:esft_token"},
              "esft_token": {"peft.method": "esft", "peft.esft_score": "token", "peft.esft_top_p": 0.2},
              "esft_gate": {"peft.method": "esft", "peft.esft_score": "gate", "peft.esft_top_p": 0.1}},
        metrics=("val_loss", "trainable_params", "experts_per_token", "specialization", "lora_specialization"),
        by_domain="val_loss",
        tests=(Check("a mixture of LoRA experts beats one LoRA of equal trainable parameters (MixLoRA)", "mixlora",
                     "lora", "val_loss"),
               Check("ESFT beats LoRA at equal trainable parameters (ESFT)", "esft_token", "lora", "val_loss"),
               Check("a mixture of LoRA experts is at least as good as ESFT at equal trainable parameters",
                     "mixlora", "esft_token", "val_loss", kind="noninferior", margin=MARGIN),
               Check("adaptation helps: one LoRA beats the base on the new domains", "lora", "base", "val_loss"))),
    "merge_experts": Claim(
        title="MC-SMoE merging keeps more quality than random merging at the same expert count",
        source="MC-SMoE, arXiv 2310.01334 (routing-policy grouping + neuron alignment + usage-weighted merge "
               "beats random / naive merging at half the experts)",
        matching="Same trained base and calibration batches (8 training batches), half the experts per MoE "
                 "layer in both arms, same recovery fine-tune (50 steps, lr 1e-3).",
        base={"init.steps": 300, "compress.merge_to": 0.5, "compress.calib_batches": 8,
              "compress.recover_steps": 50},
        arms={"mc_smoe": {"compress.method": "merge", "compress.by": "routing_similarity"},
              "random": {"compress.method": "merge", "compress.by": "random"}},
        metrics=("val_loss", "val_loss_before_recovery", "expert_params"),
        by_domain="val_loss",
        tests=(Check("MC-SMoE merging beats random merging after recovery", "mc_smoe", "random", "val_loss"),
               Check("MC-SMoE merging beats random merging before recovery", "mc_smoe", "random",
                     "val_loss_before_recovery"))),
}
