"""The conformance suite: every check on every registered method, and a test of the tests: deliberately
cheating methods (defined here, never registered) that each check must catch."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.core import conformance as C
from bench.measure.calibration import first_exit
from bench.cli import main
from bench.base.errors import UserError
from bench.core.interface import METHODS, ExitMethod
from methods.threshold import MaxSoftmaxThreshold


@pytest.fixture(scope="module")
def ctask():
    return C.default_task()


# -- every check x every registered method ------------------------------------------------------------------------
def _registry_cases():
    # method-major order, so the checks of one method share its fit
    return [pytest.param(name, check, id=f"{name}-{check}") for name in METHODS.names() for check in C.CHECK_NAMES]


@pytest.mark.parametrize("name, check", _registry_cases())
def test_registered_method_conforms(name, check, ctask):
    """Through ``run_checks``, exactly as ``python -m bench check`` reports it: a declared expected failure
    that fails is an xfail with its reason, one that passes (XPASS) fails the test."""
    [r] = C.run_checks(name, ctask, checks=[check])
    if r.status == "XFAIL":
        pytest.xfail(r.message)
    assert r.status == "PASS", f"{r.status}: {r.message}"


# -- cheaters: each one breaks one rule ------------------------------------------------------------------------
class _Cheat(MaxSoftmaxThreshold):
    """Threshold with one rule broken (subclasses). Not registered: ``bench ls`` and the registry never see it."""
    name = "cheat"


class FitReturnsNone(_Cheat):
    def fit(self, task):
        super().fit(task)  # forgets ``return self``


class PeeksInExitLogits(_Cheat):
    """Reads the labels carried by the split: the true class's logit gets a bonus at exit 0."""

    def exit_logits(self, split, point=None):
        logits = super().exit_logits(split, point)
        if split.labels is not None:
            logits[0, torch.arange(len(split)), torch.from_numpy(split.labels)] += 1.0
        return logits


class PeeksInFit(_Cheat):
    """Tunes exit 0's temperature with the test accuracy it read during fit."""

    def fit(self, task):
        super().fit(task)
        test = task.splits["test"]
        self.test_acc_ = float((task.final_logits(test).argmax(1).numpy() == test.labels).mean())
        return self

    def exit_logits(self, split, point=None):
        logits = super().exit_logits(split, point)
        logits[0] *= 1 + self.test_acc_
        return logits

    exit_head = ExitMethod.exit_head  # the generic head, via exit_logits: the runner sees the same logits


class LooksAhead(_Cheat):
    """Exit k's score is the smaller of exits k and k+1: it waits for the next exit to agree."""

    def scores(self, logits):
        s = super().scores(logits)
        if s.ndim == 2:
            s = s.copy()
            s[:-1] = np.minimum(s[:-1], s[1:])
        return s


class Overspends(_Cheat):
    """Each budget gets the point of a budget 0.15 larger."""

    def operating_points(self, task, budgets):
        out = []
        for b in budgets:
            out += [replace(p, budget=b) for p in super().operating_points(task, [b + 0.15])]
        return out


class StreamsDifferently(_Cheat):
    """The streaming rule uses a lower threshold than decide."""

    def stream(self, k, features_k, point, state):
        logits = self.exit_head(k, features_k, point)
        return logits, self.score(logits.double()) >= 0.9 * point.params["threshold"], {}


class HeadDrifts(_Cheat):
    """The real runner's per-exit head is not the one ``exit_logits`` uses."""

    def exit_head(self, k, features_k, point=None):
        return super().exit_head(k, features_k, point) * 1.01


class SwapsNeighbours(_Cheat):
    """Rows 2i and 2i+1 trade decisions: same cost, order-dependent."""

    def decide(self, logits, point, targets=None):
        exits = super().decide(logits, point, targets)
        m = len(exits) // 2 * 2
        exits[0:m:2], exits[1:m:2] = exits[1:m:2].copy(), exits[0:m:2].copy()
        return exits


class BatchRelative(_Cheat):
    """Scores are centred on the batch's mean exit-0 score: the decision depends on who else is in the batch."""

    def scores(self, logits):
        s = super().scores(logits)
        return s - s[0].mean() + 0.5 if s.ndim == 2 else s


class Nondeterministic(_Cheat):
    """An unseeded temperature at exit 0."""

    def fit(self, task):
        super().fit(task)
        self.temperature_ = float(np.random.default_rng().uniform(0.5, 1.5))
        return self

    def exit_logits(self, split, point=None):
        logits = super().exit_logits(split, point)
        logits[0] *= self.temperature_
        return logits

    exit_head = ExitMethod.exit_head


class Unpicklable(_Cheat):
    def fit(self, task):
        super().fit(task)
        self.postprocess_ = lambda z: z  # lambdas do not pickle
        return self


class SilentWhenUnfitted(_Cheat):
    def exit_logits(self, split, point=None):
        if not hasattr(self, "costs_"):
            return torch.zeros(split.features.shape[0], len(split), 1)
        return super().exit_logits(split, point)


class AcceptsAnyShape(_Cheat):
    """Its own decide (not the base class's), with no shape validation."""

    def decide(self, logits, point, targets=None):
        return first_exit(self.scores(logits), point.params["threshold"])


# cheater -> (the check that must catch it, other checks it fails by construction, and why). A rule that cannot
# stream (it looks ahead, or at the batch) fails check_streaming as well.
STREAMS = {"check_streaming"}
CHEATERS = {
    FitReturnsNone: ("check_fit_contract", set()),
    PeeksInExitLogits: ("check_no_label_peeking", STREAMS),  # the runner has no labels
    PeeksInFit: ("check_no_label_peeking", set()),
    LooksAhead: ("check_causality", STREAMS),
    Overspends: ("check_budget_respected", set()),
    StreamsDifferently: ("check_streaming", set()),
    HeadDrifts: ("check_streaming", set()),
    # a sample alone has no neighbour; stream does not swap; scrambling one row's later exits moves its pair
    SwapsNeighbours: ("check_order_invariance", {"check_batch_invariance", "check_causality"} | STREAMS),
    BatchRelative: ("check_batch_invariance", STREAMS),  # the survivors are a different batch
    Nondeterministic: ("check_determinism", {"check_no_label_peeking"}),  # its garbage-label refit draws anew
    Unpicklable: ("check_pickle_round_trip", set()),
    SilentWhenUnfitted: ("check_unfitted_errors", set()),
    AcceptsAnyShape: ("check_bad_inputs", set()),
}


@pytest.mark.parametrize("cheat", list(CHEATERS), ids=lambda c: c.__name__)
def test_each_check_catches_its_cheater(cheat, ctask):
    target, collateral = CHEATERS[cheat]
    results = {r.name: r for r in C.run_checks(cheat, ctask)}
    assert results[target].status == "FAIL", f"{target} did not catch {cheat.__name__}"
    assert results[target].message
    failed = {name for name, r in results.items() if r.status == "FAIL"}
    assert failed == {target} | collateral, {n: results[n].message for n in failed}


def test_cheaters_cover_every_check_and_stay_out_of_the_registry():
    assert {target for target, _ in CHEATERS.values()} == set(C.CHECK_NAMES)
    assert all(c not in [METHODS.get(n) for n in METHODS.names()] for c in CHEATERS)


def test_the_honest_parent_passes(ctask):
    results = C.run_checks(_Cheat, ctask)
    assert all(r.status == "PASS" for r in results), [r for r in results if r.status != "PASS"]


# -- expected failures -------------------------------------------------------------------------------------------
class DeclaresWhatItFails(Unpicklable):
    expected_failures = {"check_pickle_round_trip": "holds a lambda"}


class DeclaresWhatItPasses(_Cheat):
    expected_failures = {"check_pickle_round_trip": "stale declaration"}


class DeclaresAnUnknownCheck(_Cheat):
    expected_failures = {"check_pikcle": "typo"}


def test_expected_failures_are_xfail_and_stale_ones_xpass(ctask):
    [r] = C.run_checks(DeclaresWhatItFails, ctask, checks=["check_pickle_round_trip"])
    assert r.status == "XFAIL" and "holds a lambda" in r.message and "does not pickle" in r.message
    [r] = C.run_checks(DeclaresWhatItPasses, ctask, checks=["check_pickle_round_trip"])
    assert r.status == "XPASS" and "stale declaration" in r.message
    [r] = C.run_checks(DeclaresAnUnknownCheck, ctask, checks=["check_fit_contract"])
    assert r.status == "FAIL" and "check_pikcle" in r.message


def test_run_checks_accepts_names_classes_and_factories(ctask):
    by_name = C.run_checks("threshold", ctask, checks=["check_streaming"])
    by_class = C.run_checks(MaxSoftmaxThreshold, ctask, checks=["check_streaming"])
    by_factory = C.run_checks(lambda: MaxSoftmaxThreshold(epochs=50), ctask, checks=["check_streaming"])
    assert [r.status for r in by_name + by_class + by_factory] == ["PASS"] * 3
    with pytest.raises(UserError, match="Did you mean 'threshold'"):
        C.run_checks("thresold", ctask)
    with pytest.raises(UserError, match="Unknown check 'check_nope'"):
        C.run_checks("threshold", ctask, checks=["check_nope"])


def test_default_task_does_not_share_the_synthetic_key():
    from bench.core.task import synthetic_task
    assert C.default_task().key != synthetic_task().key  # else memoised heads would mix the two tasks


# -- the command line ----------------------------------------------------------------------------------------------
def test_cli_check_prints_one_line_per_check(capsys):
    assert main(["check", "threshold"]) == 0
    lines = capsys.readouterr().out.splitlines()
    body = [ln for ln in lines if not ln.startswith("==")]
    assert [ln.split()[1] for ln in body] == C.CHECK_NAMES
    assert all(ln.split()[0] in ("PASS", "XFAIL") for ln in body)


def test_cli_check_exit_codes(monkeypatch, capsys):
    seen = []

    def fake(status):
        def run(name, task):
            seen.append(name)
            return [C.CheckResult("check_x", status, "msg")]
        return run

    for status, code in (("PASS", 0), ("XFAIL", 0), ("FAIL", 1), ("XPASS", 1)):
        monkeypatch.setattr(C, "run_checks", fake(status))
        assert main(["check", "threshold"]) == code, status
        assert f"{status:<5}  check_x" in capsys.readouterr().out
    seen.clear()
    assert main(["check", "all"]) == 1
    assert seen == METHODS.names()
    assert main(["check", "thresold"]) == 2
    assert "Did you mean 'threshold'" in capsys.readouterr().err
