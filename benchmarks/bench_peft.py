"""LoRA-expert variants and expert compression on the built-in corpus (quality, not speed).

1. Train the tiny preset briefly (one thread). 2. Per variant: attach LoRA experts to the attention linears of
a copy, fine-tune briefly (same steps, data, seed), evaluate per domain (moelab.train.evaluate). Per-domain
plain LoRA adapters are trained first and saved as PEFT folders; X-LoRA and the similarity router mix them.
3. Compress the base: merge to half (MC-SMoE grouping) vs random groups vs pruning by usage, loss before/after.
Writes benchmarks/results/bench_peft.json.  Usage: python benchmarks/bench_peft.py [--base-steps N ...]
With --adapt: a base trained on one domain, adapted to all domains by ESFT, one LoRA and a mixture of LoRA
experts at ESFT's trainable parameters, and a full fine-tune (moelab.peft_train trainers); writes
benchmarks/results/bench_peft_adapt.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from moelab.compress import (
    expert_param_total,
    expert_weights,
    low_rank_compress,
    merge_experts,
    merge_group,
    prune_experts,
    routing_stats,
)
from moelab.config import TrainConfig
from moelab.data import Corpus
from moelab.lora import (
    LoRAConfig,
    attach_lora_experts,
    fit_centroids,
    lora_aux_loss,
    lora_modules,
    lora_param_count,
    save_lora,
    update_lora_biases,
)
from moelab.model import MoELM, lm_loss
from moelab.presets import tiny
from moelab.train import Trainer, evaluate


def finetune(model: MoELM, corpus: Corpus, cfg: TrainConfig, steps: int, lr: float, seed: int) -> float:
    """AdamW on the trainable (adapter + router) parameters only; LM loss + LoRA balance loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None
    loss = float("nan")
    for _ in range(steps if params else 0):
        b = corpus.sample(cfg.batch_size, cfg.seq_len, gen)
        out = model(b.idx_BS, valid_BS=b.valid_BS)
        lm = lm_loss(logits_BSV=out.logits_BSV, targets_BS=b.targets_BS, valid_BS=b.valid_BS)
        opt.zero_grad(set_to_none=True)
        (lm + lora_aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        update_lora_biases(model)
        loss = float(lm.detach())
    model.eval()
    return loss


def recover(model: MoELM, corpus: Corpus, cfg: TrainConfig, steps: int, lr: float) -> MoELM:
    """Brief full fine-tune after compression (MC-SMoE fine-tunes after merging; here plain LM loss + aux)."""
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(steps):
        b = corpus.sample(cfg.batch_size, cfg.seq_len, gen)
        out = model(b.idx_BS, valid_BS=b.valid_BS)
        lm = lm_loss(logits_BSV=out.logits_BSV, targets_BS=b.targets_BS, valid_BS=b.valid_BS)
        opt.zero_grad(set_to_none=True)
        (lm + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def shared_groups(model: MoELM, stats: dict, groups: dict) -> MoELM:
    """Control: MC-SMoE as the authors run it, router unchanged (E rows), every group member set to the merged
    weights; shows what merging the router rows (compress.merge_experts) costs on top."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for i, gs in groups.items():
            up, down = expert_weights(m.blocks[i].ffn)
            for g in gs:
                u, d = merge_group(up.detach().clone(), down.detach().clone(), g, stats[i].usage_E)
                for e in g:
                    up[e].copy_(u)
                    down[e].copy_(d)
    return m


def sub_corpus(corpus: Corpus, dom: str) -> Corpus:
    return Corpus([dom], {dom: corpus.train[dom]}, {dom: corpus.val[dom]}, {dom: corpus.n_files[dom]})


def experts_per_token(model: MoELM, cfg: LoRAConfig, corpus: Corpus, tcfg: TrainConfig) -> float:
    """Mean experts (mixlora) or ranks (smora, flylora) a token uses, measured; all adapters for dense mixes."""
    if cfg.variant in ("xlora", "similarity"):
        return float(len(cfg.adapters))
    if cfg.variant == "lora":
        return 1.0
    b = corpus.val_batches(corpus.domains[0], tcfg.batch_size, tcfg.seq_len, 1)[0]
    with torch.no_grad():
        model(b.idx_BS, valid_BS=b.valid_BS)
    st = [m.stats() for m in lora_modules(model).values()]
    return sum(float(s.experts_per_token) for s in st) / len(st)


def lora_specialization(model: MoELM, corpus: Corpus, tcfg: TrainConfig) -> float | None:
    """JS divergence (bits) of each domain's LoRA-expert distribution from the overall one, mean over adapted
    linears and domains (validation batches); None without routed LoRA experts."""
    import numpy as np

    from moelab.analysis import js_divergence
    mods = {n: m for n, m in lora_modules(model).items() if m.cfg.variant == "mixlora"}
    if not mods:
        return None
    counts = {n: np.zeros((len(corpus.domains), m.cfg.n_experts)) for n, m in mods.items()}
    model.eval()
    with torch.no_grad():
        for d, dom in enumerate(corpus.domains):
            for b in corpus.val_batches(dom, tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches):
                model(b.idx_BS, valid_BS=b.valid_BS)
                for n, m in mods.items():
                    idx = m.last_routing.expert_idx_TK[b.valid_BS.reshape(-1)].reshape(-1)
                    counts[n][d] += np.bincount(idx[idx >= 0].numpy(), minlength=m.cfg.n_experts)
    js = [js_divergence(c, np.broadcast_to(c.sum(0), c.shape)).mean() for c in counts.values()]
    return float(np.mean(js))


def routed_specialization(expert_by_domain: dict) -> float:
    """JS divergence (bits) of each domain's routed-expert distribution from the overall one (evaluate's
    counts), mean over MoE layers and domains."""
    import numpy as np

    from moelab.analysis import js_divergence
    js = []
    for c in expert_by_domain.values():
        c = np.asarray(c)
        js.append(js_divergence(c, np.broadcast_to(c.sum(0), c.shape)).mean())
    return float(np.mean(js))


def adapt(args) -> None:
    """Domain adaptation at equal trainable parameters: ESFT vs one LoRA vs a mixture of LoRA experts."""
    from moelab.checkpoint import latest, load_checkpoint, load_model
    from moelab.data import build_corpus
    from moelab.esft import ESFTConfig, tuned_slot_share
    from moelab.peft_train import ESFTTrainer, LoRATrainer, domain_corpus
    torch.set_num_threads(args.threads)
    load0, t0 = os.getloadavg(), time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_peft_adapt_"))
    corpus = build_corpus(["builtin"])
    base_cfg = TrainConfig(steps=args.base_steps, batch_size=8, seq_len=128, warmup=20, eval_every=0, ckpt_every=0,
                           eval_batches=4, log_every=10_000)
    Trainer(tiny(), base_cfg, work / "base", corpus=domain_corpus(corpus, args.base_domain), verbose=False).fit()
    rows = []

    def record(name: str, seed: int, model: MoELM, trainable: int, ept: float, extra: dict | None = None) -> None:
        ev = evaluate(model, corpus, base_cfg)
        rows.append({"arm": name, "seed": seed, "trainable": trainable, "experts_per_token": round(ept, 3),
                     "val_loss": ev["val_loss"], "mean": sum(ev["val_loss"].values()) / len(ev["val_loss"]),
                     "routed_specialization": round(routed_specialization(ev["expert_by_domain"]), 4),
                     **(extra or {})})
        print(rows[-1], flush=True)

    base, _ = load_model(work / "base")
    record(f"base (trained on {args.base_domain} only)", 0, base, 0, 0.0)
    K = base.cfg.moe.top_k
    seeds = [int(x) for x in args.seeds.split(",")]
    for seed in seeds:  # per seed: fine-tuning data order, adapter init, ESFT's scored tokens
        ft = base_cfg.replace(steps=args.ft_steps, lr=args.lr, warmup=10, weight_decay=0.0, seed=seed)
        w = work / f"seed{seed}"
        esft = {}
        for score, p in (("token", 0.2), ("gate", 0.1)):
            tr = ESFTTrainer(work / "base", ESFTConfig(score=score, top_p=p), ft, w / f"esft_{score}",
                             corpus=corpus, verbose=False)
            tr.fit()
            esft[score] = tr.trainable
            record(f"ESFT-{score.capitalize()} p={p}", seed, tr.model, tr.trainable,
                   K * tuned_slot_share(tr.scores, tr.experts),
                   {"experts": tr.experts, "n_experts": sum(len(v) for v in tr.experts.values())})
        budget = esft["token"]
        lora1 = LoRAConfig(variant="lora", rank=1, targets="all", seed=seed)
        per_rank = LoRATrainer(work / "base", lora1, ft, w / "probe", corpus=corpus, verbose=False).trainable
        r1 = max(1, round(budget / per_rank))
        mix1 = LoRAConfig(variant="mixlora", n_experts=4, top_k=2, rank=1, targets="all", seed=seed)
        gate = LoRATrainer(work / "base", mix1, ft, w / "probe", corpus=corpus, verbose=False).trainable - 4 * per_rank
        r4 = max(1, round((budget - gate) / (4 * per_rank)))
        for name, c in (("one LoRA (rank matched)", lora1.replace(rank=r1)),
                        ("mixlora E=4 k=2 (rank matched)", mix1.replace(rank=r4))):
            tr = LoRATrainer(work / "base", c, ft, w / c.variant, corpus=corpus, verbose=False)
            tr.fit()
            record(name, seed, tr.model, tr.trainable, experts_per_token(tr.model, c, corpus, ft),
                   {"rank": c.rank, "lora_specialization": lora_specialization(tr.model, corpus, ft)})
        full = Trainer(tiny(), ft, w / "full", corpus=corpus, verbose=False)
        load_checkpoint(latest(work / "base"), model=full.model)
        full.fit()
        record("full fine-tune", seed, full.model, sum(p.numel() for p in full.model.parameters()), float(K))
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": os.uname().nodename,
           "threads": args.threads, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
           "wall_s": round(time.time() - t0, 1), "base_train_config": asdict(base_cfg), "base_domain": args.base_domain,
           "adapt_train_config": asdict(ft), "seeds": seeds, "rows": rows}
    out = Path(args.out).with_name("bench_peft_adapt.json") if args.out == DEFAULT_OUT else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


DEFAULT_OUT = "benchmarks/results/bench_peft.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--ft-steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--recover-steps", type=int, default=50, help="full fine-tune steps after compressing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--adapt", action="store_true", help="only the domain-adaptation table (ESFT vs LoRA experts)")
    ap.add_argument("--base-domain", default="c", help="--adapt: the one domain the base is trained on")
    ap.add_argument("--seeds", default="1,2", help="--adapt: fine-tuning seeds (comma list)")
    args = ap.parse_args()
    if args.adapt:
        return adapt(args)
    torch.set_num_threads(args.threads)
    load0, t0 = os.getloadavg(), time.time()
    tcfg = TrainConfig(steps=args.base_steps, batch_size=8, seq_len=128, warmup=20, eval_every=0, ckpt_every=0,
                       eval_batches=4, log_every=10_000)
    work = Path(tempfile.mkdtemp(prefix="bench_peft_"))
    trainer = Trainer(tiny(), tcfg, work / "base", verbose=False)
    trainer.fit()
    corpus, base_sd = trainer.corpus, trainer.model.state_dict()

    def fresh() -> MoELM:
        m = MoELM(tiny())
        m.load_state_dict(base_sd)
        return m.eval()

    base = fresh()
    rows = [{"variant": "base (no adapter)", "trainable": 0, "active": 0, "experts_per_token": 0.0,
             "val_loss": evaluate(base, corpus, tcfg)["val_loss"]}]
    common = {"targets": "attn", "rank": 8, "alpha": 16.0, "seed": 0}
    # per-domain plain LoRA adapters (PEFT folders) for X-LoRA and the similarity router
    adapters = []
    for d, dom in enumerate(corpus.domains):
        m = fresh()
        c = LoRAConfig(variant="lora", **common)
        attach_lora_experts(m, c)
        finetune(m, sub_corpus(corpus, dom), tcfg, args.ft_steps, args.lr, seed=10 + d)
        adapters.append(str(save_lora(m, c, work / f"adapter_{dom}", base=str(work / "base"))))
        ev = evaluate(m, corpus, tcfg)["val_loss"]
        rows.append({"variant": f"lora on {dom} only", "trainable": lora_param_count(m).trainable,
                     "active": lora_param_count(m).active, "experts_per_token": 1.0, "val_loss": ev})
    variants = [
        ("lora (r=8)", LoRAConfig(variant="lora", **common)),
        ("lora (r=32)", LoRAConfig(variant="lora", **{**common, "rank": 32})),
        ("mixlora E=4 k=2", LoRAConfig(variant="mixlora", n_experts=4, top_k=2, **common)),
        ("smora r=32 k=8", LoRAConfig(variant="smora", top_k=8, balance="loss_free", **{**common, "rank": 32})),
        ("flylora r=32 k=8", LoRAConfig(variant="flylora", top_k=8, **{**common, "rank": 32})),
        ("xlora over domain adapters", LoRAConfig(variant="xlora", adapters=tuple(adapters), **common)),
        ("similarity router over domain adapters",
         LoRAConfig(variant="similarity", adapters=tuple(adapters), temperature=0.05, **common)),
    ]
    for name, c in variants:
        m = fresh()
        attach_lora_experts(m, c)
        if c.variant == "similarity":
            g = torch.Generator().manual_seed(5)
            per_domain = [[sub_corpus(corpus, d).sample(8, 128, g) for _ in range(4)] for d in corpus.domains]
            fit_centroids(m, per_domain, lambda mod, b: mod(b.idx_BS, valid_BS=b.valid_BS))
        tt = time.time()
        finetune(m, corpus, tcfg, args.ft_steps, args.lr, seed=1)
        pc = lora_param_count(m)
        rows.append({"variant": name, "trainable": pc.trainable, "active": pc.active,
                     "experts_per_token": round(experts_per_token(m, c, corpus, tcfg), 2),
                     "val_loss": evaluate(m, corpus, tcfg)["val_loss"], "finetune_s": round(time.time() - tt, 1)})
        print(name, rows[-1])

    # compression of the base MoE: half the experts
    gen = torch.Generator().manual_seed(7)
    calib = [corpus.sample(8, 128, gen) for _ in range(8)]
    stats = routing_stats(base, calib)
    half = base.cfg.moe.n_experts // 2
    comp = [{"method": "none", "experts": base.cfg.moe.n_experts, "expert_params": expert_param_total(base),
             "val_loss": rows[0]["val_loss"], "val_loss_after_recovery": evaluate(
                 recover(fresh(), corpus, tcfg, args.recover_steps, 1e-3), corpus, tcfg)["val_loss"]}]
    merged, groups = merge_experts(base, stats, half)
    arms = [("merge MC-SMoE (routing similarity)", merged),
            ("same groups, router unchanged (8 rows, members share weights)", shared_groups(base, stats, groups))]
    arms += [(f"merge random groups (seed {s})", merge_experts(base, stats, half, by="random", seed=s)[0])
             for s in range(3)]
    arms += [("prune by usage", prune_experts(base, stats, half)[0]),
             ("prune random", prune_experts(base, stats, half, by="random")[0]),
             ]
    low, stored = low_rank_compress(merged, 32)
    arms.append(("merge MC-SMoE + low rank 32", low))
    for name, m in arms:
        ev = evaluate(m, corpus, tcfg)["val_loss"]
        rec = evaluate(recover(m, corpus, tcfg, args.recover_steps, 1e-3), corpus, tcfg)["val_loss"] \
            if args.recover_steps and m is not low else None
        comp.append({"method": name, "experts": m.cfg.moe.n_experts,
                     "expert_params": stored if m is low else expert_param_total(m), "val_loss": ev,
                     "val_loss_after_recovery": rec})
        print(comp[-1])
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": os.uname().nodename,
           "threads": args.threads, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
           "wall_s": round(time.time() - t0, 1), "train_config": asdict(tcfg), "ft_steps": args.ft_steps,
           "lr": args.lr, "recover_steps": args.recover_steps, "peft": rows, "compress": comp}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
