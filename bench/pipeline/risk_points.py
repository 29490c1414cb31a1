"""Risk-controlled operating points of score rules (``--risk EPS,... --delta D``; bench.measure.risk_control).

For a fitted score rule (a ``ScoreExitMethod`` that keeps the shared "first exit whose score reaches t" decision:
threshold, entropy, BoostedNet, MSDNet, ...), each (procedure, epsilon) gives one operating point of the shared
rule: the threshold the procedure certifies on the ``cal`` split, on a grid from the validation scores. The
points carry no budget (they are the method's own points, labelled by epsilon, delta, procedure and loss); their
params hold the threshold and ``risk_cal`` (the cal split's empirical risk at it).

Rows added per point, on test: ``risk`` (the realised test risk of the point), and, over N_RESPLITS random
re-splits of this seed's cal + test pool (cal size kept), ``risk_violation_share`` (the share whose test risk
exceeds epsilon: at most delta for ucb / ltt) and ``risk_resplit_mean`` (the mean test risk: at most epsilon for
crc, whose guarantee is in expectation).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from bench.base.errors import UserError
from bench.core.interface import METHODS, ExitMethod, OperatingPoint, ScoreExitMethod, validation_cost
from bench.core.task import SplitData, Task
from bench.measure import metrics as M
from bench.measure import risk_control as RC
from bench.pipeline.evaluate import metric_row

RISK_METRICS = ("risk", "risk_violation_share", "risk_resplit_mean")


@dataclass(frozen=True)
class RiskSpec:
    epsilons: tuple[float, ...]
    delta: float = 0.1
    procedures: tuple[str, ...] = ("ucb",)
    loss: str = "disagreement"
    n_resplits: int = RC.N_RESPLITS


def is_score_rule(name: str) -> bool:
    """Whether a registered method decides by the shared score-threshold rule (so a threshold is a point)."""
    cls = METHODS.get(name)
    return issubclass(cls, ScoreExitMethod) and cls.decide is ScoreExitMethod.decide and not cls.bound


def check_spec(spec: RiskSpec, methods: Sequence[str]) -> None:
    """UserError (exit 2) for a risk level or confidence outside (0, 1), an unknown procedure or loss, or a
    method that is not a score rule."""
    for eps in spec.epsilons:
        if not (0 < eps < 1):
            raise UserError(f"--risk {eps}: a risk level epsilon must be in (0, 1), e.g. --risk 0.01,0.02,0.05.")
    if not (0 < spec.delta < 1):
        raise UserError(f"--delta {spec.delta}: the confidence delta must be in (0, 1), e.g. --delta 0.1.")
    if len(set(spec.epsilons)) != len(spec.epsilons):
        raise UserError(f"--risk lists a risk level twice: {','.join(map(str, spec.epsilons))}.")
    for p in spec.procedures:
        if p not in RC.PROCEDURES:
            raise UserError(f"--risk-method {p!r}: use one or more of {', '.join(RC.PROCEDURES)} (comma-separated).")
    if spec.loss not in RC.LOSSES:
        raise UserError(f"--risk-loss {spec.loss!r}: use disagreement (prediction differs from the last exit's) or "
                        "accuracy (the accuracy drop against the last exit).")
    bad = [m for m in methods if not is_score_rule(m)]
    if bad:
        ok = [m for m in METHODS.names() if is_score_rule(m)]
        raise UserError(f"--risk sets the threshold of a score rule; {', '.join(bad)} "
                        f"{'is' if len(bad) == 1 else 'are'} not one (score rules: {', '.join(ok)}). Run "
                        f"{'it' if len(bad) == 1 else 'them'} without --risk, in a separate run.")


def _arrays(method: ScoreExitMethod, split: SplitData) -> tuple[np.ndarray, np.ndarray]:
    """(scores [K, N] float64, each exit's prediction [K, N]: the argmax of its float64 softmax, as the metric
    rows and decisions.csv take it)."""
    logits = method.exit_logits(split)
    return method.scores(logits), M.softmax(logits.numpy()).argmax(-1)


def risk_points(method: ExitMethod, task: Task, spec: RiskSpec) -> list[OperatingPoint]:
    """One point per procedure and epsilon (in that order), its validation cost measured."""
    grid = RC.threshold_grid(_arrays(method, task.splits["val"])[0])
    cal = task.splits["cal"]
    scores, preds = _arrays(method, cal)
    losses = RC.loss_matrix(spec.loss, scores, preds, grid, cal.labels)
    out = []
    for proc in spec.procedures:
        for eps in spec.epsilons:
            i = RC.select_index(proc, losses, eps, spec.delta, binary_loss=True)
            params = {"threshold": float(grid[i]), "scheme": "shared", "risk_epsilon": float(eps),
                      "risk_delta": float(spec.delta), "risk_procedure": proc, "risk_loss": spec.loss,
                      "risk_cal": float(losses[i].mean()), "risk_grid": int(len(grid))}
            point = OperatingPoint(params)
            out.append(replace(point, val_macs_rel=validation_cost(method, task, point)))
    return out


def risk_rows(method: ExitMethod, task: Task, points: Sequence[OperatingPoint], spec: RiskSpec) -> list[dict]:
    """The rows of the module docstring for the points of ``risk_points``."""
    if not points:
        return []
    test, cal = task.splits["test"], task.splits["cal"]
    grid = RC.threshold_grid(_arrays(method, task.splits["val"])[0])
    (s_test, p_test), (s_cal, p_cal) = _arrays(method, test), _arrays(method, cal)
    pool = RC.loss_matrix(spec.loss, np.concatenate([s_cal, s_test], 1), np.concatenate([p_cal, p_test], 1), grid,
                          np.concatenate([cal.labels, test.labels]))
    base, rows = method.params(), []
    for proc in dict.fromkeys(p.params["risk_procedure"] for p in points):
        mine = [p for p in points if p.params["risk_procedure"] == proc]
        eps = [p.params["risk_epsilon"] for p in mine]
        risks = RC.resplit_risks(pool, len(cal), proc, eps, spec.delta, True, spec.n_resplits, seed=task.seed)
        share = RC.violation_share(risks, eps)
        for j, point in enumerate(mine):
            params = {**base, **point.params, "val_macs_rel": point.val_macs_rel}
            t = np.array([point.params["threshold"]])
            realised = RC.loss_matrix(spec.loss, s_test, p_test, t, test.labels)[0].mean()
            rows += [metric_row("test", task.seed, method.name, params, None, "risk", realised, len(test)),
                     metric_row("test", task.seed, method.name, params, None, "risk_violation_share", share[j],
                                spec.n_resplits),
                     metric_row("test", task.seed, method.name, params, None, "risk_resplit_mean",
                                risks[:, j].mean(), spec.n_resplits)]
    return rows
