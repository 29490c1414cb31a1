"""Metrics as pure functions over a whole split (never averaged over mini-batches).

Inputs are NumPy arrays: ``probs`` [N, C] (rows sum to 1), ``targets`` [N] int, ``confidence`` [N] in [0, 1],
``correct`` [N] bool. Argument checks are separated from the computations (``_check_*``) and raise
ValueError with what was wrong.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

ECE_BINS = 15


def _check_probs(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    if probs.ndim != 2 or targets.shape != (probs.shape[0],):
        raise ValueError(f"expected probs [N, C] and targets [N], got {probs.shape} and {targets.shape}")
    if probs.shape[0] == 0:
        raise ValueError("metrics need at least one sample")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probabilities contain NaN or infinity")
    if targets.min() < 0 or targets.max() >= probs.shape[1]:
        raise ValueError(f"targets must lie in [0, {probs.shape[1] - 1}]")
    return probs, targets.astype(np.int64)


def _check_conf(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    if confidence.ndim != 1 or confidence.shape != correct.shape or len(confidence) == 0:
        raise ValueError(f"expected confidence [N] and correct [N], N > 0; got {confidence.shape}, {correct.shape}")
    if np.any(~np.isfinite(confidence)) or confidence.min() < 0 or confidence.max() > 1:
        raise ValueError("confidence must lie in [0, 1]")
    return confidence, correct


def accuracy(pred: np.ndarray, targets: np.ndarray) -> float:
    pred, targets = np.asarray(pred), np.asarray(targets)
    if pred.shape != targets.shape or pred.ndim != 1 or len(pred) == 0:
        raise ValueError(f"expected pred [N] and targets [N], N > 0; got {pred.shape}, {targets.shape}")
    return float(np.mean(pred == targets))


def ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins [k/B, (k+1)/B); confidence 1.0
    falls in the last bin. sum_b |B_b|/N * |acc(B_b) - conf(B_b)|."""
    confidence, correct = _check_conf(confidence, correct)
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    return _binned_gap(bins, confidence, correct, n_bins)


def ece_equal_mass(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE with bins holding (as nearly as possible) equal numbers of samples, by sorted confidence."""
    confidence, correct = _check_conf(confidence, correct)
    order = np.argsort(confidence, kind="stable")
    bins = np.empty(len(order), dtype=np.int64)
    bins[order] = np.arange(len(order)) * n_bins // len(order)
    return _binned_gap(bins, confidence, correct, n_bins)


def _binned_gap(bins: np.ndarray, confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / len(confidence))


def nll(probs: np.ndarray, targets: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the target class (probabilities clipped at ``eps``)."""
    probs, targets = _check_probs(probs, targets)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(targets)), targets], eps, None))))


def brier(probs: np.ndarray, targets: np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of sum_c (p_c - 1[c = y])^2 (range [0, 2])."""
    probs, targets = _check_probs(probs, targets)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(targets)), targets] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def auroc_misclassification(confidence: np.ndarray, correct: np.ndarray) -> float:
    """AUROC of confidence for telling correct from wrong predictions (Mann-Whitney form, ties count 1/2);
    NaN when all predictions are correct or all wrong."""
    confidence, correct = _check_conf(confidence, correct)
    n_pos, n_neg = int(correct.sum()), int((~correct).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(confidence)
    return float((ranks[correct].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


MONOTONICITY_TAUS = (0.01, 0.1, 0.5)  # drops the harness reports (from the authors' list 0.01, 0.05, 0.1, 0.2, 0.5)


def monotonicity_violation(probs: np.ndarray, targets: np.ndarray, tau: float = 0.0) -> tuple[float, np.ndarray]:
    """Conditional monotonicity (Jazbec et al., NeurIPS 2023) of per-exit probabilities ``probs`` [K, N, C].

    Returns (overall, per_pair [K-1]):
    - overall: the share of samples whose true-class probability falls by more than ``tau`` from some exit i to
      some later exit j > i (p_j(y) - p_i(y) < -tau): the authors' ``conditional_monotonicity_check`` (which
      reports it in percent) for one threshold. Equivalently p_j(y) < max_{i<j} p_i(y) - tau for some j.
    - per_pair[k]: the share of samples whose true-class probability falls by more than ``tau`` from exit k to
      exit k+1 (p_{k+1}(y) - p_k(y) < -tau).
    Comparisons in float64; ``tau`` >= 0 (0: any fall)."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise ValueError(f"expected per-exit probabilities [K, N, C], got shape {probs.shape}")
    _check_probs(probs.reshape(-1, probs.shape[2]), np.tile(targets, probs.shape[0]))
    if not (np.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau}")
    p = probs[:, np.arange(probs.shape[1]), targets.astype(np.int64)]  # [K, N] true-class probability
    if p.shape[0] == 1:
        return 0.0, np.zeros(0)
    per_pair = (p[1:] - p[:-1] < -tau).mean(axis=1)
    # float subtraction is monotone in the subtrahend, so the largest earlier value decides "some i < j"
    overall = (p[1:] - np.maximum.accumulate(p[:-1], axis=0) < -tau).any(axis=0).mean()
    return float(overall), per_pair
