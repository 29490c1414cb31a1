"""Figures of a report, shared by ``python -m bench report`` and ``results/figures.ipynb``. Every function takes
the frames that :mod:`bench.results.report` computes (``aggregate``, ``exit_distribution``) and returns a matplotlib
Figure (or None when the runs have nothing to draw); the backend is left to the caller (the CLI uses Agg).

Imports go one way: ``report`` imports this module, never the reverse. matplotlib and seaborn are imported when a
figure is drawn (they are slow to import)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from bench.base.hashing import atomic_write
from bench.results.points import REACHED
from bench.results.summary import is_bound

FIGSIZE = (5.0, 3.8)


def _plt():
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt


def points(agg: pd.DataFrame, metric: str, score: str = "", scope: str = "", alpha: float | None = None,
           x_metric: str = "macs_rel") -> pd.DataFrame:
    """Per dataset x label x budget-or-own-point: x (mean x_metric), xerr (its std), y (mean metric), yerr,
    method, point (the own point's native label, "" for budget rows) and kind. Budget rows that are not reached
    (they repeat a smaller budget's point: :func:`bench.results.points.tag_points`) and infeasible ones are left
    out."""
    keys = ["dataset", "backbone", "label", "method", "budget", "point", "kind"]
    plain = agg["score"].fillna("") == ""
    drawn = agg["status"] == REACHED
    x = agg[plain & drawn & (agg["metric"] == x_metric)][keys + ["mean", "std"]].rename(
        columns={"mean": "x", "std": "xerr"})
    sel = drawn & (agg["metric"] == metric)
    if score:
        sel &= (agg["score"] == score) & (agg["scope"] == scope) & np.isclose(agg["alpha"], alpha)
    else:
        sel &= plain
    y = agg[sel][keys + ["mean", "std"]].rename(columns={"mean": "y", "std": "yerr"})
    p = x.merge(y, on=keys, how="inner")
    return p[np.isfinite(p["x"]) & np.isfinite(p["y"])].reset_index(drop=True)


def cost_points(agg: pd.DataFrame, metric: str, **conformal) -> tuple[pd.DataFrame, bool]:
    """``points`` against macs_rel, or, when a dataset's rows come from several networks (whose macs_rel have
    different denominators), against absolute MACs in millions. Returns (points, absolute)."""
    absolute = bool((agg.groupby("dataset")["backbone"].nunique() > 1).any())
    if not absolute:
        return points(agg, metric, **conformal), False
    p = points(agg, metric, x_metric="macs", **conformal)
    p[["x", "xerr"]] = p[["x", "xerr"]] / 1e6
    return p, True


def _xlabel(absolute: bool) -> str:
    return "MACs per image, millions (test)" if absolute else "MACs relative to the backbone (test)"


def _draw_curves(ax, p: pd.DataFrame, palette: dict, ceiling: bool = False) -> None:
    """Per label: the static backbone as a star; a method's budget rows joined by a line (dashed grey for bounds);
    for a method with own points, those are its curve (a marker per point, joined by a line) and its budget rows
    are open squares beside it."""
    for label, g in p.groupby("label", sort=False):
        g = g.sort_values("x")
        if (g["method"] == "static").all():
            ax.errorbar(g["x"], g["y"], **_err(g), marker="*", markersize=12, linestyle="none", color="black",
                        label=label, zorder=5)
            continue
        bound = is_bound(g["method"].iloc[0])
        color = "grey" if bound else palette[label]
        own, budget = g[g["kind"] == "own"], g[g["kind"] != "own"]
        if len(own):
            ax.errorbar(own["x"], own["y"], **_err(own), marker="o", markersize=4, linestyle=":" if bound else "-",
                        color=color, label=f"{label}: own points", capsize=2)
        if len(budget):
            style = ({"marker": "s", "markerfacecolor": "none", "markersize": 7, "linestyle": "none"} if len(own)
                     else {"marker": "o", "linestyle": "--" if bound else "-"})
            ax.errorbar(budget["x"], budget["y"], **_err(budget), **style, color=color, capsize=2,
                        label=f"{label}: budgets" if len(own) else label)
        if bound and ceiling:  # a bound on the metric: draw it across the whole cost axis
            ax.axhline(g["y"].max(), linestyle="--", color="grey", linewidth=1)


def _err(g: pd.DataFrame) -> dict:
    return {"xerr": g["xerr"].fillna(0), "yerr": g["yerr"].fillna(0)}


def _palette(labels) -> dict:
    import seaborn as sns

    labels = [lab for lab in dict.fromkeys(labels) if lab != "static backbone"]
    return dict(zip(labels, sns.color_palette("tab10" if len(labels) <= 10 else "tab20", max(len(labels), 1))))


def _legend(ax) -> None:
    """Inside the panel for a few curves; beside it when there are many (it would hide them)."""
    if len(ax.get_legend_handles_labels()[1]) > 6:
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig = ax.figure  # make room: each panel's share of 3.5 inches per column of panels
        w, h = fig.get_size_inches()
        fig.set_size_inches(w + 3.5 / ax.get_gridspec().nrows, h)
    else:
        ax.legend(fontsize="small")


def _grid(datasets, nrows: int = 1):
    plt = _plt()
    n = max(len(datasets), 1)
    fig, axes = plt.subplots(nrows, n, figsize=(FIGSIZE[0] * n, FIGSIZE[1] * nrows), squeeze=False)
    return fig, axes


def plot_metric_vs_cost(agg: pd.DataFrame, metric: str, ylabel: str | None = None, title: str | None = None,
                        ceiling: bool = False, **conformal):
    """One panel per dataset: ``metric`` against the realised test macs_rel, one curve per method (mean over
    seeds, error bars = std; a method with own operating points draws them as its curve, its budget rows as open
    squares; budgets not reached are not drawn), bounds dashed (with ``ceiling``, also as a horizontal line: the
    oracle's accuracy bounds every method on the same heads), the static backbone as a star."""
    p, absolute = cost_points(agg, metric, **conformal)
    if p.empty:
        return None
    datasets = list(dict.fromkeys(p["dataset"]))
    fig, axes = _grid(datasets)
    palette = _palette(p["label"])
    for ax, ds in zip(axes[0], datasets):
        _draw_curves(ax, p[p["dataset"] == ds], palette, ceiling)
        ax.set_xlabel(_xlabel(absolute))
        ax.set_ylabel(ylabel or metric)
        ax.set_title(f"{ds}" + (f" — {title}" if title else ""))
        _legend(ax)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_cost(agg: pd.DataFrame):
    return plot_metric_vs_cost(agg, "accuracy", "accuracy (test)", ceiling=True)


def plot_ece_vs_cost(agg: pd.DataFrame):
    return plot_metric_vs_cost(agg, "ece", "ECE (15 bins, test)")


def plot_conformal_vs_cost(agg: pd.DataFrame, score: str = "lac", scope: str = "global", alpha: float = 0.1):
    """Two rows per dataset: conformal set size and coverage against cost (nominal coverage dotted)."""
    conf = {"score": score, "scope": scope, "alpha": alpha}
    (size, absolute), (cov, _) = cost_points(agg, "set_size", **conf), cost_points(agg, "coverage", **conf)
    if size.empty and cov.empty:
        return None
    datasets = list(dict.fromkeys(pd.concat([size["dataset"], cov["dataset"]])))
    fig, axes = _grid(datasets, nrows=2)
    palette = _palette(pd.concat([size["label"], cov["label"]]))
    for j, ds in enumerate(datasets):
        for i, (p, name) in enumerate(((size, "set size"), (cov, "coverage"))):
            ax = axes[i, j]
            _draw_curves(ax, p[p["dataset"] == ds], palette)
            if name == "coverage":
                ax.axhline(1 - alpha, color="black", linestyle=":", linewidth=1, label=f"nominal {1 - alpha:g}")
            ax.set_xlabel(_xlabel(absolute))
            ax.set_ylabel(f"{name} ({score.upper()}, {scope}, α={alpha:g})")
            ax.set_title(ds)
            _legend(ax)
    fig.tight_layout()
    return fig


def plot_exit_distribution(dist: pd.DataFrame, budget: float):
    """Share of test samples leaving at each exit, per method, at one budget (mean over seeds)."""
    if dist is None or dist.empty:
        return None
    import seaborn as sns

    datasets = list(dict.fromkeys(dist["dataset"]))
    fig, axes = _grid(datasets)
    for ax, ds in zip(axes[0], datasets):
        d = dist[dist["dataset"] == ds]
        palette = _palette(d["label"])
        for label, method in zip(d["label"], d["method"]):
            if is_bound(method):
                palette[label] = "grey"
        sns.barplot(data=d, x="exit", y="share", hue="label", ax=ax, errorbar=None, palette=palette)
        ax.set_xlabel("exit")
        ax.set_ylabel("share of test samples")
        ax.set_title(f"{ds} — budget {budget:g}")
        _legend(ax)
    fig.tight_layout()
    return fig


def plot_wall_vs_macs(agg: pd.DataFrame, setup: str = ""):
    """Measured wall-clock ratio against the MAC ratio (None when the runs have no timing rows); ``setup`` names
    the device, batch size and dtype of the timing in the title (``summary.timing_setup_text``)."""
    title = f"timing on {setup}" if setup else "timing (device, batch and dtype not recorded)"
    fig = plot_metric_vs_cost(agg, "wall_rel", "wall-clock relative to the backbone", title=title)
    if fig is not None:
        for ax in fig.axes:
            lim = [0, 1.05]
            ax.plot(lim, lim, color="black", linestyle=":", linewidth=1, label="wall_rel = macs_rel")
            ax.title.set_fontsize("small")
            _legend(ax)
    return fig


def figures(agg: pd.DataFrame, dist: pd.DataFrame | None = None, budget: float | None = None,
            timing_setup: str = "") -> dict:
    """name -> Figure for every figure the runs can draw; ``dist`` is ``report.exit_distribution`` at ``budget``
    (the exit-distribution figure is drawn when both are given); ``timing_setup`` titles the timing figure."""
    figs = {"accuracy_vs_cost": plot_accuracy_vs_cost(agg), "ece_vs_cost": plot_ece_vs_cost(agg),
            "conformal_vs_cost": plot_conformal_vs_cost(agg),
            "exit_distribution": (plot_exit_distribution(dist, budget)
                                  if budget is not None and dist is not None else None),
            "wall_vs_macs": plot_wall_vs_macs(agg, timing_setup)}
    return {k: v for k, v in figs.items() if v is not None}


def figure_names(agg: pd.DataFrame, dist: pd.DataFrame | None = None, budget: float | None = None) -> list[str]:
    """The names :func:`figures` returns for the same frames, in its order, from the points each figure would
    draw, without drawing (a page written without its figures links the same files)."""
    def has(metric: str, **conformal) -> bool:
        return not cost_points(agg, metric, **conformal)[0].empty

    conf = {"score": "lac", "scope": "global", "alpha": 0.1}  # plot_conformal_vs_cost's defaults
    names = {"accuracy_vs_cost": has("accuracy"), "ece_vs_cost": has("ece"),
             "conformal_vs_cost": has("set_size", **conf) or has("coverage", **conf),
             "exit_distribution": budget is not None and dist is not None and not dist.empty,
             "wall_vs_macs": has("wall_rel")}
    return [k for k, v in names.items() if v]


def render(fig, fmt: str) -> bytes:
    """The bytes of one figure as ``fmt``. PNGs carry no software tag and PDFs no creation date, so the same runs
    give the same bytes."""
    metadata = {"Software": None} if fmt == "png" else {"CreationDate": None, "Producer": None, "Creator": None}
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight", metadata=metadata)
    return buf.getvalue()


def render_all(figs: dict, formats: tuple[str, ...] = ("png", "pdf")) -> dict[tuple[str, str], bytes]:
    """(name, format) -> bytes for every figure of ``figs`` (from :func:`figures`), closing each once drawn: a
    page of many sweeps holds bytes, not open figures."""
    plt = _plt()
    out = {}
    for name, fig in figs.items():
        for fmt in formats:
            out[name, fmt] = render(fig, fmt)
        plt.close(fig)
    return out


def write_all(rendered: dict[tuple[str, str], bytes], out: Path, prefix: str = "") -> dict[str, list[Path]]:
    """Write what :func:`render_all` drew as ``out/<prefix><name>.<fmt>``, each file atomically; returns
    name -> paths."""
    paths: dict[str, list[Path]] = {}
    for (name, fmt), data in rendered.items():
        path = Path(out) / f"{prefix}{name}.{fmt}"
        atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
        paths.setdefault(name, []).append(path)
    return paths


def save_all(figs: dict, out: Path, prefix: str = "", formats: tuple[str, ...] = ("png", "pdf")) -> dict[str, list[Path]]:
    """Write every figure of ``figs`` (from :func:`figures`) as ``out/<prefix><name>.<fmt>`` and close it;
    returns name -> paths."""
    return write_all(render_all(figs, formats), out, prefix)
