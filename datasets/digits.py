"""The UCI optical digits as shipped with scikit-learn (``sklearn.datasets.load_digits``): 1797 grayscale 8x8
images of the digits 0..9 with pixel values 0..16, embedded in scikit-learn (no download).

Pixels are scaled to uint8 with ``round(v * 255 / 16)``. The test set is a fixed stratified 20 % (360 images)
held out once with ``train_test_split(test_size=0.2, stratify=y, random_state=0)``, independent of any run
seed; train is the other 1437. Both keep the original order of ``load_digits``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ._base import ImageDataset, register_dataset

NAME = "digits"
SOURCE = "sklearn.datasets.load_digits"


def digits_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices of the fixed stratified 80/20 split."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    return np.sort(train), np.sort(test)


@register_dataset(NAME)
def load_digits_dataset(data_dir: Optional[Path], download: bool) -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.round(bunch.images * 255.0 / 16.0).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    y = bunch.target.astype(np.int64)
    train, test = digits_split(y)
    return ImageDataset(NAME, x[train], y[train], x[test], y[test], 10, tuple(str(i) for i in range(10)), SOURCE)
