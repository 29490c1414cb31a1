"""Risk-controlled exit thresholds (RC-EENN: Jazbec, Timans et al., "Fast yet Safe: Early-Exiting with Risk
Control", NeurIPS 2024; code metodj/RC-EENN, ``rc/risk_control.py`` and ``rc/bounds.py``).

A score rule leaves at the first exit whose score reaches one shared threshold t. Instead of a cost budget the
user gives a risk level epsilon (and a confidence delta): the threshold is the most aggressive one (the earliest
exits) whose risk against the full model (the last exit) the chosen procedure certifies on the ``cal`` split.

- The loss of a sample at threshold t (the authors' ``compute_risk``): ``disagreement`` (their
  ``prediction-consistency``) = 1[prediction at its exit != the last exit's prediction], in {0, 1};
  ``accuracy`` (their ``prediction-gt-gap``) = 1[wrong at its exit] - 1[last exit wrong], in {-1, 0, 1}: its
  mean is the accuracy drop against the full model. Loss bound B = 1 for both, as the authors use.
- The grid (``threshold_grid``): the authors sweep a fixed grid of max-softmax thresholds 1.00, 0.99, ..., 0.00.
  Any score rule's scores are not in [0, 1] (entropy's are -H), so the grid here is +inf (no early exit: risk 0)
  then the quantiles of the *validation* split's running-max scores at GRID_SIZE - 1 levels, descending; it is
  independent of cal and test, so the guarantees hold given it. Row 0 of a loss matrix is the safest threshold,
  as in the authors' code (``losses`` rows "correspond to the descending ordering of lambdas").
- The procedures pick a row index (the authors' functions, same arithmetic, same tie rules):
  ``naive`` (Eq. 9): the last row whose empirical risk < epsilon; no guarantee.
  ``crc`` (conformal risk control, Eq. 10): the last row with risk <= ((n+1) epsilon - B) / n; it controls the
  *expected* test risk, E[R] <= epsilon (for losses monotone in the threshold), not a probability.
  ``ucb`` (Eq. 12, their Waudby-Smith-Ramdas bound ``ucb_wsr``): the last row of the unbroken run from row 0
  whose WSR upper confidence bound at level delta is < epsilon: P(R > epsilon) <= delta.
  ``ltt`` (Learn-then-Test, Hoeffding-Bentkus p-values ``hb_p_value`` of H0: R > epsilon, fixed-sequence testing
  from row 0; losses clipped at 0 as the authors do): P(R > epsilon) <= delta.
  With no certified row, row 0 (no early exit).
- Difference from the authors' ``ltt_lam``: it returns the *first row not rejected* (p > delta), one row past
  the last certified one (a row whose null was not rejected); here the last rejected row before it, as fixed-
  sequence testing prescribes. So ours = max(theirs - 1, 0), and when every row is rejected (theirs -1) the last
  row (tests/data/rc_eenn_official.md). ``ucb_below`` tests "UCB < epsilon" as ``K_n(epsilon) > 0`` (the WSR
  statistic increases in mu, so this is the same comparison without the root search; the authors' root
  ``ucb_wsr`` is kept for the reported bound).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binom

PROCEDURES = ("naive", "crc", "ucb", "ltt")
LOSSES = ("disagreement", "accuracy")
GRID_SIZE = 201  # +inf and 200 validation quantiles (the authors' grid has 101 thresholds)
LOSS_BOUND = 1.0
N_RESPLITS = 200  # cal/test re-splits behind the violation share a run reports


# ------------------------------------------------------------------------------------------ the authors' bounds

def ucb_wsr(x: np.ndarray, delta: float, maxiters: int = 1000, bound: float = LOSS_BOUND, tol: float = 1e-10
            ) -> float:
    """The Waudby-Smith-Ramdas upper confidence bound of the mean of ``x`` [n] at level delta (the authors'
    ``rc.bounds.ucb_wsr``, adapted by them from aangelopoulos/rcps)."""
    x = np.asarray(x, dtype=np.float64)
    kn = _wsr_statistic(x, delta, bound)
    if kn(1.0) < 0:
        return bound
    if kn(tol) > 0:
        return tol
    return brentq(kn, tol, 1 - tol, maxiter=maxiters)


def _wsr_nu(x: np.ndarray, delta: float, bound: float) -> np.ndarray:
    """The betting fractions of the WSR bound, per row of x [..., n]."""
    n = x.shape[-1]
    t = np.arange(1, n + 1, dtype=np.float64)
    muhat = (np.cumsum(x, axis=-1) + 0.5) / (1 + t)
    sigma2 = (np.cumsum((x - muhat) ** 2, axis=-1) + 0.25) / (1 + t)
    sigma2 = np.concatenate([np.full(x.shape[:-1] + (1,), 0.25), sigma2[..., :-1]], axis=-1)
    return np.minimum(np.sqrt(2 * np.log(1 / delta) / n / sigma2), 1 / bound)


def _wsr_kn(x: np.ndarray, nu: np.ndarray, mu, delta: float):
    """The WSR statistic K_n(mu) per row of x [..., n] with betting fractions nu."""
    return np.max(np.cumsum(np.log(1 - nu * (x - mu)), axis=-1), axis=-1) + np.log(delta)


def _wsr_statistic(x: np.ndarray, delta: float, bound: float):
    nu = _wsr_nu(x, delta, bound)
    return lambda mu: _wsr_kn(x, nu, mu, delta)


def ucb_below(losses: np.ndarray, epsilon: float, delta: float, bound: float = LOSS_BOUND) -> np.ndarray:
    """Per row of losses [G, n]: whether the WSR bound is < epsilon, i.e. ``K_n(epsilon) > 0`` (vectorised)."""
    x = np.asarray(losses, dtype=np.float64)
    return _wsr_kn(x, _wsr_nu(x, delta, bound), epsilon, delta) > 0


def hb_p_value(risk, n: int, alpha: float, binary_loss: bool = False) -> np.ndarray:
    """The Hoeffding-Bentkus p-value of H0: risk > alpha from an empirical ``risk`` (scalar or array) of n losses
    in [0, 1] (the authors' ``rc.bounds.hb_p_value``; binomial tail alone for binary losses)."""
    risk = np.asarray(risk)  # in the losses' dtype: the authors' float32 losses give float32 n * risk
    tail = binom.cdf(np.ceil(n * risk), n, alpha)
    if binary_loss:
        return tail
    a, b = np.minimum(risk, alpha), alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        h1 = a * np.log(a / b) + (1 - a) * np.log((1 - a) / (1 - b))
        hoeffding = np.exp(-n * h1)
    # the authors' Python min(bentkus, hoeffding) keeps bentkus when hoeffding is NaN (risk 0: 0 * log 0)
    return np.where(hoeffding < np.e * tail, hoeffding, np.e * tail)


# ---------------------------------------------------------------------------------------------- the procedures

def _last(ok: np.ndarray) -> int:
    idx = np.flatnonzero(ok)
    return int(idx.max()) if len(idx) else 0


def _run_from_start(ok: np.ndarray) -> int:
    """The last row of the unbroken run of True from row 0 (the authors' ``find_first_gap``); 0 if none."""
    ok = np.asarray(ok, dtype=bool)
    if ok.all():
        return len(ok) - 1
    return max(0, int(np.argmin(ok)) - 1)


def naive_index(losses: np.ndarray, epsilon: float) -> int:
    return _last(np.asarray(losses).mean(axis=1) < epsilon)


def crc_index(losses: np.ndarray, epsilon: float, bound: float = LOSS_BOUND) -> int:
    n = np.asarray(losses).shape[1]
    return _last(np.asarray(losses).mean(axis=1) <= (n + 1) * epsilon / n - bound / n)


def ucb_index(losses: np.ndarray, epsilon: float, delta: float, bound: float = LOSS_BOUND) -> int:
    ok = ucb_below(losses, epsilon, delta, bound)
    # the authors' find_first_gap over the rows with UCB < epsilon: with none, or row 0 not among them, row 0
    return _run_from_start(ok) if ok.any() else 0


def ltt_index(losses: np.ndarray, epsilon: float, delta: float, binary_loss: bool) -> int:
    clipped = np.maximum(np.asarray(losses), 0.0)
    p = hb_p_value(clipped.mean(axis=1), clipped.shape[1], epsilon, binary_loss)
    return _run_from_start(p <= delta)


def select_index(procedure: str, losses: np.ndarray, epsilon: float, delta: float, binary_loss: bool,
                 bound: float = LOSS_BOUND) -> int:
    """The row of ``losses`` [G, n] (rows: thresholds from the safest down) that ``procedure`` certifies."""
    if procedure == "naive":
        return naive_index(losses, epsilon)
    if procedure == "crc":
        return crc_index(losses, epsilon, bound)
    if procedure == "ucb":
        return ucb_index(losses, epsilon, delta, bound)
    if procedure == "ltt":
        return ltt_index(losses, epsilon, delta, binary_loss)
    raise ValueError(f"risk-control procedure {procedure!r} is unknown: use one of {', '.join(PROCEDURES)}.")


# --------------------------------------------------------------------------------------------- grid and losses

def _running_max(scores: np.ndarray) -> np.ndarray:
    """Running maximum over the intermediate exits [K-1, N]: the rule "first k with s[k] >= t" is "first k with
    m[k] >= t" (bench.measure.calibration.threshold_cost_curve)."""
    return np.maximum.accumulate(np.asarray(scores, dtype=np.float64)[:-1], axis=0)


def threshold_grid(val_scores: np.ndarray, size: int = GRID_SIZE) -> np.ndarray:
    """Thresholds [<= size], descending: +inf (no early exit), then the validation running-max scores' quantiles
    at size - 1 levels from 1 to 0 (duplicates dropped)."""
    m = _running_max(val_scores).ravel()
    q = np.quantile(m, np.linspace(1.0, 0.0, size - 1)) if len(m) else np.zeros(0)
    return np.concatenate([[np.inf], np.unique(q)[::-1]])


def grid_exits(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Exit index [G, N] of every sample under each threshold of the shared rule (``first_exit`` with >=)."""
    m = _running_max(scores)  # [K-1, N]
    t = np.asarray(thresholds, dtype=np.float64)
    return (m[None, :, :] < t[:, None, None]).sum(axis=1)


def sample_losses(loss: str, exit_preds: np.ndarray, full_preds: np.ndarray, labels: np.ndarray | None = None
                  ) -> np.ndarray:
    """Per-sample losses [..., N] of predictions at the chosen exits against the full model's (the authors'
    ``compute_risk``: ``disagreement`` = prediction-consistency, ``accuracy`` = prediction-gt-gap)."""
    if loss == "disagreement":
        return (exit_preds != full_preds).astype(np.float64)
    if loss == "accuracy":
        if labels is None:
            raise ValueError("the accuracy-drop risk needs labels")
        return (exit_preds != labels).astype(np.float64) - (full_preds != labels).astype(np.float64)
    raise ValueError(f"risk loss {loss!r} is unknown: use one of {', '.join(LOSSES)}.")


def loss_matrix(loss: str, scores: np.ndarray, preds: np.ndarray, thresholds: np.ndarray,
                labels: np.ndarray | None = None) -> np.ndarray:
    """Losses [G, N] of each threshold: scores [K, N] (the rule's), preds [K, N] (each exit's prediction)."""
    preds = np.asarray(preds)
    exits = grid_exits(scores, thresholds)
    chosen = np.take_along_axis(preds, exits, axis=0)  # [G, N]
    return sample_losses(loss, chosen, preds[-1][None, :], labels)


# ----------------------------------------------------------------------------------------- guarantees, checked

def resplit_risks(losses: np.ndarray, n_cal: int, procedure: str, epsilons: Sequence[float], delta: float,
                  binary_loss: bool, n_resplits: int = N_RESPLITS, seed: int = 0) -> np.ndarray:
    """Test risks [n_resplits, E]: the pool's losses [G, N] split at random into n_cal calibration samples and
    the rest, ``n_resplits`` times (seeded); per split and epsilon, the procedure's row on the calibration part
    and that row's mean loss on the rest (the authors' ``rc_main`` trials)."""
    losses = np.asarray(losses, dtype=np.float64)
    n = losses.shape[1]
    if not 0 < n_cal < n:
        raise ValueError(f"n_cal={n_cal} must be between 1 and the pool size minus 1 ({n - 1})")
    rng = np.random.default_rng([seed, 0x215C])
    out = np.empty((n_resplits, len(epsilons)))
    for r in range(n_resplits):
        perm = rng.permutation(n)
        cal, test = losses[:, perm[:n_cal]], losses[:, perm[n_cal:]]
        for e, eps in enumerate(epsilons):
            out[r, e] = test[select_index(procedure, cal, eps, delta, binary_loss)].mean()
    return out


def violation_share(test_risks: np.ndarray, epsilons: Sequence[float]) -> np.ndarray:
    """Share [E] of re-splits whose test risk exceeds epsilon."""
    return (np.asarray(test_risks) > np.asarray(epsilons, dtype=np.float64)[None, :]).mean(axis=0)


def binomial_slack(delta: float, n: int, level: float = 0.99) -> float:
    """How far above delta the violation share of n independent re-splits may be by chance alone (one-sided, at
    ``level``): the binomial(n, delta) quantile / n - delta."""
    return float(binom.ppf(level, n, delta) / n - delta)
