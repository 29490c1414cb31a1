"""Images decoded on use: :class:`LazyImages` stands in for a uint8 ``[N, H, W, C]`` array too large for memory.

A :class:`LazyImages` holds where N encoded image files are (:class:`ImageFiles`: a folder and relative paths, an
uncompressed tar and the byte offset and size of each member's data, or a zip and member names) and a picklable
``transform(data, where) -> uint8 [H, W, C]`` (:class:`FitTo`: ``imagefolder``'s resize to one size;
:class:`ResizeCrop`: ImageNet's evaluation transform). Both decode with :func:`datasets._imagefiles._decode`, so
a streamed dataset gives exactly the pixels of the in-memory path. It behaves like a read-only array where the
harness uses one:

* ``shape`` ``(N, H, W, C)``, ``dtype`` uint8, ``ndim`` 4, ``len(x)``, ``nbytes`` (the decoded size);
* ``x[i]`` one image ``[H, W, C]``; ``x[i:j:k]``, ``x[int_array]``, ``x[bool_mask]`` a decoded ``[n, H, W, C]``
  array (decoded in the calling process); ``x[key, ...]`` applies the rest of a tuple to the decoded result;
* ``x.take(idx)``: a view on a subset (an index array, mask or slice), nothing decoded;
* ``x.batches(batch_size, order=None, workers=None)``: decoded ``[b, H, W, C]`` arrays in ``order`` (default
  ``0..N-1``), decoded in ``torch.utils.data.DataLoader`` worker processes and yielded in order.

``np.asarray(x)`` is refused (a TypeError): turning a dataset that does not fit in memory into an array by
accident is the failure this class exists to avoid; slice it instead. Pickling ships the file table (names,
offsets), never pixels; open file handles are per process (reopened after a fork).

Workers: ``workers`` when given, else ``$BENCH_DECODE_WORKERS`` when set, else ``min(4, CPUs usable)``; 0
(decoding in this process) when fewer than :data:`SMALL` images are decoded and no ``workers`` is given, or when
this process is a daemon (a multiprocessing pool's worker, which may not start processes). A file that cannot be
decoded raises :class:`bench.base.errors.UserError` naming it, in the calling process (workers send the message
back, not a traceback). :func:`check_images` decodes every file once in workers and returns each one's decoded
size: the loaders' check, before any training, that every file is an image.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch.utils.data
from PIL import Image
from tqdm.auto import tqdm

from bench.base.errors import UserError
from bench.base.hashing import atomic_write

from ._imagefiles import RESAMPLE, _decode, read_member, strict_decoding

log = logging.getLogger(__name__)

WORKERS_ENV_VAR = "BENCH_DECODE_WORKERS"
MAX_WORKERS = 4
SMALL = 256  # fewer images than this are decoded in this process unless workers are asked for
CHECK_CHUNK = 64  # images per task of check_images
Transform = Callable[[bytes, str], np.ndarray]


# ---------------------------------------------------------------------------------------------------- names


class Names:
    """An immutable sequence of N strings stored as one UTF-8 byte blob and N+1 start offsets (a file table of a
    million paths costs its bytes, not a million Python strings). Names that are not valid UTF-8 keep their
    original bytes (``surrogateescape``). ``names[i]`` is a str; a slice or index array gives a str numpy array."""

    def __init__(self, blob: np.ndarray, starts: np.ndarray) -> None:
        self.blob = np.ascontiguousarray(blob, dtype=np.uint8)
        self.starts = np.ascontiguousarray(starts, dtype=np.int64)
        if self.starts.ndim != 1 or len(self.starts) < 1 or self.starts[0] != 0 or self.starts[-1] != len(self.blob):
            raise ValueError("Names: starts must run from 0 to the blob's length")

    @classmethod
    def of(cls, strings: Sequence[str]) -> "Names":
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        starts = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=starts[1:])
        return cls(np.frombuffer(b"".join(encoded), np.uint8), starts)

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """The two arrays that store these names in an ``.npz`` (loaded back without pickle by :meth:`load`)."""
        return {f"{name}_blob": self.blob, f"{name}_starts": self.starts}

    @classmethod
    def load(cls, arrays, name: str) -> "Names":
        return cls(arrays[f"{name}_blob"], arrays[f"{name}_starts"])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"name {key} out of range for {len(self)}")
            return self.blob[self.starts[i]:self.starts[i + 1]].tobytes().decode("utf-8", "surrogateescape")
        idx = np.arange(len(self))[key]
        return np.array([self[int(i)] for i in idx], dtype=str)

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Names) and np.array_equal(self.starts, other.starts) and \
            np.array_equal(self.blob, other.blob)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Names({len(self)})"


# ---------------------------------------------------------------------------------------------------- files


class ImageFiles:
    """Where N encoded images are, and how to read file ``i``'s bytes.

    ``kind``: ``"folder"`` (``path`` is the root, ``names`` relative paths under it), ``"tar"`` (``path`` an
    uncompressed tar, ``offsets``/``sizes`` each member's data; ``names`` only name members in messages) or
    ``"zip"`` (``path`` a zip, ``members`` the member names to read, default ``names``). ``label``: the path
    messages name (the archive the user gave, where ``path`` is a decompressed copy of it)."""

    KINDS = ("folder", "tar", "zip")

    def __init__(self, kind: str, path: Union[str, os.PathLike], names: Union[Names, Sequence[str]], *,
                 offsets: Optional[np.ndarray] = None, sizes: Optional[np.ndarray] = None,
                 members: Union[Names, Sequence[str], None] = None, label: Union[str, os.PathLike, None] = None
                 ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"ImageFiles: kind {kind!r} is not one of {self.KINDS}")
        self.kind = kind
        self.path = str(path)
        self.label = str(label if label is not None else path)
        self.names = names if isinstance(names, Names) else Names.of(list(names))
        n = len(self.names)
        self.members = None if members is None else members if isinstance(members, Names) else Names.of(members)
        self.offsets = self.sizes = None
        if kind == "tar":
            if offsets is None or sizes is None or len(offsets) != n or len(sizes) != n:
                raise ValueError(f"ImageFiles: a tar needs an offset and a size for each of its {n} files")
            self.offsets = np.asarray(offsets, np.int64)
            self.sizes = np.asarray(sizes, np.int64)
        if self.members is not None and len(self.members) != n:
            raise ValueError(f"ImageFiles: {len(self.members)} members for {n} names")
        self._handle: object = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.names)

    def where(self, i: int) -> str:
        """File ``i`` as messages name it: the file's path, or ``archive:member``."""
        name = self.names[i]
        return str(Path(self.path) / name) if self.kind == "folder" else f"{self.label}:{name}"

    def read(self, i: int) -> bytes:
        try:
            if self.kind == "folder":
                with open(Path(self.path) / self.names[i], "rb") as f:
                    return f.read()
            handle = self._open()
            if self.kind == "tar":
                assert self.offsets is not None and self.sizes is not None
                return read_member(handle.fileno(), int(self.offsets[i]), int(self.sizes[i]), self.where(i))
            return handle.read((self.names if self.members is None else self.members)[i])
        except (OSError, KeyError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError) as e:
            raise UserError(f"{self.where(i)} cannot be read ({type(e).__name__}: {e}). Check its permissions or "
                            f"the archive, or remove the file.") from None

    def _open(self):
        """This process's handle on the archive (a forked child opens its own: file positions are shared)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = open(self.path, "rb", buffering=0) if self.kind == "tar" else zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._handle

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_handle=None, _pid=-1)
        return state


# ---------------------------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class FitTo:
    """``imagefolder``'s rule: decode, resize (bilinear, aspect ratio not kept) to ``width`` x ``height`` and give
    ``channels`` channels (a grayscale image in an RGB set has its channel repeated), as the in-memory arrays."""

    width: int
    height: int
    channels: int

    def __call__(self, data: bytes, where: str) -> np.ndarray:
        a = _decode(data, where, (self.width, self.height))
        return np.broadcast_to(a.reshape(self.height, self.width, -1), (self.height, self.width, self.channels))


@dataclass(frozen=True)
class ResizeCrop:
    """ImageNet's evaluation transform: decode, resize (bilinear) so the shorter side is ``resize`` (the longer
    ``int(resize * long / short)``), crop the centre ``size`` x ``size`` (offsets ``int(round((side - size) / 2))``),
    RGB: torchvision's ``Resize(resize)`` then ``CenterCrop(size)`` on a Pillow image."""

    size: int
    resize: int

    def __call__(self, data: bytes, where: str) -> np.ndarray:
        a = _decode(data, where)
        h, w = a.shape[:2]
        if w <= h:
            nw, nh = self.resize, int(self.resize * h / w)
        else:
            nw, nh = int(self.resize * w / h), self.resize
        if (nw, nh) != (w, h):
            a = np.asarray(Image.fromarray(a).resize((nw, nh), RESAMPLE))
        top, left = int(round((nh - self.size) / 2.0)), int(round((nw - self.size) / 2.0))
        a = a[top:top + self.size, left:left + self.size]
        if a.shape[:2] != (self.size, self.size):
            raise UserError(f"{where} is {w}x{h} pixels, too small to crop {self.size}x{self.size} from it after "
                            f"resizing. Remove it.")
        return np.broadcast_to(a.reshape(self.size, self.size, -1), (self.size, self.size, 3))


def probe(data: bytes, where: str) -> tuple[int, int, int]:
    """(width, height, 1 if grayscale else 0) of a file decoded at its own size (EXIF orientation applied)."""
    a = _decode(data, where)
    return a.shape[1], a.shape[0], int(a.ndim == 2)


def _decode_into(files: ImageFiles, transform: Transform, hwc: tuple[int, int, int], positions) -> np.ndarray:
    out = np.empty((len(positions), *hwc), np.uint8)
    with strict_decoding():
        for j, p in enumerate(positions):
            out[j] = transform(files.read(int(p)), files.where(int(p)))
    return out


# --------------------------------------------------------------------------------------------------- images


class LazyImages:
    """A read-only uint8 ``[N, H, W, C]`` "array" whose images are decoded from ``files`` on use (module docstring).

    ``index``: the positions in ``files`` of this view's images (None: all of them, in order)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, files: ImageFiles, transform: Transform, hwc: tuple[int, int, int],
                 index: Optional[np.ndarray] = None) -> None:
        self.files = files
        self.transform = transform
        self._hwc = tuple(int(v) for v in hwc)
        self._index = None if index is None else np.asarray(index, np.int64)
        if len(self._hwc) != 3 or min(self._hwc) < 1:
            raise ValueError(f"LazyImages: image shape (H, W, C) must be positive, got {hwc}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), *self._hwc)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.files) if self._index is None else len(self._index)

    def __repr__(self) -> str:
        return f"LazyImages(shape={self.shape}, {self.files.kind} {self.files.label})"

    def __array__(self, dtype=None, copy=None):
        raise TypeError(f"{self!r} is decoded on use ({self.nbytes / 2**30:.2f} GiB decoded) and is not turned into "
                        f"an array implicitly: index it (x[i:j], x[idx]) or use datasets.iter_batches")

    # -- positions
    def _rows(self, key) -> np.ndarray:
        """Row numbers 0..N-1 selected by a slice, an integer array or a boolean mask."""
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key]
        a = np.asarray(key)
        if a.dtype == bool:
            if a.shape != (n,):
                raise IndexError(f"boolean index of shape {a.shape} for {n} images")
            return np.flatnonzero(a)
        if a.dtype.kind not in "iu" or a.ndim != 1:
            if a.size == 0 and a.ndim == 1:
                return np.zeros(0, np.int64)
            raise IndexError(f"LazyImages takes an integer, a slice, a 1-D integer array or a boolean mask, not "
                             f"{type(key).__name__} {a.dtype} {a.shape}")
        a = a.astype(np.int64)
        if a.size and (a.min() < -n or a.max() >= n):
            raise IndexError(f"index {a.min() if a.min() < -n else a.max()} out of range for {n} images")
        return np.where(a < 0, a + n, a)

    def _positions(self, rows: np.ndarray) -> np.ndarray:
        return rows if self._index is None else self._index[rows]

    # -- access
    def __getitem__(self, key):
        if isinstance(key, tuple):
            if not key:
                return self[:]
            first, rest = key[0], key[1:]
            if any(isinstance(r, (list, np.ndarray)) for r in rest):
                raise IndexError("LazyImages: index arrays are accepted on the first axis only")
            out = self[first]
            return out[rest] if out.ndim == 3 else out[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            n = len(self)
            if not -n <= key < n:
                raise IndexError(f"index {key} out of range for {n} images")
            return _decode_into(self.files, self.transform, self._hwc, self._positions(np.array([key % n])))[0]
        return _decode_into(self.files, self.transform, self._hwc, self._positions(self._rows(key)))

    def take(self, idx) -> "LazyImages":
        """The images ``idx`` selects (integer array, boolean mask or slice), as a view: nothing is decoded."""
        if isinstance(idx, (int, np.integer)):
            raise TypeError("LazyImages.take needs an index array, a mask or a slice; use x[i] for one image")
        return LazyImages(self.files, self.transform, self._hwc, self._positions(self._rows(idx)))

    def batches(self, batch_size: int, order=None, workers: Optional[int] = None) -> Iterator[np.ndarray]:
        """Decoded uint8 ``[b, H, W, C]`` batches of ``order`` (rows of this view; default all, in order), decoded
        in ``decode_workers`` DataLoader worker processes, yielded in order. UserError names a bad file."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rows = np.arange(len(self), dtype=np.int64) if order is None else self._rows(order)
        dataset = _Batches(self.files, self.transform, self._hwc, self._positions(rows), batch_size)
        n_workers = min(decode_workers(len(rows), workers), len(dataset))
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=n_workers,
                                             prefetch_factor=2 if n_workers else None)
        for item in loader:
            if isinstance(item, str):
                raise UserError(item)
            yield item.numpy()


class _Batches(torch.utils.data.Dataset):
    """Batch ``b`` of ``positions``, decoded (in a worker process); a file that fails gives its message."""

    def __init__(self, files: ImageFiles, transform: Transform, hwc, positions: np.ndarray, batch_size: int):
        self.files, self.transform, self.hwc = files, transform, hwc
        self.positions, self.batch_size = positions, batch_size

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def __getitem__(self, b: int):
        try:
            return _decode_into(self.files, self.transform, self.hwc,
                                self.positions[b * self.batch_size:(b + 1) * self.batch_size])
        except UserError as e:
            return str(e)


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, which containers narrow), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def decode_workers(n: int, workers: Optional[int] = None) -> int:
    """Worker processes to decode ``n`` images with (module docstring); 0 means this process."""
    if workers is None:
        raw = os.environ.get(WORKERS_ENV_VAR, "").strip()
        try:
            workers = int(raw) if raw else min(MAX_WORKERS, cpu_count())
        except ValueError:
            workers = -1
        if workers < 0:
            raise UserError(f"{WORKERS_ENV_VAR}={raw!r} is not a number of worker processes: use 0 (decode in the "
                            f"main process) or more, or unset it for min({MAX_WORKERS}, CPU count).")
        if n < SMALL:
            workers = 0
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers and multiprocessing.current_process().daemon:
        log.info("decoding images in this process: a daemon process (a pool's worker) may not start workers")
        return 0
    return workers


# ---------------------------------------------------------------------------------------------------- check


class _Probe(torch.utils.data.Dataset):
    """Chunk ``c`` of the files: ``(int64 [k, 3] of probe() rows, [(position, message) of files that failed]``."""

    def __init__(self, files: ImageFiles, chunk: int) -> None:
        self.files, self.chunk = files, chunk

    def __len__(self) -> int:
        return -(-len(self.files) // self.chunk)

    def __getitem__(self, c: int):
        start = c * self.chunk
        stop = min(start + self.chunk, len(self.files))
        rows = np.zeros((stop - start, 3), np.int64)
        failed = []
        with strict_decoding():
            for p in range(start, stop):
                try:
                    rows[p - start] = probe(self.files.read(p), self.files.where(p))
                except UserError as e:
                    failed.append((p, str(e)))
        return rows, failed


def _as_is(item):
    return item


def check_images(files: ImageFiles, desc: str = "checking images", workers: Optional[int] = None) -> np.ndarray:
    """Decode every file once (in worker processes) and return int64 ``[N, 3]``: width, height and 1 if grayscale
    (else 0) of each decoded at its own size. UserError naming the first file (in order) that cannot be decoded,
    and how many others fail too."""
    dataset = _Probe(files, CHECK_CHUNK)
    n_workers = min(decode_workers(len(files), workers), len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=n_workers,
                                         collate_fn=_as_is, prefetch_factor=4 if n_workers else None)
    out, failed = [], []
    log.info("%s: decoding %d images once (%d worker processes)", desc, len(files), n_workers)
    with tqdm(total=len(files), desc=desc, unit="img", disable=None, leave=False) as bar:
        for rows, bad in loader:
            out.append(rows)
            failed += bad
            bar.update(len(rows))
    if failed:
        failed.sort()
        others = "" if len(failed) == 1 else (
            f" {len(failed) - 1} other file(s) cannot be decoded either: "
            + ", ".join(files.where(p) for p, _ in failed[1:4]) + (", ..." if len(failed) > 4 else "") + ".")
        raise UserError(failed[0][1] + others)
    return np.concatenate(out) if out else np.zeros((0, 3), np.int64)


# ---------------------------------------------------------------------------------------------------- files


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` as an ``.npz`` written atomically; a cache that cannot be written costs a rebuild (a warning)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    try:
        atomic_write(path, write)
    except OSError as e:
        log.warning("could not write the cache file %s (%s); it is built again next time", path, e.strerror or e)


def load_arrays(path: Path) -> Optional[dict[str, np.ndarray]]:
    """An ``.npz`` read with ``allow_pickle=False``; None when absent, a warning and None when unreadable."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001  (truncated or foreign file: rebuild it)
        log.warning("cache file %s is unusable (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None
