"""``patience`` — patience-based early exit (PABEE; Zhou et al., "BERT Loses Patience", NeurIPS 2020).

Method card
- Trains: the same shared cross-entropy heads as ``threshold`` / ``entropy`` (identical weights for the same
  seed); the backbone's head is the last exit.
- Exit rule: a counter of consecutive exits whose argmax did not change (0 at exit 0; at exit k >= 1 it grows
  by one when argmax_k == argmax_{k-1} and resets to 0 otherwise). A sample leaves at the first exit k < K-1
  where the counter reaches the patience t, i.e. after t+1 agreeing exits; otherwise at the last exit.
- Operating points: integer t in 1..K-1, so few points; the harness gives each budget the t whose validation
  ``macs_rel`` is the largest <= b; budgets no t meets are infeasible rows. t = K-1 never
  exits early (the counter cannot reach K-1 before the last exit), so it costs slightly more than 1. Every t
  is also reported as a native point.
- Streaming: ``stream`` keeps (previous argmax, counter) per running sample in ``state``; it equals
  ``decide``.
- Cost: each intermediate exit adds its head (D*C MACs) and the decision (C operations: the argmax; the
  comparison and counter update are not counted).
- Deviations: PABEE trains its heads with a weighted sum of losses through a fine-tuned backbone; here the
  heads are the harness's shared cross-entropy heads on the frozen backbone, as for every baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch

from bench.core.interface import OperatingPoint, register_method
from bench.core.task import Task
from methods._heads import CrossEntropyHeadsMethod


def patience_exits(argmax: np.ndarray, patience: int) -> np.ndarray:
    """Exit index [N] from per-exit predictions argmax [K, N] and patience t >= 1."""
    argmax = np.asarray(argmax)
    k, n = argmax.shape
    exits = np.full(n, k - 1, dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    count = np.zeros(n, dtype=np.int64)
    for i in range(1, k - 1):  # exit 0 has counter 0 < t; the last exit takes everyone left
        count = np.where(argmax[i] == argmax[i - 1], count + 1, 0)
        leave = ~done & (count >= patience)
        exits[leave] = i
        done |= leave
    return exits


@register_method("patience")
@dataclass
class Patience(CrossEntropyHeadsMethod):
    def decision_macs(self, num_classes: int) -> int:
        return num_classes  # the argmax

    def _patience(self, point: OperatingPoint) -> int:
        t = point.params.get("patience")
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
            raise ValueError(f"patience: point.params['patience'] must be an integer >= 1, got {t!r}.")
        return int(t)

    def operating_points(self, task: Task, budgets) -> list[OperatingPoint]:
        """Every patience t = 1..K-1 (the harness picks one per budget)."""
        self.check_fitted()
        return [OperatingPoint({"patience": t}) for t in range(1, task.num_exits)]

    def decide(self, logits: torch.Tensor, point: OperatingPoint, targets: np.ndarray | None = None
               ) -> np.ndarray:
        """Exit index [N] from logits [K, N, C]; exit k's decision reads exits 0..k only."""
        self.check_logits(logits)
        return patience_exits(logits.argmax(-1).numpy(), self._patience(point))

    def stream(self, k: int, features_k: torch.Tensor, point: OperatingPoint, state: dict | None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Exit k's logits and the mask [N_k] of the running samples that leave there, on the features' device;
        state = {"prev": argmax, "count": counter} per running sample."""
        t = self._patience(point)
        logits = self.exit_head(k, features_k, point)
        pred = logits.argmax(-1)
        if state is None:
            count = torch.zeros_like(pred)
        else:
            count = torch.where(pred == state["prev"], state["count"] + 1, 0)
        return logits, count >= t, {"prev": pred, "count": count}
