"""Budget calibration: the one shared function that turns a score-based exit rule into operating points.

Rule: a sample leaves at the first exit k < K-1 whose score ``s[k] >= t_k``; otherwise at the last exit.
Default scheme: one threshold ``t`` shared by all exits (the other, ``geometric``, is MSDNet's per-exit
thresholds from target exit shares r^k; ``calibrate_thresholds`` picks one). For a budget ``b`` (a target
``macs_rel``) the chosen threshold is the one whose *validation* mean cost is the largest that is ``<= b``; among thresholds with the
same validation cost, the smallest (every such threshold makes the same validation decisions). No threshold
fits when even "everyone leaves at exit 0" costs more than ``b``: that budget is infeasible (None).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def first_exit(scores: np.ndarray, thresholds: float | np.ndarray) -> np.ndarray:
    """Exit index [N] for scores [K, N] and a threshold (scalar or per exit [K]); the last exit takes the rest."""
    scores = np.asarray(scores)
    k = scores.shape[0]
    if k == 1:
        return np.zeros(scores.shape[1], dtype=np.int64)
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (k,))
    hit = scores[:-1] >= t[:-1, None]  # [K-1, N]
    return np.where(hit.any(0), hit.argmax(0), k - 1)


def threshold_cost_curve(scores: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct operating point of the shared-threshold rule and its mean cost, vectorised.

    scores [K, N]; costs [K] cumulative cost of each exit (any unit, e.g. macs_rel).
    Returns (thresholds [M], mean_cost [M]) with thresholds increasing (the last one +inf: no early exit)
    and mean cost non-decreasing.

    Why it works: with ``m[k] = max(s[0..k])`` (a running maximum), "first k with s[k] >= t" equals
    "first k with m[k] >= t", and since m is non-decreasing in k the exit index is #{k < K-1 : m[k] < t}. So a
    sample's cost is costs[0] plus costs[k+1] - costs[k] for every k < K-1 with m[k] < t: sort all m values
    once and the cost curve is a cumulative sum.
    """
    scores = np.asarray(scores, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    k, n = scores.shape
    assert costs.shape == (k,), (costs.shape, k)
    if k == 1:
        return np.array([np.inf]), np.array([costs[0]])
    running = np.maximum.accumulate(scores[:-1], axis=0)  # [K-1, N]
    deltas = np.broadcast_to(np.diff(costs)[:, None], running.shape)
    vals, d = running.ravel(), deltas.ravel()
    order = np.argsort(vals, kind="stable")
    vals, d = vals[order], d[order]
    cum = np.concatenate([[0.0], np.cumsum(d)])
    uniq, first = np.unique(vals, return_index=True)
    # threshold t = uniq[i]: the entries with m < t are exactly the ``first[i]`` smallest
    thresholds = np.concatenate([uniq, [np.inf]])
    total = np.concatenate([cum[first], [cum[-1]]])
    return thresholds, costs[0] + total / n


def select_budget(point_costs: np.ndarray, budgets: Sequence[float]) -> list[int | None]:
    """For each budget, the index of the point with the largest cost <= budget (the first such index on ties),
    or None when no point fits. ``point_costs`` [M] need not be sorted."""
    point_costs = np.asarray(point_costs, dtype=np.float64)
    out: list[int | None] = []
    for b in budgets:
        ok = np.flatnonzero(point_costs <= b + 1e-12)
        if len(ok) == 0:
            out.append(None)
            continue
        best = point_costs[ok].max()
        out.append(int(ok[np.flatnonzero(point_costs[ok] == best)[0]]))
    return out


def calibrate_shared_threshold(scores: np.ndarray, costs: np.ndarray, budgets: Sequence[float]
                               ) -> list[tuple[float, float] | None]:
    """Per budget: (threshold, validation mean cost) or None if infeasible. scores [K, N] are validation
    scores; costs [K] in the budget's unit (macs_rel)."""
    thresholds, curve = threshold_cost_curve(scores, costs)
    return [None if i is None else (float(thresholds[i]), float(curve[i]))
            for i in select_budget(curve, budgets)]


# MSDNet's sweep of the ratio r (its dynamic-evaluation script: r = 0.05, 0.10, ..., 1.95)
GEOMETRIC_RATIOS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 40))
SCHEMES = ("shared", "geometric")


def geometric_thresholds(scores: np.ndarray, ratio: float) -> np.ndarray:
    """MSDNet's budgeted-batch thresholds [K] for one ratio r, from validation scores [K, N].

    Target exit shares p_k = r^(k+1) / sum_j r^(j+1). For each exit k < K-1 in order, among the samples that
    have not left yet, the threshold is the score of the floor(N p_k)-th most confident one (+inf when that is
    0 or more than remain: nobody leaves there); the samples at or above it leave. The last exit takes the rest
    (threshold -inf). Ties can send a few more samples than the target, as in MSDNet's script."""
    scores = np.asarray(scores, dtype=np.float64)
    k_all, n = scores.shape
    p = ratio ** np.arange(1, k_all + 1, dtype=np.float64)
    p /= p.sum()
    t = np.full(k_all, np.inf)
    t[-1] = -np.inf
    left = np.zeros(n, dtype=bool)
    for k in range(k_all - 1):
        want = int(np.floor(n * p[k]))
        remaining = np.flatnonzero(~left)
        if 0 < want <= len(remaining):
            t[k] = np.sort(scores[k, remaining])[::-1][want - 1]
            left |= scores[k] >= t[k]
    return t


def calibrate_geometric(scores: np.ndarray, costs: np.ndarray, budgets: Sequence[float],
                        ratios: Sequence[float] = GEOMETRIC_RATIOS) -> list[tuple[np.ndarray, float, float] | None]:
    """Per budget: (per-exit thresholds [K], ratio r, validation mean cost) of the ratio whose validation cost
    is the largest within the budget, or None if even the cheapest ratio costs more."""
    scores, costs = np.asarray(scores, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    points = [geometric_thresholds(scores, r) for r in ratios]
    mean_cost = np.array([costs[first_exit(scores, t)].mean() for t in points])
    return [None if i is None else (points[i], float(ratios[i]), float(mean_cost[i]))
            for i in select_budget(mean_cost, budgets)]


def calibrate_thresholds(scheme: str, scores: np.ndarray, costs: np.ndarray, budgets: Sequence[float]
                         ) -> list[tuple[dict, float] | None]:
    """The harness's one entry point: per budget, (operating-point params, validation mean cost) or None.
    ``scheme`` is ``shared`` (one threshold for every exit) or ``geometric`` (MSDNet's r^k protocol);
    params hold ``threshold`` (a number, or a list with one per exit) and ``scheme``."""
    if scheme == "shared":
        return [None if r is None else ({"threshold": r[0], "scheme": "shared"}, r[1])
                for r in calibrate_shared_threshold(scores, costs, budgets)]
    if scheme == "geometric":
        return [None if r is None else ({"threshold": [float(v) for v in r[0]], "scheme": "geometric",
                                         "ratio": r[1]}, r[2])
                for r in calibrate_geometric(scores, costs, budgets)]
    raise ValueError(f"calibration scheme {scheme!r} is unknown: use one of {', '.join(SCHEMES)}.")
