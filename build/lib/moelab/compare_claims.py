"""Claims of the MoE literature as data for `moelab compare`: each claim = arms (dotted config overrides),
the metrics shown, and tests (arm vs baseline on a deciding metric, expected direction, kind of claim).

Overrides use dotted keys: "moe.<MoEConfig field>", "model.<ModelConfig field>", "train.<TrainConfig field>".
A value `Rel(times, plus)` is relative to the resolved base config (e.g. fine-grained experts: d_expert / 4).
Adding a claim = adding a CLAIMS entry; compare.py runs them, compare_stats.py judges them.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rel:
    """An override relative to the base config: round(base * times) + plus."""
    times: float = 1.0  # multiplies the base value
    plus: int = 0       # then added

    def __str__(self) -> str:
        s = f"base*{self.times:g}"
        return s + (f"{self.plus:+d}" if self.plus else "")


@dataclass(frozen=True)
class Check:
    """One verdict: `arm` vs `baseline` on `metric`, read by compare_stats.verdict."""
    paper: str                 # what the paper claims, one line
    arm: str                   # arm under test
    baseline: str              # arm it is compared to (same seeds)
    metric: str                # deciding metric (a key of the arm results)
    kind: str = "better"       # better | noninferior | not_better | ratio_at_least (compare_stats.KINDS)
    lower_is_better: bool = True  # direction of the metric
    margin: float = 0.0        # noninferior / not_better margin, or the ratio threshold


@dataclass(frozen=True)
class Claim:
    """A claim: arms (config overrides on top of `base`), metrics shown, tests deciding the verdict."""
    title: str                            # one line
    source: str                           # paper(s) with arXiv ids and the number quoted
    matching: str                         # how arms are matched (params, experts/token, FLOPs) and stated choices
    arms: dict[str, dict]                 # arm name -> dotted overrides
    tests: tuple[Check, ...]               # verdict lines
    metrics: tuple[str, ...] = ("val_loss", "max_vio_batch", "max_vio_global", "dead_experts")  # table columns
    base: dict = field(default_factory=dict)   # overrides shared by every arm of the claim
    target_arm: str | None = None         # steps_to_target: smoothed train loss reaching this arm's final level
    by_domain: str | None = None          # a per-domain metric to tabulate (e.g. experts_per_token)


MARGIN = 0.01  # nats/byte: non-inferiority margin of 'equal or better' claims

# Scale of the default run (the `tiny` preset cut to 2 layers, 16 x 64-byte sequences); --preset drops it.
DEFAULT_PRESET = "tiny"
DEFAULT_SCALE = {"model.n_layers": 2, "train.batch_size": 16, "train.seq_len": 64, "train.warmup": 20}
DEFAULT_STEPS = 300

TOPK = {"moe.router": "topk", "moe.balance": "aux"}  # the learned baseline: softmax top-k, Switch aux 1e-2
SIG = {"moe.router": "sigmoid_group", "moe.n_group": 1, "moe.topk_group": 1}
ACCUM = {"train.grad_accum": 4, "train.batch_size": Rel(0.25)}  # same tokens per step in 4 micro-batches

CLAIMS: dict[str, Claim] = {
    "balance": Claim(
        title="Loss-free balancing beats auxiliary-loss balancing on both loss and balance",
        source="Wang et al. 2024, arXiv 2408.15664, Table 2 (1B): aux loss MaxVio_global 0.72 at ppl 9.56 vs "
               "loss-free 0.04 at 9.50",
        matching="Same model; only the balancing differs. Gate: sigmoid (as the paper's main runs, DeepSeek-V3 "
                 "style, one group) for every arm, plus loss-free with a softmax gate as a second arm. Aux "
                 "coefficient alpha = 1e-3 for aux/seq/global; loss-free bias rate u = 1e-3. global_lbl runs 4 "
                 "micro-batches of 4 sequences (same tokens per step) so the global batch differs from the "
                 "micro-batch.",
        base={**SIG, "moe.aux_loss_coef": 1e-3},
        arms={"none": {"moe.balance": "none"}, "switch_aux": {"moe.balance": "aux"},
              "seq_aux": {"moe.balance": "seq"}, "global_lbl": {"moe.balance": "global", **ACCUM},
              "loss_free": {"moe.balance": "loss_free"},
              "loss_free_softmax": {"moe.balance": "loss_free", "moe.router": "topk"}},
        tests=(Check("loss-free balances better than the aux loss (MaxVio_global 0.04 vs 0.72)", "loss_free",
                    "switch_aux", "max_vio_global"),
               Check("loss-free reaches lower loss than the aux loss (ppl 9.50 vs 9.56)", "loss_free",
                    "switch_aux", "val_loss"),
               Check("any balancing beats none on MaxVio_global", "switch_aux", "none", "max_vio_global"))),
    "global_batch": Claim(
        title="Global-batch load-balancing loss beats the micro-batch one",
        source="Qiu et al. 2025, arXiv 2501.11873: global-batch LBL lowers perplexity and raises domain "
               "specialization",
        matching="Softmax top-k, Switch aux 1e-2, gradient accumulation over 4 micro-batches of 4 sequences; "
                 "micro: f from each micro-batch; global: f from the counts summed over the micro-batches of the "
                 "step so far. Specialization = JS divergence (bits) of each domain's expert distribution from "
                 "the global one, mean over layers and domains (moelab.analysis.js_divergence).",
        base={**TOPK, **ACCUM},
        arms={"micro_lbl": {"moe.balance": "aux"}, "global_lbl": {"moe.balance": "global"}},
        metrics=("val_loss", "specialization", "max_vio_batch", "max_vio_global"),
        tests=(Check("global-batch LBL lowers the loss", "global_lbl", "micro_lbl", "val_loss"),
               Check("global-batch LBL raises domain specialization", "global_lbl", "micro_lbl", "specialization",
                    lower_is_better=False))),
    "expert_choice": Claim(
        title="Expert choice converges > 2x faster than top-k (Zhou); no better than dropless top-k (OLMoE)",
        source="Zhou et al. 2022, arXiv 2202.09368 (> 2x faster convergence); OLMoE, arXiv 2409.02060 (expert "
               "choice no better than dropless token choice)",
        matching="Capacity factor 2 -> on average 2 experts per token = top-2; expert choice without aux loss. "
                 "Validated both ways: val_loss with the causal top-k fallback (ec_eval=topk) and val_loss_native "
                 "with training-time expert choice over each validation batch. Convergence: steps until the "
                 "smoothed train loss reaches top-k's final level (note: expert choice's train loss is taken "
                 "under non-causal routing).",
        base=TOPK,
        arms={"topk": {}, "expert_choice": {"moe.router": "expert_choice", "moe.balance": "none"}},
        metrics=("val_loss", "val_loss_native", "steps_to_target", "experts_per_token", "max_vio_batch"),
        target_arm="topk",
        tests=(Check("expert choice reaches top-k's loss > 2x faster (Zhou)", "expert_choice", "topk",
                    "steps_to_target", kind="ratio_at_least", margin=2.0),
               Check("expert choice is no better than dropless top-k (OLMoE), causal fallback", "expert_choice",
                    "topk", "val_loss", kind="not_better", margin=MARGIN),
               Check("expert choice is no better than dropless top-k (OLMoE), expert-choice eval", "expert_choice",
                    "topk", "val_loss_native", kind="not_better", margin=MARGIN))),
    "top_p": Claim(
        title="Top-p routing activates fewer experts than top-2 at equal or better loss",
        source="Huang et al. 2024, arXiv 2403.07652 (p = 0.4; < 2 experts per token on average)",
        matching="Top-p cannot fix the active parameters: it is matched on mean experts per token (reported); "
                 "p = 0.4 and entropy-loss weight 1e-4 as in the paper, Switch aux 1e-2 on both.",
        base=TOPK,
        arms={"top2": {}, "top_p": {"moe.router": "top_p", "moe.top_p": 0.4}},
        metrics=("val_loss", "experts_per_token", "max_vio_global"),
        by_domain="experts_per_token",
        tests=(Check("top-p activates fewer experts per token", "top_p", "top2", "experts_per_token"),
               Check("top-p has equal or better loss", "top_p", "top2", "val_loss", kind="noninferior",
                    margin=MARGIN))),
    "null_experts": Claim(
        title="Null / zero-computation experts cut FLOPs at equal or better loss",
        source="AdaMoE, arXiv 2406.13233 (-14.5% FLOPs at better accuracy); MoE++, arXiv 2410.07348 (zero / copy "
               "/ constant experts)",
        matching="Matched on FLOPs, not parameters: the null/zero experts are extra router outputs that compute "
                 "nothing, top-2 over all outputs, Switch aux 1e-2 over all outputs (tau = 1). AdaMoE: 2 null "
                 "experts; MoE++: 1 zero, 1 copy, 2 constant experts + gating residual. expert_mflops = routed "
                 "(+ shared) expert FLOPs per token, all MoE layers.",
        base=TOPK,
        arms={"top2": {}, "adamoe": {"moe.router": "adamoe", "moe.n_null": 2},
              "moepp": {"moe.router": "moepp", "moe.n_zero": 1, "moe.n_copy": 1, "moe.n_const": 2,
                        "moe.gating_residual": True}},
        metrics=("val_loss", "expert_mflops", "experts_per_token", "max_vio_global"),
        tests=(Check("AdaMoE uses fewer expert FLOPs", "adamoe", "top2", "expert_mflops"),
               Check("AdaMoE has equal or better loss", "adamoe", "top2", "val_loss", kind="noninferior",
                    margin=MARGIN),
               Check("MoE++ uses fewer expert FLOPs", "moepp", "top2", "expert_mflops"),
               Check("MoE++ has equal or better loss", "moepp", "top2", "val_loss", kind="noninferior",
                    margin=MARGIN))),
    "relu": Claim(
        title="ReLU routing (ReMoE) beats top-k at matched active experts",
        source="Wang et al. 2024, ReMoE, arXiv 2412.14711",
        matching="ReLU gates with the adaptive L1 penalty steering sparsity to 1 - k/E, i.e. about k = 2 experts "
                 "per token on average (reported as experts_per_token). Switch aux 1e-2 on both.",
        base=TOPK,
        arms={"topk": {}, "relu": {"moe.router": "relu"}},
        metrics=("val_loss", "experts_per_token", "max_vio_global", "dead_experts"),
        tests=(Check("ReLU routing reaches lower loss than top-k", "relu", "topk", "val_loss"),)),
    "granularity": Claim(
        title="Fine-grained + shared experts beat coarse experts at equal active parameters",
        source="DeepSeekMoE, arXiv 2401.06066",
        matching="Equal total and active expert parameters: coarse E experts of width F, top-k; fine 4E experts "
                 "of F/4, top-4k; fine+shared 4E-1 routed + 1 shared of F/4, top-(4k-1). Switch aux 1e-2.",
        base=TOPK,
        arms={"coarse": {},
              "fine": {"moe.n_experts": Rel(4), "moe.top_k": Rel(4), "moe.d_expert": Rel(0.25)},
              "fine_shared": {"moe.n_experts": Rel(4, -1), "moe.top_k": Rel(4, -1), "moe.d_expert": Rel(0.25),
                              "moe.n_shared": 1}},
        metrics=("val_loss", "active_params", "params", "max_vio_global"),
        tests=(Check("fine-grained + shared beats coarse", "fine_shared", "coarse", "val_loss"),
               Check("fine-grained beats coarse", "fine", "coarse", "val_loss"))),
    "controls": Claim(
        title="Learned routers beat hash and random routing",
        source="Roller et al. 2021, arXiv 2106.04426 (hash layers; random routing as a control)",
        matching="Random routing at top-2 vs learned top-2; hash routing is top-1, so it faces a learned top-1 "
                 "(equal active parameters); learned top-1 keeps the raw softmax weight as Switch does (renormalising one "
                 "weight to 1 would cut the router off from the LM gradient). Controls have no balance loss.",
        base=TOPK,
        arms={"top2": {}, "random2": {"moe.router": "random", "moe.balance": "none"},
              "top1": {"moe.top_k": 1, "moe.renormalize": False}, "hash1": {"moe.router": "hash", "moe.balance": "none", "moe.top_k": 1}},
        metrics=("val_loss", "max_vio_global", "dead_experts"),
        tests=(Check("learned top-2 beats random top-2", "top2", "random2", "val_loss"),
               Check("learned top-1 beats hash top-1", "top1", "hash1", "val_loss"))),
}
