"""ImageNet (ILSVRC2012): ``load_dataset("imagenet", data_dir=DIR)`` (``--dataset imagenet --data-dir DIR``).

Never decoded into memory: ``train_x`` / ``test_x`` are :class:`datasets.lazy.LazyImages` read from the files.

Layout (the extracted official archives, as torchvision's ``ImageNet`` also reads them):

* ``DIR/train/<wnid>/*.JPEG``, one folder per class (1,000 for the full set; fewer are accepted, with a warning,
  so that a subset or a miniature tree can be used);
* ``DIR/val/`` either as ``val/<wnid>/*.JPEG`` folders, or flat ``val/ILSVRC2012_val_%08d.JPEG`` files labelled by
  one of (looked for in this order):

  - the devkit: ``ILSVRC2012_validation_ground_truth.txt`` (line i: the 1-based ILSVRC2012_ID of
    ``ILSVRC2012_val_<i>``) and ``meta.mat`` (its ``synsets`` table maps an ILSVRC2012_ID with ``num_children``
    0 to its wnid), loose in ``DIR``, ``DIR/ILSVRC2012_devkit_t12/data``, ``DIR/devkit/data`` or ``DIR/devkit``,
    or inside ``DIR/ILSVRC2012_devkit_t12.tar.gz`` (read in memory, not extracted);
  - Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the wnid first in the prediction string),
    in ``DIR`` or up to three folders above it: Kaggle's "ImageNet Object Localization Challenge" copy, whose
    ``ILSVRC/Data/CLS-LOC`` folder is the ``DIR`` (its root is accepted too). Other label files have no common
    format and are not read.

``DIR`` may also be a folder holding ``imagenet/`` with that layout; without ``--data-dir`` the cache's
``data/imagenet`` folder is used. Nothing is downloaded: ImageNet needs an image-net.org account.

Classes are the train wnids, sorted (the standard class order); the train and val wnids must be equal. The test
split is the official val set (the harness holds its validation and calibration parts out of train).

Images: :func:`datasets._imagefiles._decode` (errors for truncated files, EXIF orientation applied: unlike
torchvision's loader, which ignores it, for the few files that carry it), then the standard evaluation transform,
:class:`datasets.lazy.ResizeCrop`: the shorter side resized (bilinear) to ``round(S * 256 / 224)``, the centre
``S x S`` cropped, RGB; ``S`` = ``$BENCH_IMAGENET_SIZE`` (default 224).

Checks, before any training: hidden and system files are skipped; a file with a non-image extension, a file
outside the class folders, an empty class folder, a missing ``train/`` or ``val/``, a class in one split only,
flat val files without labels, a ground truth whose line count differs from the number of val files, an ID
outside ``meta.mat``'s classes are UserErrors naming the path. Then every file is decoded once in DataLoader
workers (:func:`datasets.lazy.check_images`; a damaged image is a UserError naming it): on the full set that
takes a while, once. The key, sha256 over every file's relative path, byte size and label (not its bytes: 150
GB), names ``<cache>/imagenet/<key>/checked.npz``, the record that this exact set decoded (with each image's
size), so later loads only list the folders. ``source`` is ``imagenet:<key>:<counts, labels, transform>``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

from bench.base.errors import UserError

from . import _files
from ._base import ImageDataset, register_dataset
from ._imagefiles import _is_image_name, _skipped
from .imagefolder import _cache_root
from .lazy import ImageFiles, LazyImages, Names, ResizeCrop, check_images, load_arrays, save_arrays

log = logging.getLogger(__name__)

NAME = "imagenet"
SIZE_ENV_VAR = "BENCH_IMAGENET_SIZE"
DEFAULT_SIZE = 224
CACHE_SUBDIR = "imagenet"
CHECKED_FILE = "checked.npz"
FORMAT_VERSION = 1
NUM_CLASSES = 1000
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META = "meta.mat"
DEVKIT = "ILSVRC2012_devkit_t12"
KAGGLE_SOLUTION = "LOC_val_solution.csv"
KAGGLE_ROOT = ("ILSVRC", "Data", "CLS-LOC")
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.[A-Za-z]+")
HOW_TO_GET = ("ImageNet needs an image-net.org account, so the harness does not download it: get "
              "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz from "
              "https://image-net.org/download-images, extract the train archive's per-class tars into "
              "DIR/train/<wnid>/ and the val images into DIR/val/, put the devkit archive in DIR, and pass --data-dir "
              "DIR (Kaggle's 'ImageNet Object Localization Challenge' copy works too: pass its ILSVRC/Data/CLS-LOC "
              "folder).")


def _size() -> int:
    return _files.env_number(SIZE_ENV_VAR, DEFAULT_SIZE, int, lambda v: v >= 1,
                             f"is not an image size: use a number of pixels (e.g. 224, the crop side), or unset it "
                             f"for {DEFAULT_SIZE}.")


def _root(data_dir: Optional[Path]) -> Path:
    """The folder holding train/ and val/."""
    bases = [Path(data_dir).expanduser().absolute()] if data_dir is not None else [_files.cache_dir(NAME)]
    if data_dir is not None:
        bases.append(bases[0] / NAME)
    for base in bases:
        for root in (base, base.joinpath(*KAGGLE_ROOT)):
            if (root / "train").is_dir() or (root / "val").is_dir():
                return root
    if data_dir is None:
        raise UserError(f"No ImageNet found in the cache ({bases[0]}). {HOW_TO_GET}")
    return bases[0]


# ------------------------------------------------------------------------------------------------- listing


def _files_in(folder: Path, rel: str) -> list[tuple[str, int]]:
    """(relative path, byte size) of every non-skipped file under ``folder`` (``rel``: its relative path)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
        sub = Path(dirpath).relative_to(folder).as_posix()
        prefix = rel + ("" if sub == "." else sub + "/")
        for f in sorted(filenames):
            if _skipped(f):
                continue
            if not _is_image_name(f):
                raise UserError(f"{Path(dirpath) / f} is not an image file (by its extension); only images may sit "
                                f"in the ImageNet class folders. Remove or move it.")
            out.append((prefix + f, os.stat(Path(dirpath) / f).st_size))
    return out


def _class_folders(root: Path, split: str) -> dict[str, list[tuple[str, int]]]:
    """wnid -> (relative path, size) of the files of ``root/split/<wnid>/``; UserError for loose or empty ones."""
    folder = root / split
    per: dict[str, list[tuple[str, int]]] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _skipped(entry.name):
            continue
        if not entry.is_dir():
            raise UserError(f"{Path(entry.path)} is in no class folder: {split}/ must hold only <wnid>/ folders "
                            f"(or, for val/, only the flat ILSVRC2012_val_*.JPEG files). Move or remove it.")
        per[entry.name] = _files_in(Path(entry.path), f"{split}/{entry.name}/")
        if not per[entry.name]:
            raise UserError(f"the class folder {Path(entry.path)} holds no images. Add them or remove the folder.")
    return per


def _read_devkit(root: Path) -> Optional[tuple[str, str, bytes]]:
    """(where the ground truth is, its text, meta.mat's bytes) from a devkit folder or archive, else None."""
    for d in (root, root / DEVKIT / "data", root / "devkit" / "data", root / "devkit"):
        if (d / GROUND_TRUTH).is_file():
            if not (d / META).is_file():
                raise UserError(f"{d / GROUND_TRUTH} needs {d / META} beside it (the devkit's table of "
                                f"ILSVRC2012_IDs and wnids). Copy the devkit's data/ folder whole.")
            return str(d / GROUND_TRUTH), (d / GROUND_TRUTH).read_text(), (d / META).read_bytes()
    archive = root / f"{DEVKIT}.tar.gz"
    if not archive.is_file():
        return None
    try:
        with tarfile.open(archive, "r:*") as tar:
            files = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            if GROUND_TRUTH not in files or META not in files:
                raise UserError(f"{archive} lacks {DEVKIT}/data/{GROUND_TRUTH} or {META}. Download the ILSVRC2012 "
                                f"devkit again.")
            gt, meta = (tar.extractfile(files[n]).read() for n in (GROUND_TRUTH, META))  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{archive} is not a readable tar.gz ({type(e).__name__}: {e}). Download it again.") from None
    return f"{archive}:{GROUND_TRUTH}", gt.decode(), meta


def _meta_wnids(meta: bytes, where: str) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the leaf synsets (num_children 0: the classes) of a devkit ``meta.mat``."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        rows = zip(np.atleast_1d(synsets["ILSVRC2012_ID"]), np.atleast_1d(synsets["WNID"]),
                   np.atleast_1d(synsets["num_children"]))
        return {int(i): str(w) for i, w, children in rows if int(children) == 0}
    except Exception as e:  # noqa: BLE001  (not a MATLAB file, or no synsets table of that shape)
        raise UserError(f"{where} is not the devkit's meta.mat (a 'synsets' table with ILSVRC2012_ID, WNID and "
                        f"num_children; {type(e).__name__}: {e}). Download the ILSVRC2012 devkit again.") from None


def _devkit_labels(devkit: tuple[str, str, bytes], files: list[tuple[str, int]], root: Path) -> list[str]:
    where, text, meta = devkit
    lines = text.split()
    if len(lines) != len(files):
        raise UserError(f"{where} has {len(lines)} lines but {root / 'val'} holds {len(files)} images: the ground "
                        f"truth labels the full val set, one line per ILSVRC2012_val_%08d file. Give the whole set.")
    meta_where = where.replace(GROUND_TRUTH, META)
    wnids = _meta_wnids(meta, meta_where)
    out = []
    for rel, _ in files:
        m = VAL_FILE.fullmatch(rel.rsplit("/", 1)[-1])
        if m is None or not 1 <= int(m.group(1)) <= len(lines):
            raise UserError(f"{root / rel} is not named ILSVRC2012_val_<8 digits, 1..{len(lines)}>.JPEG, so the "
                            f"ground truth {where} cannot label it. Restore the official file names.")
        line = int(m.group(1))
        try:
            ident = int(lines[line - 1])
        except ValueError:
            raise UserError(f"{where} line {line} is {lines[line - 1]!r}, not an ILSVRC2012_ID.") from None
        if ident not in wnids:
            raise UserError(f"{where} line {line} gives the ILSVRC2012_ID {ident}, which is not a class in "
                            f"{meta_where} (IDs with num_children 0). The ground truth and meta.mat must come "
                            f"from the same devkit.")
        out.append(wnids[ident])
    return out


def _kaggle_labels(path: Path, files: list[tuple[str, int]], root: Path) -> list[str]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}).") from None
    table = {r[0]: r[1].split()[0] for r in rows[1:] if len(r) >= 2 and r[1].split()}
    if len(table) != len(files):
        raise UserError(f"{path} labels {len(table)} images but {root / 'val'} holds {len(files)}: it must label "
                        f"exactly the val images. Give the whole val set.")
    out = []
    for rel, _ in files:
        stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if stem not in table:
            raise UserError(f"{root / rel} has no row in {path}. Restore the official file names.")
        out.append(table[stem])
    return out


def _val(root: Path) -> tuple[list[tuple[str, int]], list[str], str]:
    """Val files (relative path, size), their wnids and where the labels came from."""
    folder = root / "val"
    entries = [e for e in os.scandir(folder) if not _skipped(e.name)]
    if any(e.is_dir() for e in entries):
        per = _class_folders(root, "val")
        return [f for w in per for f in per[w]], [w for w in per for _ in per[w]], "val/<wnid>/ folders"
    files = _files_in(folder, "val/")
    if not files:
        raise UserError(f"{folder} holds no images. {HOW_TO_GET}")
    devkit = _read_devkit(root)
    if devkit is not None:
        return files, _devkit_labels(devkit, files, root), "the devkit's ground truth and meta.mat"
    for d in (root, *list(root.parents)[:3]):
        if (d / KAGGLE_SOLUTION).is_file():
            return files, _kaggle_labels(d / KAGGLE_SOLUTION, files, root), KAGGLE_SOLUTION
    raise UserError(f"{folder} holds flat ILSVRC2012_val_*.JPEG files but no labels for them were found: put the "
                    f"devkit ({DEVKIT}.tar.gz, or its data/{GROUND_TRUTH} and data/{META}) in {root}, or sort val/ "
                    f"into val/<wnid>/ folders.")


# ---------------------------------------------------------------------------------------------------- loader


@register_dataset(NAME)
def load_imagenet(data_dir: Optional[Path], download: bool) -> ImageDataset:
    size = _size()
    root = _root(data_dir)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root / split} is missing: ImageNet's folder holds train/<wnid>/ and val/. {HOW_TO_GET}")
    train = _class_folders(root, "train")
    if not train:
        raise UserError(f"{root / 'train'} holds no <wnid>/ class folders. {HOW_TO_GET}")
    val_files, val_wnids, labels_from = _val(root)
    classes = tuple(sorted(train))
    only_train, only_val = sorted(set(train) - set(val_wnids)), sorted(set(val_wnids) - set(train))
    if only_train:
        raise UserError(f"the class folder {root / 'train' / only_train[0]} has no images in {root / 'val'} "
                        f"({len(only_train)} such classes): train and val must have the same classes.")
    if only_val:
        i = val_wnids.index(only_val[0])
        raise UserError(f"{root / val_files[i][0]} is of the class {only_val[0]}, which has no folder in "
                        f"{root / 'train'} ({len(only_val)} such classes): train and val must have the same classes.")
    if len(classes) != NUM_CLASSES:
        log.warning("imagenet: %d classes in %s (ILSVRC2012 has %d): a subset", len(classes), root, NUM_CLASSES)
    index = {w: i for i, w in enumerate(classes)}
    train_files = [f for w in classes for f in train[w]]
    train_y = np.array([index[w] for w in classes for _ in train[w]], np.int64)
    val_y = np.array([index[w] for w in val_wnids], np.int64)
    key = _key(train_files, train_y, val_files, val_y, classes)
    files = ImageFiles("folder", root, [f for f, _ in train_files + val_files])
    _checked(files, key)
    resize = round(size * 256 / 224)
    images = LazyImages(files, ResizeCrop(size, resize), (size, size, 3))
    n_train = len(train_files)
    source = (f"imagenet:{key}:ILSVRC2012 folders, {n_train} train + {len(val_files)} val images (the test split), "
              f"{len(classes)} classes; val labels from {labels_from}; shorter side {resize} then centre crop "
              f"{size}x{size} RGB; streamed (decoded from the files on use)")
    return ImageDataset(NAME, images.take(slice(0, n_train)), train_y, images.take(slice(n_train, None)), val_y,
                        len(classes), classes, source, train_ids=Names.of([f for f, _ in train_files]),
                        test_ids=Names.of([f for f, _ in val_files]))


def _key(train_files, train_y, val_files, val_y, classes) -> str:
    h = hashlib.sha256(f"imagenet v{FORMAT_VERSION}\n".encode())
    for files, labels in ((train_files, train_y), (val_files, val_y)):
        for (rel, nbytes), y in zip(files, labels):
            h.update(f"{rel}\t{nbytes}\t{classes[y]}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _checked(files: ImageFiles, key: str) -> np.ndarray:
    """Each file's decoded (width, height, gray), from the cache or by decoding every file once (UserError naming
    a file that is not an image)."""
    path = _cache_root() / CACHE_SUBDIR / key / CHECKED_FILE
    cached = load_arrays(path)
    if cached is not None and str(cached.get("key")) == key and cached["probe"].shape == (len(files), 3):
        return cached["probe"]
    probe = check_images(files, desc=f"imagenet: checking {len(files)} images")
    save_arrays(path, {"key": np.array(key), "version": np.array(FORMAT_VERSION), "probe": probe})
    return probe
