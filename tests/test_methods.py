"""threshold and entropy on a synthetic task: shared heads, honest costs, budgets, and the exit contract."""
import json

import numpy as np
import pytest
import torch

from bench.base.errors import UserError
from bench.core.interface import METHODS, NotFittedError, create_method, resolve_points
from bench.core.task import synthetic_task
from bench.pipeline.evaluate import evaluate_method

SCORE_METHODS = ["threshold", "entropy"]


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


# Budgets, streaming, causality, label blindness, pickling and order invariance are checked for every method by
# the conformance suite (tests/test_conformance.py); the tests below are specific to the score methods.


def test_unfitted_and_bad_fields():
    with pytest.raises(NotFittedError, match="call fit"):
        create_method("threshold").operating_points(None, [0.5])
    with pytest.raises(UserError, match="has no field 'epoch'.*epochs"):
        create_method("threshold", {"epoch": 3})
    with pytest.raises(UserError, match=r"--set threshold.epochs=abc: epochs must be an integer"):
        create_method("threshold", {"epochs": "abc"})
    with pytest.raises(UserError, match=r"threshold.epochs=0: epochs must be >= 1"):
        create_method("threshold", {"epochs": 0})
    with pytest.raises(UserError, match=r"jeidnn.lambdas=0.1: lambdas must be a list of numbers"):
        create_method("jeidnn", {"lambdas": 0.1})
    with pytest.raises(UserError, match=r"jeidnn.lambdas=\[0.1,-1\]: lambdas must be >= 0"):
        create_method("jeidnn", {"lambdas": [0.1, -1]})
    with pytest.raises(UserError, match=r"scheme must be one of shared, geometric"):
        create_method("entropy", {"scheme": "bisect"})
    assert create_method("threshold", {"lr": 1}).lr == 1.0 and isinstance(create_method("threshold", {"lr": 1}).lr, float)


def test_early_exit_buys_cost_with_little_accuracy(task, fitted):
    """On the synthetic task, the highest budget's operating point keeps the backbone's accuracy."""
    m = fitted["threshold"]
    test = task.splits["test"]
    logits = m.exit_logits(test)
    full = (logits[-1].argmax(1).numpy() == test.labels).mean()
    p = resolve_points(m, task, [0.9])[0]
    exits = m.decide(logits, p)
    acc = (logits[exits, np.arange(len(test))].argmax(1).numpy() == test.labels).mean()
    assert (m.costs_[exits] / task.macs.static).mean() < 0.95
    assert acc >= full - 0.05


@pytest.mark.parametrize("name", METHODS.names())
def test_evaluation_uses_each_points_own_logits(name):
    """The harness's rows must equal deciding each operating point on that point's own exit_logits (JEI-DNN
    has heads per lambda: evaluating every lambda on one set of logits would be silently wrong)."""
    task = synthetic_task(noise=3.0, seed=1)
    fields = create_method(name).params()
    # alternate_every=5: JEI-DNN's IM phases run on this small task, so its heads really differ per lambda
    m = create_method(name, {k: v for k, v in {"epochs": 3, "alternate_every": 5}.items() if k in fields}).fit(task)
    budgets = [0.4, 0.7]
    points = resolve_points(m, task, budgets)
    rows, _ = evaluate_method(m, task, points, splits=("test",))
    test = task.splits["test"]
    checked = 0
    for point in points:
        budget = point.budget
        if point.infeasible:
            continue
        logits = m.exit_logits(test, point)
        exits = m.decide(logits, point, test.labels if m.bound else None)
        want = (logits[exits, np.arange(len(exits))].argmax(1).numpy() == test.labels).mean()
        got = [r["value"] for r in rows if r["metric"] == "accuracy" and r["budget"] == budget
               and {k: v for k, v in json.loads(r["params"]).items() if k in point.params} == point.params]
        assert got and got[0] == pytest.approx(want), (point, got, want)
        checked += 1
    assert checked >= 1
