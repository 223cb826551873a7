"""Shared pieces of the LoRA / ESFT tests: a fast synthetic two-domain corpus, a tiny MoE (dense layer 0, MoE layer 1
with a shared expert), a short train config, and a trained base run."""
import torch

from moelab.config import ModelConfig, MoEConfig, TrainConfig
from moelab.data import Corpus
from moelab.train import Trainer


def synthetic_corpus() -> Corpus:
    """Two domains with different byte statistics (fast; no file reading)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(97, 101, (3000,), generator=g).short()     # 'a'..'d'
    b = torch.randint(48, 58, (3000,), generator=g).short()      # digits
    return Corpus(["a", "b"], {"a": a[:2500], "b": b[:2500]}, {"a": a[2500:], "b": b[2500:]},
                  {"a": (1, 1), "b": (1, 1)})


def model_cfg(**moe) -> ModelConfig:
    """Dense layer 0, MoE layer 1 (4 experts top-2, one shared expert); `moe` overrides MoEConfig fields."""
    moe_cfg = MoEConfig(**{"d_model": 32, "d_expert": 16, "n_experts": 4, "top_k": 2, "n_shared": 1, **moe})
    return ModelConfig(moe=moe_cfg, d_model=32, n_layers=2, n_heads=2, d_dense=32, first_dense=1, max_seq_len=32)


def tcfg(**kw) -> TrainConfig:
    base = {"steps": 4, "batch_size": 2, "seq_len": 16, "warmup": 1, "eval_every": 0, "ckpt_every": 0,
            "eval_batches": 1, "log_every": 1000, "lr": 1e-2}
    return TrainConfig(**{**base, **kw})


def train_base(out, cfg: ModelConfig, corpus: Corpus):
    """A base run trained 6 steps into `out` (seed 0)."""
    torch.manual_seed(0)
    Trainer(cfg, tcfg(steps=6), out, corpus=corpus, verbose=False).fit()
    return out
