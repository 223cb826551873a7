"""`make demo`: a forward/backward through one MoE layer per balance mode, with a balance report."""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from moelab.config import MoEConfig
from moelab.moe import MoELayer, update_loss_free_biases


def run_demo(out: str = "runs/demo") -> int:
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    table = Table(title="MoE layer: 100 steps on a skewed synthetic task (E=8, k=2)")
    for col in ("balance", "MaxVio start", "MaxVio end", "CV end", "entropy end", "dead"):
        table.add_column(col)
    for bal in ("none", "aux", "loss_free"):
        torch.manual_seed(0)
        cfg = MoEConfig(d_model=32, d_expert=64, n_experts=8, top_k=2, balance=bal,
                        aux_loss_coef=0.1, bias_update_rate=1e-2)
        layer = MoELayer(cfg)
        with torch.no_grad():
            layer.gate.weight[0] += 0.05  # skew: expert 0 is favoured for every input
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
        first = None
        for _ in range(100):
            x = torch.randn(256, 32) + 1.0
            r = layer(x)
            loss = (r.y - x).pow(2).mean() + r.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            update_loss_free_biases(layer)
            first = first if first is not None else float(r.stats.max_vio)
        s = r.stats
        table.add_row(bal, f"{first:.2f}", f"{float(s.max_vio):.2f}", f"{float(s.cv):.2f}",
                      f"{float(s.entropy):.3f}", str(int(s.dead)))
    Console().print(table)
    return 0
