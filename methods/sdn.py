"""``sdn`` — Shallow-Deep Networks (Kaya et al., ICML 2019): internal classifiers trained jointly with the network.

Method card
- Paper: "Shallow-Deep Networks: Understanding and Mitigating Network Overthinking", ICML 2019; run as the peer
  harness ``ztw_cv`` (gmum/Zero-Time-Waste, NeurIPS 2021) runs it: ``ztw_cv/architectures/early_exits/sdn.py``.
- Network (the method brings its own, as ``boostednet`` brings ``msdnet-boosted``): the run's network with an
  internal classifier (IC) after every block but the last, trained jointly with it from the first step.
  - ``--backbone vit`` / ``vit-scratch`` (and ``--backbone vit-sdn`` itself): ``vit-sdn`` / ``vit-scratch-sdn``,
    the run's ViT configuration plus one IC per block. The IC is ztw_cv's ``vit_standard_head``: one
    ``Linear(D, C)`` on the block's raw CLS token (no LayerNorm: ztw_cv feeds the encoder block's output to the
    head; the final LayerNorm only precedes the network's own head, the last exit).
  - ``--backbone msdnet``: ``msdnet-sdn``, MSDNet whose own classifiers are the ICs, trained with SDN's loss
    instead of MSDNet's plain sum.
  Every other backbone (and the conformance checks' synthetic task) has no SDN network: there the method is
  SDN's "IC-only" mode, linear ICs trained on the frozen network's cached features with the unweighted sum of
  their cross-entropies (``model_funcs.sdn_ic_only_step``; the harness's shared heads, the same as
  ``threshold``'s).
- Loss (``sdn_loss``): ``weighted`` (default, the paper's SDN training, ``model_funcs.sdn_training_step``):
  ``sum_i tau_i CE(IC_i) + CE(final)``, where ``tau_i = min(C_i, 0.01 + epoch * C_i / epochs)`` at epoch
  1..epochs (``model_funcs.sdn_train``) grows linearly to its maximum C_i. The authors' six ICs have
  C = 0.15, 0.3, ..., 0.9, the IC's position in the network; with n ICs we use ``C_i = ic_max_weight * i / n``
  (i = 1..n, ``ic_max_weight`` 0.9), which is exactly the authors' list for n = 6. ``mean``: ztw_cv's
  objective (``methods/early_exit.py``), the plain mean of every exit's cross-entropy, final head included.
  Both, and the schedule, are checked against the authors' code (tests/data/sdn_official.md).
- Training recipe: the run's network's own (for the ViT: its optimiser, warm-up + cosine lr, augmentation and
  label smoothing; for MSDNet: its SGD schedule), so SDN differs from the static network only by its ICs and
  loss. The authors' CNN recipe (SGD 0.1, 100 epochs, lr / 10 at epochs 35, 60, 85) is not used; ztw_cv's ViT
  SDN trains ICs after blocks 2..11 of a frozen ViT-B/16 (IC-only, Adam 0.005, 15 epochs). The
  epoch with the best validation accuracy of the final exit is kept (the authors keep the last epoch).
- Exit rule: max softmax of the exit's own IC (SDN's early-exit rule), one threshold for all exits from the
  harness's shared calibration per budget (``--set sdn.scheme=geometric`` for MSDNet's).
- Cost: blocks run, each IC on the way (D*C MACs; on MSDNet its classifier's convs too) and the decision (2C);
  ``macs_rel`` is relative to the static network of the same architecture. The ViT's IC is ztw_cv's linear
  head; the paper's CNN ICs (mixed max/average pooling then linear) are not built.
- Deviations: an exit after every block (ztw_cv places none after the ViT's first block); ``--set
  sdn.sdn_loss`` / ``sdn.ic_max_weight`` set the fields of the network the method brings (they are in its
  cache key); ``--backbone NAME`` (a timm ViT), ``--pretrained [PATH]`` and ``--set backbone.FIELD`` apply to
  the SDN network as to the run's (the same architecture and starting weights, trained the SDN way).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.backbones.base import Heads, fit_epochs, fused_optimizer, register_backbone, warmup_cosine_schedule
from bench.backbones.msdnet import MSDNetBackbone, MSDNetConfig, predict_exit_logits
from bench.backbones.vit import (ViT, ViTConfig, ViTScratch, ViTStages, embed, exit_feature, head_logits,
                                 predict_logits, vit_optimizer)
from bench.base.fields import bounded, choice
from bench.core.interface import ScoreExitMethod, register_method
from bench.core.task import Task
from bench.measure.calibration import SCHEMES
from methods._heads import HeadConfig, OnSharedHeads

SDN_LOSSES = ("weighted", "mean")
IC_MAX_WEIGHT = 0.9  # the authors' largest C_i (their last IC, at 90 % of the network)


# ---- SDN's objective -------------------------------------------------------------------------------------------
def ic_max_weights(n_ics: int, top: float = IC_MAX_WEIGHT) -> np.ndarray:
    """C_i [n_ics] float64: ``top * i / n_ics`` for i = 1..n_ics (the authors' 0.15, ..., 0.9 for six ICs)."""
    return top * np.arange(1, n_ics + 1, dtype=np.float64) / n_ics


def ic_weights(epoch: int, epochs: int, max_weights: np.ndarray) -> np.ndarray:
    """tau_i [n_ics] at ``epoch`` (1-based) of ``epochs``: ``min(C_i, 0.01 + epoch * C_i / epochs)``, SDN's
    schedule (``model_funcs.sdn_train``)."""
    max_weights = np.asarray(max_weights, dtype=np.float64)
    return np.minimum(max_weights, 0.01 + epoch * (max_weights / epochs))


def sdn_loss(exit_logits: Sequence[torch.Tensor], targets: torch.Tensor, mode: str,
             weights: np.ndarray | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """SDN's training loss from every exit's logits (ICs first, the final head last, each [N, C]) and targets
    [N]: ``weighted``: ``sum_i weights[i] * CE(IC_i) + CE(final)`` (``weights`` = ``ic_weights``); ``mean``:
    ztw_cv's mean of all exits' cross-entropies. Summed in the authors' order."""
    losses = [F.cross_entropy(o, targets, label_smoothing=label_smoothing) for o in exit_logits]
    if mode == "mean":
        return sum(loss for loss in losses) / len(losses)
    if mode != "weighted":
        raise ValueError(f"sdn_loss: mode {mode!r} is not one of {SDN_LOSSES}")
    assert weights is not None and len(weights) == len(losses) - 1, (weights, len(losses))
    total = 0.0
    for w, loss in zip(weights, losses[:-1]):
        total = total + float(w) * loss
    return total + losses[-1]


def _epoch_loss(cfg, n_ics: int):
    """(loss(exit_logits, targets), after_epoch): SDN's loss at the current epoch and the hook that advances it."""
    max_w, epoch = ic_max_weights(n_ics, cfg.ic_max_weight), [1]

    def loss(exit_logits, yb):
        w = ic_weights(epoch[0], cfg.epochs, max_w) if cfg.sdn_loss == "weighted" else None
        return sdn_loss(exit_logits, yb, cfg.sdn_loss, w, getattr(cfg, "label_smoothing", 0.0))

    def after_epoch():
        epoch[0] += 1
    return loss, after_epoch


def _validate_exits(logits: torch.Tensor, val_y: np.ndarray) -> tuple[float, dict]:
    """Validation accuracy of the final exit (the one kept), and every exit's, from logits [K, N, C]."""
    accs = (logits.argmax(2).numpy() == val_y).mean(1)
    return float(accs[-1]), {"val_exit_accuracy": [float(a) for a in accs]}


# ---- the ViT with internal classifiers -------------------------------------------------------------------------
@dataclass
class SDNViTConfig(ViTConfig):
    sdn_loss: str = choice("weighted", SDN_LOSSES)  # the paper's weighted IC losses, or ztw_cv's plain mean
    ic_max_weight: float = bounded(IC_MAX_WEIGHT, min=0.0)  # C_i = ic_max_weight * i / n (weighted loss only)


def ic_feature(tokens: torch.Tensor) -> torch.Tensor:
    """An IC's input from a block's output tokens [N, T, D]: the raw CLS token [N, D] (ztw_cv's
    ``vit_standard_head`` reads ``x[:, 0]``; no LayerNorm)."""
    return tokens[:, 0]


class SDNViTStages(ViTStages):
    """The ViT's staged forward; exit k < K-1 reads the raw CLS token (its IC's input), the last exit the CLS
    token after the final LayerNorm (the network's own head's input)."""

    def exit_feature(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return exit_feature(self.model, h) if k == self.num_exits - 1 else ic_feature(h)


def sdn_vit_forward(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's logits [N, C] of a ``vit-sdn`` model on images [N, C, H, W]: the ICs, then the own head."""
    h, out = embed(model, x), []
    last = len(model.blocks) - 1
    for k, blk in enumerate(model.blocks):
        h = blk(h)
        out.append(head_logits(model, exit_feature(model, h)) if k == last else model.sdn_heads[k](ic_feature(h)))
    return out


def predict_sdn_vit_logits(model, x_uint8: np.ndarray, cfg: ViTConfig, device: str = "cpu") -> torch.Tensor:
    """Every exit's logits [K, N, C]."""
    return predict_logits(model, x_uint8, cfg, device, lambda m, xb: torch.stack(sdn_vit_forward(m, xb)), dim=1)


class _SDNViTMixin:
    """A timm ViT with an IC (``Linear(D, C)``, kept in ``model.sdn_heads``) after every block but the last,
    trained jointly with it on SDN's loss (methods/sdn.py)."""

    Config = SDNViTConfig
    static_rows = False  # its static form has the ViT's architecture and cost

    @classmethod
    def from_name(cls, name: str) -> dict | None:
        return None  # timm names go to ``vit``

    @classmethod
    def create(cls, cfg, in_chans: int, num_classes: int, load_weights: bool = True) -> nn.Module:
        model = super().create(cfg, in_chans, num_classes, load_weights)
        model.sdn_heads = nn.ModuleList(nn.Linear(model.embed_dim, num_classes) for _ in range(len(model.blocks) - 1))
        return model

    @classmethod
    def train(cls, cfg, train_x, train_y, val_x, val_y, num_classes, seed, device="cpu", desc="backbone"):
        """The ViT's recipe (``ViT.train``: optimiser, warm-up and cosine decay, clipping) on SDN's loss; the
        epoch with the best validation accuracy of the final exit."""
        torch.manual_seed(seed)
        model = cls.create(cfg, in_chans=train_x.shape[-1], num_classes=num_classes).to(device)
        opt = vit_optimizer(model, cfg, device)
        loss, after_epoch = _epoch_loss(cfg, len(model.blocks) - 1)

        def validate() -> tuple[float, dict]:
            return _validate_exits(predict_sdn_vit_logits(model, val_x, cfg, device), val_y)

        return fit_epochs(model, opt, cfg, train_x, train_y, seed, device, desc,
                          lambda xb, yb: loss(sdn_vit_forward(model, xb), yb), validate,
                          before_step=warmup_cosine_schedule(opt, cfg, len(train_x)), after_epoch=after_epoch)

    @classmethod
    def stages(cls, model) -> SDNViTStages:
        return SDNViTStages(model)

    @classmethod
    def heads(cls, model) -> Heads:
        own = super().heads(model)
        ws = [ic.weight.detach().cpu().float().T for ic in model.sdn_heads] + [own.weight.T]
        bs = [ic.bias.detach().cpu().float() for ic in model.sdn_heads] + [own.bias]
        return Heads(own.weight, own.bias, (torch.stack(ws), torch.stack(bs)))

    @classmethod
    def label(cls, cfg) -> str:
        return f"{super().label(cfg)}-sdn" + ("" if cfg.sdn_loss == "weighted" else f"-{cfg.sdn_loss}")


def _sdn_defaults(defaults: dict, config: type) -> dict:
    return {name: config(**dataclasses.asdict(cfg)) for name, cfg in defaults.items()}


@register_backbone("vit-sdn")
class SDNViT(_SDNViTMixin, ViT):
    """The run's ViT with an internal classifier after every block, trained jointly on SDN's loss."""

    defaults = _sdn_defaults(ViT.defaults, SDNViTConfig)


@register_backbone("vit-scratch-sdn")
class SDNViTScratch(_SDNViTMixin, ViTScratch):
    """``vit-scratch`` with an internal classifier after every block, trained jointly on SDN's loss."""

    defaults = _sdn_defaults(ViTScratch.defaults, SDNViTConfig)


# ---- MSDNet trained as an SDN ----------------------------------------------------------------------------------
@dataclass
class SDNMSDNetConfig(MSDNetConfig):
    sdn_loss: str = choice("weighted", SDN_LOSSES)
    ic_max_weight: float = bounded(IC_MAX_WEIGHT, min=0.0)


@register_backbone("msdnet-sdn")
class SDNMSDNet(MSDNetBackbone):
    """MSDNet whose classifiers are trained as SDN's ICs (SDN's weighted loss instead of the plain sum)."""

    Config = SDNMSDNetConfig
    static_rows = False  # architecture and cost are MSDNet's
    defaults = _sdn_defaults(MSDNetBackbone.defaults, SDNMSDNetConfig)

    @classmethod
    def train(cls, cfg, train_x, train_y, val_x, val_y, num_classes, seed, device="cpu", desc="msdnet"):
        """MSDNet's recipe (``MSDNetBackbone.train``) on SDN's loss."""
        torch.manual_seed(seed)
        model = cls.create(cfg, train_x.shape[-1], num_classes).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              **fused_optimizer(device))
        loss, next_epoch = _epoch_loss(cfg, model.num_exits - 1)
        before_step, step_lr = None, None
        if cfg.schedule == "cosine":
            before_step = warmup_cosine_schedule(opt, cfg, len(train_x))
        else:
            milestones = sorted({max(1, round(f * cfg.epochs)) for f in cfg.lr_milestones})
            step_lr = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1).step

        def after_epoch() -> None:
            next_epoch()
            if step_lr is not None:
                step_lr()

        def validate() -> tuple[float, dict]:
            return _validate_exits(predict_exit_logits(model, val_x, cfg, device), val_y)

        return fit_epochs(model, opt, cfg, train_x, train_y, seed, device, desc,
                          lambda xb, yb: loss(model(xb), yb), validate, before_step=before_step,
                          after_epoch=after_epoch, channels_last=True)


# ---- the method ------------------------------------------------------------------------------------------------
@register_method("sdn")
@dataclass
class SDN(OnSharedHeads, ScoreExitMethod):
    # the run's backbone -> its SDN-trained form; any other network: IC-only training on its frozen features
    networks: ClassVar[dict[str, str]] = {"vit": "vit-sdn", "vit-scratch": "vit-scratch-sdn",
                                          "msdnet": "msdnet-sdn"}

    scheme: str = choice("shared", SCHEMES)
    # fields of the network the method brings (``--set sdn.FIELD`` sets them there; they are in its cache key)
    sdn_loss: str = choice("weighted", SDN_LOSSES)
    ic_max_weight: float = bounded(IC_MAX_WEIGHT, min=0.0)

    def fit(self, task: Task) -> "SDN":
        # an SDN network's ICs (task.exit_heads); a single-exit network gets IC-only training (shared heads)
        self._fit_heads(task, HeadConfig())
        self.ic_only_ = task.exit_heads is None
        return self

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1).amax(dim=-1)

    def decision_macs(self, num_classes: int) -> int:
        return 2 * num_classes
