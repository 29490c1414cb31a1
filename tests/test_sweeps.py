"""Sweeps as independent jobs: resume after an interruption, retries and failure reports, job files that are
data only (a planted pickle never runs), and the local executor giving the same tables as a sequential run.
The Dask executor (workers started outside the repository, one killed mid-sweep) is in test_packaging.py."""
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bench.pipeline.run as run_module
from bench.cli import main
from bench.pipeline.executors import JobFailures, run_jobs
from bench.results.files import read_metrics
from bench.pipeline.run import RunConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "backbone.depth=3", "--set", "backbone.embed_dim=32", "--set", "backbone.num_heads=2",
        "--set", "backbone.epochs=3", "--set", "threshold.epochs=5", "--set", "entropy.epochs=5"]
SWEEP = ["run", "--methods", "threshold,entropy", "--seeds", "0,1", "--budgets", "0.4,0.7", "--threads", "1", *TINY]


def _tables(out: Path):
    return read_metrics(out), pd.read_csv(out / "decisions.csv.gz")


def _same(a: Path, b: Path) -> None:
    for x, y in zip(_tables(a), _tables(b)):
        pd.testing.assert_frame_equal(x, y)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    out = base / "seq"
    assert main([*SWEEP, "--cache-dir", str(base / "cache"), "--out", str(out)]) == 0
    return base, out


def test_rerun_skips_finished_jobs_and_redoes_only_missing_ones(sequential, monkeypatch):
    base, out = sequential
    calls = []
    real = run_module.run_job
    monkeypatch.setattr(run_module, "run_job", lambda cfg, s, m: calls.append((s, m)) or real(cfg, s, m))
    before = _tables(out)
    assert main([*SWEEP, "--cache-dir", str(base / "cache"), "--out", str(out)]) == 0
    assert calls == []  # everything resumed from OUT/jobs
    (out / "jobs" / "seed1-entropy.npz").unlink()
    (out / "jobs" / "seed0-static.npz").write_bytes(b"truncated")  # a damaged job file is recomputed
    assert main([*SWEEP, "--cache-dir", str(base / "cache"), "--out", str(out)]) == 0
    assert sorted(calls) == [(0, "static"), (1, "entropy")]
    for x, y in zip(before, _tables(out)):
        pd.testing.assert_frame_equal(x, y)


def test_failed_jobs_are_retried_then_reported_and_finished_ones_kept(tmp_path):
    cfg = RunConfig(methods=["threshold"], retries=2)
    attempts = []

    def job(cfg, seed, name):
        attempts.append((seed, name))
        if name == "bad":
            raise RuntimeError("boom")
        return {"rows": [], "decisions": []}

    with pytest.raises(JobFailures, match=r"1 of 2 jobs failed after 3 attempt\(s\): seed 0 / bad: RuntimeError: boom"):
        run_jobs(cfg, [(0, "good"), (0, "bad")], tmp_path, log=lambda *_: None, job_fn=job)
    assert attempts.count((0, "bad")) == 3 and (tmp_path / "seed0-good.npz").exists()
    assert JobFailures.exit_code == 1


def test_kill_9_loses_only_unfinished_jobs(sequential, tmp_path):
    base, seq_out = sequential
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "bench", *SWEEP, "--cache-dir", str(base / "cache"), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert 2 <= _wait_for_jobs(out, 2, proc) < 6  # killed mid-sweep: 6 jobs in all
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "jobs").glob("*.npz")}
    assert finished and not (out / "metrics.csv").exists()
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
    for name, mtime in finished.items():  # nothing already finished was recomputed
        assert (out / "jobs" / name).stat().st_mtime_ns == mtime
    _same(seq_out, out)


def test_local_process_pool_matches_sequential(sequential, tmp_path):
    base, seq_out = sequential
    out = tmp_path / "local"
    assert main([*SWEEP, "--executor", "local", "--workers", "2", "--cache-dir", str(base / "cache"),
                 "--out", str(out)]) == 0
    _same(seq_out, out)


def _wait_for_jobs(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until ``out/jobs`` holds at least ``n`` finished jobs (or the process ends); return how many."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "jobs").glob("*.npz"))) >= n:
            break
        time.sleep(0.02)
    return len(list((out / "jobs").glob("*.npz")))


def test_nan_logits_fail_the_job_with_a_message_and_keep_the_rest(sequential, tmp_path, monkeypatch, capsys):
    from methods.entropy import EntropyGate

    base, _ = sequential
    real = EntropyGate.exit_logits
    monkeypatch.setattr(EntropyGate, "exit_logits",
                        lambda self, split, point=None: real(self, split, point) * float("nan"))
    out = tmp_path / "nan"
    rc = main([*SWEEP, "--cache-dir", str(base / "cache"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "2 of 6 jobs failed" in err and "entropy: ValueError" in err and "NaN or infinite" in err
    assert "Traceback" not in err and not (out / "metrics.csv").exists()
    assert {p.name for p in (out / "jobs").glob("*.npz")} == {f"seed{s}-{m}.npz" for s in (0, 1)
                                                              for m in ("static", "threshold")}


def test_full_disk_is_a_clear_error_and_earlier_results_stay(sequential, tmp_path, monkeypatch, capsys):
    import errno

    base, seq_out = sequential
    out = tmp_path / "full"
    shutil.copytree(seq_out, out)
    (out / "jobs" / "seed1-entropy.npz").unlink()  # so the rerun has a job to do and results to write
    before = (out / "metrics.csv").read_bytes()

    def no_space(df, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module, "write_csv", no_space)
    rc = main([*SWEEP, "--cache-dir", str(base / "cache"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "rerun the same command to resume" in err
    assert (out / "metrics.csv").read_bytes() == before and (out / "jobs" / "seed1-entropy.npz").exists()


class _Planted:
    """Unpickling this creates ``marker``: stands for code someone planted in a run folder."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_planted_pickles_in_the_jobs_folder_never_run(sequential, tmp_path, monkeypatch, caplog):
    base, seq_out = sequential
    out, marker = tmp_path / "planted", tmp_path / "code-ran"
    shutil.copytree(seq_out, out)
    jobs = out / "jobs"
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    (jobs / "seed0-static.npz").unlink()  # a job file in the old pickle format: never read
    (jobs / "seed0-static.pkl").write_bytes(pickle.dumps({"run_id": run_id, "job": (0, "static"),
                                                          "result": _Planted(marker)}))
    (jobs / "seed1-entropy.npz").write_bytes(pickle.dumps(_Planted(marker)))  # a pickle named like a job file
    with open(jobs / "seed0-threshold.npz", "wb") as f:  # a real archive whose entry is a pickled object array
        np.savez(f, meta=np.array([_Planted(marker)], dtype=object))
    calls = []
    real = run_module.run_job
    monkeypatch.setattr(run_module, "run_job", lambda cfg, s, m: calls.append((s, m)) or real(cfg, s, m))
    with caplog.at_level(logging.WARNING, logger="bench.pipeline.executors"):
        assert main([*SWEEP, "--cache-dir", str(base / "cache"), "--out", str(out)]) == 0
    assert not marker.exists()
    assert sorted(calls) == [(0, "static"), (0, "threshold"), (1, "entropy")]  # recomputed, the rest resumed
    log = caplog.text
    for name in ("seed1-entropy.npz", "seed0-threshold.npz"):
        assert f"job file {jobs / name} is unusable" in log and "the job runs again" in log
    assert "seed0-static.pkl" in log and "never read" in log
    _same(seq_out, out)
    assert not marker.exists()
