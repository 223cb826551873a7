"""Fine-tuning a local transformers MoE model with moelab's experts backend and balancing (`moelab finetune`):
the same metrics.jsonl rows and plots as `moelab train`, the result saved with save_pretrained (safetensors).

B=sequences, S=positions, T=tokens, L=MoE blocks, E=routed experts.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moelab.data import builtin_documents, document_text, load_documents, split_documents


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 100                 # optimizer steps
    batch_size: int = 8              # sequences per step
    seq_len: int = 128               # tokens per sequence
    lr: float = 1e-4                 # AdamW learning rate (constant after warmup)
    warmup: int = 0                  # linear warmup steps
    weight_decay: float = 0.0        # AdamW weight decay
    grad_clip: float = 1.0           # global grad-norm clip (0 = off)
    balance: str = "loss_free"       # loss_free | global | aux | none (moelab.hf_balance)
    rate: float = 1e-3               # loss-free bias update rate
    aux_coef: float = 1e-2           # weight of the per-layer Switch / global-batch loss
    experts_impl: str = "moelab"     # transformers experts_implementation for the run
    max_tokens: int = 1 << 20        # text tokenized per domain, at most
    val_fraction: float = 0.1        # share of each domain held out (moelab.data split rule)
    eval_batches: int = 4            # validation batches per domain at the end
    log_every: int = 10              # print a line every this many steps
    seed: int = 0                    # data order and init of anything random

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "max_tokens", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: allowed >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} is invalid: allowed 0 < val_fraction < 1")


def token_streams(tok, docs, cfg: FinetuneConfig) -> tuple[list[str], dict[str, Tensor], dict[str, Tensor]]:
    """(domains, train ids, validation ids) per domain: each domain's documents split by moelab.data's rule,
    tokenized (no special tokens) up to max_tokens."""
    domains = sorted({d.domain for d in docs})
    train, val = {}, {}
    for dom in domains:
        tr, va = split_documents([d for d in docs if d.domain == dom], cfg.val_fraction, 2)
        for part, out, cap in ((tr, train, cfg.max_tokens), (va, val, max(cfg.max_tokens // 8, 4 * cfg.seq_len))):
            ids: list[int] = []
            for d in part:
                if len(ids) >= cap:
                    break
                ids += tok(document_text(d.data), add_special_tokens=False)["input_ids"]
            out[dom] = torch.tensor(ids[:cap], dtype=torch.long)
    short = [d for d in domains if train[d].numel() <= cfg.seq_len + 1]
    if short:
        raise ValueError(f"--data: domain(s) {', '.join(short)} tokenize to <= seq_len={cfg.seq_len} training "
                         f"tokens: give more text or a smaller --seq-len")
    return domains, train, val


def sample_batch(streams: dict[str, Tensor], B: int, S: int, gen: torch.Generator) -> Tensor:
    """B windows of S+1 tokens, domains round-robin, random offsets -> (B, S+1) long."""
    doms = [d for d in sorted(streams) if streams[d].numel() > S + 1]
    rows = []
    for b in range(B):
        s = streams[doms[b % len(doms)]]
        i = int(torch.randint(0, s.numel() - S - 1, (1,), generator=gen))
        rows.append(s[i: i + S + 1])
    return torch.stack(rows)


def _lm_loss(model: nn.Module, ids_BS1: Tensor) -> Tensor:
    logits = model(input_ids=ids_BS1[:, :-1], use_cache=False).logits
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids_BS1[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, val: dict[str, Tensor], cfg: FinetuneConfig) -> dict[str, float]:
    """Mean next-token loss (nats per token) per domain on fixed validation windows."""
    model.eval()
    out = {}
    for dom, s in val.items():
        n = (s.numel() - 1) // cfg.seq_len
        if n < 1:
            continue
        ids = s[: n * cfg.seq_len + 1]
        wins = [ids[i * cfg.seq_len: (i + 1) * cfg.seq_len + 1] for i in range(n)][: cfg.eval_batches * cfg.batch_size]
        losses = [float(_lm_loss(model, torch.stack(wins[i: i + cfg.batch_size])))
                  for i in range(0, len(wins), cfg.batch_size)]
        out[dom] = sum(losses) / len(losses)
    model.train()
    return out


def finetune(model: nn.Module, tok, docs, cfg: FinetuneConfig, out: str | Path, *, verbose: bool = True,
             bal=None) -> dict:
    """Fine-tune `model` on `docs` under moelab balancing; writes metrics.jsonl and summary.json into `out`.
    `bal` (an attached moelab.hf_balance.HFBalance) is made from cfg when None."""
    from moelab.hf import attach
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    domains, train, val = token_streams(tok, docs, cfg)
    bal = bal or attach(model, cfg.balance, rate=cfg.rate, aux_coef=cfg.aux_coef)
    model.set_experts_implementation(cfg.experts_impl)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    t_start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        lr = cfg.lr * min(1.0, step / cfg.warmup) if cfg.warmup else cfg.lr
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        ids = sample_batch(train, cfg.batch_size, cfg.seq_len, gen)
        opt.zero_grad(set_to_none=True)
        lm = _lm_loss(model, ids)
        aux = bal.loss()
        if not torch.isfinite(lm):
            raise ValueError(f"non-finite loss at step {step}: lower --lr")
        (lm + aux).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        opt.step()
        bal.step()
        stats = bal.take_stats()
        rec = {"kind": "train", "step": step, "loss": float(lm.detach()), "aux_loss": float(aux.detach()), "lr": lr,
               "grad_norm": float(gnorm), "tok_per_s": ids[:, :-1].numel() / max(time.perf_counter() - t0, 1e-9),
               "max_vio": [round(float(s.max_vio), 5) for s in stats],
               "load": [[round(x, 5) for x in s.load_E.tolist()] for s in stats]}
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if verbose and (step % cfg.log_every == 0 or step == cfg.steps):
            print(f"step {step:5d}  loss {rec['loss']:.3f}  aux {rec['aux_loss']:.4f}  "
                  f"MaxVio {max(rec['max_vio']):.2f}  {rec['tok_per_s']:,.0f} tok/s", flush=True)
    val_loss = evaluate(model, val, cfg)
    bal.take_stats()
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "val", "step": cfg.steps, "val_loss": val_loss}) + "\n")
    summary = {"step": cfg.steps, "val_loss": val_loss, "domains": domains, "config": asdict(cfg),
               "train_time_s": round(time.perf_counter() - t_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def finetune_path(hf_dir: str, data: list[str] | None, cfg: FinetuneConfig, out: str | Path,
                  verbose: bool = True) -> dict:
    """`moelab finetune`: load a local HF MoE model and its tokenizer from `hf_dir` with the moelab experts
    backend, fine-tune, save with save_pretrained into OUT/model (the learned loss-free bias beside it when
    the family has no slot for it), and draw the plots of `moelab train`."""
    from moelab.hf import attach, load_hf_causal_lm, register
    from moelab.plots import plot_expert_load, plot_loss, plot_max_vio
    register()
    model, tok = load_hf_causal_lm(hf_dir)
    if not data or data == ["builtin"]:
        docs = builtin_documents()
    else:
        docs = load_documents(data).documents
    if not docs:
        raise ValueError("--data: no text found")
    bal = attach(model, cfg.balance, rate=cfg.rate, aux_coef=cfg.aux_coef, bias_from=None)
    summary = finetune(model, tok, docs, cfg, out, verbose=verbose, bal=bal)
    model_dir = Path(out) / "model"
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(model_dir)
    for w in caught:
        if "loss-free bias" in str(w.message) and verbose:
            print(f"note: {w.message}")
    tok.save_pretrained(model_dir)
    bal.detach()
    for plot in (plot_loss, plot_expert_load, plot_max_vio):
        plot(out, Path(out) / f"{plot.__name__[5:]}.png")
    summary["model_dir"] = str(model_dir)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
