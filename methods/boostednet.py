"""``boostednet`` — Boosted Dynamic Neural Networks (Yu et al., AAAI 2023): the exits as a boosting ensemble.

Method card
- Paper: "Boosted Dynamic Neural Networks", AAAI 2023 (BoostNet).
- Prediction at exit k: ``F_0 = f_0``, ``F_k = f_k + boost_weight * F_{k-1}`` (0.5), so each head learns the
  residual the earlier exits left; during training F_{k-1} is detached.
- Two forms, chosen by the run's backbone:
  - frozen backbone (the default; how JEI-DNN's paper compares against it): one linear head per exit on the
    cached features, the last exit included, trained in order, head k on the residual of the detached ensemble
    of the heads before it, each keeping the epoch with the best validation accuracy of F_k (AdamW, cosine,
    the shared heads' hyper-parameters). No trunk is trained, so there is no gradient to rescale.
  - ``--backbone msdnet`` (the paper's setting): MSDNet trained as BoostedNet (the ``msdnet-boosted`` backbone,
    registered here): boosted losses and the paper's gradient rescaling (the coarsest-scale map scaled by
    1/(K-k) before head k and by K-k-1 on its way on, so block k gets the mean gradient of the K-k heads that
    depend on it). The method combines that network's own heads; ``--set boostednet.boost_weight`` sets the weight
    for both the network's training and the method (a method field that is also a field of the network it
    brings configures both).
- Exit rule: max softmax of the ensemble F_k, with MSDNet's budget protocol (``scheme=geometric``, as the
  paper's evaluation); ``--set boostednet.scheme=shared`` for the shared threshold.
- Cost: each exit on the way adds its head (D*C), the ensemble update (C) and the decision (2C); on MSDNet also
  its classifier's convs.
- Deviations: curves are never forced monotone (the paper's scripts can, with --flat_curve).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.backbones.base import register_backbone
from bench.backbones.msdnet import MSDNet, MSDNetBackbone, MSDNetConfig
from bench.base.fields import bounded, choice
from bench.core.interface import ScoreExitMethod, register_method
from bench.core.task import SplitData, Task
from bench.measure.calibration import SCHEMES
from methods._heads import HeadConfig


def boosted_ensemble(logits: list[torch.Tensor] | torch.Tensor, weight: float, detach: bool = False
                     ) -> list[torch.Tensor]:
    """BoostedNet's exit predictions F_0 = f_0, F_i = f_i + weight * F_{i-1} (F_{i-1} detached in training)."""
    out: list[torch.Tensor] = []
    for k in range(len(logits)):
        if k == 0:
            out.append(logits[0])
        else:
            prev = out[-1].detach() if detach else out[-1]
            out.append(logits[k] + weight * prev)
    return out


# ---- the network side: MSDNet trained as BoostedNet -------------------------------------------------------------
class GradRescale(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def rescaled_exit_logits(model: MSDNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's own logits f_k, with BoostedNet's gradient rescaling: the coarsest-scale map is scaled by
    1 / (K - k) in the backward pass before classifier k and by K - k - 1 on its way to later blocks, so block k
    receives the mean gradient of the K - k heads that depend on it."""
    xs, out, k_all = model.embed(x), [], model.num_exits
    for k in range(k_all):
        xs = model.block(k, xs)
        xs = [*xs[:-1], GradRescale.apply(xs[-1], 1.0 / (k_all - k))]
        out.append(model.exit_logits(k, model.exit_feature(k, xs)))
        xs = [*xs[:-1], GradRescale.apply(xs[-1], float(k_all - k - 1))]
    return out


@dataclass
class BoostedMSDNetConfig(MSDNetConfig):
    boost_weight: float = bounded(0.5, min=0.0)  # F_i = f_i + boost_weight * stopgrad(F_{i-1})


@register_backbone("msdnet-boosted")
class BoostedMSDNet(MSDNetBackbone):
    """MSDNet trained as BoostedNet (Yu et al., AAAI 2023): exit i predicts F_i = f_i + w stopgrad(F_{i-1}) and
    its loss is CE(F_i), with gradient rescaling; the epoch kept is the one whose last ensemble F_{K-1} is best on
    validation. Its architecture and cost are MSDNet's."""

    Config = BoostedMSDNetConfig
    static_rows = False  # architecture and cost are MSDNet's; its static form is not a network of its own
    defaults = {name: BoostedMSDNetConfig(**dataclasses.asdict(cfg)) for name, cfg in MSDNetBackbone.defaults.items()}

    @classmethod
    def exit_outputs(cls, cfg, model, xb):
        return boosted_ensemble(rescaled_exit_logits(model, xb), cfg.boost_weight, detach=True)

    @classmethod
    def prediction(cls, cfg, exit_logits):
        return boosted_ensemble(exit_logits, cfg.boost_weight)[-1]


def train_boosted_heads(train: SplitData, val: SplitData, num_classes: int, seed: int, cfg: HeadConfig,
                        weight: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Heads W [K, D, C], b [K, C] trained in exit order on the frozen features, head k on the residual of
    ``weight * F_{k-1}`` (fixed: the selected earlier heads), keeping its best epoch on validation accuracy of
    F_k. Returns (W, b, val_accuracy [K])."""
    k_all, n, d = train.features.shape
    gen = torch.Generator().manual_seed(seed)
    y, yv = torch.from_numpy(train.labels), torch.from_numpy(val.labels)
    ws, bs, accs = [], [], []
    prev, prev_v = torch.zeros(n, num_classes), torch.zeros(len(yv), num_classes)
    steps = cfg.epochs * -(-n // cfg.batch_size)
    for k in tqdm(range(k_all), desc="train boosted heads", unit="exit", leave=False, dynamic_ncols=True):
        lin = torch.nn.Linear(d, num_classes)
        with torch.no_grad():  # nn.Linear's default init, from the method's own generator
            torch.nn.init.kaiming_uniform_(lin.weight, a=5 ** 0.5, generator=gen)
            lin.bias.uniform_(-1 / d ** 0.5, 1 / d ** 0.5, generator=gen)
        opt = torch.optim.AdamW(lin.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        x, xv = train.features[k], val.features[k]
        offset, offset_v = weight * prev, weight * prev_v
        best = (-1.0, lin.weight.detach().T.clone(), lin.bias.detach().clone())
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                loss = F.cross_entropy(lin(x[idx]) + offset[idx], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                acc = ((xv @ lin.weight.T + lin.bias + offset_v).argmax(1) == yv).float().mean().item()
            if acc > best[0]:
                best = (acc, lin.weight.detach().T.clone(), lin.bias.detach().clone())
        acc, w, b = best
        ws.append(w), bs.append(b), accs.append(acc)
        with torch.no_grad():
            prev = x @ w + b + offset
            prev_v = xv @ w + b + offset_v
    return torch.stack(ws), torch.stack(bs), np.array(accs)


@register_method("boostednet")
@dataclass
class BoostedNet(ScoreExitMethod):
    networks: ClassVar[dict[str, str]] = {"msdnet": "msdnet-boosted"}  # on MSDNet runs: its boosted training

    scheme: str = choice("geometric", SCHEMES)
    boost_weight: float = bounded(0.5, min=0.0)
    epochs: int = bounded(HeadConfig.epochs, min=1)
    lr: float = bounded(HeadConfig.lr, min=0.0)
    weight_decay: float = bounded(HeadConfig.weight_decay, min=0.0)
    batch_size: int = bounded(HeadConfig.batch_size, min=1)

    def fit(self, task: Task) -> "BoostedNet":
        if task.network == BoostedMSDNet.name:  # the network's own heads, trained as BoostedNet with it
            self.weight_, self.bias_ = task.exit_heads
            self.val_accuracy_ = None
        else:
            cfg = HeadConfig(self.epochs, self.lr, self.weight_decay, self.batch_size)
            self.weight_, self.bias_, self.val_accuracy_ = train_boosted_heads(
                task.splits["train"], task.splits["val"], task.num_classes, task.seed, cfg, self.boost_weight)
        c = task.num_classes
        extra = np.full(task.num_exits - 1, task.im_head_macs() + self.decision_macs(c))  # head, decision
        extra[1:] += c  # the ensemble update F_k = f_k + w F_{k-1} (none at exit 0)
        costs = task.exit_costs(extra)  # the last head has the backbone head's size, counted there
        if task.num_exits > 1:
            costs[-1] += c  # the last exit's ensemble update
        self.costs_ = costs
        return self

    def _head(self, k: int, features_k: torch.Tensor) -> torch.Tensor:
        return features_k @ self.weight_[k] + self.bias_[k]

    def exit_logits(self, split: SplitData, point=None) -> torch.Tensor:
        """The ensemble's logits F [K, N, C]."""
        self.check_fitted()
        with torch.no_grad():
            f = [self._head(k, split.features[k]) for k in range(len(self.costs_))]
            return torch.stack(boosted_ensemble(f, self.boost_weight))

    def stream(self, k: int, features_k: torch.Tensor, point, state: dict | None):
        """F_k on the survivors; F_{k-1} of each running sample travels in ``state["ensemble"]``."""
        with torch.no_grad():
            logits = self._head(k, features_k)
            if k > 0:
                logits = logits + self.boost_weight * state["ensemble"]
        leave = self.score(logits.double()) >= float(self._threshold(point, k))
        return logits, leave, {**(state or {}), "ensemble": logits}

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1).amax(dim=-1)

    def decision_macs(self, num_classes: int) -> int:
        return 2 * num_classes
