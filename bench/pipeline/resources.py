"""What a run cost the machine, recorded in run.json's ``resources`` (written by ``bench.pipeline.run.execute``
at its end) and shown on the results page's machine line (``bench.results.page.machine_line``):

- ``peak_rss_mib``: the peak resident set size of the ``bench run`` process (``getrusage(RUSAGE_SELF).ru_maxrss``),
  memory-mapped feature pages it touched included;
- ``peak_rss_children_mib``: the largest peak of its finished children (``RUSAGE_CHILDREN``: the DataLoader
  workers that decode streamed images, a ``--executor local`` pool's workers). Linux reports the largest single
  child, not a sum; a forked child counts the parent's pages it shares. 0 when no child ran;
- ``cuda_max_allocated_mib`` (on CUDA): ``torch.cuda.max_memory_allocated``, the peak of torch's allocations on
  the run's device (the caching allocator's reserve and the CUDA context are not in it);
- ``stages``: per seed and network, the images per second of the backbone's training and of the exit-feature
  extraction, for the stages that ran in this run (a backbone or features read from the cache have none).
  ``backbone_training``: training images x epochs over the training loop's seconds (each epoch's validation pass
  included: the backbone's history; a training resumed from an earlier process's state counts the seconds of
  every process, not the time in between). ``features``: the images of the dataset's train and test arrays over the
  seconds ``load_task`` took beyond the training loop (the feature pass, writing and hashing the cache files and
  gathering the split files; loading the splits and saving the checkpoint, which take milliseconds, too).

Whether a stage ran here is read from the cache: the backbone checkpoint, or the feature headers, created or
replaced during ``load_task`` (``cache_snapshot`` before, a stat after: no clock comparison, so a file another run
wrote a moment before does not count). A process of another run that built them while this one waited on its lock
counts as here.

The allocator (``fixed_mmap_threshold``, called when a run starts; ``malloc_mmap_threshold_bytes`` in
``resources``): glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
batch-sized buffers (a 512-image float batch of 64 px images is 25 MiB) come from the heap, whose freed holes stay
resident. A feature pass over 60,000 streamed 64 px images grew the anonymous memory by 170-320 MiB in 4 of 5 runs
(by how much, and whether, varies with the timing of the frees); with the threshold fixed at 1 MiB, larger blocks
are mapped and unmapped on their own and the same pass stayed within 30 MiB in 3 of 3 runs, about as fast.
"""
from __future__ import annotations

import ctypes
import os
import resource
import sys
import time
from pathlib import Path

import torch

from bench.pipeline.backbone_cache import checkpoint_path
from bench.pipeline.config import RunConfig
from bench.pipeline.features import feature_dir, feature_key, header_path
from bench.pipeline.tasks import LoadedTask, cache_dir_of
from datasets import imagefolder, imagefolder_lazy, imagenet, lazy

# environment variables that change which images a run reads, how, or how fast: run.json's ``env`` when set
DATA_ENV_VARS = (imagefolder_lazy.LAZY_ENV_VAR, imagefolder.SIZE_ENV_VAR, imagefolder.FRACTION_ENV_VAR,
                 imagenet.SIZE_ENV_VAR, lazy.WORKERS_ENV_VAR)
_MIB = 2 ** 20
_MAXRSS_BYTES = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def fixed_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> int | None:
    """Fix glibc's mmap threshold at ``nbytes`` for this process and the processes it forks later (module
    docstring): every allocation of ``nbytes`` or more is its own mapping, returned to the system when freed.
    Returns the threshold, or None where there is no glibc ``mallopt`` (macOS, musl: nothing changes)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return nbytes if mallopt(M_MMAP_THRESHOLD, nbytes) == 1 else None


def data_env() -> dict[str, str]:
    """The ``DATA_ENV_VARS`` set in this process's environment."""
    return {k: os.environ[k] for k in DATA_ENV_VARS if k in os.environ}


def peak_memory(device: str) -> dict[str, float]:
    """``peak_rss_mib``, ``peak_rss_children_mib`` and, on CUDA, ``cuda_max_allocated_mib`` (module docstring)."""
    def rss(who: int) -> float:
        return round(resource.getrusage(who).ru_maxrss * _MAXRSS_BYTES / _MIB, 1)

    out = {"peak_rss_mib": rss(resource.RUSAGE_SELF), "peak_rss_children_mib": rss(resource.RUSAGE_CHILDREN)}
    if torch.device(device).type == "cuda":
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(torch.device(device)) / _MIB, 1)
    return out


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def cache_snapshot(cache_dir) -> dict[Path, tuple[int, int]]:
    """(mtime_ns, inode) of every backbone checkpoint and feature header in the cache: taken before a
    ``load_task``, it tells which of them that call wrote (an atomic write replaces the file: a new inode)."""
    root = Path(cache_dir)
    paths = [*root.glob("backbones/*.pt"), *root.glob("features/*/*.json")]
    return {p: stamp for p in paths if (stamp := _stamp(p)) is not None}


def _written_since(path: Path, before: dict[Path, tuple[int, int]]) -> bool:
    stamp = _stamp(path)
    return stamp is not None and stamp != before.get(path)


def _entry(seed: int, network: str, stage: str, images: int, seconds: float, **extra) -> dict:
    return {"seed": seed, "network": network, "stage": stage, "images": int(images), "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1) if seconds > 0 else None, **extra}


def stage_rates(cfg: RunConfig, loaded: LoadedTask, network: str, before: dict, seconds: float) -> list[dict]:
    """The ``stages`` entries of one ``load_task`` call that took ``seconds``, ``before`` being the
    ``cache_snapshot`` taken as it started: the backbone's training and the feature extraction, each if it ran in
    this call (its file is new or was replaced since)."""
    out = []
    b = loaded.backbone
    path = checkpoint_path(cache_dir_of(cfg), b.plugin, loaded.dataset.name, b.key)
    trained = _written_since(path, before) and bool(b.history)
    train_s = float(loaded.backbone.history[-1].get("seconds") or 0.0) if trained else 0.0
    train_here_s = _seconds_here(b.history) if trained else 0.0
    if trained:
        epochs = len(loaded.backbone.history)
        out.append(_entry(loaded.task.seed, network, "backbone_training", len(loaded.splits.train) * epochs, train_s,
                          epochs=epochs))
    directory = feature_dir(cache_dir_of(cfg), loaded.dataset.name, feature_key(loaded.backbone, cfg.device))
    if any(_written_since(header_path(directory, name), before) for name in ("train", "test")):
        n = len(loaded.dataset.train_y) + len(loaded.dataset.test_y)
        out.append(_entry(loaded.task.seed, network, "features", n, max(seconds - train_here_s, 0.0)))
    return out


def _seconds_here(history: list[dict]) -> float:
    """The training loop's seconds in this process: all of them, or those after the epoch it resumed from."""
    if not history:
        return 0.0
    start = int(history[-1].get("resumed_from") or 0)
    before = float(history[start - 1].get("seconds") or 0.0) if start else 0.0
    return float(history[-1].get("seconds") or 0.0) - before


class Clock:
    """``with Clock() as c:`` -> ``c.seconds``."""

    def __enter__(self) -> "Clock":
        self._t0, self.seconds = time.perf_counter(), 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
