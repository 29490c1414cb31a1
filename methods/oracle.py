"""``oracle`` — UPPER BOUND, not a method: the best any exit policy can do with the shared heads.

Method card
- What it is: a bound, labelled as such (``bound = True``). It reads the labels of the split it decides on,
  so it cannot be deployed and cannot stream; tables must show it as a bound, never as a competitor.
- Heads: exactly the shared cross-entropy heads of ``threshold`` / ``entropy`` (same hyper-parameters, same
  memoised weights); the backbone's head is the last exit.
- Rule, unconstrained (``{"budget": None}``, its native point): each sample leaves at its earliest correct
  exit; a sample no exit gets right leaves at the FIRST exit (sending it last would inflate the bound's cost).
- Rule under a budget b (a mean ``macs_rel`` over the split being decided): start with every sample at exit 0,
  then move samples to their earliest correct exit in order of the extra cost that costs (cheapest first)
  while the mean cost stays <= b. Every correction is worth one correct sample, so this is a unit-value
  knapsack and taking the lightest items first is the exact optimum (also the cheapest among optimal
  assignments). Ties in extra cost are broken by the target's softmax probability at that exit (higher first),
  a property of the sample, so the rule does not depend on row order. If even "everyone at exit 0" costs more
  than b the budget is infeasible.
- Cost: heads only; the decision is free (0 operations), so at equal exits the oracle is never charged more
  than a real method, and the bound holds at the same realised cost.
- Operating points: one point ``{"budget": b}`` per budget; ``val_macs_rel`` is the cost the rule achieves on
  val (measured by the harness).
- Conformance: fails by nature the checks listed in ``expected_failures`` (label peeking, causality,
  streaming and the runner's path, batch invariance), each with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from bench.core.interface import OperatingPoint, register_method
from bench.core.task import Task
from methods._heads import CrossEntropyHeadsMethod

_TOL = 1e-12  # relative slack on budget comparisons, the same as bench.measure.calibration.select_budget


def oracle_exits(correct: np.ndarray, costs: np.ndarray, budget: float | None,
                 tie_key: np.ndarray | None = None) -> np.ndarray:
    """The oracle's exit index [N].

    correct [K, N] bool: exit k predicts sample n correctly. costs [K] cumulative cost of each exit, in the
    budget's unit (macs_rel). budget: target mean cost, or None (unconstrained). tie_key [N]: among samples
    with the same extra cost, larger keys are corrected first (default: row order).
    Raises ValueError when the budget is infeasible (everyone at exit 0 already costs more).
    """
    correct = np.asarray(correct, dtype=bool)
    costs = np.asarray(costs, dtype=np.float64)
    k, n = correct.shape
    assert costs.shape == (k,), (costs.shape, k)
    fixable = correct.any(0)
    earliest = np.where(fixable, correct.argmax(0), 0)  # never-correct samples: the first exit
    if budget is None:
        return earliest.astype(np.int64)
    if costs[0] > budget * (1 + _TOL) + _TOL:
        raise ValueError(f"oracle: budget {budget} is infeasible: every sample at exit 0 costs {costs[0]:.6g}.")
    extra = costs[earliest] - costs[0]  # >= 0; 0 for samples right at exit 0 and for never-correct ones
    key = np.zeros(n) if tie_key is None else -np.asarray(tie_key, dtype=np.float64)
    order = np.lexsort((key, extra))  # cheapest extra cost first, then larger tie_key; stable
    allowed = (budget - costs[0]) * n
    taken = int(np.searchsorted(np.cumsum(extra[order]), allowed * (1 + _TOL) + _TOL, side="right"))
    exits = np.zeros(n, dtype=np.int64)
    exits[order[:taken]] = earliest[order[:taken]]
    return exits


@register_method("oracle")
@dataclass
class Oracle(CrossEntropyHeadsMethod):
    bound: ClassVar[bool] = True
    expected_failures: ClassVar[dict[str, str]] = {
        "check_no_label_peeking": "a bound reads the labels by definition: with them hidden it has no rule.",
        "check_causality": "a never-correct sample goes to exit 0 only because every later exit is wrong, and "
                           "under a budget which samples get corrected depends on their later exits.",
        "check_streaming": "it needs labels and the whole split (a mean-cost knapsack over every sample), "
                           "neither of which a streaming runner has; stream raises NotImplementedError and "
                           "bench.pipeline.runner refuses bounds.",
        "check_batch_invariance": "the budget is a mean over the split being decided: the knapsack couples the "
                                  "samples, so halves of a split spend their budgets differently.",
    }

    def decision_macs(self, num_classes: int) -> int:
        return 0  # the bound is charged nothing for deciding

    def fit(self, task: Task) -> "Oracle":
        super().fit(task)
        self.static_macs_ = int(task.macs.static)
        return self

    def operating_points(self, task: Task, budgets) -> list[OperatingPoint]:
        """The rule at each feasible budget (``{"budget": b}``, serving budget b), and the unconstrained oracle
        (``{"budget": None}``) as its own point."""
        self.check_fitted()
        c0 = self.costs_[0] / self.static_macs_
        return [OperatingPoint({"budget": float(b)}, b) for b in budgets if c0 <= b * (1 + _TOL) + _TOL] + \
            [OperatingPoint({"budget": None})]

    def decide(self, logits: torch.Tensor, point: OperatingPoint, targets: np.ndarray | None = None
               ) -> np.ndarray:
        """Exit index [N] from logits [K, N, C] and the labels ``targets`` [N] (required: this is a bound)."""
        self.check_fitted()
        self.check_logits(logits)
        if targets is None:
            raise ValueError("oracle is an upper bound that reads the labels: decide needs targets [N] "
                             "(the harness passes them because Oracle.bound is True).")
        targets = np.asarray(targets)
        if targets.shape != (logits.shape[1],):
            raise ValueError(f"oracle.decide: targets must have shape [N={logits.shape[1]}], got {targets.shape}.")
        y = torch.from_numpy(targets.astype(np.int64))
        correct = (logits.argmax(-1) == y).numpy()  # [K, N]
        earliest = np.where(correct.any(0), correct.argmax(0), 0)
        # tie-break on a property of the sample (its target probability at its earliest correct exit), not
        # its row, so that permuting the split permutes the decisions
        probs = torch.softmax(logits.double(), dim=-1)
        tie = probs[torch.from_numpy(earliest), torch.arange(len(y)), y].numpy()
        return oracle_exits(correct, self.costs_ / self.static_macs_, point.params["budget"], tie)

    def stream(self, k, features_k, point, state):
        raise NotImplementedError("oracle is an upper bound: it needs each sample's label and every exit's "
                                  "prediction (and, under a budget, the whole split) before deciding, so it "
                                  "has no streaming form.")
