"""Operating points of a run's metric rows, defined once for the summary, the report and the plots.

Every metric row belongs to one of:

- ``static``: the backbone alone (method ``static``);
- ``budget``: a method's row for a budget b (the point with the largest validation ``macs_rel`` <= b);
- ``own``: one of a method's own operating points (empty ``budget``; JEI-DNN one per λ, patience one per
  patience, the oracle its unconstrained point), labelled by its native parameter (``point``, e.g. ``λ=0.1``);
- ``""``: not an operating point (the per-head ``head_accuracy`` rows).

A budget row's ``status`` is ``infeasible`` (NaN values or ``"infeasible": true`` in ``params``: no point fits
below the budget), ``not reached`` (its chosen point is the same point as that of a smaller budget of the same
method, run, split and seed: the method cannot spend more, and the row only repeats that point) or ``reached``.
"The same point" means the same ``params`` apart from the ``budget`` key (the oracle's points carry their budget
there). ``val_macs_rel`` stays part of the comparison: for the other methods it is fixed by the other params, and
it is what tells the oracle's budget points apart (its point at budget 0.3 is another point than at 0.2 exactly
when it spends more on validation).
"""
from __future__ import annotations

import json
import math
from functools import lru_cache

import numpy as np
import pandas as pd

from bench.base.hashing import canonical_json

KINDS = ("static", "budget", "own")
REACHED, NOT_REACHED, INFEASIBLE = "reached", "not reached", "infeasible"
# rows whose params are the point's own (conformal rows add score / scope / alpha to them)
ANCHOR_METRICS = ("accuracy", "macs_rel", "macs", "ece")
CONFORMAL_METRICS = ("coverage", "set_size")
CONFORMAL_KEYS = ("score", "scope", "alpha")
# conditional monotonicity rows add the drop ``tau`` to the point's params
MONOTONICITY_METRICS = ("monotonicity_violation",)
NOT_NATIVE = ("budget", "val_macs_rel", "infeasible")
SYMBOLS = {"lambda": "λ", "risk_epsilon": "ε", "risk_delta": "δ", "risk_procedure": "rc", "risk_loss": "loss"}
# a risk-controlled point (--risk) is named by its risk level and procedure; what cal chose (its threshold, its
# cal risk) differs per seed and would split one point into one label per seed
RISK_FITTED = ("threshold", "risk_cal", "risk_grid")
TAG_COLUMNS = ["kind", "status", "point", "chosen", "val_cost"]


@lru_cache(maxsize=None)
def _parse(params: str) -> dict:
    if not isinstance(params, str) or not params:
        return {}
    try:
        out = json.loads(params)
    except ValueError as e:
        raise ValueError(f"params is not JSON ({e}): {params[:200]!r}")
    if not isinstance(out, dict):
        raise ValueError(f"params must be a JSON object, got {params[:200]!r}")
    return out


def parse_params(params) -> dict:
    """``params`` (canonical JSON text, or empty/NaN) as a dict (a copy)."""
    return dict(_parse(params if isinstance(params, str) else ""))


def point_params(params, metric: str) -> str:
    """The point's own params of a metric row: conformal rows' score / scope / alpha and monotonicity rows' tau
    removed (canonical JSON)."""
    extra = CONFORMAL_KEYS if metric in CONFORMAL_METRICS else ("tau",) if metric in MONOTONICITY_METRICS else ()
    if not extra:
        return params if isinstance(params, str) else ""
    p = parse_params(params)
    return canonical_json({k: v for k, v in p.items() if k not in extra})


def identity(params) -> str:
    """What makes two budget rows the same operating point: ``params`` without the ``budget`` key."""
    p = parse_params(params)
    p.pop("budget", None)
    return canonical_json(p)


def _value(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def native_label(params, base: dict) -> str:
    """A point's label by its native parameter(s): the params that differ from the method's ``base`` params,
    apart from budget / val_macs_rel / infeasible; ``λ`` for ``lambda`` (``λ=0.1``, ``patience=2``). A point
    whose only knob is a ``budget`` key (the oracle's) reads ``budget=0.3``, or ``unconstrained`` when it is
    empty; a point with no knob at all reads ``own point``."""
    p = parse_params(params)
    skip = NOT_NATIVE + (RISK_FITTED if "risk_epsilon" in p else ())
    native = {k: v for k, v in sorted(p.items()) if k not in skip and (k not in base or base[k] != v)}
    if native:
        return ", ".join(f"{SYMBOLS.get(k, k)}={_value(v)}" for k, v in native.items())
    if "budget" in p:
        return "unconstrained" if p["budget"] is None else f"budget={_value(p['budget'])}"
    return "own point"


def _base(rows: pd.DataFrame, anchors: pd.DataFrame) -> dict:
    """A method's params shared by all its points: those of its ``head_accuracy`` rows (written with the
    method's base params), else the key/value pairs common to all its anchor rows."""
    head = rows.loc[rows["metric"] == "head_accuracy", "params"]
    if len(head):
        return parse_params(head.iloc[0])
    dicts = [parse_params(p) for p in anchors["params"].unique()]
    if not dicts:
        return {}
    return {k: v for k, v in dicts[0].items() if all(k in d and d[k] == v for d in dicts[1:])}


def _is_infeasible(params: str, values: pd.Series) -> bool:
    return bool(parse_params(params).get("infeasible")) or not np.isfinite(values.to_numpy(dtype=float)).any()


def _tag_group(rows: pd.DataFrame) -> pd.DataFrame:
    """Tags of the anchor points of one (run, split, seed, method): one row per point, with columns budget_key,
    pkey (point params), kind, status, point, chosen, val_cost."""
    method = rows["method"].iloc[0]
    anchors = rows[rows["exit"].isna() & rows["metric"].isin(ANCHOR_METRICS)]
    base = _base(rows, anchors)
    out = []
    seen: set[str] = set()
    budget_rows = anchors[anchors["budget"].notna()]
    for budget, g in sorted(budget_rows.groupby("budget"), key=lambda kv: kv[0]):
        params = g["params"].iloc[0]
        if _is_infeasible(params, g["value"]):
            status, chosen, val = INFEASIBLE, "", float("nan")
        else:
            key = identity(params)
            status = NOT_REACHED if key in seen else REACHED
            seen.add(key)
            chosen = native_label(params, base)
            val = float(parse_params(params).get("val_macs_rel", np.nan))
        for p in g["params"].unique():
            out.append({"budget_key": budget, "pkey": p, "kind": "budget", "status": status, "point": "",
                        "chosen": chosen, "val_cost": val})
    own = anchors[anchors["budget"].isna()]
    kind = "static" if method == "static" else "own"
    for params in own["params"].unique():
        label = "" if kind == "static" else native_label(params, base)
        out.append({"budget_key": -1.0, "pkey": params, "kind": kind, "status": REACHED, "point": label,
                    "chosen": label, "val_cost": float(parse_params(params).get("val_macs_rel", np.nan))})
    tags = pd.DataFrame(out, columns=["budget_key", "pkey", *TAG_COLUMNS])
    own_tags = tags[tags["kind"] == "own"]
    if own_tags["point"].duplicated().any():  # no native parameter tells them apart: number them by val cost
        order = own_tags.sort_values("val_cost", kind="stable").index
        tags.loc[order, "point"] = [f"point {i + 1}" for i in range(len(order))]
        tags.loc[order, "chosen"] = tags.loc[order, "point"]
    return tags


def tag_points(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (metrics rows: run_id, split, seed, method, params, budget, metric, value, exit) with the columns
    kind, status, point, chosen (the chosen point's native label; for own points = point) and val_cost (the
    point's validation macs_rel, from ``params``) added; rows that are no operating point get kind "".
    Raises ValueError when a required column is missing or params is not JSON."""
    missing = [c for c in ("run_id", "split", "seed", "method", "params", "budget", "metric", "value", "exit")
               if c not in df.columns]
    if missing:
        raise ValueError(f"metrics rows lack column(s) {', '.join(missing)}")
    keys = ["run_id", "split", "seed", "method"]
    d = df.drop(columns=[c for c in TAG_COLUMNS if c in df.columns]).reset_index(drop=True)
    d = d.assign(budget_key=d["budget"].fillna(-1.0).astype(float),
                 pkey=[point_params(p, m) for p, m in zip(d["params"], d["metric"])], _row=np.arange(len(d)))
    tags = [_tag_group(g).assign(**dict(zip(keys, k))) for k, g in d.groupby(keys, sort=False)]
    t = pd.concat(tags, ignore_index=True) if tags else pd.DataFrame(columns=[*keys, "budget_key", "pkey",
                                                                               *TAG_COLUMNS])
    # budget rows are matched on the budget (their conformal and per-exit rows are the same point), the others
    # on the point's params
    by_budget = t[t["kind"] == "budget"].drop_duplicates([*keys, "budget_key"]).drop(columns="pkey")
    by_params = t[t["kind"] != "budget"].drop(columns="budget_key")
    is_budget = d["budget"].notna()
    out = pd.concat([d[is_budget].merge(by_budget, on=[*keys, "budget_key"], how="left"),
                     d[~is_budget].merge(by_params, on=[*keys, "pkey"], how="left")])
    out = out.sort_values("_row").set_index(df.index)
    for c in ("kind", "status", "point", "chosen"):
        out[c] = out[c].fillna("").astype(str)
    out["val_cost"] = out["val_cost"].astype(float)
    return out.drop(columns=["budget_key", "pkey", "_row"])


def combine_status(statuses) -> str:
    """One status over the seeds of a budget row: ``infeasible`` when infeasible on every seed, ``not reached``
    when reached on none (and not infeasible on all), else ``reached``; ``""`` for no values."""
    s = [x for x in statuses if x]
    if not s:
        return ""
    if all(x == INFEASIBLE for x in s):
        return INFEASIBLE
    return REACHED if REACHED in s else NOT_REACHED


def status_text(status: str, val_cost_max: float) -> str:
    """The table cell of a budget row that is no separate point: ``infeasible``, or ``not reached (max val cost
    0.41)`` with the largest validation macs_rel the method reaches within that budget (max over seeds)."""
    if status == INFEASIBLE:
        return "infeasible"
    if status == NOT_REACHED:
        return f"not reached (max val cost {val_cost_max:.2f})" if np.isfinite(val_cost_max) else "not reached"
    raise ValueError(f"status {status!r} has no text: only infeasible and not reached rows are marked")
