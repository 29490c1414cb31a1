"""The risk-controlled points of a run (``--risk``; bench.pipeline.risk_points) as a table and a figure, read from
the metric rows: per method, procedure, loss and epsilon, the realised test risk, the cal risk the threshold was
chosen at, the cost and accuracy, and the guarantee checked over the run's re-splits of cal + test (the share of
re-splits whose test risk exceeds epsilon, beside delta; the mean re-split risk, beside epsilon). Both are None
for runs without risk rows, so pages of other runs do not change."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from bench.results.summary import _cell, method_label

RISK_KEYS = ("risk_procedure", "risk_loss", "risk_epsilon", "risk_delta")


def risk_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Test rows of risk-controlled points (params with ``risk_epsilon``), keyed by method, the RISK_KEYS and
    seed, one column per metric (risk, risk_violation_share, risk_resplit_mean, macs_rel, accuracy, risk_cal)."""
    d = df[(df["split"] == "test") & df["budget"].isna() & df["exit"].isna()
           & df["params"].astype(str).str.contains('"risk_epsilon"')]
    d = d[d["metric"].isin(("risk", "risk_violation_share", "risk_resplit_mean", "macs_rel", "accuracy"))]
    if d.empty:
        return pd.DataFrame()
    params = d["params"].map(json.loads)
    d = d.assign(**{k: params.map(lambda p, k=k: p[k]) for k in RISK_KEYS}, risk_cal=params.map(lambda p: p["risk_cal"]))
    # conformal rows share no metric name with these; one value per point, seed and metric
    keys = ["dataset", "method", *RISK_KEYS, "seed"]
    wide = d.pivot_table(index=[*keys, "risk_cal"], columns="metric", values="value", aggfunc="first").reset_index()
    return wide.sort_values(["dataset", "method", "risk_procedure", "risk_loss", "risk_epsilon", "seed"])


def risk_table(df: pd.DataFrame) -> str | None:
    """Markdown table of the risk-controlled points, mean ± std over seeds; None without them."""
    w = risk_frame(df)
    if w.empty:
        return None
    lines = ["Risk-controlled thresholds (test; the risk is against the last exit; the threshold set on the cal split; "
             "violation share: of the run's re-splits of cal + test, the share whose test risk exceeds ε, which ucb "
             "and ltt bound by δ and crc only in expectation, its mean re-split risk <= ε):", "",
             "| dataset | method | procedure | loss | ε | δ | test risk | cal risk | macs_rel | accuracy | "
             "violation share | mean re-split risk | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (dataset, method, proc, loss, eps, delta), g in w.groupby(
            ["dataset", "method", "risk_procedure", "risk_loss", "risk_epsilon", "risk_delta"], sort=False):
        c = {m: _cell(g[m], 3 if m == "macs_rel" else 4) if m in g else "—"
             for m in ("risk", "risk_cal", "macs_rel", "accuracy", "risk_violation_share", "risk_resplit_mean")}
        lines.append(f"| {dataset} | {method_label(method)} | {proc} | {loss} | {eps:g} | {delta:g} | {c['risk']} | "
                     f"{c['risk_cal']} | {c['macs_rel']} | {c['accuracy']} | {c['risk_violation_share']} | "
                     f"{c['risk_resplit_mean']} | {g['seed'].nunique()} |")
    return "\n".join(lines)


def has_guarantee(w: pd.DataFrame) -> bool:
    """Whether :func:`risk_frame`'s rows carry the re-split check :func:`plot_risk_guarantee` draws."""
    return not w.empty and "risk_violation_share" in w


def plot_risk_guarantee(df: pd.DataFrame):
    """Two panels per run: the violation share vs ε (δ dashed: ucb and ltt must stay under it) and the mean
    re-split test risk vs ε (the diagonal: crc must stay under it), one line per method, procedure and loss, mean
    over seeds; None without risk rows."""
    w = risk_frame(df)
    if not has_guarantee(w):
        return None
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10.5, 3.6))
    # a colour per method, a line style and marker per procedure: many lines stay told apart
    colours = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(w["method"]))}
    styles = {p: ("-o", "--s", ":^", "-.v")[i % 4] for i, p in enumerate(dict.fromkeys(w["risk_procedure"]))}
    for (method, proc, loss), g in w.groupby(["method", "risk_procedure", "risk_loss"], sort=False):
        m = g.groupby("risk_epsilon")[["risk_violation_share", "risk_resplit_mean"]].mean()
        label = f"{method_label(method)} {proc}" + (f" ({loss})" if w["risk_loss"].nunique() > 1 else "")
        a.plot(m.index, m["risk_violation_share"], styles[proc], color=colours[method], label=label)
        b.plot(m.index, m["risk_resplit_mean"], styles[proc], color=colours[method], label=label)
    for delta in sorted(w["risk_delta"].unique()):
        a.axhline(delta, color="k", ls="--", lw=1)
    eps = np.array(sorted(w["risk_epsilon"].unique()))
    b.plot(eps, eps, color="k", ls="--", lw=1)
    a.set(xlabel="risk level ε", ylabel="share of re-splits with test risk > ε", title="violation share (δ dashed)")
    b.set(xlabel="risk level ε", ylabel="mean test risk over re-splits", title="mean risk (ε dashed)")
    b.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig
