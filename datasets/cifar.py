"""CIFAR-10, CIFAR-100 and CIFAR-100-LT from the official "python version" archives.

Format (https://www.cs.toronto.edu/~kriz/cifar.html): ``cifar-10-python.tar.gz`` holds the folder
``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` (10000 images each), ``test_batch`` and
``batches.meta``; ``cifar-100-python.tar.gz`` holds ``cifar-100-python/`` with ``train`` (50000), ``test``
(10000) and ``meta``. Each file is a Python 2 pickle (read with ``encoding="bytes"``) of a dict: ``b"data"`` is
a uint8 array ``[N, 3072]`` whose rows are 32x32 images stored as three planes (1024 red, 1024 green, 1024
blue values, each plane row-major), labels are ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100),
and the meta file lists ``b"label_names"`` / ``b"fine_label_names"``.

Either the archive (read in memory, never extracted to disk) or the extracted folder is accepted. Every file
is md5-checked before it is unpickled, and unpickling only admits the numpy array constructors those files use.

CIFAR-100-LT is CIFAR-100 with the training set cut to the exponential long-tail profile of Cao et al. (2019,
LDAM) with imbalance factor 100: ``n_c = floor(500 * (1/100) ** (c / 99))`` images of class ``c`` (500 .. 5,
10847 in all). Which images are kept is drawn once with ``np.random.default_rng(0)``, so the subset is one
fixed thing (it is not LDAM's exact subset, which used the legacy global RNG). The test set is the balanced
official one.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from bench.base.errors import UserError

from . import _files
from ._base import ImageDataset, register_dataset

# ----------------------------------------------------------------------------------------------- unpickling

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    # Python 3 pickles of bytes at protocol < 3 (a re-saved copy would need it; it only builds bytes).
    ("_codecs", "encode"): ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch needs (numpy arrays of plain data)."""

    def find_class(self, module: str, name: str):
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(*target)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # truncated / garbled pickle, or one that references other objects
        raise UserError(
            f"{where} is not a readable CIFAR pickle ({type(e).__name__}: {e}). Delete it so it is downloaded "
            f"again, or replace it with the official file."
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{where} holds a {type(obj).__name__}, not the dict of a CIFAR batch. Replace it.")
    return obj


# ------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class CifarFormat:
    name: str  # dataset name used in messages
    subdir: str  # cache / data_dir subfolder
    archive: str  # official tarball name
    folder: str  # folder inside the archive
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


CIFAR10 = CifarFormat(
    "cifar10", "cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta", b"labels", b"label_names", 10,
)
CIFAR100 = CifarFormat(
    "cifar100", "cifar100", "cifar-100-python.tar.gz", "cifar-100-python",
    ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names", 100,
)


def _read_members(fmt: CifarFormat, path: Path) -> tuple[dict[str, bytes], str]:
    """Verified bytes of every member, from the extracted folder or the archive, and a ``source`` note."""
    out: dict[str, bytes] = {}
    if path.is_dir():
        notes = []
        for m in fmt.members:
            p = path / m
            data = p.read_bytes()
            actual = _files.verify_bytes(data, f"{fmt.folder}/{m}", str(p), _files.URLS[fmt.archive])
            out[m] = data
            notes.append(f"{m} md5 {actual}")
        return out, f"{path}/ ({', '.join(notes)}; official)"

    actual = _files.verify_file(path, fmt.archive)
    wanted = {f"{fmt.folder}/{m}": m for m in fmt.members}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    f = tar.extractfile(info)
                    assert f is not None
                    out[wanted[info.name]] = f.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(
            f"{path} is not a readable tar.gz archive ({type(e).__name__}: {e}). Delete it so it is downloaded "
            f"again, or replace it with the official file from {_files.URLS[fmt.archive]}."
        ) from None
    absent = [k for k, m in wanted.items() if m not in out]
    if absent:
        raise UserError(
            f"{path} lacks {', '.join(absent)}; it is not the official {fmt.archive}. Replace it with the official "
            f"file from {_files.URLS[fmt.archive]}."
        )
    for m, data in out.items():
        _files.verify_bytes(data, f"{fmt.folder}/{m}", f"{path}:{fmt.folder}/{m}", _files.URLS[fmt.archive])
    return out, f"{path} (md5 {actual}, official; members verified)"


def _batch(fmt: CifarFormat, batch: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get(b"data"), batch.get(fmt.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or labels is None or len(labels) != data.shape[0]:
        raise UserError(
            f"{where} is not a {fmt.name} batch: expected b'data' uint8 [N, 3072] and N {fmt.label_key!r}. "
            f"Replace it with the official file from {_files.URLS[fmt.archive]}."
        )
    y = np.asarray(labels, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= fmt.num_classes):
        raise UserError(f"{where} has labels outside 0..{fmt.num_classes - 1}. Replace it with the official file.")
    # rows are [R plane | G plane | B plane], each 32x32 row-major -> [N, 32, 32, 3] (HWC, RGB)
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y


def read_cifar(fmt: CifarFormat, data_dir: Optional[Path], download: bool, dataset: str = ""):
    """``(train_x, train_y, test_x, test_y, classes, source)`` of ``fmt``, located, verified and parsed."""
    need = _files.Need(
        describe=f"{fmt.archive} or its extracted folder {fmt.folder}/ ({', '.join(fmt.members)})",
        names=(fmt.folder, ".", fmt.archive),
        download=fmt.archive,
        members=fmt.members,
    )
    (path,) = _files.locate(dataset or fmt.name, fmt.subdir, [need], data_dir, download)
    raw, source = _read_members(fmt, path)
    where = (lambda m: f"{path / m}") if path.is_dir() else (lambda m: f"{path}:{fmt.folder}/{m}")

    def split(members: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_batch(fmt, _unpickle(raw[m], where(m)), where(m)) for m in members]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    train_x, train_y = split(fmt.train)
    test_x, test_y = split(fmt.test)
    meta = _unpickle(raw[fmt.meta], where(fmt.meta))
    names = meta.get(fmt.names_key)
    if not isinstance(names, list) or len(names) != fmt.num_classes:
        raise UserError(
            f"{where(fmt.meta)} lacks {fmt.num_classes} class names under {fmt.names_key!r}. Replace it with the "
            f"official file from {_files.URLS[fmt.archive]}."
        )
    classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    return train_x, train_y, test_x, test_y, classes, source


@register_dataset("cifar10")
def load_cifar10(data_dir: Optional[Path], download: bool) -> ImageDataset:
    train_x, train_y, test_x, test_y, classes, source = read_cifar(CIFAR10, data_dir, download)
    return ImageDataset("cifar10", train_x, train_y, test_x, test_y, 10, classes, source)


@register_dataset("cifar100")
def load_cifar100(data_dir: Optional[Path], download: bool) -> ImageDataset:
    train_x, train_y, test_x, test_y, classes, source = read_cifar(CIFAR100, data_dir, download)
    return ImageDataset("cifar100", train_x, train_y, test_x, test_y, 100, classes, source)


# --------------------------------------------------------------------------------------------- long tail

LT_MAX_PER_CLASS = 500
LT_IMBALANCE = 100
LT_SEED = 0


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Exponential profile: ``floor(n_max * (1/imbalance) ** (c / (num_classes - 1)))`` for c = 0..K-1."""
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imbalance) ** (c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_indices(labels: np.ndarray, counts: Sequence[int], seed: int = LT_SEED) -> np.ndarray:
    """Sorted indices into ``labels`` keeping ``counts[c]`` random examples of each class ``c``.

    One ``np.random.default_rng(seed)`` draws, class by class in order, a subset without replacement. A class
    with no more than ``counts[c]`` examples keeps all of them (capped, no draw), so data with fewer images
    per class than the profile asks for still loads.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) > n:
            idx = np.sort(rng.choice(idx, size=n, replace=False))
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


@register_dataset("cifar100-lt")
def load_cifar100_lt(data_dir: Optional[Path], download: bool) -> ImageDataset:
    train_x, train_y, test_x, test_y, classes, source = read_cifar(
        CIFAR100, data_dir, download, dataset="cifar100-lt (built from the CIFAR-100 files)")
    counts = long_tail_counts(LT_MAX_PER_CLASS, 100, LT_IMBALANCE)
    keep = long_tail_indices(train_y, counts, LT_SEED)
    digest = hashlib.sha256(keep.astype("<i8").tobytes()).hexdigest()[:16]
    source += (
        f"; train subsampled to the long-tail profile floor({LT_MAX_PER_CLASS}*(1/{LT_IMBALANCE})**(c/99)) "
        f"with np.random.default_rng({LT_SEED}): {len(keep)} of {len(train_y)} images kept "
        f"(kept-index sha256 {digest})"
    )
    return ImageDataset("cifar100-lt", train_x[keep], train_y[keep], test_x, test_y, 100, classes, source)
