"""``msdnet`` — MSDNet (Huang et al., ICLR 2018): a multi-scale dense network trained end to end with an exit
after every block, and its budgeted-batch exit rule.

Method card
- Paper: "Multi-Scale Dense Networks for Resource Efficient Image Classification", ICLR 2018.
- Network: ``bench.backbones.msdnet`` (3 scales, dense blocks, a classifier on the coarsest scale after each block;
  default: the budgeted CIFAR configuration, 5 blocks, lin_grow, step 1, base 1, 16 channels), trained with
  the plain sum of per-exit cross-entropies (SGD 0.1, momentum 0.9, wd 1e-4, lr / 10 at 50 % and 75 %).
  The method always runs on its own network, whatever the run's ``--backbone``; ``--set backbone.FIELD`` (with
  ``--backbone msdnet``) or ``--set backbone.msdnet.FIELD`` (on another run) sets any field of
  ``bench.backbones.msdnet.MSDNetConfig``.
- Exit rule: max softmax of the exit's own classifier, with MSDNet's budget protocol (``scheme=geometric``:
  target exit shares proportional to r^k, 39 values of r from 0.05 to 1.95, per-exit thresholds from the
  validation split; bench.measure.calibration). ``--set msdnet.scheme=shared`` uses the harness's shared threshold.
- Cost: blocks run (all scales of block k before exit k), each classifier evaluated on the way (convs +
  linear), the decision (2C). ``macs_rel`` is relative to the static MSDNet (every block and the last
  classifier only), so the budgets of MSDNet rows are fractions of MSDNet's cost, not the ViT's: compare
  networks on the absolute ``macs``.
- Deviations: images smaller than ``img_size`` are resized; small CPU configurations for digits and
  fashion-mnist (``bench.backbones.msdnet.MSDNET_DEFAULTS``); the checkpoint with the best validation accuracy at the
  last exit is kept (the paper's script does the same on its held-out 5,000 images).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.base.fields import choice
from bench.core.interface import ScoreExitMethod, register_method
from bench.measure.calibration import SCHEMES
from methods._heads import HeadConfig, OnSharedHeads


@register_method("msdnet")
@dataclass
class MSDNetMethod(OnSharedHeads, ScoreExitMethod):
    networks: ClassVar[dict[str, str]] = {"*": "msdnet"}  # always on its own network
    scheme: str = choice("geometric", SCHEMES)

    def fit(self, task) -> "MSDNetMethod":
        # on MSDNet the heads are the network's own; a single-exit task (the conformance checks' synthetic
        # one) gets the shared cross-entropy heads instead
        self._fit_heads(task, HeadConfig())
        return self

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1).amax(dim=-1)

    def decision_macs(self, num_classes: int) -> int:
        return 2 * num_classes
