"""Frozen, validated configs. Every bad value raises ValueError naming the field and what is allowed."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

ACTIVATIONS = ("swiglu", "gelu")
SCORE_ORDERS = ("softmax_topk", "topk_softmax")
BALANCES = ("aux", "seq", "global", "loss_free", "none")
EXPERT_IMPLS = ("grouped", "loop", "grouped_mm", "padded", "sparse", "fused")  # experts.IMPLS: grouped = auto
# keys of routers.ROUTERS (routers.py checks they agree; listed here so validation needs no import of it)
ROUTER_NAMES = ("topk", "sigmoid_group", "expert_choice", "top_p", "relu", "hash", "random", "base", "adamoe", "moepp")


def replace_fields(cfg, changes: dict):
    """A copy of the frozen dataclass `cfg` with `changes` (validated again); unknown names raise a clear error."""
    names = {f.name for f in fields(cfg)}
    bad = sorted(set(changes) - names)
    if bad:
        raise ValueError(f"unknown {type(cfg).__name__} field(s) {bad}: allowed {sorted(names)}")
    return type(cfg)(**{**{n: getattr(cfg, n) for n in names}, **changes})


def _need(ok: bool, name: str, value, allowed: str, cls: str = "MoEConfig") -> None:
    if not ok:
        raise ValueError(f"{cls}.{name}={value!r} is invalid: allowed {allowed}")


def _need_model(ok: bool, name: str, value, allowed: str) -> None:
    _need(ok, name, value, allowed, "ModelConfig")


def _choice(field: str, value, choices) -> None:
    _need(value in choices, field, value, "one of " + ", ".join(map(str, choices)))


@dataclass(frozen=True)
class MoEConfig:
    d_model: int = 256                # D, width of the residual stream
    d_expert: int = 512               # F, hidden size of one routed expert
    n_experts: int = 8                # E, routed experts
    top_k: int = 2                    # K, experts per token (routers with a fixed k)
    n_shared: int = 0                 # always-on shared experts (DeepSeekMoE), fused into one MLP
    d_shared: int | None = None       # hidden size of one shared expert; None = d_expert
    activation: str = "swiglu"        # expert MLP: swiglu | gelu
    router: str = "topk"              # key of routers.ROUTERS
    score_order: str = "softmax_topk"  # topk router: softmax then top-k (Qwen/OLMoE) | top-k logits then softmax (Mixtral)
    renormalize: bool = True          # topk router: renormalise the k weights to sum to 1
    n_group: int = 1                  # sigmoid_group: expert groups
    topk_group: int = 1               # sigmoid_group: groups kept per token
    routed_scaling_factor: float = 1.0  # multiplies routed weights (DeepSeek-V3 uses 2.5)
    jitter_eps: float = 0.0           # Switch input jitter: x *= U(1-eps, 1+eps) in training; 0 = off
    capacity_factor: float | None = None  # None = dropless; else per-expert capacity = ceil(cf * T*K / E)
    balance: str = "aux"              # aux (Switch) | seq (DeepSeek-V3) | global (global-batch) | loss_free | none
    aux_loss_coef: float = 1e-2       # weight of the balance loss chosen by `balance`
    z_loss_coef: float = 0.0          # weight of the router z-loss (ST-MoE); 0 = off
    bias_update_rate: float = 1e-3    # loss_free: u in b_i += u * sign(mean_load - load_i)
    expert_impl: str = "grouped"      # grouped (auto) | fused | loop (reference) | grouped_mm | padded | sparse
    ec_capacity_factor: float = 2.0   # expert_choice: each expert takes C = ceil(T * this / E) tokens
    ec_eval: str = "topk"             # expert_choice outside training: topk (causal fallback) | expert_choice
    top_p: float = 0.4                # top_p: keep the smallest set of experts whose probability sum >= top_p
    top_p_entropy_coef: float = 1e-4  # top_p: weight of the routing-entropy loss
    n_null: int = 0                   # AdaMoE null experts: extra router outputs that compute nothing
    n_zero: int = 0                   # MoE++ zero experts: output 0
    n_copy: int = 0                   # MoE++ copy experts: output x
    n_const: int = 0                  # MoE++ constant experts: a1*x + a2*v, [a1, a2] = softmax(x W_c), learned v
    special_tau: float = 1.0          # aux weight of null/zero/copy/const routes (MoE++ tau); 1 = plain Switch over all
    gating_residual: bool = False     # MoE++ gating residual: logits += W_g(previous layer's logits)
    relu_l1_init: float = 1e-8        # relu (ReMoE): initial coefficient lambda_0 of the L1 gate penalty
    relu_l1_rate: float = 1.2         # relu: lambda *= rate (or /= rate) each training step toward sparsity 1-k/E
    sinkhorn_iters: int = 8           # base: Sinkhorn iterations of the balanced assignment (training only)
    router_seed: int = 0              # hash / random: seed of the fixed hash

    def __post_init__(self) -> None:
        for f in ("d_model", "d_expert", "n_experts", "top_k", "n_group", "topk_group"):
            v = getattr(self, f)
            _need(isinstance(v, int) and v >= 1, f, v, "an integer >= 1")
        _need(isinstance(self.n_shared, int) and self.n_shared >= 0, "n_shared", self.n_shared, "an integer >= 0")
        _need(self.d_shared is None or (isinstance(self.d_shared, int) and self.d_shared >= 1),
              "d_shared", self.d_shared, "None or an integer >= 1")
        for f in ("n_null", "n_zero", "n_copy", "n_const", "router_seed"):
            _need(isinstance(getattr(self, f), int) and getattr(self, f) >= 0, f, getattr(self, f), "an integer >= 0")
        _need(self.top_k <= self.n_experts + self.n_special, "top_k", self.top_k,
              f"1..n_experts + special experts = {self.n_experts + self.n_special}")
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("score_order", self.score_order, SCORE_ORDERS)
        _choice("balance", self.balance, BALANCES)
        _choice("expert_impl", self.expert_impl, EXPERT_IMPLS)
        _choice("router", self.router, sorted(ROUTER_NAMES))
        _need(self.n_experts % self.n_group == 0, "n_group", self.n_group,
              f"a divisor of n_experts={self.n_experts}")
        _need(self.topk_group <= self.n_group, "topk_group", self.topk_group, f"1..n_group={self.n_group}")
        if self.router == "sigmoid_group":
            per_group = self.n_experts // self.n_group
            _need(per_group >= 2 or self.n_group == 1, "n_group", self.n_group,
                  "a value leaving >= 2 experts per group (groups are ranked by their top-2 scores)")
            _need(self.top_k <= self.topk_group * per_group, "top_k", self.top_k,
                  f"<= topk_group * experts per group = {self.topk_group * per_group}")
        _need(self.routed_scaling_factor > 0, "routed_scaling_factor", self.routed_scaling_factor, "> 0")
        _need(0.0 <= self.jitter_eps < 1.0, "jitter_eps", self.jitter_eps, "0 <= jitter_eps < 1")
        _need(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
              self.capacity_factor, "None (dropless) or > 0")
        for f in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            _need(getattr(self, f) >= 0, f, getattr(self, f), ">= 0")
        self._check_extra_routers()

    def _check_extra_routers(self) -> None:
        """Fields of expert_choice, top_p, relu, hash, base, random and the special experts."""
        _choice("ec_eval", self.ec_eval, ("topk", "expert_choice"))
        _need(self.ec_capacity_factor > 0, "ec_capacity_factor", self.ec_capacity_factor, "> 0")
        _need(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "0 < top_p <= 1")
        for f in ("top_p_entropy_coef", "relu_l1_init", "special_tau"):
            _need(getattr(self, f) >= 0, f, getattr(self, f), ">= 0")
        _need(self.relu_l1_rate > 1.0, "relu_l1_rate", self.relu_l1_rate, "> 1")
        _need(isinstance(self.sinkhorn_iters, int) and self.sinkhorn_iters >= 1, "sinkhorn_iters",
              self.sinkhorn_iters, "an integer >= 1")
        if self.router == "adamoe":
            _need(self.n_null >= 1, "n_null", self.n_null, ">= 1 with router='adamoe' (its null experts)")
        if self.router == "moepp":
            _need(self.n_zero + self.n_copy + self.n_const >= 1, "n_zero", self.n_zero,
                  "n_zero + n_copy + n_const >= 1 with router='moepp' (its zero-computation experts)")
        if self.n_special:
            _need(self.balance in ("aux", "loss_free", "none"), "balance", self.balance,
                  "aux, loss_free or none when null/zero/copy/const experts are used")
            _need(self.n_group == 1, "n_group", self.n_group, "1 when null/zero/copy/const experts are used")
        if self.balance == "loss_free":
            _need(self.router in ("topk", "sigmoid_group", "top_p", "adamoe", "moepp"), "balance", self.balance,
                  "not loss_free with router expert_choice/relu/hash/base/random (a per-expert bias does not "
                  "change what they select)")

    @property
    def n_special(self) -> int:
        """Null + zero + copy + constant experts: extra router outputs after the E routed experts."""
        return self.n_null + self.n_zero + self.n_copy + self.n_const

    @property
    def d_shared_total(self) -> int:
        """Hidden width of the fused shared-expert MLP (0 when there are none)."""
        return self.n_shared * (self.d_shared or self.d_expert)

    def replace(self, **changes) -> MoEConfig:
        return replace_fields(self, changes)


N_BYTES = 256    # byte values; ids 256.. are PAD, BOS, EOS (model.py)
VOCAB_SIZE = 259


@dataclass(frozen=True)
class ModelConfig:
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(d_model=128, d_expert=128))  # MoE FFN; d_model = ours
    d_model: int = 128             # D, residual width
    n_layers: int = 4              # transformer blocks
    n_heads: int = 4               # attention heads (head dim = d_model / n_heads)
    d_dense: int = 256             # hidden size of the dense SwiGLU FFN (dense layers only)
    first_dense: int = 0           # the first m layers use a dense FFN (DeepSeek style)
    moe_every: int = 1             # after those, every n-th layer is MoE (1 = all)
    max_seq_len: int = 256         # longest context (RoPE table size)
    vocab_size: int = VOCAB_SIZE   # V: 256 bytes + PAD, BOS, EOS
    rope_theta: float = 10000.0    # RoPE base
    norm_eps: float = 1e-5         # RMSNorm epsilon
    tie_embeddings: bool = True    # output projection shares the token embedding
    n_kv_heads: int | None = None  # key/value heads, shared by n_heads / n_kv_heads query heads (GQA); None = n_heads
    head_dim: int | None = None    # width of one attention head; None = d_model / n_heads
    qk_norm: bool = False          # RMSNorm over each head's query and key before RoPE (Qwen3, GLM4-MoE)
    rope_fraction: float = 1.0     # share of each head's dims RoPE rotates (the first ones; GLM4-MoE: 0.5)
    qkv_bias: bool = False         # biases on the query, key and value projections (Qwen2, GLM4-MoE)
    sliding_window: int | None = None  # a token attends to itself and the window-1 before it; None = all
    tokenizer: str = "bytes"       # ids: "bytes" (UTF-8 bytes + PAD/BOS/EOS) or a transformers tokenizer folder (relative to the run)

    def __post_init__(self) -> None:
        for f in ("d_model", "n_layers", "n_heads", "d_dense", "max_seq_len", "moe_every"):
            _need_model(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, f, getattr(self, f),
                  "an integer >= 1")
        _need_model(isinstance(self.first_dense, int) and 0 <= self.first_dense <= self.n_layers, "first_dense",
              self.first_dense, f"0..n_layers={self.n_layers}")
        if self.head_dim is None:
            _need_model(self.d_model % self.n_heads == 0 and (self.d_model // self.n_heads) % 2 == 0, "n_heads",
                        self.n_heads, f"a divisor of d_model={self.d_model} leaving an even head dim")
        else:
            _need_model(isinstance(self.head_dim, int) and self.head_dim >= 2 and self.head_dim % 2 == 0,
                        "head_dim", self.head_dim, "None or an even integer >= 2")
        _need_model(self.n_kv_heads is None or (isinstance(self.n_kv_heads, int) and self.n_kv_heads >= 1
                                                and self.n_heads % self.n_kv_heads == 0),
                    "n_kv_heads", self.n_kv_heads, f"None or a divisor of n_heads={self.n_heads}")
        rot = int(self.d_head * self.rope_fraction)
        _need_model(0 < self.rope_fraction <= 1 and rot >= 2 and rot % 2 == 0, "rope_fraction", self.rope_fraction,
                    f"0 < rope_fraction <= 1 with int(head dim {self.d_head} * rope_fraction) even and >= 2")
        _need_model(isinstance(self.tokenizer, str) and self.tokenizer != "", "tokenizer", self.tokenizer,
                    "'bytes' or a transformers tokenizer folder")
        _need_model(self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window >= 1),
                    "sliding_window", self.sliding_window, "None or an integer >= 1")
        _need_model(self.vocab_size >= VOCAB_SIZE, "vocab_size", self.vocab_size, f">= {VOCAB_SIZE}")
        _need_model(self.moe.d_model == self.d_model, "moe.d_model", self.moe.d_model, f"d_model={self.d_model}")

    @property
    def d_head(self) -> int:
        """Width of one attention head (head_dim, or d_model / n_heads)."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_kv_heads, or n_heads)."""
        return self.n_kv_heads or self.n_heads

    @property
    def d_rope(self) -> int:
        """Dims of each head that RoPE rotates."""
        return int(self.d_head * self.rope_fraction)

    def is_moe(self, layer: int) -> bool:
        """Layer `layer` (0-based) has an MoE FFN."""
        return layer >= self.first_dense and (layer - self.first_dense) % self.moe_every == 0

    @property
    def moe_layer_ids(self) -> list[int]:
        """Indices of the blocks with an MoE FFN."""
        return [i for i in range(self.n_layers) if self.is_moe(i)]

    def replace(self, **changes) -> ModelConfig:
        return replace_fields(self, changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**{**d, "moe": MoEConfig(**d["moe"])})


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600                 # optimizer steps
    batch_size: int = 16             # sequences per micro-batch
    seq_len: int = 128               # tokens (bytes) per sequence
    grad_accum: int = 1              # micro-batches per optimizer step
    lr: float = 3e-3                 # peak learning rate
    min_lr_ratio: float = 0.1        # cosine floor as a fraction of lr
    warmup: int = 30                 # linear warm-up steps
    weight_decay: float = 0.1        # AdamW decay on matrices (not on norms/biases/router bias)
    beta1: float = 0.9               # AdamW beta1
    beta2: float = 0.95              # AdamW beta2
    grad_clip: float = 1.0           # max global grad norm; 0 = off
    seed: int = 0                    # seeds model init and data sampling
    log_every: int = 20              # print a line every n steps (metrics.jsonl gets every step)
    eval_every: int = 200            # validation every n steps (and at the end); 0 = end only
    eval_batches: int = 4            # validation micro-batches per domain
    ckpt_every: int = 200            # checkpoint every n steps (and at the end); 0 = end only
    keep_last: int = 2               # checkpoints kept on disk
    val_fraction: float = 0.1        # share of files held out for validation
    split_version: int = 2           # train/validation split rule: 2 = by content hash, 1 = by file name (old runs)
    data: tuple[str, ...] = ("builtin",)  # "builtin" or the user's text files / folders
    compile: bool = False            # torch.compile the model (inductor): ~5% faster steps on CPU after ~10 s compiling

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_batches", "keep_last"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 1):
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)!r} is invalid: allowed an integer >= 1")
        for f in ("warmup", "eval_every", "ckpt_every", "seed"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 0):
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)!r} is invalid: allowed an integer >= 0")
        for f in ("lr", "weight_decay", "grad_clip"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"TrainConfig.{f}={getattr(self, f)!r} is invalid: allowed >= 0")
        if self.split_version not in (1, 2):
            raise ValueError(f"TrainConfig.split_version={self.split_version!r} is invalid: allowed 1 or 2")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio={self.min_lr_ratio} is invalid: allowed 0..1")

    def replace(self, **changes) -> TrainConfig:
        return replace_fields(self, changes)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of asdict (JSON turns the data tuple into a list)."""
        return cls(**{"split_version": 1, **d, "data": tuple(d["data"])})  # runs from before it: split 1
