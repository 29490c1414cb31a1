"""Shared, seeded splits.

A seed fixes the train / val / cal partition of the dataset's *training* data (stratified); the official test
set never moves. Every method of every run with that seed reads the same indices, saved once under the cache
with a sha256 that each result row records.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.base.hashing import atomic_write_text

log = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "val", "cal", "test")


@dataclass(frozen=True)
class Splits:
    """Index arrays. ``train``/``val``/``cal`` index the dataset's training arrays, ``test`` its test arrays."""

    seed: int
    train: np.ndarray
    val: np.ndarray
    cal: np.ndarray
    test: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return getattr(self, name)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for name in SPLIT_NAMES:
            h.update(name.encode())
            h.update(np.ascontiguousarray(self[name], dtype=np.int64).tobytes())
        return h.hexdigest()


def holdout_size(n_train: int, frac: float, cap: int) -> int:
    """Validation / calibration size: ``frac`` of the training data, at most ``cap`` samples."""
    return int(min(cap, round(frac * n_train)))


def make_splits(train_y: np.ndarray, n_test: int, seed: int, val_frac: float = 0.1, cal_frac: float = 0.1,
                cap: int = 5000) -> Splits:
    """Stratified train / val / cal partition of ``train_y`` [N], determined by ``seed`` alone.

    Each class contributes to val and cal in proportion to its frequency (largest-remainder rounding), so
    long-tailed data keeps its profile in every part. Indices within each part are sorted.
    """
    train_y = np.asarray(train_y)
    n = len(train_y)
    n_val, n_cal = holdout_size(n, val_frac, cap), holdout_size(n, cal_frac, cap)
    if n_val + n_cal >= n:
        raise ValueError(f"training set of {n} samples is too small for {n_val} val + {n_cal} cal samples")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    classes, counts = np.unique(train_y, return_counts=True)
    val_take = _largest_remainder(counts, n_val)
    cal_take = _largest_remainder(counts, n_cal)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "cal": []}
    for c, nv, nc in zip(classes, val_take, cal_take):
        idx = rng.permutation(np.flatnonzero(train_y == c))
        parts["val"].append(idx[:nv])
        parts["cal"].append(idx[nv:nv + nc])
        parts["train"].append(idx[nv + nc:])
    out = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}
    return Splits(seed=seed, test=np.arange(n_test, dtype=np.int64), **out)


def _largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    exact = counts / counts.sum() * total
    take = np.floor(exact).astype(int)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: total - take.sum()]] += 1
    return np.minimum(take, counts)


def load_or_make_splits(cache_dir: Path, dataset: str, train_y: np.ndarray, n_test: int, seed: int) -> Splits:
    """Make the splits and save them (JSON with their sha256) under ``cache_dir/splits``. A saved copy that
    differs (a change of split code or library versions) is reported and replaced: every result row records
    the hash, so runs on different splits are never silently compared."""
    splits = make_splits(train_y, n_test, seed)
    label_digest = hashlib.sha256(np.ascontiguousarray(train_y, dtype=np.int64).tobytes()).hexdigest()[:12]
    path = Path(cache_dir) / "splits" / f"{dataset}-{label_digest}-seed{seed}.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())["sha256"]
        except (ValueError, KeyError):
            saved = None
        if saved == splits.sha256:
            return splits
        log.warning("saved splits %s (sha256 %s) differ from the ones this seed makes now (%s): the split code or "
                    "its libraries changed; results with the old hash are not comparable. Overwriting.",
                    path, saved, splits.sha256)
    payload = {"dataset": dataset, "seed": seed, "sha256": splits.sha256,
               **{k: splits[k].tolist() for k in ("train", "val", "cal")}, "n_test": n_test}
    atomic_write_text(path, json.dumps(payload))
    return splits
