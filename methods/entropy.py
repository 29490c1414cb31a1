"""``entropy`` — entropy gating (BranchyNet, Teerapittayanon et al., ICPR 2016).

Method card
- Trains: the same shared cross-entropy heads as ``threshold`` (identical weights for the same seed).
- Exit rule: leave at the first exit whose softmax entropy H(p) <= t, written as score -H(p) >= -t so the
  harness's shared budget calibration applies unchanged (one threshold for all exits, set on validation).
- Cost: head (D*C MACs) plus the decision (3C operations: softmax normaliser, log and multiply-add).
- Deviations: BranchyNet hand-picks a threshold per exit; here the harness calibrates it to each budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.core.interface import register_method
from methods._heads import CrossEntropyHeadsMethod


@register_method("entropy")
@dataclass
class EntropyGate(CrossEntropyHeadsMethod):
    def score(self, logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        return (logp.exp() * logp).sum(dim=-1)  # = -H(p)

    def decision_macs(self, num_classes: int) -> int:
        return 3 * num_classes
