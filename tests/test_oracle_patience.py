"""The oracle bound (exact optimality by brute force, placement of never-correct samples, it bounds every
method on the shared heads) and patience (PABEE: hand cases, streaming, few operating points)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bench.core.conformance import default_task
from bench.core.interface import OperatingPoint, create_method, resolve_points, stream_exits
from methods.oracle import Oracle, oracle_exits
from methods.patience import Patience, patience_exits

BUDGETS = [0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: faster, and no oversubscription of a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ctask():
    return default_task()  # noisier than the default synthetic task: early exits are often wrong


@pytest.fixture(scope="module")
def fitted(ctask):
    return {name: create_method(name).fit(ctask) for name in ("oracle", "threshold", "entropy", "patience")}


def _logits_for(correct: np.ndarray, targets: np.ndarray, num_classes: int = 3) -> torch.Tensor:
    """Logits [K, N, C] whose argmax is the target exactly where ``correct`` [K, N] says so."""
    k, n = correct.shape
    wrong = (targets + 1) % num_classes
    pred = np.where(correct, targets[None], wrong[None])
    logits = torch.zeros(k, n, num_classes)
    logits.scatter_(2, torch.from_numpy(pred)[..., None], 5.0)
    return logits


def _hand_oracle(costs, static=1) -> Oracle:
    m = Oracle()  # an unfitted oracle given costs by hand: decide needs only these
    m.costs_, m.static_macs_ = np.asarray(costs, dtype=np.int64), static
    return m


# -- oracle ---------------------------------------------------------------------------------------------------------
def test_oracle_is_the_exact_optimum_by_brute_force():
    rng = np.random.default_rng(0)
    cases = 0
    for _ in range(150):
        k, n = int(rng.integers(2, 4)), int(rng.integers(1, 6))
        costs = np.sort(rng.choice([1, 2, 2, 3, 5, 8], size=k))  # ties between exits on purpose
        correct = rng.random((k, n)) < 0.4  # many never-correct samples, and ties in extra cost
        assign = np.array(list(itertools.product(range(k), repeat=n)))  # [K^N, N] every assignment
        total = costs[assign].sum(1)
        right = correct[assign, np.arange(n)].sum(1)
        for b in np.unique(np.concatenate([total / n, [costs[0], costs[-1] + 1]])):
            if b < costs[0]:
                with pytest.raises(ValueError, match="infeasible"):
                    oracle_exits(correct, costs, b)
                continue
            exits = oracle_exits(correct, costs, float(b))
            ok = total <= b * n + 1e-9
            best = right[ok].max()
            assert costs[exits].sum() <= b * n + 1e-9
            assert correct[exits, np.arange(n)].sum() == best, (correct, costs, b, exits)
            # and the cheapest way to get that many right
            assert costs[exits].sum() == total[ok & (right == best)].min()
            cases += 1
    assert cases > 500


def test_oracle_decide_matches_brute_force_through_logits():
    rng = np.random.default_rng(1)
    costs = np.array([10, 20, 20, 35])
    m = _hand_oracle(costs, static=40)
    for _ in range(30):
        n = int(rng.integers(1, 6))
        targets = rng.integers(0, 3, n)
        correct = rng.random((4, n)) < 0.35
        logits = _logits_for(correct, targets)
        assign = np.array(list(itertools.product(range(4), repeat=n)))
        for b in (0.25, 0.4, 0.55, 0.7, 0.9):
            exits = m.decide(logits, OperatingPoint({"budget": b}), targets)
            ok = costs[assign].sum(1) <= b * 40 * n + 1e-9
            assert correct[exits, np.arange(n)].sum() == correct[assign, np.arange(n)].sum(1)[ok].max()
            assert costs[exits].mean() / 40 <= b + 1e-12


def test_never_correct_samples_leave_at_the_first_exit():
    correct = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0]], dtype=bool)  # samples 0 and 3: never right
    costs = np.array([1.0, 2.0, 3.0])
    assert oracle_exits(correct, costs, None).tolist() == [0, 1, 0, 0]
    assert oracle_exits(correct, costs, 1.0).tolist() == [0, 0, 0, 0]  # only exit 0 fits
    assert oracle_exits(correct, costs, 1.25).tolist() == [0, 1, 0, 0]


def test_unconstrained_oracle_accuracy_is_the_fraction_some_exit_gets_right(ctask, fitted):
    m = fitted["oracle"]
    test = ctask.splits["test"]
    logits = m.exit_logits(test)
    correct = (logits.argmax(-1).numpy() == test.labels)
    [native] = [p for p in resolve_points(m, ctask, BUDGETS) if p.budget is None]
    assert native.params == {"budget": None}
    exits = m.decide(logits, native, test.labels)
    assert correct[exits, np.arange(len(test))].mean() == correct.any(0).mean()
    assert (exits[~correct.any(0)] == 0).all()


def test_oracle_shares_the_heads_and_decides_for_free(ctask, fitted):
    o, t = fitted["oracle"], fitted["threshold"]
    assert torch.equal(o.heads_.weight, t.heads_.weight) and torch.equal(o.heads_.bias, t.heads_.bias)
    c, k = ctask.num_classes, ctask.num_exits
    assert (t.costs_[:-1] - o.costs_[:-1] == 2 * c * np.arange(1, k)).all()  # threshold pays 2C per decision
    assert Oracle.bound and not type(t).bound


def test_oracle_calibration_and_infeasible_budgets(ctask, fitted):
    m = fitted["oracle"]
    val = ctask.splits["val"]
    logits = m.exit_logits(val)
    c0 = m.costs_[0] / ctask.macs.static
    points = resolve_points(m, ctask, BUDGETS)[:len(BUDGETS)]
    for b, p in zip(BUDGETS, points):
        assert p.budget == b
        if b < c0:
            assert p.infeasible
            with pytest.raises(ValueError, match="infeasible"):
                m.decide(logits, OperatingPoint({"budget": b}), val.labels)
            continue
        assert p.params == {"budget": b}
        cost = (m.costs_[m.decide(logits, p, val.labels)] / ctask.macs.static).mean()
        assert cost == pytest.approx(p.val_macs_rel, abs=1e-12) and cost <= b + 1e-12
    assert any(p.infeasible for p in points) and any(not p.infeasible for p in points)


def test_oracle_needs_labels_and_cannot_stream(ctask, fitted):
    m = fitted["oracle"]
    test = ctask.splits["test"]
    p = OperatingPoint({"budget": 0.5})
    with pytest.raises(ValueError, match="needs targets"):
        m.decide(m.exit_logits(test), p)
    with pytest.raises(ValueError, match="targets must have shape"):
        m.decide(m.exit_logits(test), p, test.labels[:-1])
    with pytest.raises(NotImplementedError, match="no streaming form"):
        m.stream(0, test.features[0], p, None)
    assert set(Oracle.expected_failures) == {"check_no_label_peeking", "check_causality", "check_streaming",
                                             "check_batch_invariance"}


@pytest.mark.parametrize("name", ["threshold", "entropy", "patience"])
def test_oracle_bounds_every_method_on_the_shared_heads(ctask, fitted, name):
    """At each feasible budget, the oracle at the method's realised test cost is at least as accurate, and
    costs no more."""
    m, o = fitted[name], fitted["oracle"]
    test = ctask.splits["test"]
    static = ctask.macs.static
    o_logits = o.exit_logits(test)
    checked = 0
    for p in resolve_points(m, ctask, BUDGETS)[:len(BUDGETS)]:
        if p.infeasible:
            continue
        logits = m.exit_logits(test, p)
        exits = m.decide(logits, p)
        acc = (logits[exits, np.arange(len(test))].argmax(1).numpy() == test.labels).mean()
        cost = (m.costs_[exits] / static).mean()
        o_exits = o.decide(o_logits, OperatingPoint({"budget": float(cost)}), test.labels)
        o_acc = (o_logits[o_exits, np.arange(len(test))].argmax(1).numpy() == test.labels).mean()
        assert o_acc >= acc, (p, acc, o_acc)
        assert (o.costs_[o_exits] / static).mean() <= cost + 1e-12
        checked += 1
    assert checked >= 2


# -- patience -------------------------------------------------------------------------------------------------------
HAND = np.array([  # per-exit argmax [K=5, N=6], one column per sample
    [0, 0, 0, 2, 0, 1],
    [0, 1, 1, 2, 1, 1],
    [0, 1, 0, 1, 2, 1],
    [0, 1, 1, 1, 2, 0],
    [0, 1, 0, 1, 2, 0],
])
EXPECTED = {1: [1, 2, 4, 1, 3, 1],  # t = 1: the first exit that repeats its predecessor's argmax
            2: [2, 3, 4, 4, 4, 2],  # t = 2: three agreeing exits in a row (exit 4 is the last: everyone left)
            4: [4, 4, 4, 4, 4, 4]}  # t = K-1: never early


def _hand_patience(k: int) -> Patience:
    m = Patience()
    m.costs_ = np.arange(1, k + 1) * 10  # decide and stream need only the number of exits
    m.exit_head = lambda k, features_k, point=None: features_k  # the "features" are the exits' logits here
    return m


def _one_hot(argmax: np.ndarray, c: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(argmax), c).float() * 3


@pytest.mark.parametrize("t", sorted(EXPECTED))
def test_patience_hand_case(t):
    assert patience_exits(HAND, t).tolist() == EXPECTED[t]
    m = _hand_patience(5)
    logits = _one_hot(HAND)
    p = OperatingPoint({"patience": t})
    assert m.decide(logits, p).tolist() == EXPECTED[t]
    assert stream_exits(m, logits, p)[0].tolist() == EXPECTED[t]


def test_patience_streaming_equals_decide_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(2, 7))
        argmax = rng.integers(0, 2, size=(k, 40))  # two classes: long agreeing runs and resets
        m = _hand_patience(k)
        logits = _one_hot(argmax, 2)
        for t in range(1, k):
            p = OperatingPoint({"patience": t})
            exits = m.decide(logits, p)
            assert np.array_equal(stream_exits(m, logits, p)[0], exits)
            # the rule, restated: the first k < K-1 closing a run of t+1 equal argmaxes, else the last exit
            for n in range(40):
                runs = [i for i in range(t, k - 1) if len(set(argmax[i - t:i + 1, n])) == 1]
                assert exits[n] == (runs[0] if runs else k - 1)


def test_patience_points_budgets_and_infeasible_rows(ctask, fitted):
    m = fitted["patience"]
    points = resolve_points(m, ctask, BUDGETS)
    natives = points[len(BUDGETS):]
    assert [p.params for p in natives] == [{"patience": t} for t in range(1, ctask.num_exits)]
    costs = [p.val_macs_rel for p in natives]
    assert costs == sorted(costs) and costs[-1] > 1.0  # t = K-1 never exits early: the full net plus overheads
    points = points[:len(BUDGETS)]
    for b, p in zip(BUDGETS, points):
        fits = [c for c in costs if c <= b + 1e-12]
        if not fits:
            assert p.infeasible  # an infeasible row: no patience meets this budget
        else:
            assert not p.infeasible and p.budget == b and p.val_macs_rel == max(fits)
    assert points[0].infeasible and not points[-1].infeasible


def test_patience_cost_and_bad_points(ctask, fitted):
    m = fitted["patience"]
    d, c = ctask.dim, ctask.num_classes
    assert m.costs_[0] == ctask.macs.cumulative_blocks()[0] + d * c + c  # head + argmax
    logits = m.exit_logits(ctask.splits["test"])
    for bad in ({"patience": 0}, {"patience": 1.5}, {"threshold": 0.5}):
        with pytest.raises(ValueError, match="patience"):
            m.decide(logits, OperatingPoint(bad, 0.0))
    with pytest.raises(ValueError, match="shape"):
        m.decide(logits[:-1], OperatingPoint({"patience": 1}))
