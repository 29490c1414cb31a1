"""Comparisons at equal realised cost, own operating points and budgets a method cannot reach, on hand-built run
folders whose answers are worked out by hand (bench/results/points.py, matched_cost, summary, plots)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.results.files import METRIC_COLUMNS
from bench.results.plots import plot_accuracy_vs_cost, points
from bench.results.points import tag_points
from bench.results.matched_cost import COMPARISON_COLUMNS, bracket, compare, paired_bootstrap
from bench.results.report import aggregate, load_decisions, load_runs, matched_cost_table
from bench.results.summary import exit_score_table, summary_table
from test_report import _row

N = 100  # test samples per seed
SEEDS = (0, 1)
LAMBDAS = [0.1, 1.0]


def _params(**kw) -> str:
    return json.dumps(kw, sort_keys=True, separators=(",", ":"))


def _jei(lam: float, val: float) -> str:
    return _params(**{"lambda": lam, "lambdas": LAMBDAS, "val_macs_rel": val})


# (method, budget or None, params, realised test macs_rel, samples 0..k-1 right): the reference threshold has two
# points, cost 0.2 / accuracy 0.5 and cost 0.6 / accuracy 0.9; JEI-DNN's budget 0.6 takes λ=0.1, which costs 0.4
# with accuracy 0.8 (so at budget 0.6 the threshold is better, at the same cost JEI-DNN is: 0.8 - (0.5 + 0.9) / 2),
# and budget 0.9 only repeats that point; its own point λ=1 costs 0.1, below the reference's range; entropy's
# budget 0.6 costs 0.61, within 0.02 of the reference's costliest point.
POINTS = [("threshold", 0.2, _params(threshold=0.3, val_macs_rel=0.2), 0.2, 50),
          ("threshold", 0.6, _params(threshold=0.7, val_macs_rel=0.6), 0.6, 90),
          ("jeidnn", 0.6, _jei(0.1, 0.41), 0.4, 80),
          ("jeidnn", 0.9, _jei(0.1, 0.41), 0.4, 80),
          ("jeidnn", None, _jei(1.0, 0.12), 0.1, 30),
          ("jeidnn", None, _jei(0.1, 0.41), 0.4, 80),
          ("entropy", 0.2, _params(threshold=-1.0, val_macs_rel=0.2), 0.2, 50),
          ("entropy", 0.6, _params(threshold=-0.1, val_macs_rel=0.6), 0.61, 90)]


def matched_run(path: Path, params_column: bool = True) -> Path:
    """The run folder of POINTS on seeds 0/1 (metrics.csv and decisions.csv.gz, the same on both seeds).
    ``params_column``: decisions.csv.gz records each point's params (what tells own points apart)."""
    path.mkdir(parents=True)
    rows, dec = [], []
    target = np.arange(N) % 10
    for seed in SEEDS:
        rows += [_row(seed, "static", "accuracy", 0.95, budget=None),
                 _row(seed, "static", "macs_rel", 1.0, budget=None),
                 _row(seed, "jeidnn", "head_accuracy", 0.5, budget=None, params=_params(lambdas=LAMBDAS), exit=0)]
        for method, budget, params, cost, right in POINTS:
            rows += [_row(seed, method, "accuracy", right / N, budget=budget, params=params),
                     _row(seed, method, "macs_rel", cost, budget=budget, params=params),
                     _row(seed, method, "ece", 0.05, budget=budget, params=params)]
            pred = np.where(np.arange(N) < right, target, (target + 1) % 10)
            dec.append(pd.DataFrame({"split": "test", "seed": seed, "method": method, "budget": budget,
                                     "sample_id": np.arange(N), "exit": 0, "pred": pred, "target": target,
                                     "confidence": 0.9, **({"params": params} if params_column else {})}))
    df = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    df["exit"] = df["exit"].astype("Int64")
    df.to_csv(path / "metrics.csv", index=False)
    pd.concat(dec).to_csv(path / "decisions.csv.gz", index=False)
    return path


def _comparisons(run: Path) -> pd.DataFrame:
    df = load_runs([run])
    return compare(df, load_decisions(df))


def _one(c: pd.DataFrame, label: str, budget: float | None = None, point: str | None = None) -> pd.Series:
    sel = c[c["label"] == label]
    sel = sel[np.isclose(sel["budget"], budget)] if budget is not None else sel[sel["budget"].isna()
                                                                                  & (sel["point"] == point)]
    assert len(sel) == 1, sel
    return sel.iloc[0]


def test_comparison_at_matched_cost_worked_by_hand(tmp_path):
    c = _comparisons(matched_run(tmp_path / "run"))
    assert list(c.columns) == COMPARISON_COLUMNS
    # JEI-DNN at budget 0.6 costs 0.4: against the half-half mixture of the threshold's 0.2 and 0.6 points
    # (accuracy 0.7 at cost 0.4), not against the threshold's budget-0.6 row (accuracy 0.9: diff -0.1)
    j = _one(c, "jeidnn", 0.6)
    assert j["diff"] == pytest.approx(0.1, abs=1e-12)
    assert (j["accuracy"], j["ref_accuracy"]) == pytest.approx((0.8, 0.7), abs=1e-12)
    assert (j["macs_rel"], j["ref_macs_rel"]) == pytest.approx((0.4, 0.4), abs=1e-12)
    assert j["point"] == "λ=0.1" and j["reference"] == "threshold" and j["note"] == ""
    assert j["n"] == 2 * N and j["seeds"] == 2
    # per seed: +0.5 on 30 samples, -0.5 on 10, 0 on 60 (sd 0.3): the interval is about 0.1 ± 1.96 * 0.3 / sqrt(200)
    assert 0.04 < j["lo"] < 0.1 < j["hi"] < 0.16 and j["significant"]
    # budget 0.9 repeats budget 0.6's point: no comparison of its own
    assert not np.isclose(c["budget"], 0.9).any()
    # an own point at the same cost gives the same answer
    assert _one(c, "jeidnn", point="λ=0.1")["diff"] == pytest.approx(0.1, abs=1e-12)
    # an own point below the reference's costs (0.1 < 0.2 - 0.02): no comparison, and the row says why
    low = _one(c, "jeidnn", point="λ=1")
    assert np.isnan(low["diff"]) and low["n"] == 0 and low["seeds"] == 0 and not low["significant"]
    assert low["note"] == "not compared; seeds 0, 1: cost 0.100 is below the reference's range [0.200, 0.600]"
    assert low["macs_rel"] == pytest.approx(0.1) and np.isnan(low["ref_macs_rel"])
    # within 0.02 of the reference's end point: compared with that point alone
    e = _one(c, "entropy", 0.6)
    assert e["diff"] == 0 and e["ref_macs_rel"] == pytest.approx(0.6) and e["macs_rel"] == pytest.approx(0.61)
    assert "matched to the reference's end point at 0.600" in e["note"]
    assert _one(c, "entropy", 0.2)["diff"] == 0  # the same cost as a reference point: that point (w = 0)
    assert set(c["label"]) == {"jeidnn", "entropy"}  # the reference is not compared with itself


def test_report_tables_mark_own_points_and_unreached_budgets(tmp_path, capsys):
    run = matched_run(tmp_path / "run")
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    md = capsys.readouterr().out
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith("| toy | jeidnn |")]
    # budget rows first, then the own points by realised cost
    assert [r[2] for r in rows] == ["0.6", "0.9", "λ=1", "λ=0.1"]
    by = {r[2]: r for r in rows}
    assert by["0.6"][3] == "0.8000 ± 0.0000" and by["0.6"][5] == "+0.1000*" and by["0.6"][6] == "0.400 ± 0.000"
    assert by["0.9"][3] == "not reached (max val cost 0.41)" and by["0.9"][5] == "—"
    assert by["λ=1"][5] == "n/a" and by["λ=0.1"][5] == "+0.1000*"
    saved = pd.read_csv(tmp_path / "out" / "comparisons.csv")
    assert list(saved.columns) == COMPARISON_COLUMNS and len(saved) == 5
    assert r"$\lambda$=0.1 & 0.8000 $\pm$ 0.0000" in (tmp_path / "out" / "report.tex").read_text()
    assert (tmp_path / "out" / "accuracy_vs_cost.png").stat().st_size > 1000


def test_own_points_without_recorded_params_are_not_compared(tmp_path):
    c = _comparisons(matched_run(tmp_path / "run", params_column=False))
    assert _one(c, "jeidnn", 0.6)["diff"] == pytest.approx(0.1, abs=1e-12)  # budget rows are told apart by budget
    for point in ("λ=1", "λ=0.1"):
        row = _one(c, "jeidnn", point=point)
        assert np.isnan(row["diff"]) and "own points' decisions cannot be told apart" in row["note"]


def test_summary_lists_own_points_and_marks_unreached_budgets(tmp_path):
    table = summary_table(load_runs([matched_run(tmp_path / "run")]))
    rows = [line for line in table.splitlines() if line.startswith("| toy | jeidnn |")]
    assert rows == ["| toy | jeidnn | 0.6 | 0.8000 ± 0.0000 | 0.400 ± 0.000 | 0.0500 ± 0.0000 | 2 |",
                    "| toy | jeidnn | 0.9 | not reached (max val cost 0.41) | — | — | 2 |",
                    "| toy | jeidnn | λ=1 | 0.3000 ± 0.0000 | 0.100 ± 0.000 | 0.0500 ± 0.0000 | 2 |",
                    "| toy | jeidnn | λ=0.1 | 0.8000 ± 0.0000 | 0.400 ± 0.000 | 0.0500 ± 0.0000 | 2 |"]
    assert "| toy | threshold | 0.6 | 0.9000 ± 0.0000 | 0.600 ± 0.000 |" in table


def test_plot_data_holds_own_points_and_leaves_unreached_budgets_out(tmp_path):
    agg = aggregate(load_runs([matched_run(tmp_path / "run")]))
    p = points(agg, "accuracy")
    j = p[p["label"] == "jeidnn"].sort_values(["kind", "x"])
    assert j[["kind", "point", "x", "y"]].to_dict("list") == {
        "kind": ["budget", "own", "own"], "point": ["", "λ=1", "λ=0.1"], "x": [0.4, 0.1, 0.4], "y": [0.8, 0.3, 0.8]}
    assert j["budget"].iloc[0] == 0.6 and j["budget"].iloc[1:].isna().all()  # budget 0.9 (not reached) left out
    fig = plot_accuracy_vs_cost(agg)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    assert {"jeidnn: own points", "jeidnn: budgets", "threshold", "entropy"} <= set(labels)
    own = next(h for h, lab in zip(handles, labels) if lab == "jeidnn: own points")
    assert list(own.lines[0].get_xdata()) == [0.1, 0.4]  # one marker per point, joined in order of cost
    budgets = next(h for h, lab in zip(handles, labels) if lab == "jeidnn: budgets")
    assert list(budgets.lines[0].get_xdata()) == [0.4]  # budget 0.9 is not drawn again


def test_a_repeated_point_is_not_reached_whatever_carries_the_budget():
    """The rule of bench/results/points.py: the same params apart from the budget key as a smaller budget's point
    (per seed); infeasible rows stay infeasible; the oracle's budget points differ by their validation cost."""
    oracle = [(0.1, _params(infeasible=True), np.nan), (0.2, _params(budget=0.2, val_macs_rel=0.19), 0.7),
              (0.6, _params(budget=0.6, val_macs_rel=0.3), 0.8), (0.9, _params(budget=0.9, val_macs_rel=0.3), 0.8),
              (None, _params(budget=None, val_macs_rel=0.3), 0.8)]
    rows = [_row(0, "oracle", "accuracy", v, budget=b, params=p) for b, p, v in oracle]
    rows += [_row(1, "oracle", "accuracy", 0.8, budget=0.9, params=_params(budget=0.9, val_macs_rel=0.5))]
    t = tag_points(pd.DataFrame(rows, columns=METRIC_COLUMNS).astype({"exit": "Int64"}))
    assert t["status"].tolist() == ["infeasible", "reached", "reached", "not reached", "reached", "reached"]
    assert t["kind"].tolist() == ["budget"] * 4 + ["own", "budget"]
    assert t["point"].tolist()[4] == "unconstrained" and t["chosen"].tolist()[2] == "budget=0.6"


def test_bracket_and_a_bootstrap_of_fractional_correctness():
    assert bracket([0.6, 0.2], 0.4) == (1, 0, pytest.approx(0.5))
    assert bracket([0.2, 0.3, 0.6], 0.45) == (1, 2, pytest.approx(0.5))
    assert bracket([0.2, 0.6], 0.2) == (0, 0, 0.0)
    assert bracket([0.2, 0.6], 0.19) == (0, 0, 0.0) and bracket([0.2, 0.6], 0.615) == (1, 1, 0.0)
    assert bracket([0.2, 0.6], 0.17) is None and bracket([0.2, 0.6], 0.63) is None
    with pytest.raises(ValueError, match="non-empty"):
        bracket([], 0.4)
    # a mixture's fractional correctness: right always vs right half the time
    half = paired_bootstrap(np.ones(50, bool), np.full(50, 0.5))
    assert (half["diff"], half["lo"], half["hi"], half["significant"]) == (0.5, 0.5, 0.5, True)
    a = np.arange(40) < 32
    b = np.where(np.arange(40) < 20, 1.0, np.where(np.arange(40) < 36, 0.5, 0.0))
    res = paired_bootstrap(a, b)
    assert res["diff"] == pytest.approx(a.mean() - b.mean()) and res["lo"] < res["diff"] < res["hi"]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        paired_bootstrap(np.ones(3), np.full(3, 1.5))
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap(np.ones(3), np.ones(4))


def test_bootstrap_of_many_distinct_differences_resamples_indices():
    rng = np.random.default_rng(3)
    a, b = rng.random(2000), rng.random(2000)  # 2,000 distinct differences: index resampling, in chunks
    res = paired_bootstrap(a, b, n_boot=500)
    se = np.std(a - b, ddof=1) / np.sqrt(len(a))
    assert res["lo"] == pytest.approx(res["diff"] - 1.96 * se, abs=0.3 * se)
    assert res["hi"] == pytest.approx(res["diff"] + 1.96 * se, abs=0.3 * se)


def test_page_tables_of_matched_costs_and_exit_scores_by_hand():
    comp = pd.DataFrame([
        {"label": "jeidnn", "budget": np.nan, "point": "λ=0.1", "macs_rel": 0.4, "accuracy": 0.8, "ref_accuracy": 0.7,
         "reference": "threshold", "diff": 0.1, "lo": 0.04, "hi": 0.16, "significant": True},
        {"label": "jeidnn", "budget": 0.6, "point": "λ=0.1", "macs_rel": 0.4, "accuracy": 0.8, "ref_accuracy": 0.7,
         "reference": "threshold", "diff": 0.1, "lo": -0.01, "hi": 0.2, "significant": False},
        {"label": "jeidnn", "budget": np.nan, "point": "λ=1", "macs_rel": 0.1, "accuracy": 0.5, "ref_accuracy": np.nan,
         "reference": "threshold", "diff": np.nan, "lo": np.nan, "hi": np.nan, "significant": False}])
    table = matched_cost_table(comp).splitlines()
    assert table[-2] == "| jeidnn | λ=0.1 | 0.400 | 0.8000 | 0.7000 | +0.1000* [+0.0400, +0.1600] |"
    assert table[-1] == "| jeidnn | 0.6 | 0.400 | 0.8000 | 0.7000 | +0.1000 [-0.0100, +0.2000] |"  # no row for λ=1
    assert matched_cost_table(comp.iloc[2:]) is None
    rows = [{"split": "test", "budget": np.nan, "method": "jeidnn", "params": p, "metric": m, "exit": 0, "seed": s,
             "value": v} for p, vals in (('{"lambda":0.1}', (0.6, 0.8)), ('{"lambda":1}', (0.7, 0.9)))
            for s in (0, 1) for m, v in zip(("exit_score_auroc", "msp_auroc"), vals)]
    rows.append({**rows[0], "split": "val", "value": 0.0})  # other splits and budget rows are not read
    rows.append({**rows[0], "budget": 0.5, "value": 0.0})
    scores = exit_score_table(pd.DataFrame(rows)).splitlines()
    assert scores[-1] == "| jeidnn | 0 | 0.650 [0.600, 0.700] | 0.850 [0.800, 0.900] |"
    assert exit_score_table(pd.DataFrame(rows[:0], columns=list(rows[0]))) is None
