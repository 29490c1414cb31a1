"""Matched-cost comparison for ``python -m bench report`` and the results page.

Comparisons (:func:`compare`) are made at equal realised test cost, never by budget: each point of a method (its
reached budget rows and its own points) against the reference method (``threshold`` when present, else the
first method) mixed between the two reference budget points whose test ``macs_rel`` bracket the point's, per
seed (the expected correctness of a randomised policy whose expected cost is the point's). The accuracy
difference is bootstrapped over the same (seed, sample_id) pairs pooled over seeds (2,000 resamples, seeded);
a difference whose 95 % percentile interval excludes 0 is marked ``*``. A point outside the reference's cost
range (by more than 0.02) is not compared, and its row says why.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from bench.results.points import INFEASIBLE, REACHED, combine_status, tag_points

N_BOOT = 2000
BOOT_SEED = 0
COST_TOL = 0.02  # a point this close outside the reference's cost range is matched to its end point


# ---------------------------------------------------------------------------------------- paired bootstrap

def paired_bootstrap(correct_a, correct_b, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                     level: float = 0.95) -> dict:
    """Bootstrap of mean(correct_a) - mean(correct_b) over paired samples. Correctness is 0/1 (bool) or a
    fraction in [0, 1] (the expected correctness of a mixture of two points). The per-sample difference takes
    few distinct values (3 for 0/1 inputs; a handful per mixing weight), so resampling n pairs with replacement
    is exactly a multinomial draw of their counts: no n_boot x n index matrix. Returns diff, lo, hi,
    significant (interval excludes 0), n. Raises ValueError for unequal lengths or values outside [0, 1]."""
    a = np.asarray(correct_a, dtype=float)
    b = np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be two 1-d arrays of the same length, got shapes {a.shape} and "
                         f"{b.shape}")
    for name, x in (("correct_a", a), ("correct_b", b)):
        if not (np.isfinite(x).all() and (x >= -1e-9).all() and (x <= 1 + 1e-9).all()):
            raise ValueError(f"{name} must hold correctness in [0, 1] (bool or a mixture's fraction)")
    n = len(a)
    if n == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "significant": False, "n": 0}
    d = np.clip(a, 0, 1) - np.clip(b, 0, 1)
    boot = _resampled_means(d, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "significant": bool(lo > 0 or hi < 0),
            "n": n}


MAX_CATEGORIES = 256  # above this many distinct differences, resample indices (in chunks) instead


def _resampled_means(d: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot] means of ``d`` [n] resampled with replacement: a multinomial draw of the counts of its distinct
    values when there are few, else index resampling 64 resamples at a time."""
    n = len(d)
    values, counts = np.unique(d, return_counts=True)
    if len(values) <= MAX_CATEGORIES:
        values, counts = values[::-1], counts[::-1]  # +1, 0, -1 for 0/1 inputs
        return rng.multinomial(n, counts / n, size=n_boot) @ values / n  # [n_boot, distinct] @ [distinct]
    return np.concatenate([d[rng.integers(0, n, (min(64, n_boot - i), n))].mean(axis=1)
                           for i in range(0, n_boot, 64)])


def reference_label(labels: Sequence[str], methods: Sequence[str] | None = None) -> str | None:
    """The first label of method ``threshold`` when there is one, else the first label."""
    pairs = list(dict.fromkeys(zip(labels, methods if methods is not None else labels)))
    ref = [lab for lab, m in pairs if m == "threshold"]
    return ref[0] if ref else (pairs[0][0] if pairs else None)


def bracket(costs, m: float, tol: float = COST_TOL) -> tuple[int, int, float] | None:
    """The mixture of two points that costs ``m``: indices (i, j) into ``costs`` [P] (realised test macs_rel of
    the reference's points) with costs[i] <= m <= costs[j] as close as possible, and the weight
    w = (m - costs[i]) / (costs[j] - costs[i]) of point j, so (1 - w) costs[i] + w costs[j] = m. When m lies
    outside [min, max] by at most ``tol``, the end point alone (i = j, w = 0); farther out, None."""
    c = np.asarray(costs, dtype=float)
    if c.ndim != 1 or not len(c) or not np.isfinite(c).all():
        raise ValueError(f"costs must be a non-empty 1-d array of finite numbers, got {c!r}")
    if not np.isfinite(m):
        raise ValueError(f"the cost to match must be finite, got {m!r}")
    below, above = np.flatnonzero(c <= m), np.flatnonzero(c >= m)
    if not len(below) or not len(above):
        end = int(np.argmin(c)) if not len(below) else int(np.argmax(c))
        return (end, end, 0.0) if abs(c[end] - m) <= tol else None
    i, j = int(below[np.argmax(c[below])]), int(above[np.argmin(c[above])])
    return i, j, (0.0 if c[j] == c[i] else float((m - c[i]) / (c[j] - c[i])))


COMPARISON_COLUMNS = ["dataset", "label", "budget", "point", "macs_rel", "ref_macs_rel", "reference", "accuracy",
                      "ref_accuracy", "diff", "lo", "hi", "significant", "n", "seeds", "note"]


def point_table(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per method point and seed on ``split`` (budget rows, own points; static left out): dataset,
    label, method, seed, kind, status, budget, point, chosen, params, macs_rel (realised, from metrics.csv)."""
    t = tag_points(df[df["split"] == split])
    a = t[t["exit"].isna() & (t["metric"] == "macs_rel") & t["kind"].isin(("budget", "own"))]
    return a[["dataset", "label", "method", "seed", "kind", "status", "budget", "point", "chosen", "params",
              "value"]].rename(columns={"value": "macs_rel"}).reset_index(drop=True)


def _budget_key(budget: float) -> tuple:
    return ("budget", round(float(budget), 9))


class _Decisions:
    """Per-sample correctness of each point: (dataset, label, seed, key) -> float array indexed by sample_id,
    key ("budget", b) for budget rows, ("params", json) for own points when the file records params, else
    ("own",) for all of a (label, seed)'s own-point rows together (usable only if that is one point)."""

    def __init__(self, decisions: pd.DataFrame):
        d = decisions.assign(correct=(decisions["pred"] == decisions["target"]).astype(float))
        self.has_params = bool(d["params"].notna().any()) if "params" in d else False
        # the (dataset, label) pairs with any decision (from the distinct pairs: zipping millions of rows is slow)
        pairs = d[["dataset", "label"]].drop_duplicates()
        self.labels = set(zip(pairs["dataset"], pairs["label"]))
        self._map: dict = {}
        own = d["budget"].isna()
        for (ds, lab, seed, b), g in d[~own].groupby(["dataset", "label", "seed", "budget"], sort=False):
            self._map[(ds, lab, seed, _budget_key(b))] = g.set_index("sample_id")["correct"]
        keys = ["dataset", "label", "seed", "params"] if self.has_params else ["dataset", "label", "seed"]
        for k, g in d[own].groupby(keys, sort=False):
            key = ("params", k[3]) if self.has_params else ("own",)
            self._map[(*k[:3], key)] = g.set_index("sample_id")["correct"]

    def get(self, dataset: str, label: str, seed: int, row, n_own: int) -> tuple[pd.Series | None, str]:
        """The correctness of a point-table ``row`` on ``seed`` (None and the reason when it is not recorded)."""
        if (dataset, label) not in self.labels:
            return None, f"no decisions of {label} (its run has no decisions.csv.gz)"
        if row["kind"] == "budget":
            c = self._map.get((dataset, label, seed, _budget_key(row["budget"])))
        elif self.has_params:
            c = self._map.get((dataset, label, seed, ("params", row["params"])))
        elif n_own == 1:
            c = self._map.get((dataset, label, seed, ("own",)))
        else:
            return None, ("own points' decisions cannot be told apart (decisions.csv.gz records no params and "
                          f"{label} has {n_own} own points)")
        if c is None:
            return None, f"decisions.csv.gz has no decisions of this point of {label}"
        if not c.index.is_unique:
            return None, "decisions.csv.gz repeats sample ids for this point"
        return c, ""


def _matched_seed(m: float, ref: pd.DataFrame, dec: _Decisions, dataset: str, ref_label: str, seed: int):
    """The reference mixture at cost ``m`` on one seed: (correctness Series, mixture cost, note) or
    (None, nan, reason). ``ref``: the reference's reached budget rows on that seed."""
    if ref.empty:
        return None, np.nan, f"the reference {ref_label} has no reached budget point"
    costs = ref["macs_rel"].to_numpy(dtype=float)
    if not np.isfinite(m):
        return None, np.nan, "the point's realised cost is not finite"
    hit = bracket(costs, m)
    if hit is None:
        side = "below" if m < costs.min() else "above"
        return None, np.nan, f"cost {m:.3f} is {side} the reference's range [{costs.min():.3f}, {costs.max():.3f}]"
    i, j, w = hit
    parts = []
    for k in (i, j):
        c, why = dec.get(dataset, ref_label, seed, ref.iloc[k], 1)
        if c is None:
            return None, np.nan, f"reference: {why}"
        parts.append(c)
    mix = ((1 - w) * parts[0] + w * parts[1].reindex(parts[0].index)).clip(0.0, 1.0)
    cost = (1 - w) * costs[i] + w * costs[j]
    note = (f"cost {m:.3f} matched to the reference's end point at {cost:.3f} (within {COST_TOL:g})"
            if i == j and abs(cost - m) > 1e-12 else "")
    return mix.dropna(), float(cost), note


def _compare_point(rows: pd.DataFrame, ref: pd.DataFrame, dec: _Decisions, dataset: str, ref_label: str,
                   n_boot: int, seed: int, n_own: dict) -> dict:
    """One comparison row: a point's seeds (``rows``: point-table rows of one label and budget or own point)
    against the reference mixed at each seed's realised cost, pooled over the matched seeds."""
    label, first = rows["label"].iloc[0], rows.iloc[0]
    a_all, b_all, costs, ref_costs, used = [], [], [], [], []
    notes: dict[str, list] = {}  # reason -> seeds
    for _, r in rows.sort_values("seed").iterrows():
        s = r["seed"]
        costs.append(r["macs_rel"])
        mine, why = dec.get(dataset, label, s, r, n_own.get((label, s), 0))
        if mine is None:
            notes.setdefault(why, []).append(s)
            continue
        mix, cost, why = _matched_seed(float(r["macs_rel"]), ref[ref["seed"] == s], dec, dataset, ref_label, s)
        if why:
            notes.setdefault(why, []).append(s)
        if mix is None:
            continue
        pair = pd.concat([mine.rename("a"), mix.rename("b")], axis=1, join="inner")
        a_all.append(pair["a"].to_numpy())
        b_all.append(pair["b"].to_numpy())
        ref_costs.append(cost)
        used.append(len(costs) - 1)
    a = np.concatenate(a_all) if a_all else np.zeros(0)
    b = np.concatenate(b_all) if b_all else np.zeros(0)
    res = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    head = [] if len(used) == len(rows) else [f"compared on {len(used)} of {len(rows)} seeds" if used
                                              else "not compared"]
    text = [f"seed{'s' if len(v) > 1 else ''} {', '.join(map(str, v))}: {why}" for why, v in notes.items()]
    chosen = rows["chosen"].unique()
    point = first["point"] if first["kind"] == "own" else (chosen[0] if len(chosen) == 1 else "")
    c = np.asarray(costs, dtype=float)
    return {"dataset": dataset, "label": label, "budget": first["budget"] if first["kind"] == "budget" else np.nan,
            "point": point, "macs_rel": float(np.mean(c[used] if used else c)),
            "ref_macs_rel": float(np.mean(ref_costs)) if ref_costs else np.nan, "reference": ref_label,
            "accuracy": float(a.mean()) if len(a) else np.nan, "ref_accuracy": float(b.mean()) if len(b) else np.nan,
            **res, "seeds": len(used), "note": "; ".join(head + text)}


def compare(df: pd.DataFrame, decisions: pd.DataFrame, split: str = "test", n_boot: int = N_BOOT,
            seed: int = BOOT_SEED) -> pd.DataFrame:
    """Per dataset, every point of every non-reference method (its reached budget rows and its own points)
    against the reference (:func:`reference_label`) at the same realised test macs_rel: on each seed the
    reference's two budget points whose costs c1 <= m <= c2 bracket the point's cost m, mixed per sample as
    (1 - w) correct_1 + w correct_2 with w = (m - c1) / (c2 - c1) (:func:`bracket`); the paired bootstrap
    over the (seed, sample_id) pairs of the matched seeds. ``df``: metrics rows of :func:`load_runs`;
    ``decisions``: :func:`load_decisions`. Columns: COMPARISON_COLUMNS (``budget`` empty for own points,
    ``point`` the native label, ``note`` why a seed or the whole row was not compared)."""
    pts = point_table(df, split)
    dec = _Decisions(decisions)
    rows = []
    for dataset, dp in pts.groupby("dataset", sort=False):
        ref_label = reference_label(dp["label"], dp["method"])
        ref = dp[(dp["label"] == ref_label) & (dp["kind"] == "budget") & (dp["status"] == REACHED)]
        ref = ref[np.isfinite(ref["macs_rel"])]
        own = dp[dp["kind"] == "own"]
        n_own = own.groupby(["label", "seed"])["point"].nunique().to_dict()
        for label, dl in dp[dp["label"] != ref_label].groupby("label", sort=False):
            budget = dl[dl["kind"] == "budget"]
            for _, g in budget.groupby("budget", sort=True):
                if combine_status(g["status"]) != REACHED:
                    continue
                rows.append(_compare_point(g[g["status"] != INFEASIBLE], ref, dec, dataset, ref_label, n_boot, seed,
                                           n_own))
            mine = dl[dl["kind"] == "own"]
            for _, g in sorted(mine.groupby("point"), key=lambda kv: kv[1]["macs_rel"].mean()):
                rows.append(_compare_point(g, ref, dec, dataset, ref_label, n_boot, seed, n_own))
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
