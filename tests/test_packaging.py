"""The project as installed by `make setup` (pip install -e .): `bench` imports from any directory, the `bench`
console script works, and the README's Dask recipe runs with workers started outside the repository (one of
them killed mid-sweep). Files written by the harness honour the user's umask (a shared cache stays readable)."""
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bench.base.hashing import atomic_write, atomic_write_text
from bench.cli import main
from tests.test_sweeps import SWEEP, _same, _wait_for_jobs

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the virtualenv's bin/: python, dask, bench
INSTALL_HINT = "run make setup (pip install -e .)"


def _outside(tmp_path: Path) -> dict:
    """Popen arguments for a process started outside the repository, with no PYTHONPATH to find it."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    assert ROOT not in cwd.resolve().parents, "the temporary directory must lie outside the repository"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return dict(cwd=cwd, env=env)


def _require_installed(tmp_path: Path) -> None:
    """Fail (not skip: CI installs the project) unless this checkout's packages import from elsewhere."""
    probe = ("from importlib.util import find_spec as f; "  # where each package comes from, without importing torch
             "print(*(f(name).origin for name in ('bench', 'datasets', 'methods')))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       **_outside(tmp_path))
    if r.returncode != 0:
        pytest.fail(f"`bench` does not import outside the repository: {INSTALL_HINT}.\n{r.stderr[-2000:]}")
    for f in r.stdout.split():
        if ROOT not in Path(f).resolve().parents:
            pytest.fail(f"outside the repository, {f} is imported instead of this checkout's: {INSTALL_HINT}.")


def test_project_imports_and_console_script_runs_outside_the_repository(tmp_path):
    _require_installed(tmp_path)
    script = BIN / "bench"
    assert script.exists(), f"no console script {script}: {INSTALL_HINT}"
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, **_outside(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "run" in r.stdout and "usage" in r.stdout.lower()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"data")

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "cache" / "new.bin", write)  # a new file
        (tmp_path / "old.txt").write_text("x")
        os.chmod(tmp_path / "old.txt", 0o600)
        atomic_write_text(tmp_path / "old.txt", "replaced")  # replacing a file: the new one's mode
    finally:
        os.umask(old)
    for path in (tmp_path / "cache" / "new.bin", tmp_path / "old.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, (path, oct(path.stat().st_mode))
    assert (tmp_path / "old.txt").read_text() == "replaced"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cache", "new.bin", "old.txt"]  # no temporary left


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


class DaskProcesses:
    """A `dask scheduler` and two `dask worker --nthreads 1` processes ("worker-a", "worker-b") started outside the
    repository, as the README tells users (``nanny=False``: the worker process is the one computing, so a SIGKILL
    lands on it), plus whatever else ``start`` launches; every log is kept for ``report`` and every process is
    killed on leaving."""

    def __init__(self, tmp_path: Path, nanny: bool = True):
        self.tmp_path, self.outside = tmp_path, _outside(tmp_path)
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.workers = {name: f"tcp://127.0.0.1:{_free_port()}" for name in ("worker-a", "worker-b")}
        self.nanny = nanny
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        with open(self.tmp_path / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT,
                                                **{**self.outside, **({"env": env} if env else {})})
        return self.procs[name]

    def report(self) -> str:
        return "\n".join(f"--- {name} ---\n{_tail(self.tmp_path / f'{name}.log')}" for name in self.procs)

    def __enter__(self) -> "DaskProcesses":
        _require_installed(self.tmp_path)
        self.start("scheduler", str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                   self.address.rsplit(":", 1)[1], "--no-dashboard")
        for name, at in self.workers.items():
            self.start(name, str(BIN / "dask"), "worker", self.address, "--nthreads", "1", "--host", "127.0.0.1",
                       "--worker-port", at.rsplit(":", 1)[1], "--no-dashboard",
                       *(() if self.nanny else ("--no-nanny",)))
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=30)


def test_readme_dask_recipe_with_workers_outside_the_repository_and_one_killed(tmp_path):
    """`dask scheduler`, two `dask worker tcp://HOST:PORT --nthreads 1` and `python -m bench run --executor dask`,
    all started outside the repository without PYTHONPATH, as the README tells users; one worker is killed
    mid-sweep (its tasks move to the other). The tables equal a sequential run's."""
    with DaskProcesses(tmp_path) as cluster:
        # the sequential reference (which also builds the shared cache) while the cluster starts
        cache = tmp_path / "cache"
        assert main([*SWEEP, "--cache-dir", str(cache), "--out", str(tmp_path / "seq")]) == 0
        from distributed import Client

        with Client(cluster.address, timeout="30s") as client:  # nothing else: the workers import what jobs need
            client.wait_for_workers(2, timeout=60)
        out = tmp_path / "dask"
        sweep = cluster.start("sweep", sys.executable, "-m", "bench", *SWEEP, "--executor", "dask", "--scheduler",
                              cluster.address, "--cache-dir", str(cache), "--out", str(out))
        assert 1 <= _wait_for_jobs(out, 1, sweep) < 6, cluster.report()  # mid-sweep: 6 jobs in all
        cluster.procs["worker-a"].send_signal(signal.SIGKILL)  # one worker dies mid-sweep; its tasks move on
        assert sweep.wait(timeout=300) == 0, cluster.report()
        _same(tmp_path / "seq", out)
