"""The printed summary: a markdown table generated from metrics rows (never typed by hand). Every accuracy
stands next to the realised test ``macs_rel``; with several seeds, cells read mean ± std. Each method's budget
rows come first, then its own operating points (the rule of which row is which: :mod:`bench.results.points`)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from bench.core.interface import METHODS
from bench.results.points import (INFEASIBLE, KINDS, NOT_REACHED, REACHED, combine_status, status_text,
                                   tag_points)

SUMMARY_METRICS = ("accuracy", "macs_rel", "ece")


def is_bound(method: str) -> bool:
    """Whether a registered method is an upper bound (reads labels, like the oracle) rather than a method. The
    caller imports ``methods`` (registration) first."""
    return method in METHODS and bool(METHODS.get(method).bound)


def method_label(method: str) -> str:
    """Table label: bounds are marked as such."""
    if method == "static":
        return "static backbone"
    return f"{method} (upper bound)" if is_bound(method) else method


def with_backbone(label: str, backbone: str, several: bool) -> str:
    """A table/figure label, naming the network (its backbone label) when a dataset's rows come from several."""
    return f"{label} @ {backbone}" if several else label


def _cell(values: pd.Series, digits: int) -> str:
    v = values.to_numpy(dtype=float)
    if len(v) == 0:
        return "—"
    if np.isnan(v).all():
        return "infeasible"
    v = v[np.isfinite(v)]  # infeasible seeds are counted in the seeds column
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.nanmean(v):.{digits}f} ± {np.nanstd(v, ddof=1):.{digits}f}"


def seeds_text(seeds: int, not_reached: int = 0, infeasible: int = 0) -> str:
    """The seeds cell: the number of seeds, and on how many of them a budget row is not reached or infeasible
    when that is some but not all of them (``3 (1 not reached)``)."""
    notes = [f"{k} {what}" for k, what in ((not_reached, "not reached"), (infeasible, "infeasible")) if 0 < k < seeds]
    return f"{seeds}" + (f" ({', '.join(notes)})" if notes else "")


def _seeds(g: pd.DataFrame) -> str:
    per_seed = g.drop_duplicates("seed")["status"]
    return seeds_text(len(per_seed), int((per_seed == NOT_REACHED).sum()), int((per_seed == INFEASIBLE).sum()))


def table_groups(d: pd.DataFrame):
    """(dataset, backbone, method, kind, budget, point, rows) of tagged metric rows in table order: datasets,
    networks and methods as they first appear, each method's budget rows by budget, then its own points by
    mean realised macs_rel (``d``: rows of one split with the columns of ``points.tag_points``)."""
    for (dataset, backbone, method), gm in d.groupby(["dataset", "backbone", "method"], sort=False):
        for budget, g in sorted(gm[gm["kind"] != "own"].groupby(gm["budget"].fillna(-1.0)), key=lambda kv: kv[0]):
            yield dataset, backbone, method, g["kind"].iloc[0], (budget if budget >= 0 else None), "", g
        own = gm[gm["kind"] == "own"]
        cost = own[own["metric"] == "macs_rel"].groupby("point")["value"].mean()
        for point in sorted(own["point"].unique(), key=lambda p: (cost.get(p, np.inf), p)):
            yield dataset, backbone, method, "own", None, point, own[own["point"] == point]


def summary_table(df: pd.DataFrame, split: str = "test") -> str:
    """Markdown table: one row per dataset x backbone x method x budget (plus each static backbone), then one
    per own operating point of the method (empty ``budget`` in metrics.csv, labelled by its native parameter,
    e.g. ``λ=0.1``), columns accuracy / realised macs_rel / ECE over the seeds. A budget row that only repeats
    the point of a smaller budget reads ``not reached (max val cost ...)`` (``points.tag_points``). When a run used
    several networks (``msdnet`` brings its own), labels name the network, ``macs_rel`` is relative to that
    network's static cost, and a column gives the absolute MACs per image (millions) that compare across
    networks."""
    t = tag_points(df[df["split"] == split])
    d = t[t["exit"].isna() & t["metric"].isin(SUMMARY_METRICS + ("macs",)) & t["kind"].isin(KINDS)]
    several = d.groupby("dataset")["backbone"].nunique().to_dict()
    absolute = any(v > 1 for v in several.values())
    extra = ("| MACs (M) " if absolute else "", "|---" if absolute else "")
    lines = [f"| dataset | method | budget / point | accuracy | macs_rel ({split}) {extra[0]}| ECE | seeds |",
             f"|---|---|---|---|---{extra[1]}|---|---|"]
    for dataset, backbone, method, kind, budget, point, g in table_groups(d):
        cells = {m: _cell(g[g["metric"] == m].sort_values("seed")["value"], 4 if m != "macs_rel" else 3)
                 for m in SUMMARY_METRICS}
        macs = _cell(g[g["metric"] == "macs"].sort_values("seed")["value"] / 1e6, 2)
        status = combine_status(g.drop_duplicates("seed")["status"]) if kind == "budget" else REACHED
        if status == NOT_REACHED:
            cells = {"accuracy": status_text(status, g["val_cost"].max()), "macs_rel": "—", "ece": "—"}
            macs = "—"
        label = point if kind == "own" else "—" if budget is None else f"{budget:g}"
        name = with_backbone(method_label(method), backbone, several[dataset] > 1)
        macs = f"| {macs} " if absolute else ""
        lines.append(f"| {dataset} | {name} | {label} | {cells['accuracy']} | {cells['macs_rel']} {macs}| "
                     f"{cells['ece']} | {_seeds(g)} |")
    return "\n".join(lines)


TIMING_METRICS = ("wall_rel", "throughput", "latency_ms", "latency_ms_p90")
# written by newer runs beside each timing: the timed images' own cost, the runner's host reads per block
TIMING_EXTRA = ("timed_macs_rel", "host_syncs_per_block")


def _timing_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["split"] == "test") & df["exit"].isna() & df["metric"].isin(TIMING_METRICS)]


def timing_setup(df: pd.DataFrame) -> dict | None:
    """Where the timing rows were measured, from their params: device, timing_batch, dtype (and, on CUDA,
    ``tf32``); what the runs do not record is left out (runs before dtype was recorded). None without timing
    rows; several values of a field over the rows are joined with " / "."""
    t = _timing_rows(df)
    if t.empty:
        return None
    params = [json.loads(p) for p in t["params"].unique()]
    out = {}
    for key in ("device", "timing_batch", "dtype", "tf32"):
        values = list(dict.fromkeys(str(p[key]) for p in params if key in p))
        if values:
            out[key] = " / ".join(values)
    return out


def timing_setup_text(setup: dict | None) -> str:
    """``NVIDIA H100 80GB HBM3, batch 256, float32 (TF32 matmuls)``: the device, batch and dtype of a timing."""
    if not setup:
        return ""
    parts = [setup.get("device", "device not recorded"), f"batch {setup.get('timing_batch', '?')}",
             setup.get("dtype", "dtype not recorded")]
    if setup.get("tf32") == "True":
        parts[-1] += " (TF32 matmuls)"
    return ", ".join(parts)


def timing_table(df: pd.DataFrame) -> str | None:
    """Markdown table of the real early-exit timings (``--timing``): the static backbone's row, then per method
    and budget the realised test macs_rel beside wall_rel (early-exit wall-clock / the static network's, same
    device, batches and images), throughput (images/s at the timing batch), batch-1 latency p50 and p90 (ms)
    and n (images behind the throughput and the latency values; ``6912 of 10000`` when not every test image
    fitted on the device), mean ± std over seeds; None when the run was not timed. Runs that record them add
    ``macs_rel (timed)`` (the cost of exactly the timed images, next to their wall_rel) and ``host syncs / block``
    (the runner's host reads per block); older runs' tables keep their columns. Runs timed before the static
    backbone had timing rows have no static row, and their n (then the timing batch whatever was timed) reads
    ``not recorded``."""
    t = _timing_rows(df)
    t = t[t["budget"].notna() | (t["method"] == "static")]
    if t.empty:
        return None
    setup = timing_setup(df) or {}
    test = df[(df["split"] == "test") & df["exit"].isna()]
    cost = test[(test["metric"] == "macs_rel") & test["budget"].notna()]
    extra = test[test["metric"].isin(TIMING_EXTRA) & (test["budget"].notna() | (test["method"] == "static"))]
    timed_cost, syncs = (m in set(extra["metric"]) for m in TIMING_EXTRA)
    head = ["method", "budget", "macs_rel (test)", *(["macs_rel (timed)"] if timed_cost else []), "wall_rel",
            "throughput (img/s)", "latency p50 (ms)", "latency p90 (ms)", *(["host syncs / block"] if syncs else []),
            "n (throughput / latency)"]
    lines = [f"Real early exit on {timing_setup_text(setup)} (wall_rel and throughput at batch "
             f"{setup.get('timing_batch', '?')} over the n images of the throughput column, latency at batch 1 "
             "over the n images of the latency column; mean ± std over seeds):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def value(g: pd.DataFrame, metric: str, digits: int) -> str:
        return _cell(g[g["metric"] == metric].sort_values("seed")["value"], digits)

    def cells(g: pd.DataFrame, e: pd.DataFrame) -> list[str]:
        out = [value(g, m, d)
               for m, d in (("wall_rel", 3), ("throughput", 0), ("latency_ms", 2), ("latency_ms_p90", 2))]
        out += [value(e, "host_syncs_per_block", 2)] if syncs else []
        params = [json.loads(p) for p in g["params"].unique()]
        if not all("dtype" in p for p in params):
            return out + ["not recorded"]  # rows written before dtype was: their n was the timing batch
        n = [g.loc[g["metric"] == m, "n"] for m in ("throughput", "latency_ms")]
        timed = [str(int(v.max())) if len(v) else "—" for v in n]
        split = [p["test_images"] for p in params if "test_images" in p]
        if split and len(n[0]) and int(n[0].max()) < max(split):  # not every test image was timed
            timed[0] += f" of {max(split)}"
        return out + [" / ".join(timed)]

    def group(frame: pd.DataFrame, method: str, budget) -> pd.DataFrame:
        at = frame["method"] == method
        return frame[at & (frame["budget"].isna() if budget is None else frame["budget"] == budget)]

    static = t[t["method"] == "static"]
    if not static.empty:
        c = cells(static, group(extra, "static", None))
        lines.append(f"| {method_label('static')} | — | 1.000 | {'1.000 | ' if timed_cost else ''}ref. | "
                     f"{' | '.join(c[1:])} |")
    for (method, budget), g in t[t["method"] != "static"].groupby(["method", "budget"], sort=False):
        c = cost[(cost["method"] == method) & (cost["budget"] == budget)].sort_values("seed")["value"]
        e = group(extra, method, budget)
        timed = f"{value(e, 'timed_macs_rel', 3)} | " if timed_cost else ""
        lines.append(f"| {method_label(method)} | {budget:g} | {_cell(c, 3)} | {timed}{' | '.join(cells(g, e))} |")
    return "\n".join(lines)


def exit_score_table(df: pd.DataFrame) -> str | None:
    """Markdown table of how well each method's exit score (JEI-DNN: its gates) ranks the correctness of head k
    (``exit_score_auroc``) next to head k's max softmax probability (``msp_auroc``), on test, over the method's
    own points and seeds (mean, and the range over its points); None when no method reports an exit score."""
    d = df[(df["split"] == "test") & df["budget"].isna() & df["metric"].isin(("exit_score_auroc", "msp_auroc"))]
    if d.empty:
        return None
    lines = ["Exit scores as uncertainty (test AUROC for \"head k is right\", every sample; mean over the method's "
             "own points and seeds, [min, max] over its points):", "",
             "| method | exit | its exit score (gate) | max softmax of the same head |", "|---|---|---|---|"]
    for (method, k), g in d.groupby(["method", "exit"], sort=True):
        cells = []
        for metric in ("exit_score_auroc", "msp_auroc"):
            per_point = g[g["metric"] == metric].groupby("params")["value"].mean()
            cells.append(f"{per_point.mean():.3f} [{per_point.min():.3f}, {per_point.max():.3f}]")
        lines.append(f"| {method_label(method)} | {int(k)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def monotonicity_table(df: pd.DataFrame, split: str = "test") -> str | None:
    """Markdown table of conditional monotonicity (Jazbec et al., NeurIPS 2023; ``monotonicity_violation`` rows):
    per method, the share of samples whose true-class probability falls by more than tau from an exit to any
    later exit, one column per tau, and the consecutive exit pair with the most falls at the smallest tau. Means
    over seeds per point (the method's own points if it has any, else its reached budget rows), then over its
    points, with [min, max] over the points where they differ (a score rule's points share one set of heads, so
    one value). None when the runs have no such rows (runs made before the metric existed)."""
    d = df[(df["split"] == split) & (df["metric"] == "monotonicity_violation")]
    if d.empty:
        return None
    t = tag_points(df[df["split"] == split])
    t = t[(t["metric"] == "monotonicity_violation") & t["kind"].isin(("budget", "own"))]
    t = t.assign(tau=[float(json.loads(p)["tau"]) for p in t["params"]],
                 where=[p if k == "own" else f"b{b}" for p, k, b in zip(t["point"], t["kind"], t["budget"])])
    taus = sorted(t["tau"].unique())
    several = t.groupby("dataset")["backbone"].nunique().to_dict()
    head = ["dataset", "method", *(f"τ = {tau:g}" for tau in taus), f"most falls k→k+1 (τ = {taus[0]:g})"]
    lines = [f"Conditional monotonicity ({split}): the share of samples whose true-class probability falls by more "
             "than τ from an exit to any later exit (Jazbec et al., NeurIPS 2023; lower is better), mean over seeds "
             "and over the method's points, [min, max] over its points where they differ; and the consecutive exit "
             "pair with the largest share of such falls:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dataset, backbone, method), g in t.groupby(["dataset", "backbone", "method"], sort=False):
        own = g[g["kind"] == "own"]
        g = own if len(own) else g[g["status"] == REACHED]
        if g.empty:
            continue
        cells = []
        for tau in taus:
            per_point = g[(g["tau"] == tau) & g["exit"].isna()].groupby("where")["value"].mean()
            lo, hi = per_point.min(), per_point.max()
            cells.append("—" if per_point.empty else f"{per_point.mean():.3f}" if np.isclose(lo, hi, atol=5e-4)
                         else f"{per_point.mean():.3f} [{lo:.3f}, {hi:.3f}]")
        pairs = g[(g["tau"] == taus[0]) & g["exit"].notna()].groupby("exit")["value"].mean()
        cells.append("—" if pairs.empty else f"{int(pairs.idxmax())}→{int(pairs.idxmax()) + 1}: {pairs.max():.3f}")
        name = with_backbone(method_label(method), backbone, several[dataset] > 1)
        lines.append(f"| {dataset} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
