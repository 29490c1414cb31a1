"""Turn a fitted method's decisions into tidy metric rows and per-sample decision rows.

One code path for every method: the prediction at the chosen exit, its softmax (float64), and the metrics
of bench.measure.metrics over the whole split. Row schema (DESIGN.md): split, seed, method, params, budget, metric,
value, n, exit; the run-level columns (run_id, dataset, backbone) are added by the writer.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import numpy as np
import torch

from bench.measure import conformal as CP
from bench.measure import metrics as M
from bench.base.hashing import canonical_json
from bench.core.interface import ExitMethod, OperatingPoint
from bench.core.task import Task

EVAL_SPLITS = ("val", "test")
CONFORMAL_ALPHAS = (0.05, 0.1)  # fixed in advance, never chosen on test


def metric_row(split, seed, method, params, budget, metric, value, n, exit=None) -> dict:
    return {"split": split, "seed": seed, "method": method, "params": canonical_json(params),
            "budget": budget, "metric": metric, "value": float(value), "n": int(n),
            "exit": exit}


def prediction_metrics(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Overall metrics of predictions with probabilities [N, C] (the emitted prediction is the argmax)."""
    pred = probs.argmax(1)
    conf = probs.max(1)
    correct = pred == targets
    return {"accuracy": M.accuracy(pred, targets), "ece": M.ece(conf, correct),
            "ece_equal_mass": M.ece_equal_mass(conf, correct), "nll": M.nll(probs, targets),
            "brier": M.brier(probs, targets), "auroc_misclassification": M.auroc_misclassification(conf, correct)}


class _Outputs:
    """Per-exit logits and float64 softmax per (split, operating point), computed once per evaluation. Points
    whose logits are equal (a score rule's heads serve every threshold) share one logits tensor and one softmax,
    so a method's memo by tensor identity (``ScoreExitMethod.scores``) computes their scores once too."""

    def __init__(self, method: ExitMethod, task: Task):
        self.method, self.task, self._cache = method, task, {}
        self._distinct: dict[str, list[tuple[torch.Tensor, np.ndarray]]] = {}  # per split

    def __call__(self, split_name: str, point: OperatingPoint | None) -> tuple[torch.Tensor, np.ndarray]:
        key = (split_name, None if point is None else canonical_json(point.params))
        if key not in self._cache:
            logits = self.method.exit_logits(self.task.splits[split_name], point)
            if not torch.isfinite(logits).all():
                raise ValueError(f"method {self.method.name} produced NaN or infinite logits on {split_name}")
            seen = self._distinct.setdefault(split_name, [])
            same = next((s for s in seen if s[0].shape == logits.shape and torch.equal(s[0], logits)), None)
            if same is None:
                same = (logits, M.softmax(logits.numpy()))  # [K, N, C], float64 probabilities
                seen.append(same)
            self._cache[key] = same
        return self._cache[key]


def evaluate_method(method: ExitMethod, task: Task, points: Sequence[OperatingPoint],
                    splits: Sequence[str] = EVAL_SPLITS) -> tuple[list[dict], list[dict]]:
    """Metric rows and per-sample decision rows for every operating point (``resolve_points``: one per budget,
    then the method's own points, whose budget is left empty) on every split."""
    rows: list[dict] = []
    decisions: list[dict] = []
    base_params = method.params()
    outputs = _Outputs(method, task)
    monotonicity: dict = {}  # (split, id of the probabilities) -> values: points that share logits compute them once
    for split_name in splits:
        split = task.splits[split_name]
        n = len(split)
        _, probs = outputs(split_name, None)
        for k in range(probs.shape[0]):  # each head on every sample: what exit k could do if all stopped there
            rows.append(metric_row(split_name, task.seed, method.name, base_params, None, "head_accuracy",
                                   M.accuracy(probs[k].argmax(1), split.labels), n, k))
        targets = split.labels if method.bound else None
        for point in points:
            budget = point.budget
            if point.infeasible:
                params = {**base_params, "infeasible": True}
                for metric in ("accuracy", "macs", "macs_rel", "ece"):
                    rows.append(metric_row(split_name, task.seed, method.name, params, budget, metric,
                                           np.nan, n))
                continue
            params = {**base_params, **point.params, "val_macs_rel": point.val_macs_rel}
            logits, probs = outputs(split_name, point)
            exit_idx = np.asarray(method.decide(logits, point, targets))
            r, d = _point_rows(method, task, split_name, split, probs, exit_idx, params, budget)
            rows += r
            decisions.append(d)
            rows += monotonicity_rows(method, task, split_name, split, probs, params, budget, monotonicity)
            if split_name == "test" and hasattr(method, "exit_scores"):
                rows += exit_score_rows(method, task, split, logits, probs, point, params, budget)
            if split_name == "test" and "cal" in task.splits:
                rows += conformal_rows(method, task, point, outputs, probs, exit_idx, params, budget)
    return rows, decisions


def _point_rows(method, task, split_name, split, probs, exit_idx, params, budget) -> tuple[list[dict], dict]:
    n, y = len(split), split.labels
    row = partial(metric_row, split_name, task.seed, method.name, params, budget)
    p = probs[exit_idx, np.arange(n)]  # [N, C] the emitted distribution
    macs = method.costs_[exit_idx]
    values = {**prediction_metrics(p, y), "macs": macs.mean(), "macs_rel": macs.mean() / task.macs.static}
    rows = [row(m, v, n) for m, v in values.items()]
    pred, conf = p.argmax(1), p.max(1)
    for k in range(probs.shape[0]):
        at = exit_idx == k
        rows.append(row("exit_share", at.mean(), n, k))
        if at.any():
            rows.append(row("exit_accuracy", M.accuracy(pred[at], y[at]), int(at.sum()), k))
            rows.append(row("exit_ece", M.ece(conf[at], pred[at] == y[at]), int(at.sum()), k))
    decision = {"split": split_name, "seed": task.seed, "method": method.name, "budget": budget,
                "params": canonical_json(params), "sample_id": split.sample_ids, "exit": exit_idx, "pred": pred,
                "target": y, "confidence": conf}
    return rows, decision


def monotonicity_rows(method: ExitMethod, task: Task, split_name: str, split, probs: np.ndarray, params: dict,
                      budget, memo: dict) -> list[dict]:
    """Conditional monotonicity of the point's per-exit softmax ``probs`` [K, N, C] (every exit, whatever the
    point decides): ``monotonicity_violation`` per tau of ``MONOTONICITY_TAUS`` (``tau`` in params), with an empty
    ``exit`` the share of samples whose true-class probability falls by more than tau from some exit to a later
    one (Jazbec et al.'s definition), and with ``exit`` = k the share that falls from exit k to exit k+1."""
    key = (split_name, id(probs))
    if key not in memo:
        memo[key] = (probs, [(tau, *M.monotonicity_violation(probs, split.labels, tau)) for tau in M.MONOTONICITY_TAUS])
    rows, n = [], len(split)
    for tau, overall, pairs in memo[key][1]:
        row = partial(metric_row, split_name, task.seed, method.name, {**params, "tau": tau}, budget,
                      "monotonicity_violation")
        rows.append(row(overall, n))
        rows += [row(v, n, k) for k, v in enumerate(pairs)]
    return rows


def exit_score_rows(method: ExitMethod, task: Task, split, logits: torch.Tensor, probs: np.ndarray,
                    point: OperatingPoint, params: dict, budget) -> list[dict]:
    """How well the score a method's exit rule reads (``method.exit_scores(logits, point)`` [K-1, N], e.g.
    JEI-DNN's gate outputs) tells, at each intermediate exit k, whether head k is right, over every sample:
    ``exit_score_auroc`` next to ``msp_auroc``, the same AUROC for head k's max softmax probability."""
    scores = np.asarray(method.exit_scores(logits, point), dtype=np.float64)
    row = partial(metric_row, "test", task.seed, method.name, params, budget)
    n, rows = len(split), []
    for k in range(scores.shape[0]):
        correct = probs[k].argmax(1) == split.labels
        rows.append(row("exit_score_auroc", M.auroc_misclassification(scores[k], correct), n, k))
        rows.append(row("msp_auroc", M.auroc_misclassification(probs[k].max(1), correct), n, k))
    return rows


def conformal_rows(method: ExitMethod, task: Task, point: OperatingPoint, outputs: _Outputs,
                   test_probs: np.ndarray, test_exits: np.ndarray, params: dict, budget) -> list[dict]:
    """Coverage and mean set size on test, thresholds from the cal split decided by the same final model and
    operating point; LAC and randomised APS, global and per-exit, at each alpha of CONFORMAL_ALPHAS."""
    cal = task.splits["cal"]
    cal_logits, cal_probs = outputs("cal", point)
    cal_exits = np.asarray(method.decide(cal_logits, point, cal.labels if method.bound else None))
    cal_p = cal_probs[cal_exits, np.arange(len(cal))]
    test = task.splits["test"]
    n = len(test)
    test_p = test_probs[test_exits, np.arange(n)]
    rng = np.random.default_rng([task.seed, 0xC0F])
    u_cal, u_test = rng.uniform(size=len(cal)), rng.uniform(size=n)
    rows = []
    for score in CP.SCORES:
        cal_scores = CP.scores_for(score, cal_p, cal.labels, u_cal)
        test_scores = CP.class_scores(score, test_p, u_test)  # [N, C], shared by every alpha and scope
        for alpha in CONFORMAL_ALPHAS:
            q_exit, fallbacks = CP.per_exit_quantiles(cal_scores, cal_exits, test_probs.shape[0], alpha)
            for scope, q in (("global", CP.conformal_quantile(cal_scores, alpha)), ("per_exit", q_exit[test_exits])):
                sets = CP.sets_from_scores(test_scores, q)
                row = partial(metric_row, "test", task.seed, method.name,
                              {**params, "score": score, "scope": scope, "alpha": alpha}, budget)
                rows.append(row("coverage", sets[np.arange(n), test.labels].mean(), n))
                rows.append(row("set_size", sets.sum(1).mean(), n))
                if scope == "per_exit":
                    rows.append(row("conformal_fallbacks", fallbacks, len(cal)))
    return rows


def static_backbone_rows(task: Task, splits: Sequence[str] = EVAL_SPLITS) -> list[dict]:
    """The static backbone (every sample through every block, no heads): the reference point, macs_rel = 1."""
    rows = []
    for split_name in splits:
        split = task.splits[split_name]
        probs = M.softmax(task.final_logits(split).numpy())
        values = {**prediction_metrics(probs, split.labels), "macs": task.macs.static, "macs_rel": 1.0}
        rows += [metric_row(split_name, task.seed, "static", {}, None, m, v, len(split))
                 for m, v in values.items()]
    return rows
