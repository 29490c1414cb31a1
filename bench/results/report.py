"""``python -m bench report``: aggregate one or more run directories over seeds, compare methods pairwise on
the same test samples, and write ``report.md`` / ``report.tex`` / ``aggregate.csv`` plus the figures of
:mod:`bench.results.plots`; or, with ``--page PATH`` (:func:`build_page`), a markdown results page with one
section per run (its command, machine, summary table and figures), every number read from the run folders.

Aggregation: per dataset x backbone x method x budget x metric (conformal rows also keyed by ``score``,
``scope`` and ``alpha`` from ``params``), the mean, the standard deviation (ddof 1) and a 95 % confidence
interval from the t distribution (``t(0.975, n-1) * std / sqrt(n)``) over the seeds. Infeasible points (NaN
values) are left out of the mean; a point with no finite value reads "infeasible".

Comparisons: at each budget, every method against a reference (``threshold`` when present, else the first
method), as a paired bootstrap of the accuracy difference over the same (seed, sample_id) pairs pooled over
seeds (2,000 resamples, seeded). A difference whose 95 % percentile interval excludes 0 is marked ``*``.
"""
from __future__ import annotations

import json
import os
import shlex
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
from bench.results.summary import method_label, summary_table, timing_table, with_backbone

OVERALL_METRICS = ("accuracy", "macs_rel", "macs", "ece", "nll", "brier", "auroc_misclassification")
CONFORMAL_METRICS = ("coverage", "set_size")
TIMING_METRICS = ("wall_rel",)
CONFORMAL_KEYS = ("score", "scope", "alpha")
# split_sha256 is recorded by newer runs only; without it the split check is skipped for that run
REQUIRED_COLUMNS = [c for c in METRIC_COLUMNS if c != "split_sha256"]
GROUP_KEYS = ["dataset", "backbone", "label", "method", "budget", "metric", *CONFORMAL_KEYS]
N_BOOT = 2000
BOOT_SEED = 0


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


def _label(df: pd.DataFrame) -> pd.DataFrame:
    """``label``: the display name. Bounds are marked (``method_label``); a method present in several runs of the
    same dataset (e.g. two JEI-DNN variants) gets its run id appended; where a dataset's rows come from several
    networks (``msdnet`` brings its own), labels name the network. Each static backbone is kept once."""
    static = df["method"] == "static"
    first = df[static].groupby(["dataset", "backbone", "seed"])["run_id"].first().rename("_first")
    df = df.merge(first, left_on=["dataset", "backbone", "seed"], right_index=True, how="left")
    df = df[~static | (df["run_id"] == df["_first"])].drop(columns="_first").reset_index(drop=True)
    runs_per = df[df["method"] != "static"].groupby(["dataset", "backbone", "method"])["run_id"].nunique()
    dup = {k for k, v in runs_per.items() if v > 1}
    several = df.groupby("dataset")["backbone"].nunique().to_dict()
    df["label"] = [with_backbone(method_label(m), b, several[ds] > 1) + (f" [{r}]" if (ds, b, m) in dup else "")
                   for ds, m, b, r in zip(df["dataset"], df["method"], df["backbone"], df["run_id"])]
    return df


def load_runs(run_dirs: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenated metrics rows of the runs, with ``run_dir`` and ``label`` columns. Raises UserError for a
    missing/malformed run or runs on different splits."""
    if not run_dirs:
        raise UserError("give at least one run directory.")
    df = pd.concat([_read_run(Path(p)) for p in run_dirs], ignore_index=True)
    _check_comparable(df)
    return _label(df)


def load_decisions(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Decision rows of the runs in ``df`` at budgets (native points left out), with ``dataset`` and ``label``.
    Runs without decisions.csv.gz contribute nothing."""
    frames = []
    for run_dir, g in df.groupby("run_dir", sort=False):
        f = Path(run_dir) / "decisions.csv.gz"
        if not f.is_file():
            continue
        d = pd.read_csv(f, usecols=["split", "seed", "method", "budget", "sample_id", "pred", "target"])
        d = d[(d["split"] == split) & d["budget"].notna()]
        labels = g.drop_duplicates("method").set_index("method")["label"]
        d = d[d["method"].isin(labels.index)].copy()
        d["label"] = d["method"].map(labels)
        d["dataset"] = g["dataset"].iloc[0]
        frames.append(d)
    if not frames:
        return pd.DataFrame(columns=["dataset", "split", "seed", "method", "label", "budget", "sample_id", "pred",
                                     "target"])
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------- aggregation

def mean_std_ci(values) -> tuple[int, float, float, float]:
    """(n, mean, std with ddof 1, half-width of the 95 % t interval) over the finite values."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return 0, float("nan"), float("nan"), float("nan")
    if n == 1:
        return 1, float(v[0]), float("nan"), float("nan")
    std = float(np.std(v, ddof=1))
    return n, float(np.mean(v)), std, float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n))


def _conformal_keys(params: str) -> tuple[str, str, float]:
    p = json.loads(params) if isinstance(params, str) and params else {}
    return str(p.get("score", "")), str(p.get("scope", "")), float(p.get("alpha", np.nan))


def aggregate(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """One row per dataset x backbone x method x budget x metric (x score/scope/alpha for conformal rows):
    n (seeds with a finite value), mean, std, ci_half, ci_low, ci_high. Budget rows and the static backbone
    (budget NaN) only; native operating points are left out."""
    metrics = OVERALL_METRICS + CONFORMAL_METRICS + TIMING_METRICS
    d = df[(df["split"] == split) & df["exit"].isna() & df["metric"].isin(metrics)]
    d = d[d["budget"].notna() | (d["method"] == "static")].copy()
    conf = d["metric"].isin(CONFORMAL_METRICS)
    keys = [_conformal_keys(p) if c else ("", "", np.nan) for p, c in zip(d["params"], conf)]
    d["score"], d["scope"], d["alpha"] = ([k[i] for k in keys] for i in range(3))
    order = {lab: i for i, lab in enumerate(dict.fromkeys(d["label"]))}
    rows = []
    for key, g in d.groupby(GROUP_KEYS, dropna=False, sort=False):
        n, mean, std, half = mean_std_ci(g["value"])
        rows.append({**dict(zip(GROUP_KEYS, key)), "seeds": g["seed"].nunique(), "n": n, "mean": mean, "std": std,
                     "ci_half": half, "ci_low": mean - half, "ci_high": mean + half})
    out = pd.DataFrame(rows, columns=[*GROUP_KEYS, "seeds", "n", "mean", "std", "ci_half", "ci_low", "ci_high"])
    out["_static"] = out["method"] != "static"
    out["_order"] = out["label"].map(order)
    out = out.sort_values(["dataset", "backbone", "_static", "_order", "budget", "metric", "score", "scope",
                           "alpha"], kind="stable", na_position="first")
    return out.drop(columns=["_static", "_order"]).reset_index(drop=True)


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


# ---------------------------------------------------------------------------------------- paired bootstrap

def paired_bootstrap(correct_a, correct_b, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                     level: float = 0.95) -> dict:
    """Bootstrap of mean(correct_a) - mean(correct_b) over paired samples. The per-sample difference takes
    values in {+1, 0, -1}, so resampling n pairs with replacement is exactly a multinomial draw of the three
    counts: no n_boot x n index matrix. Returns diff, lo, hi, significant (interval excludes 0), n."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("paired samples must have the same length")
    n = len(a)
    if n == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "significant": False, "n": 0}
    d = a.astype(np.int8) - b.astype(np.int8)
    p = np.array([(d == 1).sum(), (d == 0).sum(), (d == -1).sum()], dtype=float) / n
    counts = np.random.default_rng(seed).multinomial(n, p, size=n_boot)
    boot = (counts[:, 0] - counts[:, 2]) / n
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "significant": bool(lo > 0 or hi < 0),
            "n": n}


def reference_label(labels: Sequence[str], methods: Sequence[str] | None = None) -> str | None:
    """The first label of method ``threshold`` when there is one, else the first label."""
    pairs = list(dict.fromkeys(zip(labels, methods if methods is not None else labels)))
    ref = [lab for lab, m in pairs if m == "threshold"]
    return ref[0] if ref else (pairs[0][0] if pairs else None)


def compare(decisions: pd.DataFrame, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> pd.DataFrame:
    """Per dataset x budget x method: accuracy difference to the reference method on the same
    (seed, sample_id) pairs pooled over seeds, with its bootstrap interval."""
    rows = []
    dec = decisions.assign(correct=decisions["pred"] == decisions["target"])
    for dataset, dd in dec.groupby("dataset", sort=False):
        ref = reference_label(dd["label"], dd["method"])
        for budget, db in dd.groupby("budget", sort=True):
            r = db[db["label"] == ref][["seed", "sample_id", "correct"]]
            if r.empty:
                continue
            for label, dl in db.groupby("label", sort=False):
                if label == ref:
                    continue
                m = dl[["seed", "sample_id", "correct"]].merge(r, on=["seed", "sample_id"], suffixes=("", "_ref"))
                res = paired_bootstrap(m["correct"], m["correct_ref"], n_boot=n_boot, seed=seed)
                rows.append({"dataset": dataset, "budget": budget, "label": label, "reference": ref, **res})
    return pd.DataFrame(rows, columns=["dataset", "budget", "label", "reference", "diff", "lo", "hi", "significant",
                                       "n"])


# ------------------------------------------------------------------------------------------------ tables

def _fmt(mean: float, std: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "infeasible"
    return f"{mean:.{digits}f}" if not np.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


MAIN_COLUMNS = [("accuracy", "accuracy", 4), ("macs_rel", "macs_rel", 3), ("ece", "ECE", 4), ("nll", "NLL", 4),
                ("brier", "Brier", 4), ("auroc_misclassification", "AUROC (misclass.)", 4)]


def main_rows(agg: pd.DataFrame, comparisons: pd.DataFrame | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the main table (shared by markdown and LaTeX)."""
    comparisons = comparisons if comparisons is not None else pd.DataFrame(columns=["dataset", "budget", "label"])
    refs = comparisons.groupby("dataset")["reference"].first().to_dict() if len(comparisons) else {}
    a = agg[agg["score"].fillna("") == ""]
    header = ["dataset", "method", "budget", "accuracy", "acc. 95% CI", "Δacc vs ref.",
              *[h for _, h, _ in MAIN_COLUMNS[1:]], "seeds"]
    rows = []
    for (dataset, _bb, label, budget), g in a.groupby(["dataset", "backbone", "label", "budget"], dropna=False,
                                                      sort=False):
        m = g.set_index("metric")
        cell = {k: (_fmt(m.at[k, "mean"], m.at[k, "std"], dg) if k in m.index else "—") for k, _, dg in MAIN_COLUMNS}
        acc = m.loc["accuracy"] if "accuracy" in m.index else None
        ci = (f"[{acc['ci_low']:.4f}, {acc['ci_high']:.4f}]" if acc is not None and np.isfinite(acc["ci_half"])
              else "—")
        delta = "—"
        c = comparisons[(comparisons["dataset"] == dataset) & (comparisons["label"] == label)
                        & np.isclose(comparisons["budget"], budget)] if np.isfinite(budget) else comparisons[:0]
        if len(c):
            x = c.iloc[0]
            delta = f"{x['diff']:+.4f}{'*' if x['significant'] else ''}"
        elif refs.get(dataset) == label:
            delta = "ref."
        rows.append([dataset, label, "—" if not np.isfinite(budget) else f"{budget:g}", cell["accuracy"], ci, delta,
                     *[cell[k] for k, _, _ in MAIN_COLUMNS[1:]], str(int(g["seeds"].max()))])
    return header, rows


def conformal_rows(agg: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    c = agg[agg["metric"].isin(CONFORMAL_METRICS)]
    header = ["dataset", "method", "budget", "score", "scope", "α", "coverage", "set size", "seeds"]
    rows = []
    for (dataset, _bb, label, budget, score, scope, alpha), g in c.groupby(
            ["dataset", "backbone", "label", "budget", "score", "scope", "alpha"], dropna=False, sort=False):
        m = g.set_index("metric")
        cov = _fmt(m.at["coverage", "mean"], m.at["coverage", "std"], 4) if "coverage" in m.index else "—"
        size = _fmt(m.at["set_size", "mean"], m.at["set_size", "std"], 3) if "set_size" in m.index else "—"
        rows.append([dataset, label, "—" if not np.isfinite(budget) else f"{budget:g}", score, scope, f"{alpha:g}",
                     cov, size, str(int(g["seeds"].max()))])
    return header, rows


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def _tex_escape(s: str) -> str:
    s = s.replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        s = s.replace(ch, "\\" + ch)
    return (s.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("α", r"$\alpha$").replace("—", "--")
            .replace("~", r"\textasciitilde{}"))


def _tex(header: list[str], rows: list[list[str]]) -> str:
    out = [r"\begin{tabular}{" + "l" * 3 + "r" * (len(header) - 3) + "}", r"\hline",
           " & ".join(_tex_escape(h) for h in header) + r" \\", r"\hline"]
    out += [" & ".join(_tex_escape(c) for c in r) + r" \\" for r in rows]
    return "\n".join([*out, r"\hline", r"\end{tabular}"])


def markdown_report(agg: pd.DataFrame, comparisons: pd.DataFrame, split: str = "test") -> str:
    refs = ", ".join(f"{d}: {r}" for d, r in comparisons.groupby("dataset")["reference"].first().items()) or "none"
    parts = [f"## Results ({split}): mean ± std over seeds", "",
             "95% CI: t interval over seeds. Δacc: accuracy minus the reference method's on the same samples "
             f"(pooled over seeds; reference {refs}); `*` = the 95% paired-bootstrap interval "
             f"({N_BOOT} resamples) excludes 0.", "", _md(*main_rows(agg, comparisons))]
    if agg["metric"].isin(CONFORMAL_METRICS).any():
        parts += ["", f"## Conformal prediction ({split})", "", _md(*conformal_rows(agg))]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ driver

@dataclass
class Report:
    markdown: str
    out: Path
    files: list[Path] = field(default_factory=list)


def _use_agg() -> None:
    import matplotlib

    matplotlib.use("Agg")


def build_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, split: str = "test",
                 budget: float | None = None) -> Report:
    """Everything ``python -m bench report`` does. Inputs are validated before anything is written."""
    df = load_runs(run_dirs)
    _check_split(df, split)
    agg = aggregate(df, split)
    chosen = choose_budget(agg, budget)
    comparisons = compare(load_decisions(df, split))
    md = markdown_report(agg, comparisons, split)
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
    saved = plots.save_all(plots.figures(agg, dist, chosen), out_dir)
    files += [path for paths in saved.values() for path in paths]
    return Report(markdown=md, out=out_dir, files=files)


def _check_split(df: pd.DataFrame, split: str) -> None:
    if not (df["split"] == split).any():
        raise UserError(f"the runs have no rows for split {split!r}; they have "
                        f"{', '.join(sorted(df['split'].unique()))}.")


# -------------------------------------------------------------------------------------------- results page

FIGURE_TITLES = {"accuracy_vs_cost": "accuracy vs cost", "ece_vs_cost": "ECE vs cost",
                 "conformal_vs_cost": "conformal sets vs cost", "exit_distribution": "exit distribution",
                 "wall_vs_macs": "wall-clock vs MACs"}
LOSSY_PREFIX = "cifar10-jpeg"


def _read_run_json(run_dir: Path) -> dict:
    f = run_dir / "run.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is malformed and could not be read as JSON ({e}).")


def _command(run: dict) -> str:
    """The recorded command; older runs stored ``sys.argv`` joined, whose first word is bench/__main__.py."""
    cmd = str(run.get("command", "")).strip()
    head, _, rest = cmd.partition(" ")
    if head.endswith("bench/__main__.py"):
        return f"python -m bench {rest}".strip()
    return cmd


def machine_line(run: dict) -> str:
    """One line describing where and how the run ran, from run.json (only what it records)."""
    dev, ver, cfg = run.get("device", {}), run.get("versions", {}), run.get("config", {})
    hw = [str(dev.get("cpu_model") or dev.get("cpu") or "")]
    if dev.get("cpu_count"):
        hw.append(f"{dev['cpu_count']} cores")
    if dev.get("memory_gib"):
        hw.append(f"{dev['memory_gib']:g} GiB RAM")
    gpus = dev.get("gpus")
    if gpus:
        hw.append(", ".join(f"{n}x {g}" if (n := gpus.count(g)) > 1 else g for g in dict.fromkeys(gpus)))
    elif dev.get("cuda"):
        hw.append(str(dev["cuda"]))
    elif gpus is not None:
        hw.append("no GPU")
    parts = [", ".join(h for h in hw if h)]
    ran = [f"on {cfg['device']}" if cfg.get("device") else "",
           f"{dev['threads']} torch threads" if dev.get("threads") else ""]
    parts.append("ran " + " with ".join(x for x in ran if x) if any(ran) else "")
    parts.append(", ".join(f"{k} {ver[k]}" for k in ("torch", "timm", "python") if ver.get(k)))
    if run.get("git_sha"):
        parts.append(f"git {str(run['git_sha'])[:12]}" + (" (uncommitted changes)" if run.get("git_dirty") else ""))
    if run.get("date"):
        parts.append(str(run["date"]).replace("T", " ").replace("Z", " UTC"))
    if run.get("duration_s") is not None:
        parts.append(f"took {float(run['duration_s']):.0f} s")
    parts = [x for x in parts if x]
    return "Machine: " + " · ".join(parts) + "." if parts else "Machine: not recorded (no run.json)."


def _run_names(run_dirs: Sequence[Path], frames: Sequence[pd.DataFrame]) -> list[str]:
    """File-name stems of the runs' figures: the folder name, with the run id where two folders share a name."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{n}-{df['run_id'].iloc[0]}" if names.count(n) > 1 else n for n, df in zip(names, frames)]


@dataclass
class _Section:
    text: str
    figures: dict


def _section(run_dir: Path, name: str, df: pd.DataFrame, split: str, budget: float | None,
             figure_dir: str) -> _Section:
    run = _read_run_json(run_dir)
    datasets = list(dict.fromkeys(df["dataset"]))
    agg = aggregate(df, split)
    chosen = choose_budget(agg, budget)
    dist = exit_distribution(df, chosen, split) if chosen is not None else None
    figs = plots.figures(agg, dist, chosen)
    cmd = _command(run)
    lines = [f"## {', '.join(datasets)} — `{run_dir}`", "",
             *(["```bash", cmd, "```"] if cmd else ["Command: not recorded (no run.json)."]), "",
             machine_line(run), "",
             f"Mean ± std over seeds ({split}; `macs_rel` is the realised cost relative to the static backbone; "
             "bounds read labels and are marked as such):", "",
             summary_table(df, split)]
    timing = timing_table(df)
    if timing:
        lines += ["", timing]
    lossy = [d for d in datasets if str(d).startswith(LOSSY_PREFIX)]
    if lossy:
        lines += ["", f"**{', '.join(lossy)}: the images are lossy JPEG re-encodings of CIFAR-10, not the official "
                      "files; these numbers are not comparable with results on the official CIFAR-10.**"]
    if figs:
        links = [f"[{FIGURE_TITLES.get(k, k)}]({figure_dir}/{name}_{k}.png)" for k in figs]
        lines += ["", "Figures: " + " · ".join(links)]
        if "accuracy_vs_cost" in figs:
            lines += ["", f"![accuracy vs cost, {', '.join(datasets)}]({figure_dir}/{name}_accuracy_vs_cost.png)"]
    return _Section("\n".join(lines), figs)


def page_command(run_dirs: Sequence[str | os.PathLike], page: str | os.PathLike, split: str = "test",
                 budget: float | None = None) -> str:
    """The command that regenerates the page (printed on its first line)."""
    args = ["python", "-m", "bench", "report", *map(str, run_dirs), "--page", str(page)]
    args += ["--split", split] if split != "test" else []
    args += ["--budget", f"{budget:g}"] if budget is not None else []
    return shlex.join(args)


def build_page(run_dirs: Sequence[str | os.PathLike], page: str | os.PathLike, split: str = "test",
               budget: float | None = None, figure_dir: str = "figures") -> list[Path]:
    """(Re)write the markdown results page ``page`` from the run directories: a generated-by line with the command
    that regenerates it, then per run its command, machine, summary table and figures (PNG, saved under
    ``<page's folder>/<figure_dir>/<run name>_<figure>.png``). Every number comes from the run folders; the same
    runs give byte-identical files. Inputs are validated before anything is written. Returns the paths written."""
    dirs = [Path(p) for p in run_dirs]
    if not dirs:
        raise UserError("give at least one run directory.")
    frames = [load_runs([d]) for d in dirs]
    for d in frames:
        _check_split(d, split)
        choose_budget(aggregate(d, split), budget)  # an unknown --budget fails before anything is drawn
    for d in dirs:
        _read_run_json(d)
    _use_agg()
    page = Path(page)
    names = _run_names(dirs, frames)
    sections = [_section(d, n, df, split, budget, figure_dir) for d, n, df in zip(dirs, names, frames)]
    head = [f"Generated by `bench report` from the run folders below; do not edit by hand. Regenerate with "
            f"`{page_command(run_dirs, page, split, budget)}`.", "",
            "# Results", "",
            "One section per run: the command that produced it, the machine it ran on, and its table (mean ± std "
            "over seeds per method and budget), then the real early-exit timings when the run was timed. Rerun a "
            "section's command to recreate its run folder.", ""]
    text = "\n".join(head + ["\n\n".join(s.text for s in sections)]) + "\n"
    written = []
    for name, section in zip(names, sections):
        saved = plots.save_all(section.figures, page.parent / figure_dir, prefix=f"{name}_", formats=("png",))
        written += [p for paths in saved.values() for p in paths]
    atomic_write_text(page, text)
    return [*written, page]
