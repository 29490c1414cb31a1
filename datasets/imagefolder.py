"""Bring-your-own images: ``load_dataset("imagefolder", data_dir=PATH)`` (``--dataset imagefolder --data-dir PATH``).

PATH is a folder or an archive (``.tar``, ``.tar.gz`` / ``.tgz``, ``.tar.bz2``, ``.tar.xz``, ``.zip``) holding

* ``train/<class>/...`` and ``test/<class>/...`` (both with the same class folders), or
* one tree ``<class>/...`` of class folders, from which a fixed, stratified test part is held out: of each class,
  the ``round(f * n)`` files (at least 1, at most ``n - 1``) whose ``sha256("0:" + relative path)`` is smallest,
  ``f`` = ``$BENCH_IMAGEFOLDER_TEST_FRACTION`` (default 0.2). The choice depends only on a file's own name, so it
  is the same on every machine and stays put when files are added.

Either may sit inside one top folder (``mydata/train/...``): when the root holds a single folder, no images and
that folder is not ``train``/``test`` and holds no images itself, it is stepped into. Class names are the
folder names, sorted; an image may sit deeper inside its class folder. Sample ids (``train_ids`` /
``test_ids``) are the relative paths (``train/cat/0001.jpg``), arrays are ordered by (class, path).

What is read. Hidden entries (a name starting with ``.``: ``.DS_Store``, macOS ``._photo.jpg`` AppleDouble
files, ``.git/``) and the system files ``Thumbs.db``, ``desktop.ini``, ``__MACOSX/`` are skipped, whatever
their extension. Every other file inside a class folder must be an image Pillow can decode: a text file there
is an error that names it, not something silently dropped. Files outside the class folders (a ``README`` at
the root or beside ``train/``) are ignored unless they have an image extension (then the error says that the
image is in no class folder); other root folders beside ``train/`` and ``test/`` (``val/``) are ignored with a
warning. Archives are read member by member, never extracted: a zip by member; an uncompressed tar in place, by
each member's byte offset; a compressed tar streamed with its members held in memory, or, above 1 GiB, from a copy
decompressed once into the cache (:func:`datasets.imagefolder_lazy.plain_tar`). A member with an absolute path, a
``..`` component, or that is a link or device is an error, as are duplicate members. File listing, reading and
decoding live in :mod:`datasets._imagefiles`.

Decoding. Pillow, with ``ImageFile.LOAD_TRUNCATED_IMAGES`` forced off while decoding (a truncated JPEG is an
error naming the file, not a grey-filled image); EXIF orientation is applied; the first frame of an animated
file is used; alpha is dropped. Images become 1-channel ``L`` when every file is grayscale (modes 1, L, LA, I,
I;16, F), else RGB. All are resized (bilinear, aspect ratio not kept) to one size: ``$BENCH_IMAGEFOLDER_SIZE``
(``32`` for 32x32 or ``WxH``, e.g. ``64x48``), default the most common size (ties: the larger area); the choice
is logged once, when the arrays are built, and recorded in ``source``.

Cache. The decoded uint8 arrays are saved (``arrays.npz``, loaded with ``allow_pickle=False``, written
atomically) under ``<cache>/imagefolder/<sha256>/`` where ``<cache>`` is ``load_dataset(cache_dir=)`` /
``--cache-dir``, else ``$BENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/bench`` (``~/.cache/bench``). The sha256 is over
the sorted relative file names and the sha256 of each file's bytes, plus the size setting and, for a single
tree, the held-out fraction; it is therefore the same for a folder and an archive of it (with or without the top
folder), and any change of a file's bytes or name gives a new entry (older entries are left untouched). A load
reads and hashes all files, then decodes only on a cache miss; for an archive, ``<cache>/imagefolder/archives/``
first maps the archive's own sha256 (and the settings) to its entry, so a cached archive is not even parsed
(CIFAR-10 as 60,000 JPEGs in a .tar.gz: about 11 s to build, 0.4 s from the cache). The ``source`` string is
``imagefolder:<sha256>:<layout, counts, size>``; it holds no path, so the same images give the same source (and
the same backbone and feature caches) wherever they are; ``--data-dir`` itself is in run.json's config.

Large sets are streamed. When no ``arrays.npz`` exists and the decoded images would exceed
``$BENCH_IMAGEFOLDER_LAZY_BYTES`` (default 2 GiB), nothing is decoded into memory: ``train_x`` / ``test_x`` are
:class:`datasets.lazy.LazyImages` with the same pixels, every file is decoded once in worker processes to check
it (cached), and ``source`` ends in ``; streamed``. See :mod:`datasets.imagefolder_lazy`.

The dataset's ``name`` is the folder or archive name without its extension (``cifar10-jpeg`` for
``cifar10-jpeg.tar.gz``). ``download`` is ignored. Every user-fixable problem raises
:class:`bench.base.errors.UserError` naming the file or folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from bench.base.errors import UserError
from bench.base.hashing import atomic_write, canonical_json, file_sha256

from . import _files, imagefolder_lazy
from ._base import ImageDataset, register_dataset
from ._imagefiles import (  # noqa: F401  (re-exported: the file rules and decoding live in _imagefiles)
    GRAY_MODES, IGNORED_NAMES, IMAGE_EXTENSIONS, RESAMPLE, _decode, _is_image_name, _member_name, _skipped, _Tree,
    _utf8, strict_decoding)
from .imagefolder_lazy import choose_size

log = logging.getLogger(__name__)

NAME = "imagefolder"
SIZE_ENV_VAR = "BENCH_IMAGEFOLDER_SIZE"
FRACTION_ENV_VAR = "BENCH_IMAGEFOLDER_TEST_FRACTION"
DEFAULT_TEST_FRACTION = 0.2
HOLDOUT_SEED = 0
CACHE_SUBDIR = "imagefolder"
CACHE_FILE = "arrays.npz"
ARCHIVE_INDEX = "archives"  # <cache>/imagefolder/archives/<sha256(archive sha256, settings)>: the entry's sha256
FORMAT_VERSION = 1  # part of the cache key: bump when decoding changes
SPLITS = ("train", "test")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")
HOLD_BYTES = 1 << 30  # decoded images held between the two steps of _decode_all; beyond it they are decoded again
LAYOUT_HINT = ("Expected train/<class>/ and test/<class>/ folders, or one tree of <class>/ folders (a test part "
               "is then held out), optionally inside one top folder.")


# -------------------------------------------------------------------------------------------------- layout


class _Layout:
    """Which files belong to which split and class: ``samples[split]`` lists (relative path, class index)."""

    def __init__(self, tree: _Tree) -> None:
        self.tree = tree
        files, dirs = tree.files, tree.dirs
        self.prefix = self._top_folder(files, dirs)
        p = self.prefix
        files = [f[len(p):] for f in files if f.startswith(p)]
        dirs = {d[len(p):] for d in dirs if d.startswith(p)}
        top = {d for d in dirs if "/" not in d}
        self.split_layout = bool(top & set(SPLITS))
        if self.split_layout:
            missing = [s for s in SPLITS if s not in top]
            if missing:
                have = "train" if "test" in missing else "test"
                raise UserError(f"{self._where(have)} has no {missing[0]}/ beside it. Add {missing[0]}/<class>/ "
                                f"folders, or give one tree of class folders without train/ and test/ so that a "
                                f"test part is held out.")
            ignored = sorted(top - set(SPLITS))
            if ignored:
                log.warning("%s: ignoring the folder(s) %s beside train/ and test/", tree.path, ", ".join(ignored))
            roots = {s: s + "/" for s in SPLITS}
        else:
            roots = {"": ""}
        # loose files: outside every class folder
        for f in files:
            for r in {"", *roots.values()}:
                if f.startswith(r) and "/" not in f[len(r):] and _is_image_name(f):
                    raise UserError(f"{self._where(f)} is in no class folder. {LAYOUT_HINT} Move it into its class "
                                    f"folder or remove it.")
        self.class_files: dict[str, dict[str, list[str]]] = {}  # split or "" -> class -> files
        for split, r in roots.items():
            classes = {d[len(r):] for d in dirs if d.startswith(r) and "/" not in d[len(r):]}
            per = {c: [] for c in sorted(classes)}
            for f in files:
                rest = f[len(r):] if f.startswith(r) else None
                if rest and "/" in rest:
                    per[rest.split("/", 1)[0]].append(f)
            self.class_files[split] = per
        if not any(fs for per in self.class_files.values() for fs in per.values()):
            archives = sorted(f for f in files if "/" not in f and f.lower().endswith(ARCHIVE_SUFFIXES))
            hint = f" To read an archive, pass the archive itself (e.g. --data-dir {self._where(archives[0])})." \
                if archives and tree.kind == "folder" else ""
            raise UserError(f"{tree.path} holds no images in class folders. {LAYOUT_HINT}{hint}")
        if self.split_layout:
            a, b = (set(self.class_files[s]) for s in SPLITS)
            if a != b:
                only = "; ".join(f"only in {s}/: {', '.join(sorted(x - y))}" for s, x, y in
                                 (("train", a, b), ("test", b, a)) if x - y)
                raise UserError(f"{tree.path}: train/ and test/ have different class folders ({only}). Give both "
                                f"the same class folders.")
        empty = [f"{s}/{c}".lstrip("/") for s, per in self.class_files.items() for c, fs in per.items() if not fs]
        if empty:
            raise UserError(f"the class folder(s) {', '.join(self._where(e) for e in empty[:5])} hold no images "
                            f"(hidden files are skipped). Add images or remove the folder(s).")
        self.classes = tuple(next(iter(self.class_files.values())))
        if len(self.classes) < 2:
            only = self._where(("train/" if self.split_layout else "") + self.classes[0])
            raise UserError(f"{tree.path} has a single class folder ({only}); classification needs at least two. "
                            f"{LAYOUT_HINT}")

    @staticmethod
    def _top_folder(files, dirs) -> str:
        top_dirs = {d.split("/", 1)[0] for d in dirs}
        if len(top_dirs) != 1 or any("/" not in f and _is_image_name(f) for f in files):
            return ""
        (top,) = top_dirs
        if top in SPLITS or any(f.startswith(top + "/") and f.count("/") == 1 and _is_image_name(f) for f in files):
            return ""
        return top + "/"

    def _where(self, rel: str) -> str:
        return self.tree.where(self.prefix + rel)

    def samples(self, fraction: float) -> dict[str, list[tuple[str, int]]]:
        """(relative path, class index) per split, ordered by (class, path)."""
        index = {c: i for i, c in enumerate(self.classes)}
        if self.split_layout:
            return {s: [(f, index[c]) for c, fs in self.class_files[s].items() for f in sorted(fs)] for s in SPLITS}
        out: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
        for c, fs in self.class_files[""].items():
            n = len(fs)
            if n < 2:
                raise UserError(f"the class folder {self._where(c)} holds a single image; holding out a test part "
                                f"needs at least two per class. Add images, or give train/ and test/ folders.")
            k = min(max(math.floor(fraction * n + 0.5), 1), n - 1)
            ranked = sorted(fs, key=lambda f: hashlib.sha256(_utf8(f"{HOLDOUT_SEED}:{f}")).digest())
            test = set(ranked[:k])
            out["train"] += [(f, index[c]) for f in sorted(fs) if f not in test]
            out["test"] += [(f, index[c]) for f in sorted(fs) if f in test]
        return out


# ------------------------------------------------------------------------------------------------ settings


def _size_setting() -> Optional[tuple[int, int]]:
    """``$BENCH_IMAGEFOLDER_SIZE`` as (width, height), or None for the most common size."""
    raw = os.environ.get(SIZE_ENV_VAR, "").strip().lower()
    if raw in ("", "auto"):
        return None
    try:
        w, _, h = raw.partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise UserError(f"{SIZE_ENV_VAR}={os.environ[SIZE_ENV_VAR]!r} is not an image size: use N (N x N pixels) "
                        f"or WxH (e.g. 64x48), or unset it to use the most common size of the images.")
    return size


def _setting_text() -> str:
    return f"{SIZE_ENV_VAR}={os.environ.get(SIZE_ENV_VAR)}"


def _test_fraction() -> float:
    return _files.env_number(FRACTION_ENV_VAR, DEFAULT_TEST_FRACTION, float, lambda f: 0 < f < 1,
                             f"is not a fraction strictly between 0 and 1 (e.g. 0.2); unset it for the default "
                             f"{DEFAULT_TEST_FRACTION}.")


def _cache_root() -> Path:
    """``load_dataset(cache_dir=)``, else ``$BENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/bench`` (~/.cache/bench)."""
    harness = _files._HARNESS_CACHE.get() or os.environ.get(_files.CACHE_ENV_VAR)
    if harness:
        return Path(harness).expanduser().absolute()
    return (Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "bench").absolute()


def dataset_name(path: Path) -> str:
    """The folder name, or the archive name without its extension."""
    name = path.resolve().name if path.is_dir() else path.name
    low = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if not path.is_dir() and low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


# -------------------------------------------------------------------------------------------------- images


def _decode_all(tree: _Tree, prefix: str, samples: dict[str, list[tuple[str, int]]], size_setting, name: str
                ) -> tuple[dict[str, np.ndarray], str]:
    """``{"train_x", "test_x"}`` and a note on the size and mode. Every file is decoded once; the decoded images
    are held (up to :data:`HOLD_BYTES`) until the common size and mode are known, those beyond are decoded again."""
    rels = [prefix + f for s in SPLITS for f, _ in samples[s]]
    held: list[Optional[np.ndarray]] = []
    sizes: list[tuple[int, int]] = []
    gray = True
    total = 0
    with strict_decoding():  # a truncated file is an error, never a grey-filled image
        for r in rels:
            a = _decode(tree.read(r), tree.where(r), size_setting)
            sizes.append((a.shape[1], a.shape[0]))
            gray = gray and a.ndim == 2
            keep = total + a.nbytes <= HOLD_BYTES
            held.append(a if keep else None)
            total += a.nbytes if keep else 0
        size, c, note = choose_size(sizes, gray, size_setting, _setting_text())
        log.warning("%s: decoded %d images to %s%s", name, len(rels), note,
                    "" if size_setting else f"; set {SIZE_ENV_VAR}=WxH to choose the size")
        w, h = size
        out: dict[str, np.ndarray] = {}
        i = 0
        for split in SPLITS:
            x = out[f"{split}_x"] = np.empty((len(samples[split]), h, w, c), np.uint8)
            for j in range(len(x)):
                a = held[i]
                if a is None:
                    a = _decode(tree.read(rels[i]), tree.where(rels[i]), size)
                held[i] = None
                if a.shape[:2] != (h, w):
                    a = np.asarray(Image.fromarray(a).resize(size, RESAMPLE))
                x[j] = a.reshape(h, w, -1)  # a gray image in an RGB set: its channel is repeated, as convert does
                i += 1
    return out, note


# --------------------------------------------------------------------------------------------------- cache


def _cache_key(tree: _Tree, prefix: str, samples, size_setting, fraction: Optional[float]) -> str:
    manifest = hashlib.sha256()
    for f in sorted(f for s in SPLITS for f, _ in samples[s]):
        manifest.update(_utf8(f"{hashlib.sha256(tree.read(prefix + f)).hexdigest()}  {f}\n"))
    settings = {"v": FORMAT_VERSION, "size": list(size_setting) if size_setting else "auto",
                "holdout": None if fraction is None else {"fraction": fraction, "seed": HOLDOUT_SEED}}
    manifest.update(json.dumps(settings, sort_keys=True).encode())
    return manifest.hexdigest()


def _from_arrays(name: str, a: dict[str, np.ndarray]) -> ImageDataset:
    classes = tuple(str(c) for c in a["classes"])
    return ImageDataset(name, a["train_x"], a["train_y"], a["test_x"], a["test_y"], len(classes), classes,
                        str(a["source"]), train_ids=a["train_ids"], test_ids=a["test_ids"])


def _load_cached(path: Path, key: str, name: str) -> Optional[ImageDataset]:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if str(arrays["key"]) != key:
            raise ValueError(f"built for key {arrays['key']}")
        return _from_arrays(name, arrays)
    except Exception as e:  # noqa: BLE001  (truncated or foreign file: rebuild it)
        log.warning("image cache %s is unusable (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None


@register_dataset(NAME, accepts_files=True)
def load_imagefolder(data_dir: Optional[Path], download: bool) -> ImageDataset:
    if data_dir is None:
        raise UserError("The imagefolder dataset reads your own images: pass --data-dir PATH naming a folder or a "
                        ".tar/.tar.gz/.tgz/.zip archive that holds train/ and test/ class folders, or one tree of "
                        "class folders (a test part is then held out).")
    path = Path(data_dir).expanduser().absolute()
    if not path.exists():
        raise UserError(f"--data-dir {path} does not exist. Pass the folder or archive (.tar, .tar.gz, .tgz, "
                        f".zip) that holds the images.")
    if not path.is_dir() and not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"--data-dir {path} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)}). "
                        f"Pass the folder or archive that holds the images.")
    size_setting = _size_setting()
    name = dataset_name(path)
    root = _cache_root() / CACHE_SUBDIR
    index = archive_sha = plain = None
    if not path.is_dir():  # an archive: its own sha256 may already name the cache entry (no tar parsing then)
        settings = canonical_json({"v": FORMAT_VERSION, "size": os.environ.get(SIZE_ENV_VAR, "").strip().lower(),
                                   "fraction": os.environ.get(FRACTION_ENV_VAR, "").strip()})
        archive_sha = file_sha256(path)
        index = root / ARCHIVE_INDEX / hashlib.sha256(f"{archive_sha} {settings}".encode()).hexdigest()
        key = _read_index(index)
        cached = _load_cached(root / key / CACHE_FILE, key, name) if key else None
        if cached is None and key:  # streamed before (imagefolder_lazy): its member locations are cached
            cached = imagefolder_lazy.reopen_archive(root, key, index, path, archive_sha, name)
        if cached is not None:
            return cached
        if not path.name.lower().endswith(".zip"):  # a tar: read by offset when uncompressed or large
            plain = imagefolder_lazy.plain_tar(path, archive_sha, root)
    tree = _Tree(path) if plain is None else _Tree(path, plain)
    try:
        layout = _Layout(tree)
        fraction = None if layout.split_layout else _test_fraction()
        samples = layout.samples(fraction or 0.0)
        key = _cache_key(tree, layout.prefix, samples, size_setting, fraction)
        cache_file = root / key / CACHE_FILE
        dataset = _load_cached(cache_file, key, name)
        if layout.split_layout:
            how = "train/ and test/ class folders"
        else:
            how = (f"one tree of class folders, test part held out (fraction {fraction}, stratified, sha256 of "
                   f"the path with seed {HOLDOUT_SEED})")
        if dataset is None:  # above $BENCH_IMAGEFOLDER_LAZY_BYTES decoded: streamed, not decoded here
            dataset = imagefolder_lazy.load_streamed(
                tree, layout.prefix, samples, layout.classes, key, name, root, size_setting, _setting_text(), how,
                None if index is None else (index, archive_sha))
        if dataset is None:
            arrays, note = _decode_all(tree, layout.prefix, samples, size_setting, name)
    finally:
        tree.close()
    if dataset is None:
        n_train, n_test = len(samples["train"]), len(samples["test"])
        source = (f"imagefolder:{key}:{how}; {n_train} train + {n_test} test images, {len(layout.classes)} "
                  f"classes; {note}")
        arrays.update(
            train_y=np.array([c for _, c in samples["train"]], np.int64),
            test_y=np.array([c for _, c in samples["test"]], np.int64),
            train_ids=np.array([f for f, _ in samples["train"]], dtype=str),
            test_ids=np.array([f for f, _ in samples["test"]], dtype=str),
            classes=np.array(layout.classes, dtype=str), source=np.array(source), key=np.array(key))
        dataset = _from_arrays(name, arrays)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, **arrays)

        _save(cache_file, write)
    if index is not None:
        _save(index, lambda tmp: Path(tmp).write_text(key))
    return dataset


def _read_index(index: Path) -> Optional[str]:
    try:
        key = index.read_text().strip()
    except OSError:
        return None
    return key if len(key) == 64 and all(ch in "0123456789abcdef" for ch in key) else None


def _save(path: Path, write) -> None:
    try:
        atomic_write(path, write)
    except OSError as e:  # a read-only or full cache costs a rebuild next time, nothing else
        log.warning("could not write the image cache %s (%s); the images will be read and decoded again next "
                    "time", path, e.strerror or e)
