"""The dataset record and the name -> loader registry.

Every loader returns an :class:`ImageDataset`: uint8 images stored channels-last ``[N, H, W, C]`` (C=1 for
grayscale), int64 labels ``[N]`` in ``0 .. num_classes-1``, the class names, and a ``source`` string that says
which files were read and which checksums they matched, and optionally per-sample ids (``train_ids`` /
``test_ids``: e.g. the relative file paths of a user's image folder). Loaders are registered with
``@register_dataset("name")``; registering a name twice is an error.

The images are a numpy array, or, for datasets larger than memory (ImageNet, a large image folder),
:class:`datasets.lazy.LazyImages`, decoded on use. Code that may meet either selects images with
:func:`take` (``x[idx]`` for an array, a view for lazy images) and walks them with :func:`iter_batches`
(slices of an array; lazy images decoded in worker processes); ``x[i:j]``, ``x.shape`` and ``len(x)`` work on both.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from bench.base.errors import UserError
from bench.base.registry import Registry

from ._files import harness_cache

# A loader takes (data_dir or None, download) and returns an ImageDataset.
Loader = Callable[[Optional[Path], bool], "ImageDataset"]

_REGISTRY: Registry[Loader] = Registry("dataset")


def register_dataset(name: str, *, accepts_files: bool = False) -> Callable[[Loader], Loader]:
    """Decorator: register ``fn(data_dir, download) -> ImageDataset`` under ``name`` (duplicates raise).

    ``accepts_files``: ``load_dataset`` passes ``data_dir`` on unchecked (it may name a file, e.g. an archive, or
    not exist, or be None) and the loader reports problems itself; otherwise ``data_dir`` must be a directory."""
    register = _REGISTRY.register(name)

    def deco(fn: Loader) -> Loader:
        register(fn)
        if accepts_files:
            fn.accepts_files = True  # type: ignore[attr-defined]
        return fn

    return deco


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A classification dataset (fixed train/test split); labels are in memory, images in memory or lazy.

    ``train_x`` / ``test_x``: uint8 ``[N, H, W, C]`` numpy arrays, or :class:`datasets.lazy.LazyImages` (anything
    with ``dtype``, ``ndim``, ``shape``, ``len``, slicing and ``take``). ``eq=False``: datasets compare by
    identity (element-wise array comparison has no single truth value).
    """

    name: str
    train_x: Any  # uint8 [N, H, W, C]: np.ndarray or LazyImages
    train_y: np.ndarray  # int64 [N]
    test_x: Any  # uint8 [M, H, W, C]: np.ndarray or LazyImages
    test_y: np.ndarray  # int64 [M]
    num_classes: int
    classes: tuple[str, ...]
    source: str
    # Optional sample ids (str, one per image; e.g. relative file paths), a tuple or numpy array, or None.
    train_ids: Optional[Sequence[str]] = None
    test_ids: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if not isinstance(x, np.ndarray) and not all(hasattr(x, a) for a in ("dtype", "ndim", "shape", "take")):
                raise ValueError(f"{self.name}: {split}_x must be a uint8 [N,H,W,C] array or lazy images, got "
                                 f"{type(x).__name__}")
            if x.dtype != np.uint8 or x.ndim != 4:
                raise ValueError(f"{self.name}: {split}_x must be uint8 [N,H,W,C], got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: {split}_y must be int64 [{x.shape[0]}], got {y.dtype} {y.shape}")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"{self.name}: {split} labels outside 0..{self.num_classes - 1}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(f"{self.name}: train images {self.train_x.shape[1:]} != test {self.test_x.shape[1:]}")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes")
        for split, ids, n in (("train", self.train_ids, len(self.train_y)), ("test", self.test_ids, len(self.test_y))):
            if ids is not None and len(ids) != n:
                raise ValueError(f"{self.name}: {len(ids)} {split}_ids for {n} {split} images")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``, the shape a model sees after the channels-first conversion."""
        _, h, w, c = self.train_x.shape
        return (c, h, w)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={self.train_x.shape[0]}, test={self.test_x.shape[0]}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


def take(x, idx):
    """The images ``idx`` selects (integer array, boolean mask or slice): ``x[idx]`` for a numpy array, the view
    ``x.take(idx)`` (nothing decoded) for lazy images."""
    return x[idx] if isinstance(x, np.ndarray) else x.take(idx)


def iter_batches(x, batch_size: int, order=None) -> Iterator[np.ndarray]:
    """uint8 ``[b, H, W, C]`` batches of ``x`` in ``order`` (row numbers; default ``0..N-1``), ``batch_size`` at a
    time (the last may be smaller): slices of a numpy array (views when ``order`` is None), or lazy images
    decoded in worker processes (:meth:`datasets.lazy.LazyImages.batches`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(x, np.ndarray):
        yield from x.batches(batch_size, order)
        return
    if order is None:
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size]
        return
    order = np.flatnonzero(order) if np.asarray(order).dtype == bool else np.asarray(order)
    for i in range(0, len(order), batch_size):
        yield x[order[i:i + batch_size]]


def list_datasets() -> list[str]:
    """Sorted registry names."""
    return _REGISTRY.names()


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> ImageDataset:
    """Load dataset ``name`` (see :func:`list_datasets`).

    Files are looked for in ``data_dir`` (and its ``<name>/`` subfolder), then the cache, then system locations;
    missing files are downloaded into the cache unless ``download`` is false. The cache is ``$BENCH_DATA_DIR``,
    else ``<cache_dir>/data`` (``cache_dir``: the harness cache, default ``$BENCH_CACHE_DIR``), else
    ``~/.cache/bench/data``; see :mod:`datasets._files` for downloads (progress, retries, resume,
    ``$BENCH_DATA_MIRROR``). A loader registered with ``accepts_files=True`` (``imagefolder``) gets ``data_dir``
    unchecked: it may name an archive. Every problem the user can fix raises :class:`bench.base.errors.UserError`.
    """
    loader = _REGISTRY.get(name)  # UserError with "did you mean" for unknown names
    path = None
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not getattr(loader, "accepts_files", False) and not path.is_dir():
            raise UserError(
                f"--data-dir {path} is not a directory. Pass --data-dir DIR naming an existing folder that holds "
                f"the {name} files, or leave --data-dir out to use the cache."
            )
    with harness_cache(cache_dir):
        return loader(path, download)
