"""``threshold`` — max-softmax confidence thresholding (the classic early-exit baseline).

Method card
- Paper lineage: BranchyNet-style confidence exits; the budgeted protocol of MSDNet (Huang et al., ICLR 2018).
- Trains: one linear head (IM) per intermediate exit on the frozen backbone's cached features, plain
  cross-entropy (shared with ``entropy``); the backbone's head is the last exit.
- Exit rule: leave at the first exit whose max softmax probability >= t. t is set per budget on the
  validation split by the harness's shared calibration (one threshold for all exits).
- Cost: each intermediate exit adds its head (D*C MACs) and the decision (2C operations: the softmax
  normaliser and the max).
- Deviations: MSDNet sets one threshold per exit from target exit shares (r^k); the harness default is one
  shared threshold bisected to the budget, which is equally valid and the same for every method.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.core.interface import register_method
from methods._heads import CrossEntropyHeadsMethod


@register_method("threshold")
@dataclass
class MaxSoftmaxThreshold(CrossEntropyHeadsMethod):
    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1).amax(dim=-1)

    def decision_macs(self, num_classes: int) -> int:
        return 2 * num_classes
