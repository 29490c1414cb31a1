"""`python -m bench report` and results/figures.ipynb: aggregation numbers and the paired bootstrap on
hand-built files, figures and the notebook on a tiny real run, and the user errors."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.cli import main
from bench.results.files import METRIC_COLUMNS, command_line, machine
from bench.results.matched_cost import paired_bootstrap
from bench.results.report import aggregate, load_runs

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ["accuracy_vs_cost", "ece_vs_cost", "conformal_vs_cost", "exit_distribution"]
CONF = json.dumps({"alpha": 0.1, "scope": "global", "score": "lac"}, sort_keys=True, separators=(",", ":"))
CONF05 = json.dumps({"alpha": 0.05, "scope": "global", "score": "lac"}, sort_keys=True, separators=(",", ":"))


TIMED = json.dumps({"device": "Test GPU", "dtype": "float32", "tf32": True, "timing_batch": 256}, sort_keys=True,
                   separators=(",", ":"))


def _row(seed, method, metric, value, budget=0.5, params="{}", exit=None, split="test", sha=None, n=10):
    return {"run_id": "hand", "dataset": "toy", "split": split, "seed": seed, "backbone": "vit(toy)",
            "method": method, "params": params, "budget": budget, "metric": metric, "value": value, "n": n,
            "exit": exit, "split_sha256": sha or f"sha{seed}"}


def _timing_rows(seed, method, budget=0.5) -> list[dict]:
    """A timed point: 300 images through the throughput passes, 64 single images for the latency; the static
    backbone has no wall_rel (it is the reference)."""
    static = method == "static"
    values = {"throughput": (1800.0 if static else 1000.0 + 100 * seed), "latency_ms": 3.5 if static else 2.0,
              "latency_ms_p90": 4.0 if static else 3.0, **({} if static else {"wall_rel": 0.45})}
    return [_row(seed, method, m, v, budget=budget, params=TIMED, n=64 if m.startswith("latency") else 300)
            for m, v in values.items()]


def hand_built_run(path: Path, n: int = 50, timing: bool = False) -> Path:
    """Seeds 0/1, budget 0.5, metrics: threshold accuracy 0.8 / 0.9. Decisions (n samples per seed): threshold,
    patience and the oracle always right, entropy always wrong."""
    path.mkdir(parents=True)
    rows = []
    for seed, acc in ((0, 0.8), (1, 0.9)):
        rows.append(_row(seed, "static", "accuracy", 0.95, budget=None))
        rows.append(_row(seed, "static", "macs_rel", 1.0, budget=None))
        if timing:
            rows += _timing_rows(seed, "static", budget=None)
        for method, a in (("threshold", acc), ("patience", acc), ("entropy", 0.0), ("oracle", 1.0)):
            rows += [_row(seed, method, "accuracy", a), _row(seed, method, "macs_rel", 0.5 + 0.01 * seed),
                     _row(seed, method, "ece", 0.02 + 0.01 * seed), _row(seed, method, "nll", 0.3),
                     _row(seed, method, "brier", 0.2), _row(seed, method, "auroc_misclassification", 0.8),
                     _row(seed, method, "coverage", 0.90 + 0.02 * seed, params=CONF),
                     _row(seed, method, "coverage", 0.99, params=CONF05),
                     _row(seed, method, "set_size", 1.5, params=CONF),
                     _row(seed, method, "set_size", 2.5, params=CONF05),
                     _row(seed, method, "accuracy", 0.1, split="val"),
                     _row(seed, method, "exit_share", 0.25, exit=0), _row(seed, method, "exit_share", 0.75, exit=1)]
            if timing and method != "oracle":  # a bound is not timed
                rows += _timing_rows(seed, method)
        # an infeasible budget: NaN rows are left out of the mean
        rows.append(_row(seed, "threshold", "accuracy", np.nan, budget=0.1))
    df = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    df["exit"] = df["exit"].astype("Int64")
    df.to_csv(path / "metrics.csv", index=False)
    dec = []
    rng = np.random.default_rng(0)
    for seed in (0, 1):
        target = rng.integers(0, 10, n)
        right = target.copy()
        wrong = (target + 1) % 10
        for method, pred in (("threshold", right), ("patience", right), ("entropy", wrong), ("oracle", right)):
            dec.append(pd.DataFrame({"split": "test", "seed": seed, "method": method, "budget": 0.5,
                                     "sample_id": np.arange(n), "exit": 0, "pred": pred, "target": target,
                                     "confidence": 0.9}))
    pd.concat(dec).to_csv(path / "decisions.csv.gz", index=False)
    return path


RUN_JSON = {"run_id": "hand", "status": "complete",
            "command": "python -m bench run --methods threshold,entropy,patience,oracle --seeds 0,1",
            "device": {"cpu": "x86_64", "cpu_model": "Test CPU 9000", "cpu_count": 2, "memory_gib": 24.0, "gpus": [],
                       "threads": 2},
            "versions": {"torch": "2.14.1", "timm": "1.0.31", "python": "3.11.7"}, "git_sha": "0123456789abcdef99",
            "git_dirty": True, "date": "2025-01-02T03:04:05Z", "duration_s": 12.3, "config": {"device": "cpu"}}


def with_run_json(path: Path, dataset: str | None = None, **fields) -> Path:
    """Add a run.json (RUN_JSON updated with ``fields``); ``dataset`` renames the dataset in metrics.csv."""
    (path / "run.json").write_text(json.dumps({**RUN_JSON, **fields}))
    if dataset is not None:
        df = pd.read_csv(path / "metrics.csv")
        df["dataset"] = dataset
        df.to_csv(path / "metrics.csv", index=False)
    return path


def _digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_cache):
    base = tmp_path_factory.mktemp("tiny")
    out = base / "run"
    rc = main(["run", "--methods", "threshold,entropy", "--seeds", "0,1", "--cache-dir", str(shared_cache),
               "--out", str(out), "--set", "backbone.depth=3", "--set", "backbone.embed_dim=32",
               "--set", "backbone.num_heads=2", "--set", "backbone.epochs=3"])
    assert rc == 0
    return out


def test_aggregation_on_hand_built_metrics(tmp_path):
    agg = aggregate(load_runs([hand_built_run(tmp_path / "run")]))
    a = agg[(agg["label"] == "threshold") & (agg["metric"] == "accuracy") & (agg["budget"] == 0.5)].iloc[0]
    assert a["n"] == 2 and a["mean"] == pytest.approx(0.85)
    assert a["std"] == pytest.approx(0.0707106781, abs=1e-9)
    assert a["ci_half"] == pytest.approx(stats.t.ppf(0.975, 1) * 0.0707106781 / np.sqrt(2), abs=1e-9)
    assert a["ci_half"] == pytest.approx(0.6353102, abs=1e-6)
    assert (a["ci_low"], a["ci_high"]) == pytest.approx((0.85 - 0.6353102, 0.85 + 0.6353102), abs=1e-6)
    # conformal rows are keyed by score / scope / alpha from params
    cov = agg[(agg["label"] == "threshold") & (agg["metric"] == "coverage")].set_index("alpha")["mean"]
    assert cov[0.1] == pytest.approx(0.91) and cov[0.05] == pytest.approx(0.99)
    # val rows and per-exit rows stay out; an infeasible budget reads NaN with n = 0
    assert (agg["metric"] != "exit_share").all()
    infeasible = agg[(agg["label"] == "threshold") & (agg["budget"] == 0.1)].iloc[0]
    assert infeasible["n"] == 0 and np.isnan(infeasible["mean"])
    # the static backbone (no budget) and the bound's label
    assert agg[agg["method"] == "static"]["label"].unique().tolist() == ["static backbone"]
    assert "oracle (upper bound)" in set(agg["label"])
    # one seed: std and interval undefined, not zero
    one = aggregate(load_runs([hand_built_run(tmp_path / "r2")]).query("seed == 0"))
    assert one[one["metric"] == "accuracy"]["std"].isna().all()


def test_paired_bootstrap_hand_built():
    same = paired_bootstrap(np.ones(100, bool), np.ones(100, bool))
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0 and not same["significant"]
    mixed = np.arange(100) % 3 == 0
    assert not paired_bootstrap(mixed, mixed)["significant"]
    right = paired_bootstrap(np.ones(100, bool), np.zeros(100, bool))
    assert right["diff"] == 1 and right["significant"] and right["n"] == 100
    # the multinomial shortcut equals resampling indices, in distribution
    rng = np.random.default_rng(1)
    a, b = rng.random(300) < 0.8, rng.random(300) < 0.75
    res = paired_bootstrap(a, b)
    d = a.astype(int) - b.astype(int)
    idx = rng.integers(0, len(d), (4000, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    assert res["lo"] == pytest.approx(lo, abs=0.01) and res["hi"] == pytest.approx(hi, abs=0.01)
    assert paired_bootstrap(a, b) == res  # seeded


def test_report_marks_significant_differences(tmp_path, capsys):
    run = hand_built_run(tmp_path / "run", timing=True)
    rc = main(["report", str(run), "--out", str(tmp_path / "out")])
    assert rc == 0
    md = capsys.readouterr().out
    main_table = md.split("## Conformal")[0]
    rows = {line.split(" | ")[1]: line for line in main_table.splitlines() if line.startswith("| toy |")
            and line.split(" | ")[2] == "0.5"}
    assert "| 0.1 | infeasible |" in main_table
    assert "| 0.5 | 0.8500 ± 0.0707 | [0.2147, 1.4853] | ref. |" in rows["threshold"]
    assert "| +0.0000 |" in rows["patience"]  # identical predictions: no star
    assert "| -1.0000* |" in rows["entropy"]  # always wrong against always right
    assert "| +0.0000 |" in rows["oracle (upper bound)"]
    out = tmp_path / "out"
    assert (out / "report.md").read_text() in md
    tex = (out / "report.tex").read_text()
    assert tex.startswith(r"\begin{tabular}") and r"0.8500 $\pm$ 0.0707" in tex and r"\end{tabular}" in tex
    for name in FIGURES + ["wall_vs_macs"]:  # timing rows -> the wall-clock figure too
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
    # the latency and throughput table: the static backbone first, then each timed method, n = images timed
    timing = md.split("## Latency and throughput (test)")[1]
    assert "Real early exit on Test GPU, batch 256, float32 (TF32 matmuls) (wall_rel and throughput at batch 256" \
        in timing
    rows = [line for line in timing.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert rows == ["| static backbone | — | 1.000 | ref. | 1800 ± 0 | 3.50 ± 0.00 | 4.00 ± 0.00 | 300 / 64 |",
                    "| threshold | 0.5 | 0.505 ± 0.007 | 0.450 ± 0.000 | 1050 ± 71 | 2.00 ± 0.00 | 3.00 ± 0.00 | "
                    "300 / 64 |",
                    "| patience | 0.5 | 0.505 ± 0.007 | 0.450 ± 0.000 | 1050 ± 71 | 2.00 ± 0.00 | 3.00 ± 0.00 | "
                    "300 / 64 |",
                    "| entropy | 0.5 | 0.505 ± 0.007 | 0.450 ± 0.000 | 1050 ± 71 | 2.00 ± 0.00 | 3.00 ± 0.00 | "
                    "300 / 64 |"]


def test_timing_figure_names_device_batch_and_dtype(tmp_path):
    from bench.results import plots
    from bench.results.summary import timing_setup, timing_setup_text

    df = load_runs([hand_built_run(tmp_path / "run", timing=True)])
    setup = timing_setup_text(timing_setup(df))
    assert setup == "Test GPU, batch 256, float32 (TF32 matmuls)"
    fig = plots.plot_wall_vs_macs(aggregate(df), setup)
    assert fig.axes[0].get_title() == "toy — timing on Test GPU, batch 256, float32 (TF32 matmuls)"
    # a run timed before dtype was recorded says so rather than guessing
    legacy = df.assign(params=df["params"].str.replace('"dtype":"float32",', "").str.replace(',"tf32":true', ""))
    assert timing_setup_text(timing_setup(legacy)) == "Test GPU, batch 256, dtype not recorded"
    assert timing_setup(df[~df["metric"].isin(["wall_rel", "throughput", "latency_ms", "latency_ms_p90"])]) is None


def test_timing_table_shows_the_timed_cost_host_syncs_and_images_timed_of_the_split(tmp_path):
    """Newer runs record the timed images' own cost (timed_macs_rel), the runner's host reads per block and, in
    params, how many test images were timed of the split: the table shows them (300 of 1000 timed here); the
    report aggregation leaves the new metrics alone."""
    from bench.results.summary import timing_table

    run = hand_built_run(tmp_path / "run", timing=True)
    df = pd.read_csv(run / "metrics.csv", dtype={"exit": "Int64"})
    timed = json.dumps({**json.loads(TIMED), "timed_images": 300, "test_images": 1000}, sort_keys=True,
                       separators=(",", ":"))
    df.loc[df["params"] == TIMED, "params"] = timed
    extra = []
    for seed in (0, 1):
        extra.append(_row(seed, "static", "host_syncs_per_block", 0.0, budget=None, params=timed, n=300))
        for method in ("threshold", "patience", "entropy"):
            extra += [_row(seed, method, "timed_macs_rel", 0.48 + 0.02 * seed, params=timed, n=300),
                      _row(seed, method, "host_syncs_per_block", 0.75, params=timed, n=300)]
    df = pd.concat([df, pd.DataFrame(extra, columns=METRIC_COLUMNS)], ignore_index=True)
    df.to_csv(run / "metrics.csv", index=False)
    loaded = load_runs([run])
    table = timing_table(loaded)
    lines = table.splitlines()
    assert lines[2] == ("| method | budget | macs_rel (test) | macs_rel (timed) | wall_rel | throughput (img/s) | "
                        "latency p50 (ms) | latency p90 (ms) | host syncs / block | n (throughput / latency) |")
    assert lines[4] == ("| static backbone | — | 1.000 | 1.000 | ref. | 1800 ± 0 | 3.50 ± 0.00 | 4.00 ± 0.00 | "
                        "0.00 ± 0.00 | 300 of 1000 / 64 |")
    assert lines[5] == ("| threshold | 0.5 | 0.505 ± 0.007 | 0.490 ± 0.014 | 0.450 ± 0.000 | 1050 ± 71 | "
                        "2.00 ± 0.00 | 3.00 ± 0.00 | 0.75 ± 0.00 | 300 of 1000 / 64 |")
    assert all(len(line.split(" | ")) == len(lines[2].split(" | ")) for line in lines[2:] if line.startswith("| "))
    assert not aggregate(loaded)["metric"].isin(["timed_macs_rel", "host_syncs_per_block"]).any()
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0


def test_report_on_a_real_run_writes_every_figure(tiny_run, capsys):
    before = _digest(tiny_run)
    assert main(["report", str(tiny_run)]) == 0
    md = capsys.readouterr().out
    assert "static backbone" in md and "| threshold |" in md and "ref." in md
    out = tiny_run / "report"  # default: the first run's report/ folder
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, name
    assert not (out / "wall_vs_macs.png").exists()  # no timing rows: skipped silently
    assert (out / "report.md").stat().st_size > 0 and (out / "report.tex").stat().st_size > 0
    after = _digest(tiny_run)
    assert {k: v for k, v in after.items() if not k.startswith("report")} == before


def assert_names_match_the_drawn_figures(df: pd.DataFrame, with_distribution: bool = True) -> list[str]:
    """``run_figure_names`` (a page written without figures) names exactly what ``run_figures`` draws."""
    import matplotlib
    import matplotlib.pyplot as plt

    from bench.results.report import choose_budget, exit_distribution, run_figure_names, run_figures

    matplotlib.use("Agg")
    agg = aggregate(df)
    chosen = choose_budget(agg) if with_distribution else None
    dist = exit_distribution(df, chosen) if chosen is not None else None
    drawn = run_figures(df, agg, dist, chosen)
    for fig in drawn.values():
        plt.close(fig)
    assert run_figure_names(df, agg, dist, chosen) == list(drawn)
    return list(drawn)


def test_figure_names_without_drawing_match_the_figures(tiny_run, tmp_path):
    timed = load_runs([hand_built_run(tmp_path / "timed", timing=True)])
    assert assert_names_match_the_drawn_figures(timed) == [*FIGURES, "wall_vs_macs"]
    assert assert_names_match_the_drawn_figures(timed, with_distribution=False) == [
        "accuracy_vs_cost", "ece_vs_cost", "conformal_vs_cost", "wall_vs_macs"]
    assert assert_names_match_the_drawn_figures(load_runs([tiny_run])) == FIGURES
    no_conformal = load_runs([tiny_run])
    no_conformal = no_conformal[~no_conformal["metric"].isin(["set_size", "coverage"])]
    assert "conformal_vs_cost" not in assert_names_match_the_drawn_figures(no_conformal)


def _not_a_dir(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    return [f], "is not a directory"


def _no_metrics(tmp_path):
    (tmp_path / "empty").mkdir()
    return [tmp_path / "empty"], "has no metrics.csv"


def _missing_column(tmp_path):
    run = hand_built_run(tmp_path / "run")
    df = pd.read_csv(run / "metrics.csv").drop(columns=["metric"])
    df.to_csv(run / "metrics.csv", index=False)
    return [run], "missing column(s) metric"


def _other_splits(tmp_path):
    a = hand_built_run(tmp_path / "a")
    b = hand_built_run(tmp_path / "b")
    df = pd.read_csv(b / "metrics.csv")
    df["split_sha256"] = "different"
    df.to_csv(b / "metrics.csv", index=False)
    return [a, b], "cannot be compared"


def _bad_budget(tmp_path):
    return [hand_built_run(tmp_path / "run")], "--budget 0.3 is not a budget"


@pytest.mark.parametrize("target", ["--out", "--page"])
@pytest.mark.parametrize("case", [_not_a_dir, _no_metrics, _missing_column, _other_splits, _bad_budget])
def test_user_errors_exit_2_and_write_nothing(tmp_path, capsys, case, target):
    paths, message = case(tmp_path)
    if case is _other_splits and target == "--page":  # a page reports each run on its own: nothing to compare
        paths, message = [paths[0], tmp_path / "missing"], "is not a directory"
    before = _digest(tmp_path)
    extra = ["--budget", "0.3"] if case is _bad_budget else []
    out = tmp_path / "out" if target == "--out" else tmp_path / "out" / "page.md"
    rc = main(["report", *map(str, paths), target, str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1  # one paragraph
    assert not (tmp_path / "out").exists()
    assert _digest(tmp_path) == before


def test_notebook_executes_headless(tiny_run, tmp_path):
    import nbclient  # pinned in requirements.txt: a missing install must fail here, not skip
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager

    # the kernel must be this venv's: ipykernel ships its spec under sys.prefix, and jupyter_client runs a
    # spec whose argv starts with "python" with sys.executable
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.resource_dir).resolve().is_relative_to(Path(sys.prefix).resolve()), spec.resource_dir
    nb = nbformat.read(ROOT / "results" / "figures.ipynb", as_version=4)
    old = os.environ.get("BENCH_RUN_DIRS")
    os.environ["BENCH_RUN_DIRS"] = str(tiny_run)
    try:
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                resources={"metadata": {"path": str(ROOT / "results")}}).execute()
    finally:
        if old is None:
            os.environ.pop("BENCH_RUN_DIRS")
        else:
            os.environ["BENCH_RUN_DIRS"] = old
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    assert any("static backbone" in o.get("data", {}).get("text/markdown", "") for o in outputs)


def test_results_page_from_hand_built_runs(tmp_path, capsys):
    a = with_run_json(hand_built_run(tmp_path / "runs" / "toy-run"))
    b = with_run_json(hand_built_run(tmp_path / "runs" / "jpeg-run"), dataset="cifar10-jpeg-q75",
                      command="python -m bench run --dataset cifar10-jpeg-q75 --device cuda",
                      device={"cpu_model": "Other CPU", "cpu_count": 16, "gpus": ["NVIDIA H100"], "threads": 4},
                      config={"device": "cuda"}, git_dirty=False)
    page = tmp_path / "site" / "results.md"
    argv = ["report", str(a), str(b), "--page", str(page)]
    assert main(argv) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    text = page.read_text()
    first = text.splitlines()[0]
    assert first.startswith("Generated by `bench report`")
    assert f"`python -m bench report {a} {b} --page {page}`" in first
    toy, jpeg = text.split(f"## toy — `{a}`")[1].split(f"## cifar10-jpeg-q75 — `{b}`")
    # the command and the machine, as run.json records them
    assert "```bash\npython -m bench run --methods threshold,entropy,patience,oracle --seeds 0,1\n```" in toy
    assert ("Machine: Test CPU 9000, 2 cores, 24 GiB RAM, no GPU · ran on cpu with 2 torch threads · torch 2.14.1, "
            "timm 1.0.31, python 3.11.7 · git 0123456789ab (uncommitted changes) · 2025-01-02 03:04:05 UTC · "
            "took 12 s.") in toy
    assert "Machine: Other CPU, 16 cores, NVIDIA H100 · ran on cuda with 4 torch threads" in jpeg
    assert "(uncommitted changes)" not in jpeg
    # one row per method x budget (plus the static backbone; each method's budgets in order), mean ± std over the
    # two seeds; bounds labelled
    rows = [line for line in toy.splitlines() if line.startswith("| toy |")]
    assert rows == ["| toy | static backbone | — | 0.9500 ± 0.0000 | 1.000 ± 0.000 | — | 2 |",
                    "| toy | threshold | 0.1 | infeasible | — | — | 2 |",
                    "| toy | threshold | 0.5 | 0.8500 ± 0.0707 | 0.505 ± 0.007 | 0.0250 ± 0.0071 | 2 |",
                    "| toy | patience | 0.5 | 0.8500 ± 0.0707 | 0.505 ± 0.007 | 0.0250 ± 0.0071 | 2 |",
                    "| toy | entropy | 0.5 | 0.0000 ± 0.0000 | 0.505 ± 0.007 | 0.0250 ± 0.0071 | 2 |",
                    "| toy | oracle (upper bound) | 0.5 | 1.0000 ± 0.0000 | 0.505 ± 0.007 | 0.0250 ± 0.0071 | 2 |"]
    assert sum(line.startswith("| cifar10-jpeg-q75 |") for line in jpeg.splitlines()) == 6
    # the lossy-JPEG warning under the JPEG run's table only
    assert "lossy JPEG" in jpeg and "lossy JPEG" not in toy
    # figures saved next to the page and linked relative to it
    for name in ("toy-run", "jpeg-run"):
        for fig in FIGURES:
            assert (page.parent / "figures" / f"{name}_{fig}.png").stat().st_size > 1000
        assert f"](figures/{name}_accuracy_vs_cost.png)" in text
    # the page alone (no figure drawn) has the same text and links
    from bench.results.page import build_page

    alone = tmp_path / "alone" / "results.md"
    assert build_page([a, b], alone, draw=False) == [alone] and not (alone.parent / "figures").exists()
    assert alone.read_text().splitlines()[1:] == text.splitlines()[1:]
    # rerunning gives byte-identical files
    before = _digest(page.parent)
    assert main(argv) == 0
    assert _digest(page.parent) == before
    # the page alone: no report folder written into the runs
    assert not (a / "report").exists() and not (b / "report").exists()


def test_results_page_without_run_json(tmp_path):
    run = hand_built_run(tmp_path / "run")
    page = tmp_path / "page.md"
    assert main(["report", str(run), "--page", str(page)]) == 0
    text = page.read_text()
    assert "Command: not recorded" in text and "Machine: not recorded" in text
    assert "| toy | threshold | 0.5 | 0.8500 ± 0.0707 |" in text


def test_provenance_records_a_retypable_command_and_the_machine():
    assert command_line(["/x/bench/__main__.py", "run", "--set", "a.b=c d"]) == "python -m bench run --set 'a.b=c d'"
    m = machine()
    assert m["cpu_model"] and m["cpu_count"] >= 1 and isinstance(m["gpus"], list) and "node" not in m


def _split_by_seed(whole: Path, base: Path, config: dict) -> list[Path]:
    """One folder per seed of a hand-built run, as a sweep whose seeds ran in separate sessions: the same config
    apart from the placement fields (seeds, out, argv), each with its own run id."""
    metrics = pd.read_csv(whole / "metrics.csv")
    dec = pd.read_csv(whole / "decisions.csv.gz")
    parts = []
    for seed in (0, 1):
        part = base / f"part-s{seed}"
        part.mkdir(parents=True)
        metrics[metrics["seed"] == seed].assign(run_id=f"r{seed}").to_csv(part / "metrics.csv", index=False)
        dec[dec["seed"] == seed].to_csv(part / "decisions.csv.gz", index=False)
        with_run_json(part, run_id=f"r{seed}", command=f"python -m bench run --seeds {seed} --out {part}",
                      config={**config, "seeds": [seed], "out": str(part), "argv": ["run", "--seeds", str(seed)]})
        parts.append(part)
    return parts


def test_a_sweep_split_over_runs_is_aggregated_as_one(tmp_path):
    whole = hand_built_run(tmp_path / "whole")
    cfg = {"device": "cpu", "dataset": "toy", "methods": ["threshold", "patience", "entropy", "oracle"]}
    parts = _split_by_seed(whole, tmp_path / "sweep", cfg)
    # the same labels (no run ids) and the same aggregate, over the two seeds, as the run that had both seeds
    merged, one = load_runs(parts), load_runs([whole])
    assert sorted(merged["label"].unique()) == sorted(one["label"].unique())
    cols = ["label", "budget", "metric", "n", "mean", "std"]
    a = aggregate(merged).sort_values(cols[:3]).reset_index(drop=True)[cols]
    b = aggregate(one).sort_values(cols[:3]).reset_index(drop=True)[cols]
    pd.testing.assert_frame_equal(a, b)
    assert a.loc[(a["label"] == "threshold") & (a["metric"] == "accuracy") & (a["budget"] == 0.5), "n"].item() == 2
    # one section on the page, naming both parts, their seeds and commands; the table over both seeds
    page = tmp_path / "page.md"
    assert main(["report", *map(str, parts), "--page", str(page)]) == 0
    text = page.read_text()
    assert text.count("\n## ") == 1 and f"## toy — `{parts[0]}`, `{parts[1]}`" in text
    assert "One sweep run in 2 parts" in text
    from bench.results.page import reader_command

    for seed, part in enumerate(parts):  # each part's command, as a reader can run it (a /tmp --out moved)
        cmd = reader_command(f"python -m bench run --seeds {seed} --out {part}")
        assert f"Seed {seed} (`{part}`):" in text and f"{cmd}\n" in text
        assert (f"--out results/runs/part-s{seed}" in cmd) == str(part).startswith("/tmp/")
    assert "| toy | threshold | 0.5 | 0.8500 ± 0.0707 | 0.505 ± 0.007 | 0.0250 ± 0.0071 | 2 |" in text


@pytest.mark.parametrize("change", ["other settings", "same seed", "no run.json"])
def test_runs_that_are_not_one_sweep_stay_apart(tmp_path, change):
    whole = hand_built_run(tmp_path / "whole")
    cfg = {"device": "cpu", "dataset": "toy", "methods": ["threshold", "patience", "entropy", "oracle"]}
    parts = _split_by_seed(whole, tmp_path / "sweep", cfg)
    if change == "other settings":  # e.g. another backbone recipe: a different experiment, not more seeds
        with_run_json(parts[1], run_id="r1", config={**cfg, "overrides": {"backbone": {"epochs": 3}}})
    elif change == "same seed":  # the same seed twice is a repeat, not a part
        m = pd.read_csv(whole / "metrics.csv")
        m[m["seed"] == 0].assign(run_id="r1").to_csv(parts[1] / "metrics.csv", index=False)
    else:
        (parts[1] / "run.json").unlink()
    labels = set(load_runs(parts)["label"])
    assert {"threshold [r0]", "threshold [r1]"} <= labels and "threshold" not in labels
    page = tmp_path / "page.md"
    assert main(["report", *map(str, parts), "--page", str(page)]) == 0
    text = page.read_text()
    assert text.count("\n## ") == 2 and "One sweep run in" not in text


def test_the_results_page_says_whether_the_gpu_target_was_measured():
    """Unmeasured until a run on the page has the device-streaming runner's timing rows on a ViT-S/16."""
    from bench.results.page import gpu_target_note

    cpu = pd.DataFrame({"metric": ["wall_rel", "host_syncs_per_block"], "backbone": ["vit-d6-w128-p4-32px"] * 2})
    old_gpu = pd.DataFrame({"metric": ["wall_rel"], "backbone": ["vit_small_patch16_224-pretrained-224px"]})
    new_gpu = pd.DataFrame({"metric": ["wall_rel", "host_syncs_per_block"],
                            "backbone": ["vit_small_patch16_224-pretrained-224px"] * 2})
    assert gpu_target_note([cpu, old_gpu]).startswith("GPU target, unmeasured so far")
    assert gpu_target_note([cpu, new_gpu]).startswith("GPU target: real early exit")


def test_page_commands_name_paths_a_reader_has():
    """A run's command on the results page names the shared data as a checkout's reader has it, drops the cache
    folder (it changes no number) and moves a /tmp output under results/runs; a command with nothing to change
    is shown exactly as recorded."""
    from bench.results.page import reader_command

    assert reader_command("python -m bench run --data-dir /work/shared/data/cifar10-jpeg.tar.gz --seeds 0 "
                          "--cache-dir /tmp/x/cache --out /tmp/x/fmnist") == (
        "python -m bench run --data-dir ../shared/data/cifar10-jpeg.tar.gz --seeds 0 --out results/runs/fmnist")
    kept = "python -m bench run --set jeidnn.lambdas=[0.1,1.0] --out results/runs/a"
    assert reader_command(kept) == kept
    # the memory benchmark's generated folders: where its generator puts them for a reader
    assert reader_command("python -m bench run --data-dir /root/.cache/bench/memory-flat/images-10k --out "
                          "results/runs/memory-flat/images-10k") == (
        "python -m bench run --data-dir '~/.cache/bench/memory-flat/images-10k' --out "
        "results/runs/memory-flat/images-10k")
    assert reader_command("python -m bench run --set 'unbalanced") == "python -m bench run --set 'unbalanced"
