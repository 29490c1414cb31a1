"""Sweeps as independent jobs: resume after an interruption, retries and failure reports, and the local and
Dask executors giving the same tables as a sequential run (with a Dask worker killed mid-sweep)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    (out / "jobs" / "seed1-entropy.pkl").unlink()
    (out / "jobs" / "seed0-static.pkl").write_bytes(b"truncated")  # a damaged job file is recomputed
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
    assert attempts.count((0, "bad")) == 3 and (tmp_path / "seed0-good.pkl").exists()
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
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "jobs").glob("*.pkl")}
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
        if len(list((out / "jobs").glob("*.pkl"))) >= n:
            break
        time.sleep(0.02)
    return len(list((out / "jobs").glob("*.pkl")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dask_cluster_with_a_worker_killed_mid_sweep(sequential, tmp_path):
    base, seq_out = sequential
    bindir = Path(sys.executable).parent
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    quiet = dict(cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], **quiet)]
    try:
        time.sleep(3)
        for _ in range(2):
            procs.append(subprocess.Popen([str(bindir / "dask"), "worker", address, "--nthreads", "1",
                                           "--host", "127.0.0.1", "--no-dashboard"], **quiet))
        out = tmp_path / "dask"
        sweep = subprocess.Popen([sys.executable, "-m", "bench", *SWEEP, "--executor", "dask", "--scheduler", address,
                                  "--cache-dir", str(base / "cache"), "--out", str(out)], **quiet)
        assert 1 <= _wait_for_jobs(out, 1, sweep) < 6  # mid-sweep: 6 jobs in all
        procs[1].send_signal(signal.SIGKILL)  # one worker dies mid-sweep; its tasks move to the other
        assert sweep.wait(timeout=300) == 0
        _same(seq_out, out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()


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
    assert {p.name for p in (out / "jobs").glob("*.pkl")} == {f"seed{s}-{m}.pkl" for s in (0, 1)
                                                              for m in ("static", "threshold")}


def test_full_disk_is_a_clear_error_and_earlier_results_stay(sequential, tmp_path, monkeypatch, capsys):
    import errno
    import shutil

    base, seq_out = sequential
    out = tmp_path / "full"
    shutil.copytree(seq_out, out)
    (out / "jobs" / "seed1-entropy.pkl").unlink()  # so the rerun has a job to do and results to write
    before = (out / "metrics.csv").read_bytes()

    def no_space(df, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module, "write_csv", no_space)
    rc = main([*SWEEP, "--cache-dir", str(base / "cache"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "rerun the same command to resume" in err
    assert (out / "metrics.csv").read_bytes() == before and (out / "jobs" / "seed1-entropy.pkl").exists()
