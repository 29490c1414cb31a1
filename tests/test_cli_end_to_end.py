"""The command line: one real end-to-end run on digits (tiny backbone), result files that agree with each
other, and clear exit-2 errors for user mistakes."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.measure import metrics as M
from bench.cli import main
from bench.results.files import DECISION_COLUMNS, METRIC_COLUMNS, read_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "backbone.depth=3", "--set", "backbone.embed_dim=32", "--set", "backbone.num_heads=2",
        "--set", "backbone.epochs=3", "--set", "threshold.epochs=5", "--set", "entropy.epochs=5"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_cache):
    base = tmp_path_factory.mktemp("e2e")
    out = base / "out"
    rc = main(["run", "--methods", "threshold,entropy", "--seeds", "0,1", "--budgets", "0.02,0.4,0.7,1.0",
               "--cache-dir", str(shared_cache), "--out", str(out), *TINY])
    assert rc == 0
    return out


def test_run_writes_the_contract_files(run_dir):
    assert {p.name for p in run_dir.iterdir()} >= {"metrics.csv", "decisions.csv.gz", "run.json", "summary.md"}
    df = read_metrics(run_dir)
    assert list(df.columns) == METRIC_COLUMNS
    assert set(df["method"]) == {"static", "threshold", "entropy"} and set(df["seed"]) == {0, 1}
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "complete" and run["run_id"] == df["run_id"].iloc[0]
    assert set(run["seeds"]) == {"0", "1"} and all(len(s["split_sha256"]) == 64 for s in run["seeds"].values())
    for seed, info in run["seeds"].items():  # every row records the hash of its seed's splits
        assert set(df[df["seed"] == int(seed)]["split_sha256"]) == {info["split_sha256"]}
    assert run["versions"]["torch"].startswith("2.14.1") and "command" in run and "git_sha" in run
    for params in df["params"]:
        assert json.loads(params) == json.loads(json.dumps(json.loads(params), sort_keys=True))


def test_accuracy_and_ece_recompute_from_decisions(run_dir):
    df = read_metrics(run_dir)
    dec = pd.read_csv(run_dir / "decisions.csv.gz")
    assert list(dec.columns) == DECISION_COLUMNS
    overall = df[df["exit"].isna() & df["budget"].notna()]
    checked = 0
    for (split, seed, method, budget), g in dec.groupby(["split", "seed", "method", "budget"]):
        row = overall[(overall.split == split) & (overall.seed == seed) & (overall.method == method)
                      & np.isclose(overall.budget, budget)].set_index("metric")["value"]
        correct = (g["pred"] == g["target"]).to_numpy()
        assert row["accuracy"] == pytest.approx(correct.mean(), abs=1e-6)
        assert row["ece"] == pytest.approx(M.ece(g["confidence"].to_numpy(), correct), abs=1e-6)
        checked += 1
    assert checked == 2 * 2 * 2 * 3  # splits x seeds x methods x feasible budgets


def test_budgets_respected_and_infeasible_rows(run_dir):
    df = read_metrics(run_dir)
    overall = df[df["exit"].isna() & (df["method"] != "static")]
    tiny = overall[np.isclose(overall.budget, 0.02)]
    assert len(tiny) and tiny["value"].isna().all()
    assert all(json.loads(p)["infeasible"] for p in tiny["params"])
    val = overall[(overall.split == "val") & (overall.metric == "macs_rel") & overall.value.notna()]
    assert (val["value"] <= val["budget"] + 1e-9).all()
    assert val["value"].min() < 0.75  # early exit really saves compute
    shares = df[(df.metric == "exit_share")].groupby(["split", "seed", "method", "budget"])["value"].sum()
    assert np.allclose(shares, 1.0)


def test_static_row_equals_last_exit_head(run_dir):
    df = read_metrics(run_dir)
    static = df[(df.method == "static") & (df.metric == "accuracy")].set_index(["split", "seed"])["value"]
    heads = df[(df.metric == "head_accuracy") & (df.method == "threshold")]
    last = heads[heads["exit"] == heads["exit"].max()].set_index(["split", "seed"])["value"]
    assert np.allclose(static.sort_index(), last.sort_index())


def test_same_command_reuses_out_and_other_config_is_refused(run_dir, capsys, shared_cache):
    before = (run_dir / "metrics.csv").read_bytes()
    rc = main(["run", "--methods", "threshold", "--out", str(run_dir), "--cache-dir", str(shared_cache),
               *TINY[:8], "--set", "threshold.epochs=5"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "holds a run of another configuration" in err
    assert (run_dir / "metrics.csv").read_bytes() == before  # earlier results intact


@pytest.mark.parametrize("args, message", [
    (["--methods", "threshhold"], "Did you mean 'threshold'"),
    (["--dataset", "cifar1000"], "Unknown dataset 'cifar1000'"),
    (["--budgets", "0.5,1.5"], "outside (0, 1]"),
    (["--set", "threshold.epochs"], "malformed"),
    (["--set", "threshold.nope=1"], "has no field 'nope'"),
    (["--set", "jeidnn.lam=1"], "neither 'backbone' nor one of the methods"),
    (["--set", "backbone.depthh=2"], "backbone has no field 'depthh'"),
    (["--set", "threshold.epochs=abc"], "--set threshold.epochs=abc: epochs must be an integer"),
    (["--set", "jeidnn.lambdas=0.1", "--methods", "jeidnn"], "lambdas must be a list of numbers, e.g. [1, 2]"),
    (["--set", "backbone.augment=rotate"], "augment must be one of none, crop, crop_flip"),
    (["--set", "backbone.msdnet.epochs=2"], "'msdnet' is not a network of this run"),
    (["--backbone", "resnet50"], "Unknown backbone 'resnet50'"),
    (["--device", "cuda"], "no CUDA device"),
    (["--seeds", "0,-1"], "distinct non-negative integers"),
    (["--pretrained"], "Pretrained weights for 'vit_tiny_patch16_224' could not be loaded"),  # offline hub
    (["--set", "backbone.num_heads=5"], "embed_dim must be divisible by"),
])
def test_user_errors_exit_2_with_a_message(tmp_path, capsys, args, message):
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    rc = main(["run", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "c" / "backbones").exists()  # validated before any expensive work


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--seeds", "a,b"])
    assert e.value.code == 2 and "comma-separated list of integers" in capsys.readouterr().err


def test_cifar100_offline_fails_fast_with_instructions(tmp_path):
    """With and without --no-download (the two run side by side): exit 2, the file, the folders and --data-dir
    named, well within a minute."""
    env = {**os.environ, "BENCH_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "bench", "run", "--methods", "threshold", "--dataset", "cifar100",
                               "--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / f"c{i}"),
                               "--out", str(tmp_path / f"o{i}"), *extra],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, extra in enumerate((["--no-download"], []))]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert "cifar-100-python.tar.gz" in err and "--data-dir" in err
        assert str(tmp_path) in err and "Traceback" not in err
    assert "--no-download" in err or "download" in err
    assert time.time() - t0 < 60


def test_conformal_rows_for_every_feasible_budget(run_dir):
    df = read_metrics(run_dir)
    cov = df[(df.metric == "coverage") & (df.method == "threshold")]
    params = cov["params"].map(json.loads)
    combos = {(p["score"], p["scope"], p["alpha"]) for p in params}
    assert combos == {(s, sc, a) for s in ("lac", "aps") for sc in ("global", "per_exit") for a in (0.05, 0.1)}
    assert len(cov) == 2 * 3 * 8  # seeds x feasible budgets x (score, scope, alpha)
    assert (cov["value"] > 0.75).all()  # 360 test samples: coverage sits near its nominal 0.9-0.95
    size = df[(df.metric == "set_size") & (df.method == "threshold")]["value"]
    assert (size >= 0.5).all() and (size <= 10).all()


def test_timing_rows(tmp_path, shared_cache):
    rc = main(["run", "--methods", "threshold", "--budgets", "0.5,1.0", "--timing", "--timing-batch", "64",
               "--cache-dir", str(shared_cache), "--out", str(tmp_path / "out"), *TINY[:10]])
    assert rc == 0
    df = read_metrics(tmp_path / "out")
    t = df[df.metric.isin(["latency_ms", "latency_ms_p90", "throughput", "wall_rel"])]
    # per budget the method's four timings, and the static backbone's throughput and batch-1 p50/p90 once
    assert len(t) == 2 * 4 + 3 and (t["value"] > 0).all() and (t["split"] == "test").all()
    assert set(t.loc[t.method == "static", "metric"]) == {"latency_ms", "latency_ms_p90", "throughput"}
    p = json.loads(t.loc[t.method == "threshold", "params"].iloc[0])
    assert p["timing_batch"] == 64 and p["torch"].startswith("2.14.1") and p["device"] and p["dtype"] == "float32"
    assert (t.loc[t.metric.str.startswith("latency"), "n"] == 64).all()  # the images timed one by one
    assert (t.loc[t.metric == "throughput", "n"] == 360).all()  # the whole test split


def test_run_json_names_the_code_of_the_run_start(tmp_path, shared_cache, monkeypatch):
    """A commit made while a run trains does not become the run's provenance: the state is taken at the start."""
    import bench.pipeline.run as run_module
    import bench.results.files as files

    states = iter([{"git_sha": "at-start", "git_dirty": False}])
    monkeypatch.setattr(run_module, "source_state", lambda: next(states))
    monkeypatch.setattr(files, "source_state", lambda: {"git_sha": "at-end", "git_dirty": True})
    rc = main(["run", "--methods", "threshold", "--budgets", "1.0", "--cache-dir", str(shared_cache),
               "--out", str(tmp_path / "out"), *TINY[:10]])
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert rc == 0 and (run["git_sha"], run["git_dirty"]) == ("at-start", False)


def test_ls_lists_methods_and_datasets(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in ("threshold", "entropy", "digits", "fashion-mnist", "cifar100-lt", "svhn"):
        assert name in out


def test_same_command_and_threads_give_identical_rows(tmp_path):
    """Two runs from empty caches (backbone retrained, features recomputed, heads refitted) with the same seeds
    and --threads produce identical metric rows and decisions."""
    import torch

    threads = torch.get_num_threads()
    frames = []
    for i in (0, 1):
        out = tmp_path / f"out{i}"
        assert main(["run", "--methods", "threshold,entropy", "--threads", "1", "--cache-dir", str(tmp_path / f"c{i}"),
                     "--out", str(out), *TINY]) == 0
        frames.append((read_metrics(out), pd.read_csv(out / "decisions.csv.gz")))
    torch.set_num_threads(threads)  # --threads is process-wide; leave the session as it was
    pd.testing.assert_frame_equal(frames[0][0], frames[1][0])
    pd.testing.assert_frame_equal(frames[0][1], frames[1][1])


def test_unwritable_out_is_a_user_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc = main(["run", "--out", str(blocker / "out"), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and "Cannot write to --out" in err and "Traceback" not in err
    assert blocker.read_text() == "not a directory"
