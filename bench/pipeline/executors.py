"""Where the jobs of a sweep run: in this process (``sequential``, the default), on a local process pool
(``local``, ``--workers N``) or on a Dask distributed cluster (``dask``, ``--scheduler tcp://HOST:PORT``).

Each finished job is written atomically to ``OUT/jobs/seed<S>-<method>.npz`` (with the run id), so an
interrupted run (Ctrl-C, kill -9, a dead worker) loses only unfinished jobs, and rerunning the same command
skips finished ones. A job file is data only (JSON text and plain numeric/string arrays, read with
``allow_pickle=False``): nothing read back from a run folder can execute code, and a damaged or foreign file
is reported and its job recomputed. Failed jobs are retried ``--retries`` times, then reported together; the
run exits 1. Dask workers must see the same ``--cache-dir`` (a shared filesystem): the splits, backbones and
features are built before any job is submitted (the features by the workers, in index ranges:
``bench.pipeline.feature_ranges``), and jobs only read them. Workers import ``bench`` wherever
they start: install the project (``make setup`` runs ``pip install -e .``) in their environment.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from bench.base.errors import UserError
from bench.base.hashing import atomic_write

log_ = logging.getLogger(__name__)
EXECUTORS = ("sequential", "local", "dask")
Job = tuple[int, str]  # (seed, method name; "static" / "static@msdnet" are the static networks)


class JobFailures(UserError):
    """Some jobs failed after their retries; finished ones are kept for a resume."""

    exit_code = 1


JOB_FILE_FORMAT = 1
_ARRAY_KINDS = "biufU"  # bool, signed/unsigned int, float, unicode: arrays that load without pickle


def job_path(jobs_dir: Path, job: Job) -> Path:
    return Path(jobs_dir) / f"seed{job[0]}-{job[1]}.npz"


def _scalar(value, where: str):
    """``value`` as a JSON scalar (str, int, float, bool or None); numpy scalars become their Python values."""
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        value = value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{where} is a {type(value).__name__}; a job result holds only str/int/float/bool/None "
                    "values and 1-D numpy arrays")


def _array(value, where: str) -> np.ndarray:
    if value.dtype == object and all(isinstance(v, str) for v in value):
        value = value.astype(str)  # string sample ids kept as a unicode array (object arrays need pickle)
    if value.ndim != 1 or value.dtype.kind not in _ARRAY_KINDS:
        raise TypeError(f"{where} is a {value.ndim}-D {value.dtype} array; a job result holds only 1-D arrays of "
                        "bools, numbers or strings")
    return value


def encode_result(run_id: str, job: Job, result: dict) -> dict[str, np.ndarray]:
    """The arrays of a job file: ``meta`` (UTF-8 JSON: run id, job, metric rows, the scalar fields of each
    decision block) and one entry per decision array."""
    rows = []
    for i, row in enumerate(result["rows"]):
        rows.append({str(k): _scalar(v, f"rows[{i}][{k!r}]") for k, v in row.items()})
    decisions, arrays = [], {}
    for i, block in enumerate(result["decisions"]):
        spec = {"keys": [str(k) for k in block], "scalars": {}, "arrays": {}}
        for k, v in block.items():
            if isinstance(v, np.ndarray) and v.ndim > 0:
                name = f"d{i}_{len(spec['arrays'])}"
                arrays[name] = _array(v, f"decisions[{i}][{k!r}]")
                spec["arrays"][str(k)] = name
            else:
                spec["scalars"][str(k)] = _scalar(v, f"decisions[{i}][{k!r}]")
        decisions.append(spec)
    extra = sorted(set(result) - {"rows", "decisions"})
    if extra:
        raise TypeError(f"a job result holds only 'rows' and 'decisions', not {extra}")
    meta = {"format": JOB_FILE_FORMAT, "run_id": run_id, "job": [int(job[0]), str(job[1])], "rows": rows,
            "decisions": decisions}
    text = json.dumps(meta, separators=(",", ":"))  # NaN/inf as JSON's NaN/Infinity, read back by json.loads
    return {"meta": np.frombuffer(text.encode("utf-8"), dtype=np.uint8), **arrays}


def _check_scalars(d, where: str) -> dict:
    if not isinstance(d, dict) or not all(v is None or isinstance(v, (str, bool, int, float)) for v in d.values()):
        raise ValueError(f"{where} is not a flat record of scalars")
    return d


def read_job_file(path: Path) -> dict:
    """``{"run_id", "job", "result"}`` of a job file, read with ``allow_pickle=False`` (nothing in it can run
    code). Raises (ValueError, OSError, zipfile.BadZipFile, ...) when the file is not an intact job file."""
    archive = np.load(path, allow_pickle=False)  # a pickle, or an object array inside an archive, raises here
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    with archive:
        meta = archive["meta"]
        if meta.dtype != np.uint8 or meta.ndim != 1:
            raise ValueError("no job metadata in the archive")
        meta = json.loads(meta.tobytes().decode("utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != JOB_FILE_FORMAT:
            raise ValueError(f"not a job file of format {JOB_FILE_FORMAT}")
        rows = [_check_scalars(r, f"rows[{i}]") for i, r in enumerate(meta["rows"])]
        decisions = []
        for i, spec in enumerate(meta["decisions"]):
            scalars, names = _check_scalars(spec["scalars"], f"decisions[{i}]"), spec["arrays"]
            block = {}
            for k in spec["keys"]:
                if k in names:
                    a = archive[names[k]]
                    if a.ndim != 1 or a.dtype.kind not in _ARRAY_KINDS:
                        raise ValueError(f"decisions[{i}][{k!r}] is a {a.ndim}-D {a.dtype} array")
                    block[k] = a
                else:
                    block[k] = scalars[k]
            decisions.append(block)
    job = meta["job"]
    return {"run_id": meta["run_id"], "job": (job[0], job[1]), "result": {"rows": rows, "decisions": decisions}}


def load_finished(path: Path, run_id: str, job: Job | None = None) -> dict | None:
    """A finished job's result if its file is intact and belongs to this run (and job); None otherwise."""
    if not path.exists():
        return None
    try:
        payload = read_job_file(path)
        if payload["run_id"] != run_id:
            raise ValueError(f"written by run {payload['run_id']}")
        if job is not None and payload["job"] != (job[0], job[1]):
            raise ValueError(f"holds job {payload['job']}")
        return payload["result"]
    except Exception as e:  # truncated, foreign or planted: recompute, never trust it
        log_.warning("job file %s is unusable (%s: %s); the job runs again", path, type(e).__name__, e)
        return None


def save_finished(path: Path, run_id: str, job: Job, result: dict) -> None:
    arrays = encode_result(run_id, job, result)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez given a name would append ".npz" to it
            np.savez(f, allow_pickle=False, **arrays)

    atomic_write(path, write)


def _warn_old_job_files(jobs_dir: Path) -> None:
    old = sorted(p.name for p in Path(jobs_dir).glob("*.pkl"))
    if old:
        log_.warning("%d job file(s) in the old pickle format in %s are ignored, never read (a pickle can run "
                     "code): %s; those jobs run again", len(old), jobs_dir, ", ".join(old))


def run_jobs(cfg, jobs: list[Job], jobs_dir: Path, log: Callable, job_fn: Callable) -> dict[Job, dict]:
    """Results of every job, from ``jobs_dir`` when finished earlier, else by running ``job_fn(cfg, seed,
    name)`` (``bench.pipeline.run.run_job`` for a sweep; it must be importable by worker processes) on
    ``cfg.executor``. ``job_fn`` returns ``{"rows": [flat dicts of str/int/float/bool/None], "decisions":
    [dicts of such scalars and 1-D numpy arrays]}``."""
    results: dict[Job, dict] = {}
    run_id = cfg.run_id  # derived from the whole configuration (it checks every network's config): once
    _warn_old_job_files(jobs_dir)
    for job in jobs:
        r = load_finished(job_path(jobs_dir, job), run_id, job)
        if r is not None:
            results[job] = r
    todo = [j for j in jobs if j not in results]
    if results:
        log(f"resuming: {len(results)} of {len(jobs)} jobs already finished, {len(todo)} to run")
    if not todo:
        return results
    bar = tqdm(total=len(todo), desc=f"jobs ({cfg.executor})", unit="job", dynamic_ncols=True)

    def done(job: Job, result: dict) -> None:
        save_finished(job_path(jobs_dir, job), run_id, job, result)
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


def dask_client(cfg):
    """A ``distributed.Client`` of ``cfg.scheduler``; a UserError when dask is missing or the scheduler is not
    reachable. The caller closes it."""
    try:
        from distributed import Client
    except ImportError:
        raise UserError("--executor dask needs dask[distributed] (pip install -r requirements.txt).") from None
    try:
        return Client(cfg.scheduler, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise UserError(f"Could not reach the Dask scheduler at {cfg.scheduler} ({_describe(e)}). Start one with "
                        "`dask scheduler` and workers with `dask worker tcp://HOST:8786`, then pass "
                        "--scheduler tcp://HOST:8786.") from None


def dask_resources(device: str) -> dict | None:
    """A GPU task asks for a GPU resource, so two never share one by accident (workers: --resources GPU=1)."""
    return {"GPU": 1} if device.startswith("cuda") else None


def _dask(cfg, todo, job_fn, done) -> dict:
    client = dask_client(cfg)
    from distributed import as_completed as dask_as_completed

    resources = dask_resources(cfg.device)
    failures = {}
    run_id = cfg.run_id
    try:
        futures = {client.submit(job_fn, cfg, *job, key=f"bench-{run_id}-seed{job[0]}-{job[1]}", pure=False,
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
