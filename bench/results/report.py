"""``python -m bench report``: aggregate one or more run directories over seeds, compare methods pairwise on
the same test samples, and write ``report.md`` / ``report.tex`` / ``aggregate.csv`` plus the figures of
:mod:`bench.results.plots`; or, with ``--page PATH`` (:func:`bench.results.page.build_page`), a results page with one
section per run (its command, machine, summary table and figures), every number read from the run folders. Runs
with the same settings and other seeds (one sweep split over sessions or machines: :func:`sweep_key`) are
aggregated together, in the report and in one section of the page.

Aggregation: per dataset x backbone x method x budget x metric (conformal rows also keyed by ``score``,
``scope`` and ``alpha`` from ``params``), the mean, the standard deviation (ddof 1) and a 95 % confidence
interval from the t distribution (``t(0.975, n-1) * std / sqrt(n)``) over the seeds. Infeasible points (NaN
values) are left out of the mean; a point with no finite value reads "infeasible".

Own operating points (rows with an empty budget: JEI-DNN's λ points, patience's t, the oracle's unconstrained
point) are aggregated like budget rows, keyed by their native label (``point``, e.g. ``λ=0.1``); a budget row
that repeats the point of a smaller budget is ``not reached`` (the rule: :mod:`bench.results.points`).

Comparisons at equal realised cost: :mod:`bench.results.matched_cost`.

The results page, the report's other consumer, lives in ``page.py``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

import methods  # noqa: F401  (registers the methods, so bounds are recognised)
from bench.base.errors import UserError
from bench.base.hashing import atomic_write_text
from bench.results import plots
from bench.results.files import METRIC_COLUMNS
from bench.results.risk_report import has_guarantee, plot_risk_guarantee, risk_frame, risk_table
from bench.results.matched_cost import COMPARISON_COLUMNS, N_BOOT, compare
from bench.results.points import KINDS, NOT_REACHED, REACHED, combine_status, status_text, tag_points
from bench.results.summary import (method_label, monotonicity_table, seeds_text, timing_setup, timing_setup_text,
                                   timing_table, with_backbone)

OVERALL_METRICS = ("accuracy", "macs_rel", "macs", "ece", "nll", "brier", "auroc_misclassification")
CONFORMAL_METRICS = ("coverage", "set_size")
TIMING_METRICS = ("wall_rel",)
CONFORMAL_KEYS = ("score", "scope", "alpha")
# split_sha256 is recorded by newer runs only; without it the split check is skipped for that run
REQUIRED_COLUMNS = [c for c in METRIC_COLUMNS if c != "split_sha256"]
GROUP_KEYS = ["dataset", "backbone", "label", "method", "budget", "point", "metric", *CONFORMAL_KEYS]


# ----------------------------------------------------------------------------------------------- loading

def _read_run(path: Path) -> pd.DataFrame:
    if not path.is_dir():
        raise UserError(f"{path} is not a directory: give the run directories written by `python -m bench run` "
                        "(each holds metrics.csv).")
    f = path / "metrics.csv"
    if not f.is_file():
        raise UserError(f"{path} has no metrics.csv: is it a run directory written by `python -m bench run`?")
    try:
        df = pd.read_csv(f, dtype={"exit": "Int64"})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise UserError(f"{f} is malformed and could not be read as a CSV table ({type(e).__name__}: {e}).")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{f} is malformed: missing column(s) {', '.join(missing)}; expected "
                        f"{', '.join(METRIC_COLUMNS)}. Rerun `python -m bench run` to regenerate it.")
    if "split_sha256" not in df.columns:
        df["split_sha256"] = np.nan
    if not pd.api.types.is_numeric_dtype(df["value"]) or not pd.api.types.is_numeric_dtype(df["budget"]):
        raise UserError(f"{f} is malformed: the value and budget columns must be numbers.")
    df["run_dir"] = str(path)
    return df


def _check_comparable(df: pd.DataFrame) -> None:
    d = df.dropna(subset=["split_sha256"])
    shas = d.groupby(["dataset", "seed"])["split_sha256"].nunique()
    bad = shas[shas > 1]
    if len(bad):
        dataset, seed = bad.index[0]
        runs = sorted(d[(d["dataset"] == dataset) & (d["seed"] == seed)]["run_dir"].unique())
        raise UserError(f"the runs cannot be compared: {dataset} seed {seed} was evaluated on different data splits "
                        f"(split_sha256 differs between {', '.join(runs)}). Compare only runs made with the same "
                        "splits (same dataset version, seeds and split settings), or report them separately.")


# run.json config fields that say where and how a sweep's jobs ran, not what they computed: runs equal in every
# other field are parts of one sweep (its seeds split over sessions or machines) and are aggregated together
PLACEMENT_FIELDS = ("argv", "out", "seeds", "cache_dir", "executor", "workers", "scheduler", "retries", "threads")


def _read_run_json(run_dir: Path) -> dict:
    f = run_dir / "run.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is malformed and could not be read as JSON ({e}).")


def sweep_key(run_dir: Path) -> str | None:
    """What a run computed, as one string: its run.json config without the placement fields (None without
    run.json). Two runs with the same key and no seed in common are parts of one sweep."""
    cfg = _read_run_json(Path(run_dir)).get("config")
    if not isinstance(cfg, dict):
        return None
    return json.dumps({k: v for k, v in cfg.items() if k not in PLACEMENT_FIELDS}, sort_keys=True)


def _one_sweep(g: pd.DataFrame) -> bool:
    """Whether rows of several runs (one dataset, backbone and method) are parts of one sweep: the same sweep
    key and every seed from one run only."""
    keys = g.drop_duplicates("run_id")["_sweep"]
    return bool(keys.notna().all() and keys.nunique() == 1 and (g.groupby("seed")["run_id"].nunique() == 1).all())


def _label(df: pd.DataFrame) -> pd.DataFrame:
    """``label``: the display name. Bounds are marked (``method_label``); a method present in several runs of the
    same dataset (e.g. two JEI-DNN variants) gets its run id appended, unless those runs are parts of one sweep
    (:func:`sweep_key`: the same settings, other seeds), whose seeds are then aggregated together; where a
    dataset's rows come from several networks (``msdnet`` brings its own), labels name the network. Each static
    backbone is kept once."""
    static = df["method"] == "static"
    first = df[static].groupby(["dataset", "backbone", "seed"])["run_id"].first().rename("_first")
    df = df.merge(first, left_on=["dataset", "backbone", "seed"], right_index=True, how="left")
    df = df[~static | (df["run_id"] == df["_first"])].drop(columns="_first").reset_index(drop=True)
    dup = {k for k, g in df[df["method"] != "static"].groupby(["dataset", "backbone", "method"])
           if g["run_id"].nunique() > 1 and not _one_sweep(g)}
    several = df.groupby("dataset")["backbone"].nunique().to_dict()
    df["label"] = [with_backbone(method_label(m), b, several[ds] > 1) + (f" [{r}]" if (ds, b, m) in dup else "")
                   for ds, m, b, r in zip(df["dataset"], df["method"], df["backbone"], df["run_id"])]
    return df


def load_runs(run_dirs: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenated metrics rows of the runs, with ``run_dir`` and ``label`` columns. Raises UserError for a
    missing/malformed run or runs on different splits."""
    if not run_dirs:
        raise UserError("give at least one run directory.")
    df = pd.concat([_read_run(Path(p)).assign(_sweep=sweep_key(Path(p))) for p in run_dirs], ignore_index=True)
    _check_comparable(df)
    return _label(df).drop(columns="_sweep")


DECISION_KEYS = ["dataset", "split", "seed", "method", "label", "budget", "params", "sample_id", "pred", "target"]


def load_decisions(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Decision rows (one per sample and point) of the runs in ``df`` on ``split``, budget rows and own points
    (empty budget), with ``dataset`` and ``label`` added. ``params`` is the point's params when the file records
    them (it tells a method's own points apart), else empty. Runs without decisions.csv.gz contribute nothing."""
    frames = []
    wanted = {"split", "seed", "method", "budget", "params", "sample_id", "pred", "target"}
    for run_dir, g in df.groupby("run_dir", sort=False):
        f = Path(run_dir) / "decisions.csv.gz"
        if not f.is_file():
            continue
        try:
            d = pd.read_csv(f, usecols=lambda c: c in wanted, dtype={"params": object})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as e:
            raise UserError(f"{f} is malformed and could not be read ({type(e).__name__}: {e}).")
        missing = sorted(wanted - {"params"} - set(d.columns))
        if missing:
            raise UserError(f"{f} is malformed: missing column(s) {', '.join(missing)}.")
        d = d[d["split"] == split]
        labels = g.drop_duplicates("method").set_index("method")["label"]
        d = d[d["method"].isin(labels.index)].copy()
        d["label"] = d["method"].map(labels)
        d["dataset"] = g["dataset"].iloc[0]
        if "params" not in d.columns:
            d["params"] = np.nan
        frames.append(d[DECISION_KEYS])
    if not frames:
        return pd.DataFrame(columns=DECISION_KEYS)
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------- aggregation

def _conformal_keys(params: str) -> tuple[str, str, float]:
    p = json.loads(params) if isinstance(params, str) and params else {}
    return str(p.get("score", "")), str(p.get("scope", "")), float(p.get("alpha", np.nan))


def _seed_statistics(d: pd.DataFrame) -> pd.DataFrame:
    """``aggregate``'s columns for the tagged rows ``d``, one row per group of ``GROUP_KEYS`` in the order the
    groups first appear: over the finite values, n, mean, std (ddof 1) and the half-width of the 95 % t interval
    (NaN below 2 values; vectorised: one groupby, not a loop over thousands of groups), and per group its kind (the first row's), its status over the seeds
    (:func:`combine_status` of each seed's first row; ``reached`` for rows that are not budget rows), the seeds
    not reached and the largest validation cost."""
    from scipy import stats

    v = d["value"].astype(float)
    d = d.assign(_v=v.where(np.isfinite(v)))
    first = ~d.duplicated([*GROUP_KEYS, "seed"])  # each seed's first row stands for the seed
    d["_status"] = d["status"].where(first, None)
    d["_not_reached"] = first & (d["status"] == NOT_REACHED)
    d["_val_cost"] = d["val_cost"].where(first)
    g = d.groupby(GROUP_KEYS, dropna=False, sort=False).agg(
        kind=("kind", "first"), statuses=("_status", list), not_reached=("_not_reached", "sum"),
        val_cost_max=("_val_cost", "max"), seeds=("seed", "nunique"), n=("_v", "count"), mean=("_v", "mean"),
        std=("_v", "std")).reset_index()
    budget_row = g["kind"] == "budget"
    g["status"] = [combine_status(s) if b else REACHED for s, b in zip(g["statuses"], budget_row)]
    g["not_reached"] = np.where(budget_row, g["not_reached"], 0).astype(int)
    n = g["n"].to_numpy()
    g["std"] = np.where(n >= 2, g["std"], np.nan)
    t = stats.t.ppf(0.975, np.maximum(n - 1, 1))
    g["ci_half"] = np.where(n >= 2, t * g["std"] / np.sqrt(np.maximum(n, 1)), np.nan)
    g["ci_low"], g["ci_high"] = g["mean"] - g["ci_half"], g["mean"] + g["ci_half"]
    return g[AGG_COLUMNS]


AGG_COLUMNS = [*GROUP_KEYS, "kind", "status", "not_reached", "val_cost_max", "seeds", "n", "mean", "std", "ci_half",
               "ci_low", "ci_high"]


def aggregate(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per dataset x backbone x method x budget-or-point x metric (x score/scope/alpha for conformal
    rows): n (seeds with a finite value), mean, std, ci_half, ci_low, ci_high over the seeds. Budget rows, the
    static backbone and each method's own points (``point``: the native label, e.g. ``λ=0.1``; empty for budget
    rows), with ``kind`` (static / budget / own), ``status`` (reached / not reached / infeasible, over the seeds:
    :func:`bench.results.points.combine_status`), ``not_reached`` (seeds on which the budget row repeats a
    smaller budget's point) and ``val_cost_max`` (the largest validation macs_rel of the chosen points).
    Ordered per method: budget rows by budget, then own points by mean test macs_rel."""
    metrics = OVERALL_METRICS + CONFORMAL_METRICS + TIMING_METRICS
    t = tag_points(df[df["split"] == split])
    d = t[t["exit"].isna() & t["metric"].isin(metrics) & t["kind"].isin(KINDS)].copy()
    conf = d["metric"].isin(CONFORMAL_METRICS)
    keys = [_conformal_keys(p) if c else ("", "", np.nan) for p, c in zip(d["params"], conf)]
    d["score"], d["scope"], d["alpha"] = ([k[i] for k in keys] for i in range(3))
    order = {lab: i for i, lab in enumerate(dict.fromkeys(d["label"]))}
    out = _seed_statistics(d)
    where = ["dataset", "backbone", "label", "point"]
    cost = out[(out["metric"] == "macs_rel") & (out["kind"] == "own")].set_index(where)["mean"].to_dict()
    out["_static"] = out["method"] != "static"
    out["_order"] = out["label"].map(order)
    out["_own"] = out["kind"] == "own"
    out["_cost"] = [cost.get(k, np.inf) if own else 0.0 for k, own in zip(zip(*(out[c] for c in where)), out["_own"])]
    out = out.sort_values(["dataset", "backbone", "_static", "_order", "_own", "budget", "_cost", "point", "metric",
                           "score", "scope", "alpha"], kind="stable", na_position="first")
    return out.drop(columns=["_static", "_order", "_own", "_cost"]).reset_index(drop=True)


def budgets_of(agg: pd.DataFrame, feasible: bool = False) -> list[float]:
    """The budgets of the runs (with ``feasible``: only those where some method has a finite accuracy)."""
    a = agg[(agg["metric"] == "accuracy") & np.isfinite(agg["mean"])] if feasible else agg
    return sorted(a["budget"].dropna().unique().tolist())


def choose_budget(agg: pd.DataFrame, budget: float | None = None) -> float | None:
    """The budget of the exit-distribution figure: ``budget`` if the runs have it, else the middle feasible one
    (the lower of the two middle ones for an even count)."""
    budgets = budgets_of(agg)
    if budget is None:
        feasible = budgets_of(agg, feasible=True)
        return feasible[(len(feasible) - 1) // 2] if feasible else None
    if not any(np.isclose(budget, b) for b in budgets):
        raise UserError(f"--budget {budget:g} is not a budget of these runs; they have "
                        f"{', '.join(f'{b:g}' for b in budgets) or 'none'}.")
    return next(b for b in budgets if np.isclose(budget, b))


def exit_distribution(df: pd.DataFrame, budget: float, split: str = "test") -> pd.DataFrame:
    """Mean (over seeds) share of samples leaving at each exit, per dataset x label, at ``budget``."""
    d = df[(df["split"] == split) & (df["metric"] == "exit_share") & np.isclose(df["budget"], budget)]
    if d.empty:
        return pd.DataFrame(columns=["dataset", "label", "method", "exit", "share", "std"])
    g = d.groupby(["dataset", "label", "method", "exit"], sort=False)["value"]
    out = pd.concat([g.mean().rename("share"), g.std(ddof=1).rename("std")], axis=1).reset_index()
    out["exit"] = out["exit"].astype(int)
    return out


# ------------------------------------------------------------------------------------------------ tables

def _fmt(mean: float, std: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "infeasible"
    return f"{mean:.{digits}f}" if not np.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


MAIN_COLUMNS = [("accuracy", "accuracy", 4), ("macs_rel", "macs_rel", 3), ("ece", "ECE", 4), ("nll", "NLL", 4),
                ("brier", "Brier", 4), ("auroc_misclassification", "AUROC (misclass.)", 4)]


def _delta(comparisons: pd.DataFrame, dataset: str, label: str, budget: float, point: str) -> str | None:
    """The Δacc cell of a point: the matched-cost difference (``*`` when significant), ``n/a`` when it could
    not be matched, None when the point has no comparison row."""
    c = comparisons[(comparisons["dataset"] == dataset) & (comparisons["label"] == label)]
    c = c[np.isclose(c["budget"], budget)] if np.isfinite(budget) else c[c["budget"].isna() & (c["point"] == point)]
    if not len(c):
        return None
    x = c.iloc[0]
    return f"{x['diff']:+.4f}{'*' if x['significant'] else ''}" if np.isfinite(x["diff"]) else "n/a"


def _budget_cell(budget: float, point: str, kind: str) -> str:
    return point if kind == "own" else ("—" if not np.isfinite(budget) else f"{budget:g}")


def _seeds_cell(g: pd.DataFrame) -> str:
    """Seeds of a table row (one aggregated group per metric): how many, and how many not reached / infeasible
    (seeds without a finite value)."""
    seeds = int(g["seeds"].max())
    infeasible = seeds - int(g["n"].max()) if g["kind"].iloc[0] == "budget" else 0
    return seeds_text(seeds, int(g["not_reached"].max()), infeasible)


def main_rows(agg: pd.DataFrame, comparisons: pd.DataFrame | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the main table (shared by markdown and LaTeX): per method its budget rows, then its
    own points (labelled by their native parameter); a budget row that repeats a smaller budget's point reads
    ``not reached (max val cost ...)``."""
    comparisons = comparisons if comparisons is not None else pd.DataFrame(columns=COMPARISON_COLUMNS)
    refs = comparisons.groupby("dataset")["reference"].first().to_dict() if len(comparisons) else {}
    a = agg[agg["score"].fillna("") == ""]
    header = ["dataset", "method", "budget / point", "accuracy", "acc. 95% CI", "Δacc vs ref. (same cost)",
              *[h for _, h, _ in MAIN_COLUMNS[1:]], "seeds"]
    rows = []
    for (dataset, _bb, label, budget, point), g in a.groupby(["dataset", "backbone", "label", "budget", "point"],
                                                             dropna=False, sort=False):
        kind, status = g["kind"].iloc[0], g["status"].iloc[0]
        where = [dataset, label, _budget_cell(budget, point, kind)]
        if status == NOT_REACHED:
            rows.append([*where, status_text(status, g["val_cost_max"].max()), "—", "—",
                         *["—"] * (len(MAIN_COLUMNS) - 1), _seeds_cell(g)])
            continue
        m = g.set_index("metric")
        cell = {k: (_fmt(m.at[k, "mean"], m.at[k, "std"], dg) if k in m.index else "—") for k, _, dg in MAIN_COLUMNS}
        acc = m.loc["accuracy"] if "accuracy" in m.index else None
        ci = (f"[{acc['ci_low']:.4f}, {acc['ci_high']:.4f}]" if acc is not None and np.isfinite(acc["ci_half"])
              else "—")
        delta = _delta(comparisons, dataset, label, budget, point)
        if delta is None:
            delta = "ref." if refs.get(dataset) == label and kind == "budget" else "—"
        rows.append([*where, cell["accuracy"], ci, delta, *[cell[k] for k, _, _ in MAIN_COLUMNS[1:]],
                     _seeds_cell(g)])
    return header, rows


def conformal_rows(agg: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the conformal table: budget rows only (own points would multiply it by the number of
    points: their coverage is in aggregate.csv); not-reached budgets marked."""
    c = agg[agg["metric"].isin(CONFORMAL_METRICS) & (agg["kind"] != "own")]
    header = ["dataset", "method", "budget", "score", "scope", "α", "coverage", "set size", "seeds"]
    rows = []
    for (dataset, _bb, label, budget, score, scope, alpha), g in c.groupby(
            ["dataset", "backbone", "label", "budget", "score", "scope", "alpha"], dropna=False, sort=False):
        m = g.set_index("metric")
        if g["status"].iloc[0] == NOT_REACHED:
            cov, size = status_text(NOT_REACHED, g["val_cost_max"].max()), "—"
        else:
            cov = _fmt(m.at["coverage", "mean"], m.at["coverage", "std"], 4) if "coverage" in m.index else "—"
            size = _fmt(m.at["set_size", "mean"], m.at["set_size", "std"], 3) if "set_size" in m.index else "—"
        rows.append([dataset, label, "—" if not np.isfinite(budget) else f"{budget:g}", score, scope, f"{alpha:g}",
                     cov, size, _seeds_cell(g)])
    return header, rows


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def _tex_escape(s: str) -> str:
    s = s.replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        s = s.replace(ch, "\\" + ch)
    return (s.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("α", r"$\alpha$").replace("λ", r"$\lambda$")
            .replace("—", "--").replace("~", r"\textasciitilde{}"))


def _tex(header: list[str], rows: list[list[str]]) -> str:
    out = [r"\begin{tabular}{" + "l" * 3 + "r" * (len(header) - 3) + "}", r"\hline",
           " & ".join(_tex_escape(h) for h in header) + r" \\", r"\hline"]
    out += [" & ".join(_tex_escape(c) for c in r) + r" \\" for r in rows]
    return "\n".join([*out, r"\hline", r"\end{tabular}"])


def markdown_report(agg: pd.DataFrame, comparisons: pd.DataFrame, split: str = "test") -> str:
    refs = ", ".join(f"{d}: {r}" for d, r in comparisons.groupby("dataset")["reference"].first().items()) or "none"
    parts = [f"## Results ({split}): mean ± std over seeds", "",
             "Each method's budget rows, then its own operating points (labelled by their native parameter). A "
             "budget that only repeats the point of a smaller budget reads `not reached`, with the largest validation "
             "cost the method reaches within it. 95% CI: t interval over seeds. Δacc: accuracy minus the reference "
             f"method's at the same realised {split} cost (reference {refs}; per seed, a mixture of its two budget "
             "points whose costs bracket the point's, on the same samples, pooled over seeds); `*` = the 95% "
             f"paired-bootstrap interval ({N_BOOT} resamples) excludes 0; `n/a` = no comparison at that cost (the "
             "reason is in comparisons.csv).", "", _md(*main_rows(agg, comparisons))]
    if agg["metric"].isin(CONFORMAL_METRICS).any():
        parts += ["", f"## Conformal prediction ({split}, budget rows)", "", _md(*conformal_rows(agg))]
    return "\n".join(parts) + "\n"


def matched_cost_table(comparisons: pd.DataFrame) -> str | None:
    """Markdown table of the comparisons made at matched realised cost (``compare``), those with a value only;
    None when there are none (e.g. a run folder without decisions.csv.gz)."""
    c = comparisons[np.isfinite(pd.to_numeric(comparisons["diff"], errors="coerce"))] if len(comparisons) else comparisons
    if c.empty:
        return None
    lines = [f"Accuracy minus the reference's ({', '.join(dict.fromkeys(c['reference']))}) at the same realised test "
             "cost (a mixture of its two bracketing budget points, per seed), pooled over seeds, with the 95% "
             f"paired-bootstrap interval ({N_BOOT} resamples); `*`: the interval excludes 0:", "",
             "| method | budget / point | macs_rel | accuracy | reference's accuracy | Δacc [95% CI] |",
             "|---|---|---|---|---|---|"]
    for _, r in c.iterrows():
        where = f"{r['budget']:g}" if np.isfinite(r["budget"]) else r["point"]
        lines.append(f"| {r['label']} | {where} | {r['macs_rel']:.3f} | {r['accuracy']:.4f} | {r['ref_accuracy']:.4f} "
                     f"| {r['diff']:+.4f}{'*' if r['significant'] else ''} [{r['lo']:+.4f}, {r['hi']:+.4f}] |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ driver

@dataclass
class Report:
    markdown: str
    out: Path
    files: list[Path] = field(default_factory=list)


def _use_agg() -> None:
    import matplotlib

    matplotlib.use("Agg")


def run_figures(df: pd.DataFrame, agg: pd.DataFrame, dist: pd.DataFrame | None, budget: float | None) -> dict:
    """name -> Figure for every figure of the runs: ``plots.figures`` and, for --risk runs, the guarantee's."""
    figs = plots.figures(agg, dist, budget, timing_setup_text(timing_setup(df)))
    guarantee = plot_risk_guarantee(df)
    return {**figs, **({"risk_guarantee": guarantee} if guarantee else {})}


def run_figure_names(df: pd.DataFrame, agg: pd.DataFrame, dist: pd.DataFrame | None,
                     budget: float | None) -> list[str]:
    """The names :func:`run_figures` returns, without drawing."""
    guarantee = has_guarantee(risk_frame(df))
    return [*plots.figure_names(agg, dist, budget), *(["risk_guarantee"] if guarantee else [])]


def build_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, split: str = "test",
                 budget: float | None = None) -> Report:
    """Everything ``python -m bench report`` does. Inputs are validated before anything is written."""
    df = load_runs(run_dirs)
    _check_split(df, split)
    agg = aggregate(df, split)
    chosen = choose_budget(agg, budget)
    comparisons = compare(df, load_decisions(df, split), split)
    md = markdown_report(agg, comparisons, split)
    timing = timing_table(df)
    if timing:  # the timings are measured on the test split whatever --split says
        md += f"\n## Latency and throughput (test)\n\n{timing}\n"
    monotonicity = monotonicity_table(df, split)
    if monotonicity:
        md += f"\n## Conditional monotonicity ({split})\n\n{monotonicity}\n"
    risk = risk_table(df)
    if risk:  # --risk runs: risk-controlled thresholds (bench.results.risk_report)
        md += f"\n## Risk-controlled thresholds (test)\n\n{risk}\n"
    tex = _tex(*main_rows(agg, comparisons)) + "\n"
    _use_agg()
    out_dir = Path(out) if out is not None else Path(run_dirs[0]) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in (("report.md", md), ("report.tex", tex), ("aggregate.csv", agg.to_csv(index=False)),
                       ("comparisons.csv", comparisons.to_csv(index=False))):
        atomic_write_text(out_dir / name, text)
        files.append(out_dir / name)
    dist = exit_distribution(df, chosen, split) if chosen is not None else None
    saved = plots.save_all(run_figures(df, agg, dist, chosen), out_dir)
    files += [path for paths in saved.values() for path in paths]
    return Report(markdown=md, out=out_dir, files=files)


def _check_split(df: pd.DataFrame, split: str) -> None:
    if not (df["split"] == split).any():
        raise UserError(f"the runs have no rows for split {split!r}; they have "
                        f"{', '.join(sorted(df['split'].unique()))}.")
