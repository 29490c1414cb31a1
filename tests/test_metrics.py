"""Metrics against hand-computed values and independent implementations."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bench.measure import metrics as M


def test_ece_hand_computed():
    conf = np.array([0.95, 0.95, 0.55, 0.55, 1.0])
    correct = np.array([True, False, True, True, True])
    # bins (15 equal-width): 0.95 -> bin 14, 1.0 -> bin 14 (last bin holds 1.0), 0.55 -> bin 8
    # bin 14: acc 2/3, conf (0.95+0.95+1)/3; bin 8: acc 1, conf 0.55
    want = 3 / 5 * abs(2 / 3 - 2.9 / 3) + 2 / 5 * abs(1 - 0.55)
    assert M.ece(conf, correct) == pytest.approx(want, abs=1e-12)


def test_ece_bin_edges_are_left_closed():
    # 1/15 exactly falls in bin 1, not bin 0: with bin 0 = {0.05} and bin 1 = {1/15}, the gaps do not cancel
    conf, correct = np.array([0.05, 1 / 15]), np.array([False, True])
    assert M.ece(conf, correct) == pytest.approx(0.5 * 0.05 + 0.5 * (1 - 1 / 15))


def test_ece_perfect_and_one_sample():
    assert M.ece(np.array([1.0, 1.0]), np.array([True, True])) == 0.0
    assert M.ece(np.array([0.7]), np.array([False])) == pytest.approx(0.7)
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 200_000)
    correct = rng.uniform(0, 1, 200_000) < conf  # calibrated by construction
    assert M.ece(conf, correct) < 0.01  # whole-split ECE of a calibrated model is ~0 (not 6-19 % as per-batch)


def test_ece_equal_mass_matches_loop():
    rng = np.random.default_rng(1)
    conf, correct = rng.uniform(size=97), rng.uniform(size=97) < 0.6
    order = np.argsort(conf, kind="stable")
    # exact check with the documented assignment: bin of rank r = r * 15 // N
    bins = np.empty(97, int)
    bins[order] = np.arange(97) * 15 // 97
    want = sum((bins == b).sum() / 97 * abs(correct[bins == b].mean() - conf[bins == b].mean())
               for b in range(15) if (bins == b).any())
    assert M.ece_equal_mass(conf, correct) == pytest.approx(want, abs=1e-12)


def test_nll_brier_hand_computed():
    probs = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    y = np.array([0, 1])
    assert M.nll(probs, y) == pytest.approx(-(np.log(0.7) + np.log(0.25)) / 2)
    assert M.brier(probs, y) == pytest.approx(((0.09 + 0.04 + 0.01) + (0.0625 + 0.5625 + 0.25)) / 2)


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    conf = rng.integers(0, 10, 500) / 10
    correct = rng.uniform(size=500) < conf
    assert M.auroc_misclassification(conf, correct) == pytest.approx(roc_auc_score(correct, conf), abs=1e-12)
    assert np.isnan(M.auroc_misclassification(np.array([0.9, 0.8]), np.array([True, True])))


def test_argument_validation():
    with pytest.raises(ValueError, match="confidence must lie"):
        M.ece(np.array([1.2]), np.array([True]))
    with pytest.raises(ValueError, match="at least one|N > 0"):
        M.ece(np.array([]), np.array([], bool))
    with pytest.raises(ValueError, match="targets must lie"):
        M.nll(np.array([[0.5, 0.5]]), np.array([2]))
    with pytest.raises(ValueError, match="NaN"):
        M.brier(np.array([[np.nan, 1.0]]), np.array([0]))


# true-class (class 0) probability per exit of four samples: rises; falls 0.25 at 0->1; falls 0.125 then 0.375
# (0.5 from exit 0 to exit 2); flat. Binary fractions, so every difference is exact.
MONO_TRUE = np.array([[0.25, 0.5, 0.75], [0.5, 0.25, 0.75], [0.875, 0.75, 0.375], [0.5, 0.5, 0.5]]).T  # [K, N]


@pytest.mark.parametrize("tau, overall, pairs", [
    (0.0, 2 / 4, [2 / 4, 1 / 4]),      # any strict fall; the flat sample never counts
    (0.25, 1 / 4, [0, 1 / 4]),         # a fall of exactly tau is no violation (the authors' diff >= -tau)
    (0.375, 1 / 4, [0, 0]),            # only exit 0 -> exit 2 (not consecutive) falls by more than tau
    (0.5, 0.0, [0, 0]),
])
def test_monotonicity_violation_hand_computed(tau, overall, pairs):
    probs = np.stack([MONO_TRUE, 1 - MONO_TRUE], axis=-1)  # [K, N, 2]
    got_overall, got_pairs = M.monotonicity_violation(probs, np.zeros(4, dtype=int), tau)
    assert got_overall == overall
    np.testing.assert_array_equal(got_pairs, pairs)


def test_monotonicity_violation_edge_cases():
    one_exit = np.full((1, 3, 2), 0.5)
    assert M.monotonicity_violation(one_exit, np.zeros(3, dtype=int)) == (0.0, pytest.approx(np.zeros(0)))
    with pytest.raises(ValueError, match=r"\[K, N, C\]"):
        M.monotonicity_violation(np.full((3, 2), 0.5), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="tau"):
        M.monotonicity_violation(np.full((2, 3, 2), 0.5), np.zeros(3, dtype=int), -0.1)
    with pytest.raises(ValueError, match="targets must lie"):
        M.monotonicity_violation(np.full((2, 3, 2), 0.5), np.full(3, 2))
