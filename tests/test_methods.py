"""threshold and entropy on a synthetic task: shared heads, honest costs, budgets, and the exit contract."""
import pickle

import numpy as np
import pytest
import torch

from bench.core.conformance import scramble_after_exit
from bench.base.errors import UserError
from bench.core.interface import METHODS, NotFittedError, create_method, stream_decide

SCORE_METHODS = ["threshold", "entropy"]
BUDGETS = [0.3, 0.45, 0.6, 0.75, 0.9, 1.0]


@pytest.fixture(scope="module")
def fitted(task):
    return {name: create_method(name).fit(task) for name in SCORE_METHODS}


def test_registry_lists_the_methods():
    assert {"threshold", "entropy"} <= set(METHODS.names())


def test_threshold_and_entropy_share_identical_heads(fitted):
    a, b = fitted["threshold"].heads_, fitted["entropy"].heads_
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_costs_include_heads_and_decisions(task, fitted):
    m = fitted["threshold"]
    k, d, c = task.num_exits, task.dim, task.num_classes
    per_exit = d * c + 2 * c
    blocks = task.macs.cumulative_blocks()
    assert m.costs_[0] == blocks[0] + per_exit
    assert m.costs_[-1] == task.macs.static + (k - 1) * per_exit  # sending everyone last costs more than 1
    assert fitted["entropy"].costs_[-1] == task.macs.static + (k - 1) * (d * c + 3 * c)


def test_last_exit_is_the_backbone_head(task, fitted):
    split = task.splits["test"]
    logits = fitted["threshold"].exit_logits(split)
    assert torch.allclose(logits[-1], task.final_logits(split))


@pytest.mark.parametrize("name", SCORE_METHODS)
def test_budget_respected_on_val_and_cost_monotone(task, fitted, name):
    m = fitted[name]
    points = m.calibrate(task, BUDGETS)
    val = task.splits["val"]
    logits = m.exit_logits(val)
    prev = -1.0
    for b, p in zip(BUDGETS, points):
        if p is None:
            continue
        cost = (m.costs_[m.decide(logits, p)] / task.macs.static).mean()
        assert cost <= b + 1e-9 and cost == pytest.approx(p.val_macs_rel)
        assert cost >= prev - 1e-12
        prev = cost


@pytest.mark.parametrize("name", SCORE_METHODS)
def test_streaming_equals_decide_and_is_causal(task, fitted, name):
    m = fitted[name]
    split = task.splits["test"]
    logits = m.exit_logits(split)
    for p in filter(None, m.calibrate(task, BUDGETS)):
        exits = m.decide(logits, p)
        # streaming: exit k decides on its own logits among samples still running
        assert np.array_equal(stream_decide(m, logits, p), exits)
        # causality: scrambling every exit after the chosen one changes nothing
        assert np.array_equal(m.decide(scramble_after_exit(logits, exits), p), exits)


@pytest.mark.parametrize("name", SCORE_METHODS)
def test_no_label_peeking_and_pickle_round_trip(task, fitted, name):
    m = fitted[name]
    p = m.calibrate(task, [0.6])[0]
    test = task.splits["test"]
    exits = m.decide(m.exit_logits(test), p)
    assert np.array_equal(m.decide(m.exit_logits(test.without_labels()), p), exits)
    clone = pickle.loads(pickle.dumps(m))
    assert np.array_equal(clone.decide(clone.exit_logits(test), p), exits)


def test_order_invariance(task, fitted):
    m = fitted["threshold"]
    p = m.calibrate(task, [0.6])[0]
    test = task.splits["test"]
    perm = np.random.default_rng(0).permutation(len(test))
    assert np.array_equal(m.decide(m.exit_logits(test.subset(perm)), p), m.decide(m.exit_logits(test), p)[perm])


def test_unfitted_and_bad_fields():
    with pytest.raises(NotFittedError, match="call fit"):
        create_method("threshold").calibrate(None, [0.5])
    with pytest.raises(UserError, match="has no field 'epoch'.*epochs"):
        create_method("threshold", {"epoch": 3})


def test_early_exit_buys_cost_with_little_accuracy(task, fitted):
    """On the synthetic task, the highest budget's operating point keeps the backbone's accuracy."""
    m = fitted["threshold"]
    test = task.splits["test"]
    logits = m.exit_logits(test)
    full = (logits[-1].argmax(1).numpy() == test.labels).mean()
    p = m.calibrate(task, [0.9])[0]
    exits = m.decide(logits, p)
    acc = (logits[exits, np.arange(len(test))].argmax(1).numpy() == test.labels).mean()
    assert (m.costs_[exits] / task.macs.static).mean() < 0.95
    assert acc >= full - 0.05


@pytest.mark.parametrize("name", METHODS.names())
def test_evaluation_uses_each_points_own_logits(name):
    """The harness's rows must equal deciding each operating point on that point's own exit_logits (JEI-DNN
    has heads per lambda: evaluating every lambda on one set of logits would be silently wrong)."""
    import json

    from bench.pipeline.evaluate import evaluate_method
    from bench.core.task import synthetic_task

    task = synthetic_task(noise=3.0, seed=1)
    fields = create_method(name).params()
    # alternate_every=5: JEI-DNN's IM phases run on this small task, so its heads really differ per lambda
    m = create_method(name, {k: v for k, v in {"epochs": 3, "alternate_every": 5}.items() if k in fields}).fit(task)
    budgets = [0.4, 0.7]
    points = m.calibrate(task, budgets)
    rows, _ = evaluate_method(m, task, points, budgets, splits=("test",))
    test = task.splits["test"]
    checked = 0
    for budget, point in [*zip(budgets, points), *[(None, p) for p in m.native_points(task)]]:
        if point is None:
            continue
        logits = m.exit_logits(test, point)
        exits = m.decide(logits, point, test.labels if m.bound else None)
        want = (logits[exits, np.arange(len(exits))].argmax(1).numpy() == test.labels).mean()
        got = [r["value"] for r in rows if r["metric"] == "accuracy" and r["budget"] == budget
               and {k: v for k, v in json.loads(r["params"]).items() if k in point.params} == point.params]
        assert got and got[0] == pytest.approx(want), (point, got, want)
        checked += 1
    assert checked >= 1
