"""Sharded feature extraction on a Dask cluster (``--executor dask``): the backbone's forward pass over the
dataset's train and test arrays, cut into index ranges that the workers compute side by side and write to the
shared ``--cache-dir``. The values and files are the sequential build's (``bench.pipeline.features``).

How it goes. ``load_task`` in the driver passes ``dask_extractor(cfg, checkpoint)`` to
``load_or_compute_features``; when an array's shards are missing it is called while the driver holds the feature
entry's lock (``exclusive``), so one process produces the entry and other runs wait for it. ``extract_arrays``:

1. plans each missing array as consecutive ranges [start, stop) of ``range_rows`` rows (the last one shorter):
   ``$BENCH_FEATURE_RANGE_ROWS`` (default ``RANGE_ROWS`` = 4096) rounded up to a multiple of the eval batch size,
   so every batch is one the whole pass computes and the rows are bit-identical (``write_feature_range``). The
   size is fixed, not derived from the number of workers, so a rerun on a cluster of another size reuses the
   ranges an earlier attempt finished. 4096 rows make 13 ranges of CIFAR's 50k train images and 313 of
   ImageNet's 1.28M: a few per worker on usual clusters, and a killed worker loses at most one range's work;
2. submits one task per range not finished yet (``compute_range``; ``--retries`` retries; on CUDA each asks for
   one ``GPU`` resource). A worker writes ``<entry>/ranges/<array>-<start:08d>-<stop:08d>.npy`` ([K, n, D]
   float32) into a temporary file (``.NAME.<random>.tmp``) that is renamed when complete, then ``NAME.json``
   beside it (key, shape, size, sha256), written the same way. A range is finished when its ``.json`` names the
   entry's key and the range's shape and the ``.npy`` has that size and sha256; a worker killed mid-range leaves
   at most a temporary file (removed by the next driver that plans ranges, never read) and the scheduler runs
   the range again on another worker. A range that still fails stops the run (``FeatureRangeFailures``, exit 1)
   naming it; the finished ranges stay, and rerunning the command computes only the others;
3. when every range is finished, copies the range files into the array's K block shards chunk by chunk
   (``GATHER_BYTES`` at a time: no array is ever whole in memory) through ``write_array``, so the shards and
   header are the sequential build's, then deletes the ``ranges/`` folder. The split files follow as usual.

Who reads what. A task carries a ``RangeSource``: names, absolute paths, keys and shapes, no images and no
model. The worker reloads the dataset by name (``load_dataset(..., download=False)``, as jobs do, once per worker
process) and checks that it is the driver's (array shapes and the labels' sha256), instead of receiving the
arrays: a streamed set (ImageNet) is its files anyway, and shipping an in-memory CIFAR to every range task
would push 150 MB through the scheduler per task. The backbone comes from the checkpoint cache
(``load_checkpoint``: ``torch.load(weights_only=True)``, the key checked), never a pickled model. Workers
therefore need the driver's ``--cache-dir`` (and data) at the same paths, as jobs do. Nothing read from a
range file runs code: ``np.load(allow_pickle=False)`` and JSON.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from bench.backbones.base import BACKBONES
from bench.base.errors import UserError
from bench.base.hashing import atomic_write, atomic_write_text, file_sha256
from bench.pipeline.backbone_cache import load_checkpoint
from bench.pipeline.executors import dask_client, dask_resources
from bench.pipeline.features import DTYPE, FORMAT, GATHER_BYTES, Extract, feature_key, write_array, write_feature_range
from datasets import load_dataset

log = logging.getLogger(__name__)
RANGE_ROWS = 4096  # rows per range task, rounded up to a multiple of the eval batch size
RANGE_ROWS_ENV = "BENCH_FEATURE_RANGE_ROWS"
Range = tuple[str, int, int]  # (array, start, stop)


class FeatureRangeFailures(UserError):
    """Some feature ranges failed after their retries; the finished ones are kept for a rerun."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------- planning


def range_rows(batch_size: int, rows: int | None = None) -> int:
    """Rows per range: ``rows`` (default ``$BENCH_FEATURE_RANGE_ROWS``, else ``RANGE_ROWS``) rounded up to a
    multiple of ``batch_size``."""
    if rows is None:
        text = os.environ.get(RANGE_ROWS_ENV, "").strip()
        try:
            rows = int(text) if text else RANGE_ROWS
        except ValueError:
            rows = 0
        if rows < 1:
            raise UserError(f"${RANGE_ROWS_ENV}={text!r}: give a positive number of rows per feature range "
                            f"(default {RANGE_ROWS}).")
    return -(-max(1, rows) // batch_size) * batch_size


def plan_ranges(n: int, batch_size: int, rows: int | None = None) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges covering rows 0..n-1, each starting at a multiple of ``batch_size``."""
    size = range_rows(batch_size, rows)
    return [(start, min(start + size, n)) for start in range(0, n, size)]


# ---------------------------------------------------------------------------------------------- range files


def range_path(directory: str | os.PathLike, name: str, start: int, stop: int) -> Path:
    return Path(directory) / "ranges" / f"{name}-{start:08d}-{stop:08d}.npy"


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def write_range(path: Path, key: str, shape: tuple[int, int, int], fill: Callable[[list[np.ndarray]], None]
                ) -> dict:
    """Write one range file ([K, n, D] float32; ``fill`` gets its K blocks [n, D]) atomically, then its
    ``.json``; returns the metadata."""
    path = Path(path)
    digest = {}

    def write(tmp: str) -> None:
        out = open_memmap(tmp, mode="w+", dtype=DTYPE, shape=tuple(shape))
        fill([out[k] for k in range(shape[0])])
        out.flush()
        del out
        digest["sha256"] = file_sha256(tmp)

    atomic_write(path, write)
    meta = {"format": FORMAT, "key": key, "shape": list(shape), "size": path.stat().st_size, **digest}
    atomic_write_text(_meta_path(path), json.dumps(meta))
    return {"range": path.name, **meta}


def read_range(path: Path, key: str, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The range file, memory-mapped read-only, if it is finished and intact for ``key`` and ``shape``; None
    otherwise (with a warning when a finished-looking file is damaged)."""
    path = Path(path)
    if not (path.exists() and _meta_path(path).exists()):
        return None
    try:
        meta = json.loads(_meta_path(path).read_text())
        if meta.get("format") != FORMAT or meta.get("key") != key or meta.get("shape") != list(shape):
            raise ValueError(f"written for key {meta.get('key')} shape {meta.get('shape')}, need {key} {list(shape)}")
        if path.stat().st_size != meta.get("size") or file_sha256(path) != meta.get("sha256"):
            raise ValueError("sha256 mismatch (truncated or modified file)")
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.dtype != DTYPE or arr.shape != tuple(shape):
            raise ValueError(f"holds {arr.dtype} {arr.shape}")
        return arr
    except Exception as e:  # damaged, foreign or unsafe: computed again, never used
        log.warning("feature range %s is unusable (%s: %s); computing it again", path, type(e).__name__, e)
        return None


def remove_temporaries(folder: Path) -> int:
    """Delete the temporary files killed writers left in ``folder``; returns how many."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------- the worker's side


@dataclass(frozen=True)
class RangeSource:
    """What a range task needs, small enough to travel with every task: where the worker finds the dataset and
    the backbone checkpoint, how to check them, and where the entry is."""

    dataset: str
    data_dir: str | None
    cache_dir: str  # the harness cache, absolute
    data_shapes: dict  # {"train": [N, H, W, C], "test": [M, H, W, C]}
    labels_sha256: str
    network: str  # the backbone plugin's registry name
    config: Any  # the backbone's config (a plugin.Config dataclass)
    backbone_key: str
    checkpoint: str  # absolute path of the backbone checkpoint
    directory: str  # absolute path of the feature entry
    key: str  # the feature key
    shapes: dict  # array -> (K, N, D)
    device: str
    threads: int | None = None


def labels_sha256(dataset) -> str:
    h = hashlib.sha256()
    for y in (dataset.train_y, dataset.test_y):
        h.update(np.ascontiguousarray(y, dtype="<i8").tobytes())
    return h.hexdigest()


_WORKER_MEMO: dict = {}  # the last dataset and backbone this worker process loaded
_WORKER_LOCK = threading.Lock()  # a worker with --nthreads > 1 runs several tasks at once


def _worker_inputs(src: RangeSource):
    """(dataset, backbone, stages) on this worker, loaded once per process and checked against the driver's."""
    memo_key = (src.dataset, src.data_dir, src.cache_dir, src.checkpoint, src.backbone_key, src.device)
    with _WORKER_LOCK:
        if _WORKER_MEMO.get("key") != memo_key:
            _WORKER_MEMO.clear()
            _WORKER_MEMO.update(key=memo_key, inputs=_load_inputs(src))
        return _WORKER_MEMO["inputs"]


def _load_inputs(src: RangeSource):
    host = socket.gethostname()
    dataset = load_dataset(src.dataset, data_dir=src.data_dir, download=False, cache_dir=src.cache_dir)
    shapes = {"train": list(dataset.train_x.shape), "test": list(dataset.test_x.shape)}
    if shapes != src.data_shapes or labels_sha256(dataset) != src.labels_sha256:
        raise RuntimeError(f"the dataset {src.dataset} on worker {host} is not the driver's (arrays {shapes}, need "
                           f"{src.data_shapes}, or other labels): workers must read the same data files")
    backbone = load_checkpoint(Path(src.checkpoint), BACKBONES.get(src.network), src.config, src.backbone_key,
                               dataset, src.device)
    if backbone is None:
        raise RuntimeError(f"the backbone checkpoint {src.checkpoint} is missing or unusable on worker {host}: "
                           "workers must see the driver's --cache-dir at the same path")
    if feature_key(backbone, src.device) != src.key:
        raise RuntimeError(f"worker {host} would compute features of key {feature_key(backbone, src.device)}, "
                           f"need {src.key}")
    return dataset, backbone, backbone.stages()


def compute_range(src: RangeSource, name: str, start: int, stop: int) -> dict:
    """The Dask task: rows [start, stop) of array ``name``'s exit features into their range file; returns the
    file's small metadata (never the features)."""
    if src.threads:
        torch.set_num_threads(src.threads)
    dataset, backbone, st = _worker_inputs(src)
    x = {"train": dataset.train_x, "test": dataset.test_x}[name]
    k, _, d = src.shapes[name]
    cfg = backbone.config
    return write_range(range_path(src.directory, name, start, stop), src.key, (k, stop - start, d),
                       lambda outs: write_feature_range(st, x, start, stop, outs, cfg.img_size, cfg.eval_batch_size,
                                                        src.device, offset=start,
                                                        desc=f"features ({name} {start}-{stop})"))


# ---------------------------------------------------------------------------------------------- the driver's side


def assemble_array(src: RangeSource, name: str, ranges: Sequence[tuple[int, int]]) -> None:
    """Copy array ``name``'s range files into its block shards and header (``write_array``), a bounded number of
    rows at a time, then delete the range files."""
    directory = Path(src.directory)
    k, _, d = src.shapes[name]
    chunk = max(1, GATHER_BYTES // (DTYPE.itemsize * max(1, d)))

    def fill(outs: list[np.ndarray]) -> None:
        for start, stop in ranges:
            path = range_path(directory, name, start, stop)
            part = read_range(path, src.key, (k, stop - start, d))
            if part is None:
                raise FeatureRangeFailures(f"The feature range file {path} ({name} rows [{start}, {stop})) is "
                                           "missing or damaged after its task finished: rerun the same command "
                                           "to compute it again.")
            for b, out in enumerate(outs):
                for j in range(0, stop - start, chunk):
                    out[start + j:start + min(j + chunk, stop - start)] = part[b, j:j + chunk]
            del part

    write_array(directory, src.key, name, src.shapes[name], fill)
    for start, stop in ranges:
        path = range_path(directory, name, start, stop)
        for p in (path, _meta_path(path)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def extract_arrays(src: RangeSource, names: Sequence[str], submit: Callable, batch_size: int, attempts: int = 1
                   ) -> dict[str, int]:
    """Build the block shards of arrays ``names`` from ranges computed by ``submit(compute_range, src, name,
    start, stop)`` (which returns a future: ``.result()`` gives the task's metadata or raises its error). Ranges
    finished earlier are reused. Returns {"ranges", "computed", "reused"}. Call it holding the entry's lock."""
    directory = Path(src.directory)
    folder = directory / "ranges"
    remove_temporaries(folder)  # killed writers': nobody else writes this entry while we hold its lock
    plans = {name: plan_ranges(src.shapes[name][1], batch_size) for name in names}
    todo: list[Range] = []
    for name in names:
        k, _, d = src.shapes[name]
        for start, stop in plans[name]:
            if read_range(range_path(directory, name, start, stop), src.key, (k, stop - start, d)) is None:
                todo.append((name, start, stop))
    total = sum(len(p) for p in plans.values())
    log.info("features of %s: %d of %d ranges to compute (%d finished earlier)", directory.name, len(todo), total,
             total - len(todo))
    futures = [(r, submit(compute_range, src, *r)) for r in todo]
    failures: dict[Range, str] = {}
    for r, fut in tqdm(futures, desc=f"features ({', '.join(names)}, ranges)", unit="range", dynamic_ncols=True,
                       leave=False):
        try:
            fut.result()
        except Exception as e:  # retries exhausted, or a range whose workers kept dying (KilledWorker)
            failures[r] = f"{type(e).__name__}: {e}"
    if failures:
        named = [f"{n} rows [{a}, {b}): {err}" for (n, a, b), err in failures.items()]
        lines = "; ".join(named[:5] + ([f"and {len(named) - 5} more"] if len(named) > 5 else []))
        raise FeatureRangeFailures(
            f"Feature extraction failed for {len(failures)} of {total} ranges of {directory} after {attempts} "
            f"attempt(s): {lines}. The {total - len(failures)} finished ranges are kept in {folder}; fix the cause "
            "and rerun the same command to compute only the missing ones.")
    for name in names:
        assemble_array(src, name, plans[name])
    shutil.rmtree(folder, ignore_errors=True)  # with any temporary file a killed worker left
    return {"ranges": total, "computed": len(todo), "reused": total - len(todo)}


def range_source(cfg, cache: Path, backbone, dataset, checkpoint: Path, directory: Path, key: str,
                 shapes: dict[str, tuple[int, int, int]], device: str) -> RangeSource:
    """The ``RangeSource`` of one entry (``cache``: the run's cache folder), paths made absolute."""
    return RangeSource(
        dataset=cfg.dataset, data_dir=cfg.data_dir, cache_dir=str(Path(cache).resolve()),
        data_shapes={"train": list(dataset.train_x.shape), "test": list(dataset.test_x.shape)},
        labels_sha256=labels_sha256(dataset), network=backbone.plugin.name, config=backbone.config,
        backbone_key=backbone.key, checkpoint=str(Path(checkpoint).resolve()),
        directory=str(Path(directory).resolve()), key=key, shapes={n: tuple(s) for n, s in shapes.items()},
        device=device, threads=cfg.threads)


def dask_extractor(cfg, cache: Path, checkpoint: Path) -> Extract:
    """``load_or_compute_features``' ``extract`` for ``--executor dask``: the missing arrays computed in ranges
    by the workers of ``cfg.scheduler``; ``checkpoint``: the backbone's checkpoint file (workers load it)."""

    def extract(backbone, dataset, directory: Path, key: str, shapes: dict, device: str) -> None:
        src = range_source(cfg, cache, backbone, dataset, checkpoint, directory, key, shapes, device)
        client = dask_client(cfg)
        resources, token = dask_resources(device), secrets.token_hex(4)

        def submit(fn, src, name, start, stop):
            return client.submit(fn, src, name, start, stop, key=f"bench-features-{key}-{name}-{start:08d}-"
                                 f"{stop:08d}-{token}", pure=False, retries=cfg.retries, resources=resources)

        try:
            extract_arrays(src, list(shapes), submit, backbone.config.eval_batch_size, cfg.retries + 1)
        finally:
            client.close()

    return extract


def in_dask_worker() -> bool:
    """True inside a Dask task (a job that finds its features missing builds them there, sequentially)."""
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False
