"""Where the jobs of a sweep run: in this process (``sequential``, the default), on a local process pool
(``local``, ``--workers N``) or on a Dask distributed cluster (``dask``, ``--scheduler tcp://HOST:PORT``).

Each finished job is written atomically to ``OUT/jobs/seed<S>-<method>.pkl`` (with the run id), so an
interrupted run (Ctrl-C, kill -9, a dead worker) loses only unfinished jobs, and rerunning the same command
skips finished ones. Failed jobs are retried ``--retries`` times, then reported together; the run exits 1.
Dask workers must see the same ``--cache-dir`` (a shared filesystem): the splits, backbones and features are
built before any job is submitted, and jobs only read them.
"""
from __future__ import annotations

import logging
import pickle
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from bench.base.errors import UserError
from bench.base.hashing import atomic_write

log_ = logging.getLogger(__name__)
EXECUTORS = ("sequential", "local", "dask")
Job = tuple[int, str]  # (seed, method name; "static" / "static@msdnet" are the static networks)


class JobFailures(UserError):
    """Some jobs failed after their retries; finished ones are kept for a resume."""

    exit_code = 1


def job_path(jobs_dir: Path, job: Job) -> Path:
    return Path(jobs_dir) / f"seed{job[0]}-{job[1]}.pkl"


def load_finished(path: Path, run_id: str) -> dict | None:
    """A finished job's result if its file is intact and belongs to this run; None otherwise."""
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)
        if payload.get("run_id") != run_id:
            raise ValueError(f"written by run {payload.get('run_id')}")
        return payload["result"]
    except Exception as e:  # truncated or foreign: recompute, never trust it
        log_.warning("job file %s is unusable (%s: %s); the job runs again", path, type(e).__name__, e)
        return None


def save_finished(path: Path, run_id: str, job: Job, result: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump({"run_id": run_id, "job": job, "result": result}, f)

    atomic_write(path, write)


def run_jobs(cfg, jobs: list[Job], jobs_dir: Path, log: Callable = print,
             job_fn: Callable | None = None) -> dict[Job, dict]:
    """Results of every job, from ``jobs_dir`` when finished earlier, else by running ``job_fn(cfg, seed,
    name)`` (default ``bench.pipeline.run.run_job``) on ``cfg.executor``."""
    if job_fn is None:
        from bench.pipeline.run import run_job as job_fn
    results: dict[Job, dict] = {}
    for job in jobs:
        r = load_finished(job_path(jobs_dir, job), cfg.run_id)
        if r is not None:
            results[job] = r
    todo = [j for j in jobs if j not in results]
    if results:
        log(f"resuming: {len(results)} of {len(jobs)} jobs already finished, {len(todo)} to run")
    if not todo:
        return results
    bar = tqdm(total=len(todo), desc=f"jobs ({cfg.executor})", unit="job", dynamic_ncols=True)

    def done(job: Job, result: dict) -> None:
        save_finished(job_path(jobs_dir, job), cfg.run_id, job, result)
        results[job] = result
        bar.update(1)

    runner = {"sequential": _sequential, "local": _local, "dask": _dask}[cfg.executor]
    failures = runner(cfg, todo, job_fn, done)
    bar.close()
    if failures:
        lines = "; ".join(f"seed {s} / {m}: {err}" for (s, m), err in failures.items())
        raise JobFailures(f"{len(failures)} of {len(jobs)} jobs failed after {cfg.retries + 1} attempt(s): {lines}. "
                          f"The {len(results)} finished jobs are kept in {jobs_dir}; fix the cause and rerun the "
                          "same command to run only the missing ones.")
    return results


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _sequential(cfg, todo, job_fn, done) -> dict:
    failures = {}
    for job in todo:
        for _ in range(cfg.retries + 1):
            try:
                result = job_fn(cfg, *job)
            except UserError:
                raise  # a user mistake fails the same way every time: report it at once
            except Exception as e:
                failures[job] = _describe(e)
                continue
            failures.pop(job, None)
            done(job, result)
            break
    return failures


def _local(cfg, todo, job_fn, done) -> dict:
    failures: dict = {}
    attempts = {job: 0 for job in todo}
    # spawn, not fork: torch's thread pools do not survive a fork safely
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(job_fn, cfg, *job): job for job in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:
                    attempts[job] += 1
                    failures[job] = _describe(e)
                    if attempts[job] <= cfg.retries:
                        pending[pool.submit(job_fn, cfg, *job)] = job
                    continue
                failures.pop(job, None)
                done(job, result)
    return failures


def _dask(cfg, todo, job_fn, done) -> dict:
    try:
        from distributed import Client
        from distributed import as_completed as dask_as_completed
    except ImportError:
        raise UserError("--executor dask needs dask[distributed] (pip install -r requirements.txt).") from None
    try:
        client = Client(cfg.scheduler, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise UserError(f"Could not reach the Dask scheduler at {cfg.scheduler} ({_describe(e)}). Start one with "
                        "`dask scheduler` and workers with `dask worker tcp://HOST:8786`, then pass "
                        "--scheduler tcp://HOST:8786.") from None
    # a GPU job asks for a GPU resource, so two never share one by accident (workers: --resources GPU=1)
    resources = {"GPU": 1} if cfg.device.startswith("cuda") else None
    failures = {}
    try:
        futures = {client.submit(job_fn, cfg, *job, key=f"bench-{cfg.run_id}-seed{job[0]}-{job[1]}", pure=False,
                                 retries=cfg.retries, resources=resources): job for job in todo}
        for fut in dask_as_completed(list(futures)):
            job = futures[fut]
            try:
                done(job, fut.result())
            except Exception as e:  # retries exhausted (a dead worker's tasks are rescheduled by the scheduler)
                failures[job] = _describe(e)
    finally:
        client.close()
    return failures
