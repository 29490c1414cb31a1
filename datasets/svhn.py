"""SVHN, cropped digits ("format 2"): 73257 train / 26032 test RGB 32x32 images of house-number digits.

Format (http://ufldl.stanford.edu/housenumbers/): ``train_32x32.mat`` and ``test_32x32.mat`` are MATLAB files
read with :func:`scipy.io.loadmat`; ``X`` is uint8 ``[32, 32, 3, N]`` (height, width, RGB, image) and ``y`` is
``[N, 1]`` with labels 1..10 where 10 means the digit 0. Images are returned as ``[N, 32, 32, 3]`` and label 10
is mapped to 0, so class ``i`` is the digit ``i``. (The ``extra_32x32.mat`` set is not used.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from bench.base.errors import UserError

from . import _files
from ._base import ImageDataset, register_dataset

NAME = "svhn"
FILES = ("train_32x32.mat", "test_32x32.mat")
CLASSES = tuple(str(i) for i in range(10))


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    from scipy.io import loadmat

    actual = _files.verify_file(path, path.name)
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # truncated / garbled .mat
        raise UserError(
            f"{path} is not a readable MATLAB file ({type(e).__name__}: {e}). Delete it so it is downloaded "
            f"again, or replace it with the official file from {_files.URLS[path.name]}."
        ) from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) \
            or y.size != x.shape[3] or (y.size and (y.min() < 1 or y.max() > 10)):
        raise UserError(
            f"{path} is not an SVHN cropped-digits file: expected X uint8 [32, 32, 3, N] and y [N, 1] in 1..10, "
            f"got X {None if x is None else (x.dtype, x.shape)} and y {None if y is None else y.shape}. Replace it "
            f"with the official file from {_files.URLS[path.name]}."
        )
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0
    return images, labels, f"{path} (md5 {actual}, official)"


@register_dataset(NAME)
def load_svhn(data_dir: Optional[Path], download: bool) -> ImageDataset:
    needs = [_files.Need(describe=f, names=(f,), download=f) for f in FILES]
    train_path, test_path = _files.locate(NAME, NAME, needs, data_dir, download)
    train_x, train_y, train_note = _read(train_path)
    test_x, test_y, test_note = _read(test_path)
    return ImageDataset(NAME, train_x, train_y, test_x, test_y, 10, CLASSES, f"{train_note}; {test_note}")
