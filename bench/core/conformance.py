"""The conformance suite: the same checks on every method, like scikit-learn's ``check_estimator``.

Each check is ``check_xxx(method_factory, task) -> None`` and raises ``AssertionError`` with a message that says
what went wrong on which operating point. ``method_factory()`` returns a fresh, unfitted method (a registered
class, ``NamedMethod("threshold")``, or any zero-argument callable). ``run_checks`` runs them and honours the
method's ``expected_failures`` ({check name: reason}): a declared failure that fails is XFAIL, one that passes
is XPASS (reported: the declaration is stale). ``python -m bench check METHOD`` prints the results and the
tests parametrise every check over the whole registry.

Checks run over the operating points the harness resolves (``resolve_points``) for a sweep of budgets
``BUDGETS``, plus the method's own points, on ``default_task()`` (a
harder ``synthetic_task``) by default, and decide exactly as the harness does (``bench.pipeline.evaluate``):
``exit_logits(split, point)``, then ``decide(logits, point, targets)`` with targets only for a bound. A method
fitted once (by the contract check, or by ``_fitted``) is shared by the checks that only read it; the checks
about fitting itself (label peeking, determinism) make their own fits (determinism on a task copy with a new
``key``, so that no memo keyed on the task hides a second training).
"""
from __future__ import annotations

import json
import pickle
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bench.base.errors import UserError
from bench.base.registry import unknown_name_message
from bench.core.interface import METHODS, ExitMethod, OperatingPoint, create_method, resolve_points, stream_exits
from bench.core.task import SplitData, Task, synthetic_task

# dense at the low end, where the cheapest operating points (and the oracle's binding budgets) live
BUDGETS: tuple[float, ...] = (0.25, 0.3, 0.35, 0.4, 0.45, 0.55, 0.65, 0.75, 0.85, 1.0)
STATUSES = ("PASS", "FAIL", "XFAIL", "XPASS")
CHECK_NOISE = 3.0  # synthetic_task's noise for the checks (its default, 1.5, makes exit 0 right 95 % of the time)
TOL = 1e-9  # slack on macs_rel comparisons (costs are integers; the rest is float64 rounding)

MethodFactory = Callable[[], ExitMethod]


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # one of STATUSES
    message: str
    seconds: float = 0.0


@dataclass(frozen=True)
class NamedMethod:
    """A hashable factory for a registered method (so fitted methods can be shared between checks)."""
    name: str

    def __call__(self) -> ExitMethod:
        return create_method(self.name)


def as_factory(name_or_factory: str | MethodFactory) -> MethodFactory:
    if isinstance(name_or_factory, str):
        METHODS.get(name_or_factory)  # UserError with "did you mean" for unknown names
        return NamedMethod(name_or_factory)
    if not callable(name_or_factory):
        raise TypeError(f"expected a method name or a zero-argument factory, got {name_or_factory!r}")
    return name_or_factory


def default_task() -> Task:
    """The synthetic task the checks run on: ``synthetic_task`` with more noise than its default, so that early
    exits are often wrong and budgets bind (with the default, exit 0 is right 95 % of the time)."""
    return synthetic_task(noise=CHECK_NOISE)


def method_class(factory: MethodFactory) -> type[ExitMethod]:
    if isinstance(factory, NamedMethod):
        return METHODS.get(factory.name)
    if isinstance(factory, type):
        return factory
    return type(factory())


# ---------------------------------------------------------------------------------------------------------------
# helpers

@dataclass
class _Fitted:
    method: ExitMethod
    task: Task  # held so that id(task) in the cache key stays unique while the entry lives
    points: list[OperatingPoint]  # resolve_points(method, task, BUDGETS): one per budget, then its own


_CACHE: "OrderedDict[tuple, _Fitted]" = OrderedDict()
_CACHE_SIZE = 4


def _key(factory: MethodFactory, task: Task) -> tuple | None:
    key = (factory, id(task))
    try:
        hash(key)
    except TypeError:  # an unhashable factory is simply not cached
        return None
    return key


def _fitted(factory: MethodFactory, task: Task) -> _Fitted:
    """The method fitted on ``task`` and its points, shared by the checks that only read them."""
    key = _key(factory, task)
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    m = factory()
    m.fit(task)  # not ``factory().fit(task)``: a fit that forgets to return self fails the contract check only
    return _store(factory, task, m, resolve_points(m, task, BUDGETS))


def _store(factory: MethodFactory, task: Task, m: ExitMethod, points) -> _Fitted:
    f = _Fitted(m, task, list(points))
    key = _key(factory, task)
    if key is not None:
        _CACHE[key] = f
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return f


def clear_cache() -> None:
    _CACHE.clear()


def _targets(method: ExitMethod, split: SplitData) -> np.ndarray | None:
    return split.labels if method.bound else None  # as bench.pipeline.evaluate: only a bound is given labels


def _label(p: OperatingPoint) -> str:
    return f"native {p.params}" if p.budget is None else f"budget={p.budget}"


def _sweep(f: _Fitted) -> list[tuple[str, OperatingPoint]]:
    """(label, point) for every feasible budget of the sweep and every point of the method's own."""
    return [(_label(p), p) for p in f.points if not p.infeasible]


def _valid_exits(exits: Any, n: int, k: int, where: str) -> np.ndarray:
    exits = np.asarray(exits)
    assert exits.shape == (n,), f"{where}: decide returned shape {exits.shape}, expected ({n},)"
    assert np.issubdtype(exits.dtype, np.integer), f"{where}: decide returned dtype {exits.dtype}, not integers"
    assert exits.min(initial=0) >= 0 and exits.max(initial=0) < k, \
        f"{where}: exit indices outside 0..{k - 1}: [{exits.min()}, {exits.max()}]"
    return exits


def _decide(m: ExitMethod, split: SplitData, point: OperatingPoint, where: str,
            logits: torch.Tensor | None = None) -> np.ndarray:
    if logits is None:
        logits = m.exit_logits(split, point)
    return _valid_exits(m.decide(logits, point, _targets(m, split)), len(split), len(m.costs_), where)


def _diff(a: np.ndarray, b: np.ndarray) -> str:
    bad = np.flatnonzero(np.asarray(a) != np.asarray(b))
    head = ", ".join(f"row {i}: {a[i]} vs {b[i]}" for i in bad[:3])
    return f"{len(bad)} of {len(a)} samples differ ({head}{', ...' if len(bad) > 3 else ''})"


def _same_points(a: Sequence[OperatingPoint], b: Sequence[OperatingPoint]) -> bool:
    key = lambda ps: [(json.dumps(p.params, sort_keys=True, default=str), p.budget, p.val_macs_rel, p.infeasible)
                      for p in ps]
    return key(a) == key(b)


def _first_point(f: _Fitted) -> OperatingPoint:
    sweep = _sweep(f)
    assert sweep, "no feasible operating point in the budget sweep and no native point"
    return sweep[len(sweep) // 2][1]


# ---------------------------------------------------------------------------------------------------------------
# the checks

def check_fit_contract(method_factory: MethodFactory, task: Task) -> None:
    """fit returns self; hyper-parameters round-trip; costs_ [K] non-decreasing, the last exit >= the static
    backbone; exit_logits [K, N, C] finite; operating_points gives OperatingPoints with JSON-able params and
    budgets from the sweep (or None); at least one feasible point exists; expected_failures name real checks."""
    m = method_factory()
    assert isinstance(m, ExitMethod), f"the factory returned {type(m).__name__}, not an ExitMethod"
    names = {c.__name__ for c in CHECKS}
    for check, reason in type(m).expected_failures.items():
        assert check in names, f"expected_failures names an unknown check {check!r} (known: {sorted(names)})"
        assert isinstance(reason, str) and reason.strip(), f"expected_failures[{check!r}] needs a written reason"
    again = type(m).from_params(m.params())
    assert again.params() == m.params(), f"from_params(params()) changed the hyper-parameters: {again.params()}"
    ret = m.fit(task)
    assert ret is m, f"fit returned {type(ret).__name__}, not self"
    k, c = task.num_exits, task.num_classes
    costs = np.asarray(m.costs_)
    assert costs.shape == (k,), f"costs_ has shape {costs.shape}, expected ({k},)"
    assert np.isfinite(costs).all() and (costs > 0).all(), f"costs_ must be positive and finite: {costs}"
    assert (np.diff(costs) >= 0).all(), f"costs_ must be non-decreasing (cumulative MACs): {costs}"
    assert costs[-1] >= task.macs.static, \
        f"the last exit ({costs[-1]} MACs) costs less than the static backbone ({task.macs.static})"
    for name in ("val", "test"):
        split = task.splits[name]
        logits = m.exit_logits(split)
        assert isinstance(logits, torch.Tensor) and logits.is_floating_point(), \
            f"exit_logits must return a float tensor, got {type(logits).__name__}"
        assert tuple(logits.shape) == (k, len(split), c), \
            f"exit_logits({name}) has shape {tuple(logits.shape)}, expected {(k, len(split), c)}"
        assert torch.isfinite(logits).all(), f"exit_logits({name}) has NaN or infinite values"
    candidates = m.operating_points(task, BUDGETS)
    assert isinstance(candidates, list), f"operating_points returned {type(candidates).__name__}, not a list"
    for p in candidates:
        assert isinstance(p, OperatingPoint), f"operating_points returned {type(p).__name__}"
        try:
            json.dumps(p.params)
        except TypeError as e:
            raise AssertionError(f"point params {p.params!r} are not plain JSON: {e}") from None
        assert p.budget is None or p.budget in BUDGETS, f"point {p.params} serves budget {p.budget}, not asked for"
    points = resolve_points(m, task, BUDGETS)
    for p in points:
        assert p.infeasible or np.isfinite(p.val_macs_rel), f"point {p.params} has val_macs_rel {p.val_macs_rel}"
    assert any(not p.infeasible for p in points), f"no feasible operating point for any budget in {BUDGETS}"
    val = task.splits["val"]
    for p in points:
        if not p.infeasible:
            _decide(m, val, p, f"val, {_label(p)}")
    _store(method_factory, task, m, points)  # the checks that only read a fitted method reuse it


def check_no_label_peeking(method_factory: MethodFactory, task: Task) -> None:
    """Test decisions are identical (a) with the test labels hidden (``split.without_labels()``, decide called
    without targets) and (b) for a method fitted on a task whose test labels are garbage."""
    f = _fitted(method_factory, task)
    m, test = f.method, task.splits["test"]
    rng = np.random.default_rng(0)
    garbage = (test.labels + rng.integers(1, task.num_classes, len(test))) % task.num_classes  # all wrong
    g_test = SplitData(test.features, garbage.astype(np.int64), test.sample_ids)
    # same key: the key names the backbone and split, which garbage test labels do not change
    g_task = replace(task, splits={**task.splits, "test": g_test})
    m2 = method_factory()
    m2.fit(g_task)
    g_points = resolve_points(m2, g_task, BUDGETS)
    assert _same_points(f.points, g_points), \
        "the operating points differ after fitting on a task whose only change is garbage test labels " \
        "(if check_determinism fails too, nondeterminism may be the cause)"
    hidden = test.without_labels()
    for label, p in _sweep(f):
        ref = _decide(m, test, p, f"test, {label}")
        try:
            blind = m.decide(m.exit_logits(hidden, p), p)
        except Exception as e:
            raise AssertionError(f"{label}: with the test labels hidden, deciding failed: "
                                 f"{type(e).__name__}: {e}") from None
        blind = _valid_exits(blind, len(test), len(m.costs_), f"hidden labels, {label}")
        assert np.array_equal(blind, ref), f"{label}: decisions change when the test labels are hidden: " \
                                           f"{_diff(blind, ref)}"
        g = _valid_exits(m2.decide(m2.exit_logits(g_test, p), p), len(test), len(m.costs_), label)
        assert np.array_equal(g, ref), f"{label}: fitted with garbage test labels, the test decisions " \
                                       f"differ: {_diff(g, ref)}"


def scramble_after_exit(logits: torch.Tensor, exits: np.ndarray, how: int = 0) -> torch.Tensor:
    """Replace every exit after each sample's chosen exit: how 0 = loud noise, 1 = another sample's logits."""
    k, n = logits.shape[:2]
    later = torch.from_numpy(np.arange(k)[:, None] > exits[None, :])  # [K, N]
    if how == 0:
        gen = torch.Generator().manual_seed(1234)
        other = torch.randn(logits.shape, generator=gen, dtype=logits.dtype) * 10
    else:
        other = torch.roll(logits, shifts=max(1, n // 2), dims=1)
    return torch.where(later[..., None], other, logits)


def check_causality(method_factory: MethodFactory, task: Task) -> None:
    """Over the budget sweep: scrambling the logits of every exit after a sample's chosen exit (noise, or
    another sample's logits) changes no decision (row k of any score uses exits 0..k only)."""
    f = _fitted(method_factory, task)
    m, test = f.method, task.splits["test"]
    for label, p in _sweep(f):
        logits = m.exit_logits(test, p)
        exits = _decide(m, test, p, label, logits)
        for how, what in ((0, "noise"), (1, "another sample's logits")):
            again = _decide(m, test, p, label, scramble_after_exit(logits, exits, how))
            assert np.array_equal(again, exits), \
                f"{label}: replacing the exits after the chosen one with {what} changed decisions: " \
                f"{_diff(again, exits)}"


def check_budget_respected(method_factory: MethodFactory, task: Task) -> None:
    """On validation, each budget's point costs <= the budget and exactly its ``val_macs_rel``; costs never
    decrease with the budget; a budget is feasible only if every larger budget is; native points report
    their own validation cost."""
    f = _fitted(method_factory, task)
    m, val = f.method, task.splits["val"]
    static = task.macs.static
    prev, prev_b = -np.inf, None
    budgeted = sorted([p for p in f.points if p.budget is not None], key=lambda p: p.budget)
    assert [p.budget for p in budgeted] == sorted(BUDGETS), \
        f"one point per budget expected, got budgets {[p.budget for p in budgeted]}"
    for p in budgeted:
        b = p.budget
        if p.infeasible:
            assert prev_b is None, f"budget {b} is infeasible although the smaller budget {prev_b} was feasible"
            continue
        cost = float((np.asarray(m.costs_)[_decide(m, val, p, f"budget={b}")] / static).mean())
        assert cost <= b + TOL, f"budget={b}: validation macs_rel {cost:.6f} exceeds the budget ({p.params})"
        assert abs(cost - p.val_macs_rel) <= TOL, \
            f"budget={b}: the point claims val_macs_rel {p.val_macs_rel:.6f} but its decisions cost {cost:.6f}"
        assert cost >= prev - TOL, f"budget={b}: cost {cost:.6f} is below the cost {prev:.6f} at budget {prev_b}"
        prev, prev_b = cost, b
    for p in [p for p in f.points if p.budget is None]:
        cost = float((np.asarray(m.costs_)[_decide(m, val, p, f"native {p.params}")] / static).mean())
        assert abs(cost - p.val_macs_rel) <= TOL, \
            f"native {p.params}: claims val_macs_rel {p.val_macs_rel:.6f} but its decisions cost {cost:.6f}"


def check_order_invariance(method_factory: MethodFactory, task: Task) -> None:
    """Deciding on a permuted test split gives the permuted decisions, at every point of the sweep."""
    f = _fitted(method_factory, task)
    m, test = f.method, task.splits["test"]
    perm = np.random.default_rng(0).permutation(len(test))
    shuffled = test.subset(perm)
    for label, p in _sweep(f):
        exits = _decide(m, test, p, label)
        got = _decide(m, shuffled, p, f"permuted, {label}")
        assert np.array_equal(got, exits[perm]), \
            f"{label}: permuting the samples changed their decisions: {_diff(got, exits[perm])}"


def check_batch_invariance(method_factory: MethodFactory, task: Task) -> None:
    """Deciding on two unequal parts of the test split, or on single samples (batch 1, as latency is timed),
    gives the same decisions as deciding on the whole split."""
    f = _fitted(method_factory, task)
    m, test = f.method, task.splits["test"]
    n = len(test)
    cut = n // 3
    for label, p in _sweep(f):
        exits = _decide(m, test, p, label)
        parts = np.concatenate([_decide(m, test.subset(np.arange(cut)), p, f"first part, {label}"),
                                _decide(m, test.subset(np.arange(cut, n)), p, f"second part, {label}")])
        assert np.array_equal(parts, exits), \
            f"{label}: deciding on parts [0, {cut}) and [{cut}, {n}) differs from the whole: {_diff(parts, exits)}"
        for i in range(0, n, max(1, n // 8)):
            one = _decide(m, test.subset(np.array([i])), p, f"sample {i} alone, {label}")
            assert one[0] == exits[i], f"{label}: sample {i} alone exits at {one[0]}, in the batch at {exits[i]}"


def check_determinism(method_factory: MethodFactory, task: Task) -> None:
    """Two fits with the same seed give identical points, logits and decisions at every point. The second fit
    sees a copy of the task under a new ``key``, so memos keyed on the task (the shared heads) retrain."""
    f = _fitted(method_factory, task)
    a = f.method
    b = method_factory()
    b.fit(replace(task, key=task.key + "#determinism"))
    pa, pb = f.points, resolve_points(b, task, BUDGETS)
    assert _same_points(pa, pb), f"two fits give different operating points: {pa} vs {pb}"
    test = task.splits["test"]
    assert torch.equal(a.exit_logits(test), b.exit_logits(test)), "two fits give different exit logits"
    for label, p in _sweep(f):
        ea, eb = _decide(a, test, p, label), _decide(b, test, p, label)
        assert np.array_equal(ea, eb), f"{label}: two fits decide differently: {_diff(ea, eb)}"


def check_pickle_round_trip(method_factory: MethodFactory, task: Task) -> None:
    """A fitted method survives pickle: same points, logits and decisions."""
    f = _fitted(method_factory, task)
    try:
        clone = pickle.loads(pickle.dumps(f.method))
    except Exception as e:
        raise AssertionError(f"a fitted {type(f.method).__name__} does not pickle: {type(e).__name__}: {e}") \
            from None
    assert type(clone) is type(f.method), f"unpickled as {type(clone).__name__}"
    assert _same_points(resolve_points(clone, task, BUDGETS), f.points), \
        "the unpickled method gives different operating points"
    test = task.splits["test"]
    for label, p in _sweep(f):
        assert torch.equal(clone.exit_logits(test, p), f.method.exit_logits(test, p)), \
            f"{label}: the unpickled method gives different logits"
        ea, eb = _decide(clone, test, p, label), _decide(f.method, test, p, label)
        assert np.array_equal(ea, eb), f"{label}: the unpickled method decides differently: {_diff(ea, eb)}"


def check_streaming(method_factory: MethodFactory, task: Task) -> None:
    """The real runner's path without the backbone (``stream_exits``): at each exit k, ``stream`` on the
    survivors' exit-k features, then compaction of the survivors and their state. The logits each sample leaves
    with equal ``exit_logits``'s at its exit (to 1e-5) and the exits equal ``decide``'s, at every point of the
    sweep."""
    f = _fitted(method_factory, task)
    m, test = f.method, task.splits["test"]
    for label, p in _sweep(f):
        logits = m.exit_logits(test, p)
        exits = _decide(m, test, p, label, logits)
        try:
            got, left_with = stream_exits(m, test.features, p)
        except Exception as e:
            raise AssertionError(f"{label}: streaming failed: {type(e).__name__}: {e}") from None
        assert np.array_equal(got, exits), f"{label}: streaming differs from decide: {_diff(got, exits)}"
        want = logits[torch.from_numpy(exits), torch.arange(len(test))]
        assert tuple(left_with.shape) == tuple(want.shape), \
            f"{label}: stream's logits have shape {tuple(left_with.shape)}, expected {tuple(want.shape)}"
        assert torch.allclose(left_with.float(), want.float(), atol=1e-5, rtol=1e-5), \
            f"{label}: the logits stream leaves with differ from exit_logits by up to " \
            f"{(left_with.float() - want.float()).abs().max().item():.3g}"


_CLEAR = (UserError, ValueError)  # NotFittedError is a UserError


def _raises_clearly(call: Callable[[], Any], allowed: tuple[type[BaseException], ...]) -> str | None:
    """None if ``call`` raised one of ``allowed`` with a message, else what happened instead."""
    try:
        out = call()
    except allowed as e:
        return None if str(e).strip() else f"raised {type(e).__name__} without a message"
    except Exception as e:
        return f"raised {type(e).__name__}: {e}"
    shape = getattr(out, "shape", None)
    return f"returned {type(out).__name__}{'' if shape is None else ' of shape ' + str(tuple(shape))} silently"


def check_unfitted_errors(method_factory: MethodFactory, task: Task) -> None:
    """An unfitted method refuses ``operating_points`` and ``exit_logits`` with NotFittedError / UserError /
    ValueError and a message (not an AttributeError, not a silent answer)."""
    m = method_factory()
    problems = []
    for what, call in (("operating_points", lambda: m.operating_points(task, [0.5])),
                       ("exit_logits", lambda: m.exit_logits(task.splits["test"]))):
        got = _raises_clearly(call, _CLEAR)
        if got is not None:
            problems.append(f"unfitted {what} {got}")
    assert not problems, "; ".join(problems) + " (expected NotFittedError: call fit(task) first)"


def check_bad_inputs(method_factory: MethodFactory, task: Task) -> None:
    """Wrong shapes are refused, not answered: decide on logits with one exit too many or too few, or without
    the exit axis, raises ValueError/UserError (for a bound, also targets of the wrong length);
    exit_logits on features of the wrong width raises (torch's own shape error is clear enough)."""
    f = _fitted(method_factory, task)
    m, test = f.method, task.splits["test"]
    p = _first_point(f)
    logits = m.exit_logits(test, p)
    y = _targets(m, test)
    cases = {"logits with one exit too many": lambda: m.decide(torch.cat([logits, logits[-1:]]), p, y),
             "logits with one exit too few": lambda: m.decide(logits[:-1], p, y),
             "2-D logits [N, C]": lambda: m.decide(logits[0], p, y)}
    if m.bound:
        cases["targets of the wrong length"] = lambda: m.decide(logits, p, y[:-1])
    problems = [f"decide on {what} {got}" for what, call in cases.items()
                if (got := _raises_clearly(call, _CLEAR)) is not None]
    wide = SplitData(torch.cat([test.features, torch.zeros(*test.features.shape[:2], 1)], dim=-1), test.labels,
                     test.sample_ids)
    got = _raises_clearly(lambda: m.exit_logits(wide, p), (*_CLEAR, RuntimeError))
    if got is not None:
        problems.append(f"exit_logits on features of width D+1 {got}")
    assert not problems, "; ".join(problems)


CHECKS: list[Callable[[MethodFactory, Task], None]] = [
    check_fit_contract, check_no_label_peeking, check_causality, check_budget_respected, check_order_invariance,
    check_batch_invariance, check_determinism, check_pickle_round_trip, check_streaming, check_unfitted_errors,
    check_bad_inputs,
]
CHECK_NAMES: list[str] = [c.__name__ for c in CHECKS]


def expected_failures_for(cls: type[ExitMethod]) -> dict[str, str]:
    return dict(getattr(cls, "expected_failures", {}) or {})


def run_checks(name_or_factory: str | MethodFactory, task: Task | None = None,
               checks: Sequence[str] | None = None) -> list[CheckResult]:
    """Run the checks (all, or those named) on one method; never raises for a failing check."""
    factory = as_factory(name_or_factory)
    task = default_task() if task is None else task
    selected = CHECKS if checks is None else [_check_by_name(c) for c in checks]
    xfail = expected_failures_for(method_class(factory))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and never oversubscribes a shared machine
    try:
        return [_run_one(check, factory, task, xfail) for check in selected]
    finally:
        torch.set_num_threads(threads)


def _run_one(check: Callable[[MethodFactory, Task], None], factory: MethodFactory, task: Task,
             xfail: dict[str, str]) -> CheckResult:
    name = check.__name__
    start = time.perf_counter()
    try:
        check(factory, task)
        failed = None
    except AssertionError as e:
        failed = str(e) or "assertion failed"
    except Exception as e:  # a crash is a failure of the method, reported like one
        failed = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    if name in xfail:
        status = "XPASS" if failed is None else "XFAIL"
        message = (f"declared expected failure passed, remove it: {xfail[name]}" if failed is None
                   else f"expected: {xfail[name]} | got: {failed}")
    else:
        status, message = ("PASS", "") if failed is None else ("FAIL", failed)
    return CheckResult(name, status, " ".join(message.split()), seconds)


def _check_by_name(name: str) -> Callable[[MethodFactory, Task], None]:
    by_name = {c.__name__: c for c in CHECKS}
    if name not in by_name:
        raise UserError(unknown_name_message("check", name, sorted(by_name)))
    return by_name[name]
