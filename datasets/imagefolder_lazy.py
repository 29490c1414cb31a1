"""``imagefolder`` above a size: the images are streamed (:class:`datasets.lazy.LazyImages`), not decoded into memory.

:mod:`datasets.imagefolder` calls this module once it knows the files, their split and the cache key (the sha256
over names and file bytes). When no ``arrays.npz`` exists for the key and the decoded images would take more than
``$BENCH_IMAGEFOLDER_LAZY_BYTES`` (default 2 GiB; an integer number of bytes), the dataset is streamed:

* The decision estimates the decoded size from the headers of up to :data:`ESTIMATE_SAMPLE` files spread evenly
  over the set (their most common size, ties to the larger area, or ``$BENCH_IMAGEFOLDER_SIZE``; one channel if
  every sampled file is grayscale), times the number of images. Nothing is decoded for it.
* Every file is then decoded once in DataLoader worker processes (:func:`datasets.lazy.check_images`), before any
  training: a file that is not an image is a UserError naming it, as in memory. The pass gives each image's
  decoded size, from which the one size and the mode are chosen exactly as the in-memory path chooses them.
* The index, ``<cache>/imagefolder/<key>/streamed.npz`` (``allow_pickle=False``; sample ids, labels, class names,
  the chosen size and channels, the source string, each file's decoded size, the key), is written only after that
  pass succeeded: its presence, under the key that covers every name and byte, is the record that the set decodes,
  so a second load decodes nothing. It is reused as long as the decoded size stays above the threshold (raise
  the threshold and the next load decodes into memory instead).
* Archives are read by member. A zip by member name (opened once per process). A tar by the byte offset and
  size of each member's data: an uncompressed ``.tar`` in place; a compressed one (``.tar.gz``, ``.tar.bz2``,
  ``.tar.xz``, recognised by its magic bytes) decompressed ONCE into ``<cache>/imagefolder/tars/<archive
  sha256>.tar`` (written atomically), since random access into a compressed stream is impractical. A compressed
  archive larger than :data:`TAR_HOLD_BYTES` is decompressed that way before it is even listed, whatever the
  decision, so that no more than that is held in memory. ``<cache>/imagefolder/archives/<entry>.members.npz``
  keeps an archive's member locations, so a streamed archive seen before is not parsed again.

The ``source`` is the in-memory one (``imagefolder:<sha256>:<layout, counts, size>``) plus ``; streamed``; the
pixels are identical (the same :func:`datasets._imagefiles._decode`, the same resize).
"""
from __future__ import annotations

import bz2
import collections
import gzip
import io
import logging
import lzma
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from bench.base.errors import UserError
from bench.base.hashing import atomic_write

from . import _files
from ._base import ImageDataset
from ._imagefiles import GRAY_MODES, _Tree, compression
from .lazy import FitTo, ImageFiles, LazyImages, Names, check_images, load_arrays, save_arrays

log = logging.getLogger(__name__)

LAZY_ENV_VAR = "BENCH_IMAGEFOLDER_LAZY_BYTES"
DEFAULT_LAZY_BYTES = 2 << 30
TAR_HOLD_BYTES = 1 << 30  # a compressed tar larger than this is decompressed into the cache before it is listed
ESTIMATE_SAMPLE = 2000  # files whose headers estimate the decoded size
INDEX_FILE = "streamed.npz"
TARS_SUBDIR = "tars"
MEMBERS_SUFFIX = ".members.npz"
INDEX_VERSION = 1
SPLITS = ("train", "test")
_OPENERS = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}


def lazy_threshold() -> int:
    """``$BENCH_IMAGEFOLDER_LAZY_BYTES`` (decoded bytes above which a set is streamed), default 2 GiB."""
    return _files.env_number(LAZY_ENV_VAR, DEFAULT_LAZY_BYTES, int, lambda v: v >= 0,
                             "is not a number of bytes: use an integer such as 2147483648 (2 GiB; image sets whose "
                             "decoded size exceeds it are streamed), or unset it for the default.")


def choose_size(sizes: list[tuple[int, int]], gray: bool, size_setting: Optional[tuple[int, int]],
                setting_text: str) -> tuple[tuple[int, int], int, str]:
    """The one (width, height), the channels and the note for ``source``: ``size_setting`` when given (``sizes``
    are then the decoded sizes after that resize), else the most common of ``sizes`` (ties: the larger area)."""
    counts = collections.Counter(sizes)
    mode, c = ("L", 1) if gray else ("RGB", 3)
    if size_setting is None:
        size = max(counts, key=lambda s: (counts[s], s[0] * s[1], s))
        how = f"the most common size, {counts[size]} of {len(sizes)} images"
    else:
        size = size_setting
        how = setting_text
    return size, c, f"{size[0]}x{size[1]} {mode} ({how}; {len(sizes) - counts.get(size, 0)} resized)"


# --------------------------------------------------------------------------------------------------- archives


def plain_tar(archive: Path, archive_sha: str, root: Path, force: bool = False) -> Optional[Path]:
    """The uncompressed tar to read ``archive``'s members from by offset: the archive itself when it is not
    compressed; a copy decompressed once into ``root/tars/`` when ``force`` or the archive is larger than
    :data:`TAR_HOLD_BYTES`; else None (small compressed archives are streamed and held in memory)."""
    kind = compression(archive)
    if kind is None:
        return archive
    if not force and archive.stat().st_size <= TAR_HOLD_BYTES:
        return None
    dest = root / TARS_SUBDIR / f"{archive_sha}.tar"
    if dest.exists():
        return dest
    log.warning("decompressing %s once into %s: its members are then read by offset", archive, dest)

    def write(tmp: str) -> None:
        with _OPENERS[kind](archive, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)

    try:
        atomic_write(dest, write)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise UserError(f"could not decompress {archive} into the cache {dest} ({type(e).__name__}: {e}); a large "
                        f"compressed archive is read from an uncompressed copy there. Free space in the cache "
                        f"(--cache-dir), or pass the extracted folder as --data-dir.") from None
    return dest


def _tree_files(tree: _Tree, rels: list[str], archive_sha: Optional[str], root: Path) -> ImageFiles:
    if tree.kind == "folder":
        return ImageFiles("folder", tree.path, rels)
    if tree.kind == "zip":
        raw = [tree.files[r].filename for r in rels]  # type: ignore[attr-defined]
        return ImageFiles("zip", tree.path, rels, members=None if raw == rels else raw)
    assert archive_sha is not None
    path = tree.plain_tar or plain_tar(tree.path, archive_sha, root, force=True)
    offsets, sizes = (np.array(v, np.int64) for v in zip(*(tree.offsets[r] for r in rels)))
    return ImageFiles("tar", path, rels, offsets=offsets, sizes=sizes, label=tree.path)


def _save_members(path: Path, files: ImageFiles, prefix: str) -> None:
    arrays = {"kind": np.array(files.kind), "prefix": np.array(prefix)}
    if files.kind == "tar":
        arrays.update(offsets=files.offsets, sizes=files.sizes)
    elif files.members is not None:
        arrays.update(files.members.arrays("members"))
    save_arrays(path, arrays)


def _members_files(path: Path, ids: list[str], archive: Path, archive_sha: str, root: Path) -> Optional[ImageFiles]:
    a = load_arrays(path)
    if a is None:
        return None
    try:
        kind, prefix = str(a["kind"]), str(a["prefix"])
        names = [prefix + f for f in ids]
        if kind == "zip":
            members = Names.load(a, "members") if "members_blob" in a else None
            return ImageFiles("zip", archive, names, members=members)
        if kind != "tar":
            raise ValueError(f"kind {kind!r}")
        tar = plain_tar(archive, archive_sha, root, force=True)
        return ImageFiles("tar", tar, names, offsets=a["offsets"], sizes=a["sizes"], label=archive)
    except (KeyError, ValueError) as e:
        log.warning("cache file %s is unusable (%s: %s); the archive is read again", path, type(e).__name__, e)
        return None


# ------------------------------------------------------------------------------------------------------ index


def _header(tree: _Tree, rel: str) -> Optional[tuple[tuple[int, int], str]]:
    try:
        if tree.kind == "folder":
            with open(tree.files[rel], "rb") as f, Image.open(f) as im:  # type: ignore[arg-type]
                return im.size, im.mode
        with Image.open(io.BytesIO(tree.read(rel))) as im:
            return im.size, im.mode
    except Exception:  # noqa: BLE001  (not an image: the decoding names it)
        return None


def estimated_bytes(tree: _Tree, rels: list[str], size_setting: Optional[tuple[int, int]]) -> int:
    """The decoded size of ``rels``, estimated from the headers of up to :data:`ESTIMATE_SAMPLE` of them."""
    step = max(1, -(-len(rels) // ESTIMATE_SAMPLE))
    heads = [h for h in (_header(tree, r) for r in rels[::step]) if h is not None]
    if not heads:
        return 0
    gray = all(mode in GRAY_MODES for _, mode in heads)
    counts = collections.Counter(size for size, _ in heads)
    w, h = size_setting or max(counts, key=lambda s: (counts[s], s[0] * s[1], s))
    return len(rels) * w * h * (1 if gray else 3)


def _read_index(path: Path, key: str) -> Optional[dict[str, np.ndarray]]:
    a = load_arrays(path)
    if a is not None and (str(a.get("key")) != key or int(a.get("version", -1)) != INDEX_VERSION):
        log.warning("cache file %s was built for another key or version; rebuilding it", path)
        return None
    return a


def _dataset(name: str, index: dict[str, np.ndarray], files: ImageFiles) -> ImageDataset:
    h, w, c = (int(v) for v in index["hwc"])
    n_train = len(index["train_y"])
    images = LazyImages(files, FitTo(w, h, c), (h, w, c))
    classes = tuple(Names.load(index, "classes"))
    return ImageDataset(name, images.take(slice(0, n_train)), index["train_y"], images.take(slice(n_train, None)),
                        index["test_y"], len(classes), classes, str(index["source"]),
                        train_ids=Names.load(index, "train_ids"), test_ids=Names.load(index, "test_ids"))


def _ids(index: dict[str, np.ndarray]) -> list[str]:
    return list(Names.load(index, "train_ids")) + list(Names.load(index, "test_ids"))


def _decoded_bytes(index: dict[str, np.ndarray]) -> int:
    return (len(index["train_y"]) + len(index["test_y"])) * int(np.prod(index["hwc"]))


def load_streamed(tree: _Tree, prefix: str, samples: dict[str, list[tuple[str, int]]], classes: tuple[str, ...],
                  key: str, name: str, root: Path, size_setting: Optional[tuple[int, int]], setting_text: str,
                  layout_text: str, archive: Optional[tuple[Path, str]] = None) -> Optional[ImageDataset]:
    """The streamed dataset, or None when it should be decoded into memory (at most the threshold).

    ``root``: ``<cache>/imagefolder``; ``archive``: (the archive's entry file under ``root/archives``, its sha256)
    when ``tree`` is an archive; ``setting_text`` names the size setting, ``layout_text`` the layout (for
    ``source``)."""
    path = root / key / INDEX_FILE
    index = _read_index(path, key)
    rels = [prefix + f for s in SPLITS for f, _ in samples[s]]
    threshold = lazy_threshold()
    if (estimated_bytes(tree, rels, size_setting) if index is None else _decoded_bytes(index)) <= threshold:
        return None
    files = _tree_files(tree, rels, archive[1] if archive else None, root)
    if index is None:
        probed = check_images(files, desc=f"{name}: checking {len(rels)} images")
        gray = bool(probed[:, 2].all())
        sizes = [size_setting] * len(rels) if size_setting else [(int(w), int(h)) for w, h, _ in probed]
        (w, h), c, note = choose_size(sizes, gray, size_setting, setting_text)
        n_train, n_test = len(samples["train"]), len(samples["test"])
        source = (f"imagefolder:{key}:{layout_text}; {n_train} train + {n_test} test images, {len(classes)} classes; "
                  f"{note}; streamed (decoded from the files on use)")
        index = {"key": np.array(key), "version": np.array(INDEX_VERSION), "source": np.array(source),
                 "hwc": np.array([h, w, c], np.int64), "probe": probed,
                 **{f"{s}_y": np.array([y for _, y in samples[s]], np.int64) for s in SPLITS},
                 **Names.of([f for f, _ in samples["train"]]).arrays("train_ids"),
                 **Names.of([f for f, _ in samples["test"]]).arrays("test_ids"),
                 **Names.of(classes).arrays("classes")}
        save_arrays(path, index)
        log.warning("%s: %d images (%.1f GiB decoded) are streamed as %s, decoded on use; set %s to change the "
                    "threshold", name, len(rels), _decoded_bytes(index) / 2**30, note, LAZY_ENV_VAR)
    if archive is not None:
        _save_members(archive[0].with_name(archive[0].name + MEMBERS_SUFFIX), files, prefix)
    return _dataset(name, index, files)


def reopen_archive(root: Path, key: str, entry: Path, archive: Path, archive_sha: str, name: str
                   ) -> Optional[ImageDataset]:
    """A streamed archive seen before (its index and member locations cached), without parsing it; else None."""
    index = _read_index(root / key / INDEX_FILE, key)
    if index is None or _decoded_bytes(index) <= lazy_threshold():
        return None
    files = _members_files(entry.with_name(entry.name + MEMBERS_SUFFIX), _ids(index), archive, archive_sha, root)
    return None if files is None else _dataset(name, index, files)
