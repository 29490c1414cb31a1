"""Conformal prediction: hand cases and the coverage guarantee over many random re-splits."""
import math

import numpy as np
import pytest

from bench.measure import conformal as CP


def test_quantile_rank_and_infinity():
    scores = np.arange(1, 11) / 10  # 0.1 .. 1.0, n = 10
    assert CP.conformal_quantile(scores, 0.1) == 1.0  # rank ceil(11 * 0.9) = 10
    assert CP.conformal_quantile(scores, 0.2) == 0.9  # rank ceil(8.8) = 9
    assert CP.conformal_quantile(scores, 0.05) == math.inf  # rank 11 > n: every class
    assert CP.min_samples(0.05) == 19 and CP.min_samples(0.1) == 9


def test_lac_and_aps_hand_cases():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    y = np.array([1, 0])
    assert CP.scores_for("lac", probs, y) == pytest.approx([0.7, 0.9])
    # APS: mass ranked strictly before y, plus u * p_y; ties broken by class index (stable)
    assert CP.scores_for("aps", probs, y, np.array([0.5, 1.0])) == pytest.approx([0.5 + 0.15, 0.8 + 0.1])
    sets = CP.prediction_sets("lac", probs, 0.75)
    assert sets.tolist() == [[True, True, False], [False, False, True]]
    sets = CP.prediction_sets("aps", probs, np.array([0.6, 0.86]), np.array([0.5, 0.5]))
    # row 0: 0.25, 0.65, 0.9 -> {0}; row 1: class 2 -> 0.4, class 0 -> 0.85, class 1 -> 0.95 -> {0, 2}
    assert sets.tolist() == [[True, False, False], [True, False, True]]
    assert CP.prediction_sets("lac", probs, math.inf).all()


def test_per_exit_fallbacks_are_counted():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=100)
    exits = np.array([0] * 90 + [1] * 10)  # exit 1 has 10 < 19 samples at alpha 0.05; exit 2 has none
    q, fallbacks = CP.per_exit_quantiles(scores, exits, 3, 0.05)
    assert fallbacks == 2
    assert q[0] == CP.conformal_quantile(scores[:90], 0.05)
    assert q[1] == q[2] == CP.conformal_quantile(scores, 0.05)


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_coverage_within_the_theoretical_band(score, alpha):
    """Exchangeable data, many random cal/test re-splits: the mean coverage is >= 1 - alpha, and for the
    tie-free randomised APS also <= 1 - alpha + 1/(n+1) (up to Monte Carlo error)."""
    rng = np.random.default_rng(1)
    n_cal, n_test, trials, c = 100, 200, 400, 6
    cover = []
    for _ in range(trials):
        logits = rng.normal(size=(n_cal + n_test, c)) * 2
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = (probs.cumsum(1) > rng.uniform(size=(len(probs), 1))).argmax(1)  # labels drawn from probs
        u = rng.uniform(size=len(probs))
        s = CP.scores_for(score, probs[:n_cal], y[:n_cal], u[:n_cal])
        q = CP.conformal_quantile(s, alpha)
        sets = CP.prediction_sets(score, probs[n_cal:], q, u[n_cal:])
        cover.append(sets[np.arange(n_test), y[n_cal:]].mean())
    mean, se = np.mean(cover), np.std(cover) / np.sqrt(trials)
    assert mean >= 1 - alpha - 3 * se
    if score == "aps":
        assert mean <= 1 - alpha + 1 / (n_cal + 1) + 3 * se
