"""Split conformal prediction for early-exit outputs (LAC and randomised APS), calibrated globally or per exit.

All functions are pure. ``probs`` [N, C] is the emitted softmax of each sample (at the exit it left from),
``targets`` [N], ``u`` [N] uniform(0, 1) draws for APS's randomisation.

Threshold: the ceil((n+1)(1-alpha))-th smallest calibration score; +inf (every class) when that rank exceeds
n. Per-exit calibration uses the calibration samples that leave at exit k; an exit with fewer than
ceil((1-alpha)/alpha) of them falls back to the global threshold, and the fallbacks are counted.
"""
from __future__ import annotations

import math

import numpy as np

SCORES = ("lac", "aps")


def _sorted_cumsum(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every class c: the total probability of the classes ranked before c (descending, stable ties)."""
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=1)
    before_sorted = np.cumsum(sorted_p, axis=1) - sorted_p
    before = np.empty_like(probs)
    np.put_along_axis(before, order, before_sorted, axis=1)
    return before, order


def class_scores(kind: str, probs: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
    """The non-conformity score every class would have [N, C]: LAC 1 - p_c; APS (mass ranked before c) +
    u * p_c. A prediction set is {c : score_c <= threshold}; the calibration score is the true class's."""
    probs = np.asarray(probs, dtype=np.float64)
    if kind == "lac":
        return 1.0 - probs
    if kind == "aps":
        if u is None:
            raise ValueError("APS needs uniform draws u [N] for its randomisation")
        before, _ = _sorted_cumsum(probs)
        return before + np.asarray(u)[:, None] * probs
    raise ValueError(f"unknown conformal score {kind!r}; use one of {SCORES}")


def scores_for(kind: str, probs: np.ndarray, targets: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
    """Non-conformity score of the true class [N]."""
    return class_scores(kind, probs, u)[np.arange(len(targets)), targets]


def prediction_sets(kind: str, probs: np.ndarray, qhat: np.ndarray | float, u: np.ndarray | None = None
                    ) -> np.ndarray:
    """Boolean sets [N, C]: every class whose score is <= the sample's threshold ``qhat`` ([N] or scalar)."""
    return sets_from_scores(class_scores(kind, probs, u), qhat)


def sets_from_scores(scores: np.ndarray, qhat: np.ndarray | float) -> np.ndarray:
    q = np.broadcast_to(np.asarray(qhat, dtype=np.float64), (len(scores),))[:, None]
    return scores <= q


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return math.inf
    return float(np.sort(scores)[rank - 1])


def min_samples(alpha: float) -> int:
    """Fewest calibration samples for which the threshold can be finite: ceil((1-alpha)/alpha)."""
    return math.ceil((1 - alpha) / alpha - 1e-12)


def per_exit_quantiles(scores: np.ndarray, exits: np.ndarray, num_exits: int, alpha: float
                       ) -> tuple[np.ndarray, int]:
    """Thresholds [K] from the calibration samples leaving at each exit, and how many exits fell back to the
    global threshold for having fewer than ``min_samples(alpha)`` samples (exits nobody used count too)."""
    global_q = conformal_quantile(scores, alpha)
    q = np.full(num_exits, global_q)
    fallbacks = 0
    for k in range(num_exits):
        at = exits == k
        if at.sum() >= min_samples(alpha):
            q[k] = conformal_quantile(scores[at], alpha)
        else:
            fallbacks += 1
    return q, fallbacks
