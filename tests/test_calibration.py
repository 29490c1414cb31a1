"""Budget calibration: the vectorised cost curve equals a slow loop, ties included."""
import numpy as np
import pytest

from bench.measure.calibration import calibrate_shared_threshold, first_exit, select_budget, threshold_cost_curve


def slow_first_exit(scores, t):
    k, n = scores.shape
    out = np.full(n, k - 1)
    for i in range(n):
        for j in range(k - 1):
            if scores[j, i] >= t:
                out[i] = j
                break
    return out


def slow_calibrate(scores, costs, budget):
    """Try every distinct threshold (every score value, and +-inf), keep the largest mean cost <= budget;
    among equal costs the smallest threshold."""
    best = None
    for t in sorted(set(scores.ravel().tolist()) | {np.inf, -np.inf}):
        c = costs[slow_first_exit(scores, t)].mean()
        if c <= budget + 1e-12 and (best is None or c > best[1] + 1e-12):
            best = (t, c)
    return best


def test_first_exit_hand_case():
    s = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.0, 0.0, 0.0]])
    assert first_exit(s, 0.5).tolist() == [0, 1, 0]
    assert first_exit(s, 0.85).tolist() == [0, 2, 2]
    assert first_exit(s, np.inf).tolist() == [2, 2, 2]  # the last exit takes the rest, whatever its score
    assert first_exit(s, [0.95, 0.5, 0.0]).tolist() == [2, 1, 1]  # per-exit thresholds


@pytest.mark.parametrize("trial", range(300))
def test_vectorised_equals_slow_loop_with_ties(trial):
    rng = np.random.default_rng(trial)
    k, n = int(rng.integers(1, 6)), int(rng.integers(1, 25))
    scores = rng.integers(0, 4, size=(k, n)) / 3.0  # few distinct values: many ties
    costs = np.cumsum(rng.uniform(0.05, 0.5, size=k))
    thresholds, curve = threshold_cost_curve(scores, costs)
    assert np.all(np.diff(thresholds) > 0) and np.all(np.diff(curve) >= -1e-12)
    for t, c in zip(thresholds, curve):
        assert c == pytest.approx(costs[slow_first_exit(scores, t)].mean(), abs=1e-12)
    for budget in rng.uniform(0, costs[-1] * 1.1, size=6):
        got = calibrate_shared_threshold(scores, costs, [budget])[0]
        want = slow_calibrate(scores, costs, budget)
        if want is None:
            assert got is None
        else:
            assert got[1] == pytest.approx(want[1], abs=1e-12)
            assert costs[slow_first_exit(scores, got[0])].mean() == pytest.approx(want[1], abs=1e-12)


def test_infeasible_and_full_budgets():
    scores = np.array([[0.2, 0.9], [0.5, 0.5]])
    costs = np.array([0.4, 1.05])
    got = calibrate_shared_threshold(scores, costs, [0.3, 0.4, 1.0, 1.05])
    assert got[0] is None  # even "everyone at exit 0" costs 0.4
    assert got[1][1] == pytest.approx(0.4)
    assert got[2][1] == pytest.approx(0.725)  # one sample at each exit
    assert got[3][1] == pytest.approx(1.05) and got[3][0] == np.inf


def test_select_budget_prefers_first_on_ties():
    assert select_budget(np.array([0.2, 0.5, 0.5, 0.9]), [0.6, 0.1, 1.0]) == [1, None, 3]


# ---- MSDNet's geometric (r^k) scheme --------------------------------------------------------------------------
from bench.measure.calibration import (GEOMETRIC_RATIOS, calibrate_geometric, calibrate_thresholds,  # noqa: E402
                               geometric_thresholds)


def slow_geometric(scores, ratio):
    """MSDNet's dynamic-evaluation loop, transcribed: per exit, walk the samples by decreasing score, count
    those not yet filtered, and take the score of the n_k-th as the threshold."""
    k_all, n = scores.shape
    p = np.exp(np.log(ratio) * np.arange(1, k_all + 1))
    p /= p.sum()
    filtered = np.zeros(n)
    t = np.full(k_all, np.inf)
    for k in range(k_all - 1):
        out_n = np.floor(n * p[k])
        count = 0
        for i in np.argsort(-scores[k], kind="stable"):
            if filtered[i] == 0:
                count += 1
                if count == out_n:
                    t[k] = scores[k, i]
                    break
        filtered += scores[k] >= t[k]
    t[-1] = -np.inf
    return t


def test_geometric_thresholds_hand_case():
    # r = 1: equal target shares, floor(6 / 3) = 2 samples per early exit
    s = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                  [0.1, 0.2, 0.95, 0.3, 0.85, 0.99],
                  [0.0] * 6])
    t = geometric_thresholds(s, 1.0)
    assert t[0] == 0.8  # samples 0 and 1 leave at exit 0
    assert t[1] == 0.95  # of samples 2..5 the two most confident at exit 1: 0.99 and 0.95
    assert t[2] == -np.inf
    assert first_exit(s, t).tolist() == [0, 0, 1, 2, 2, 1]
    # a small r sends almost everyone early, a large r almost everyone late
    assert (first_exit(s, geometric_thresholds(s, 0.05)) == 0).sum() >= 5
    assert (first_exit(s, geometric_thresholds(s, 1.95)) == 2).sum() >= 3


@pytest.mark.parametrize("trial", range(100))
def test_geometric_equals_msdnet_loop(trial):
    rng = np.random.default_rng(trial)
    k, n = int(rng.integers(2, 6)), int(rng.integers(1, 40))
    scores = rng.integers(0, 5, size=(k, n)) / 4.0  # ties
    for r in (0.05, 0.5, 1.0, 1.5, 1.95):
        np.testing.assert_array_equal(geometric_thresholds(scores, r), slow_geometric(scores, r))


def test_geometric_calibration_respects_budgets_and_records_the_ratio():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=(4, 500))
    costs = np.array([0.2, 0.45, 0.7, 1.02])
    budgets = [0.1, 0.3, 0.5, 0.7, 1.0]
    got = calibrate_geometric(scores, costs, budgets)
    assert got[0] is None  # below the cheapest exit
    prev = -np.inf
    for b, g in zip(budgets[1:], got[1:]):
        t, r, c = g
        assert r in GEOMETRIC_RATIOS and c <= b and c >= prev
        assert c == pytest.approx(costs[first_exit(scores, t)].mean())
        prev = c
    params, cost = calibrate_thresholds("geometric", scores, costs, [0.5])[0]
    assert params["scheme"] == "geometric" and len(params["threshold"]) == 4 and cost <= 0.5
    with pytest.raises(ValueError, match="scheme"):
        calibrate_thresholds("bisect", scores, costs, [0.5])
