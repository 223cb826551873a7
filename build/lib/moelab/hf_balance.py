"""Balance metrics and load balancing for transformers MoE models, by hooks (the model's class is unchanged).

`HFBalance` (made by `moelab.hf.attach(model, balance=...)`) hooks every MoE block's router output and experts
call, so each forward yields moelab's BalanceStats per layer and, per the `balance` mode:
  loss_free  Wang et al. 2024 (arXiv 2408.15664) Alg. 1: a per-expert bias added to the gating scores for the
             top-k choice only (the combine weights stay the unbiased scores), stepped after each optimizer step.
             A router with its own correction-bias slot (a `e_score_correction_bias` buffer, DeepSeek-V3 style)
             is left to choose with it and moelab steps that buffer; others get their choice recomputed here
             (softmax scores + bias, top-k, weights gathered from the unbiased scores, renormalised when the
             router's `norm_topk_prob` says so, default yes), checked once against the router's own output.
  global     Qiu et al. 2025 (arXiv 2501.11873) global-batch Switch loss: f_i from counts summed over the
             micro-batches of one optimizer step.
  aux        Switch Transformer (Fedus et al. 2021) eq. 4, per layer (never pooled across layers).
  none       metrics only.
Losses are handed to the caller (`losses()` per layer, `loss()` weighted sum) or, with add_to_loss=True,
added to the model output's `loss` (HF Trainer); transformers' own output_router_logits aux loss is switched
off while balancing is on. Routers without a bias slot lose a learned bias at save_pretrained: it is written
beside the checkpoint as SIDECAR (safetensors, one `<block name>.bias_E` (E,) fp32 tensor per MoE block) and
`attach` reads it back from the model's folder.

T=tokens of one forward, E=routed experts, K=slots per token, L=MoE blocks.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moelab import balance
from moelab.balance import BalanceStats
from moelab.router_state import GlobalBatchCounts, LossFreeBias

BALANCES = ("loss_free", "global", "aux", "none")
SIDECAR = "moelab_router_bias.safetensors"  # learned loss-free biases of routers with no slot for one
BIAS_SLOT = "e_score_correction_bias"        # a router buffer that already biases the choice only


@dataclass(frozen=True)
class HFBalanceConfig:
    balance: str = "loss_free"   # loss_free | global | aux | none
    rate: float = 1e-3           # loss-free bias update rate u (Wang et al. 2024 use 1e-3)
    aux_coef: float = 1e-2       # weight of each layer's Switch / global-batch loss in loss()
    add_to_loss: bool = False    # also add loss() to the model output's .loss (for transformers' Trainer)

    def __post_init__(self) -> None:
        if self.balance not in BALANCES:
            raise ValueError(f"balance={self.balance!r} is invalid: allowed one of {', '.join(BALANCES)}")
        if self.rate < 0 or self.aux_coef < 0:
            raise ValueError(f"rate={self.rate} / aux_coef={self.aux_coef} is invalid: allowed >= 0")


class _Layer:
    """One MoE block: its router and experts modules, router state, and what its last forwards produced."""

    def __init__(self, block, n_experts: int):
        self.name, self.module, self.adapter = block.name, block.module, block.adapter
        self.router = getattr(block.module, block.adapter.router)
        self.experts = getattr(block.module, block.adapter.experts)
        self.E = n_experts
        self.k = getattr(self.router, "top_k", None)
        self.state: LossFreeBias | GlobalBatchCounts | None = None
        self.own_slot = isinstance(getattr(self.router, BIAS_SLOT, None), Tensor)
        self.checked = False
        self.logits_TE: Tensor | None = None
        self.counts_E = torch.zeros(n_experts)
        self.losses: list[dict[str, Tensor]] = []


def select_with_bias(logits_TE: Tensor, bias_E: Tensor, k: int, normalise: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Loss-free balancing (Wang et al. 2024, arXiv 2408.15664, eq. 3): top-k of softmax scores + bias chooses,
    the unbiased scores weight (renormalised over the chosen when `normalise`), times `scale`."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    idx_TK = torch.topk(probs_TE + bias_E.to(probs_TE), k, dim=-1).indices
    w_TK = probs_TE.gather(1, idx_TK)
    if normalise:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    return idx_TK, w_TK * scale


class HFBalance:
    """Hooks on a transformers MoE model's blocks; see the module docstring. Use:
    bal = moelab.hf.attach(model, balance="loss_free"); loss = model(**batch).loss + bal.loss(); loss.backward();
    opt.step(); bal.step(); ...; bal.take_stats(); bal.detach()."""

    def __init__(self, model: nn.Module, blocks: list, n_experts: list[int], cfg: HFBalanceConfig,
                 bias_from: str | Path | None = None):
        self.model, self.cfg = model, cfg
        self.layers = [_Layer(b, e) for b, e in zip(blocks, n_experts)]
        for lay in self.layers:
            if lay.adapter.dense_at is not None or lay.adapter.logits_at is None:
                raise ValueError(f"moelab.hf.attach: {type(lay.module).__name__} returns dense scores or bare "
                                 f"logits from its router: unsupported (routers returning (logits, weights, "
                                 f"experts) are)")
            if cfg.balance == "global":
                lay.state = GlobalBatchCounts()
        loaded = self._read_sidecar(bias_from)
        for lay in self.layers:
            if cfg.balance == "loss_free" or lay.name in loaded:
                if lay.own_slot:
                    lay.state = LossFreeBias(lay.E, 0, cfg.rate)
                    lay.state.bias_E = getattr(lay.router, BIAS_SLOT)  # the router's own buffer, stepped in place
                else:
                    if not isinstance(lay.k, int):
                        raise ValueError(f"moelab.hf.attach: {type(lay.router).__name__} has no integer top_k: "
                                         f"loss_free balancing cannot recompute its choice")
                    lay.state = LossFreeBias(lay.E, 0, cfg.rate)
                    if lay.name in loaded:
                        lay.state.bias_E.copy_(loaded[lay.name])
        self._handles: list = []
        for i, lay in enumerate(self.layers):
            self._handles.append(lay.router.register_forward_hook(functools.partial(self._on_router, lay)))
            self._handles.append(lay.experts.register_forward_pre_hook(functools.partial(self._on_experts, lay)))
        if cfg.add_to_loss:
            self._handles.append(model.register_forward_hook(self._on_output))
        self._router_logits = getattr(model.config, "output_router_logits", None)
        if cfg.balance != "none" and self._router_logits is not None:
            model.config.output_router_logits = False  # transformers' aux loss off: nothing counted twice
        self._sidecar_layers = [lay for lay in self.layers if isinstance(lay.state, LossFreeBias) and not lay.own_slot]
        if self._sidecar_layers and hasattr(model, "save_pretrained"):
            model.save_pretrained = functools.partial(self._save_pretrained, type(model).save_pretrained)

    # -- hooks ---------------------------------------------------------------------------------------------
    def _on_router(self, lay: _Layer, mod, args, out):
        logits_TE = out[lay.adapter.logits_at]
        lay.logits_TE = logits_TE.reshape(-1, logits_TE.shape[-1])
        if not isinstance(lay.state, LossFreeBias) or lay.own_slot:  # no bias, or the router applies its own
            return None
        w_TK, idx_TK = out[1], out[2]
        norm, scale = getattr(mod, "norm_topk_prob", True), float(getattr(mod, "routed_scaling_factor", 1.0))
        if not lay.checked:  # the recomputed choice must be the router's own when the bias is zero
            ref_idx, ref_w = select_with_bias(lay.logits_TE, torch.zeros(lay.E), lay.k, norm, scale)
            order, ref_order = idx_TK.argsort(-1), ref_idx.argsort(-1)
            same = torch.equal(idx_TK.gather(1, order).long(), ref_idx.gather(1, ref_order)) and torch.allclose(
                w_TK.gather(1, order).float(), ref_w.gather(1, ref_order), atol=1e-5, rtol=1e-4)
            if not same:
                raise ValueError(f"moelab.hf.attach: {type(mod).__name__} does not choose softmax top-{lay.k} "
                                 f"experts: loss_free balancing needs that or an {BIAS_SLOT} buffer")
            lay.checked = True
        idx_TK, new_w_TK = select_with_bias(lay.logits_TE, lay.state.bias_E, lay.k, norm, scale)
        return (*out[:1], new_w_TK.to(w_TK.dtype), idx_TK.to(out[2].dtype), *out[3:])

    def _on_experts(self, lay: _Layer, mod, args):
        if len(args) < 3:
            raise ValueError(f"moelab.hf.attach: {lay.name}.{lay.adapter.experts} was not called as "
                             f"experts(hidden_states, top_k_index, top_k_weights) positionally")
        idx_TK = args[1].reshape(-1, args[1].shape[-1])
        idx_TK = torch.where((idx_TK >= 0) & (idx_TK < lay.E), idx_TK, -1).long()
        counts_E = balance.expert_counts(expert_idx_TK=idx_TK.detach(), n_experts=lay.E)
        lay.counts_E = lay.counts_E.to(counts_E.device) + counts_E
        training = self.model.training and torch.is_grad_enabled()
        if training and isinstance(lay.state, LossFreeBias) and self.cfg.balance == "loss_free":
            lay.state.observe(counts_E=counts_E, sparsity=torch.zeros(()))
        if self.cfg.balance in ("aux", "global") and torch.is_grad_enabled() and lay.logits_TE is not None:
            probs_TE = torch.softmax(lay.logits_TE.float(), dim=-1)
            glob = lay.state.counts(counts_E) if isinstance(lay.state, GlobalBatchCounts) and training else None
            lay.losses.append({self.cfg.balance: balance.switch_aux_loss(
                probs_TE=probs_TE, expert_idx_TK=idx_TK, n_experts=lay.E, counts_E=glob)})
        lay.logits_TE = None

    def _on_output(self, mod, args, out):
        if getattr(out, "loss", None) is not None and torch.is_grad_enabled():
            out.loss = out.loss + self.loss().to(out.loss)
        return out

    # -- what the caller reads -----------------------------------------------------------------------------
    def losses(self) -> list[dict[str, Tensor]]:
        """Each layer's unweighted losses, summed over the forwards since the last call (then cleared)."""
        out = []
        for lay in self.layers:
            d: dict[str, Tensor] = {}
            for f in lay.losses:
                for k, v in f.items():
                    d[k] = d[k] + v if k in d else v
            lay.losses = []
            out.append(d)
        return out

    def loss(self) -> Tensor:
        """aux_coef * the sum over layers of losses() (zero for loss_free / none); clears them."""
        total = torch.zeros(())
        for d in self.losses():
            for v in d.values():
                total = total.to(v.device) + self.cfg.aux_coef * v
        return total

    def take_stats(self) -> list[BalanceStats]:
        """BalanceStats per layer from the slots counted since the last call (every forward), then cleared."""
        out = [balance.balance_stats(counts_E=lay.counts_E.cpu()) for lay in self.layers]
        for lay in self.layers:
            lay.counts_E = torch.zeros(lay.E)
        return out

    def biases(self) -> dict[str, Tensor]:
        """Current loss-free bias per MoE block name (copies)."""
        return {lay.name: lay.state.bias_E.detach().float().cpu().clone() for lay in self.layers
                if isinstance(lay.state, LossFreeBias)}

    def step(self) -> None:
        """After each optimizer step: the loss-free bias moves by rate * sign(mean load - load) from the loads of
        that step's training forwards; global-batch counts restart."""
        for lay in self.layers:
            if isinstance(lay.state, GlobalBatchCounts) or (isinstance(lay.state, LossFreeBias)
                                                              and self.cfg.balance == "loss_free"):
                lay.state.step()

    def callback(self):
        """A transformers.TrainerCallback stepping this balancing after each optimizer step (one line for HF
        Trainer users; attach with add_to_loss=True so the Trainer's loss includes the balance losses)."""
        from transformers import TrainerCallback
        bal = self

        class MoelabBalanceCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                bal.step()

        return MoelabBalanceCallback()

    # -- the sidecar for routers with no bias slot -----------------------------------------------------------
    def save_bias(self, folder: str | Path) -> Path | None:
        """Write SIDECAR into `folder` (the learned biases the checkpoint has no slot for); None if none."""
        from safetensors.torch import save_file
        if not self._sidecar_layers:
            return None
        path = Path(folder) / SIDECAR
        tensors = {f"{lay.name}.bias_E": lay.state.bias_E.detach().float().cpu().contiguous()
                   for lay in self._sidecar_layers}
        save_file(tensors, str(path), metadata={"format": "moelab-router-bias", "version": "1"})
        return path

    def _save_pretrained(self, original, folder, *args, **kwargs):
        result = original(self.model, folder, *args, **kwargs)
        path = self.save_bias(folder)
        warnings.warn(f"{type(self.model).__name__}'s routers have no slot for the learned loss-free bias: it is "
                      f"saved beside the checkpoint in {path} (moelab.hf.attach reads it back)", stacklevel=2)
        return result

    def _read_sidecar(self, bias_from: str | Path | None) -> dict[str, Tensor]:
        folder = bias_from if bias_from is not None else getattr(self.model.config, "_name_or_path", "")
        path = Path(folder) / SIDECAR if folder else None
        if path is None or not path.is_file():
            if bias_from is not None:
                raise ValueError(f"bias_from={str(bias_from)!r}: no {SIDECAR} there")
            return {}
        from safetensors.torch import load_file
        tensors = load_file(str(path))
        out = {}
        for lay in self.layers:
            t = tensors.get(f"{lay.name}.bias_E")
            if t is not None:
                if t.shape != (lay.E,):
                    raise ValueError(f"{path}: {lay.name}.bias_E has shape {tuple(t.shape)}, the model's block "
                                     f"has {lay.E} experts")
                out[lay.name] = t
        return out

    def detach(self) -> None:
        """Remove every hook and restore save_pretrained / output_router_logits; learned state stays (a router's
        own correction bias keeps its learned values; biases() still returns the others)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model.__dict__.pop("save_pretrained", None)
        if self._router_logits is not None:
            self.model.config.output_router_logits = self._router_logits
