"""Fashion-MNIST (Xiao et al. 2017): 60000 train / 10000 test grayscale 28x28 images, 10 classes.

Format: four IDX files (see :mod:`datasets.idx`), officially gzip-compressed:
``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz`` from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ .

Verification: a ``.gz`` file is accepted when its md5 is the official archive's, or, failing that, when its
decompressed content has the official content md5 (a re-compressed copy, e.g. Debian's
``dataset-fashion-mnist`` package under ``/usr/share/datasets/fashion-mnist``, whose gzip headers lack the
original file name, so the archive md5 differs while the IDX bytes are identical). Uncompressed IDX files are
accepted when their md5 is the official content md5.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from bench.base.errors import UserError

from . import _files
from ._base import ImageDataset, register_dataset
from .idx import IMAGES_MAGIC, LABELS_MAGIC, gunzip, parse_idx

NAME = "fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _read(path: Path, stem: str, magic: int) -> tuple[np.ndarray, str]:
    """Verified, parsed IDX array from ``path`` (``stem.gz`` or ``stem``) and a note for ``source``."""
    data = path.read_bytes()
    where = str(path)
    if path.name.endswith(".gz"):
        gz_key = stem + ".gz"
        actual = _files.md5_bytes(data)
        if actual == _files.CHECKSUMS[gz_key]:
            raw = gunzip(data, where)
            note = f"{where} (md5 {actual}, official)"
        else:
            try:
                raw = gunzip(data, where)
            except UserError as e:
                raise UserError(f"{e} (Its md5 is {actual}, the official {_files.CHECKSUMS[gz_key]}.)") from None
            raw_md5 = _files.md5_bytes(raw)
            if raw_md5 != _files.CHECKSUMS[stem]:
                raise UserError(
                    f"Checksum mismatch for {where}: md5 is {actual} (decompressed {raw_md5}), expected the "
                    f"official {_files.CHECKSUMS[gz_key]} (decompressed {_files.CHECKSUMS[stem]}). The file is "
                    f"corrupt or not the official release. Delete it so it is downloaded again, or replace it "
                    f"with the official file from {_files.URLS[gz_key]}."
                )
            note = f"{where} (re-compressed copy, md5 {actual}; decompressed md5 {raw_md5}, official)"
    else:
        raw = data
        actual = _files.verify_bytes(raw, stem, where, _files.URLS[stem + ".gz"] + " (gunzip it)")
        note = f"{where} (md5 {actual}, official)"
    return parse_idx(raw, where, magic), note


@register_dataset(NAME)
def load_fashion_mnist(data_dir: Optional[Path], download: bool) -> ImageDataset:
    needs = [
        _files.Need(describe=f"{s}.gz (or uncompressed {s})", names=(f"{s}.gz", s), download=f"{s}.gz")
        for s in STEMS
    ]
    paths = _files.locate(NAME, NAME, needs, data_dir, download)
    arrays, notes = [], []
    for path, stem in zip(paths, STEMS):
        arr, note = _read(path, stem, IMAGES_MAGIC if "images" in stem else LABELS_MAGIC)
        arrays.append(arr)
        notes.append(note)
    train_x, train_y, test_x, test_y = arrays
    for split, x, y, (xp, yp) in (("train", train_x, train_y, paths[:2]), ("test", test_x, test_y, paths[2:])):
        if x.shape[1:] != (28, 28) or x.shape[0] != y.shape[0] or (y.size and y.max() >= len(CLASSES)):
            raise UserError(
                f"{xp} and {yp} do not form a Fashion-MNIST {split} set: images {list(x.shape)}, labels "
                f"{list(y.shape)} with maximum {int(y.max()) if y.size else None} (expected [N, 28, 28] images, N "
                f"labels in 0..9). Replace them with the official files."
            )
    return ImageDataset(
        name=NAME,
        train_x=train_x[..., None],
        train_y=train_y.astype(np.int64),
        test_x=test_x[..., None],
        test_y=test_y.astype(np.int64),
        num_classes=len(CLASSES),
        classes=CLASSES,
        source="; ".join(notes),
    )
