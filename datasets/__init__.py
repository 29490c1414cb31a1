"""Image classification datasets for the benchmark, loaded from their official file formats.

``load_dataset(name, data_dir=None, download=True, cache_dir=None)`` returns an :class:`ImageDataset` (uint8
``[N, H, W, C]`` images, int64 labels, fixed train/test split). Registered names: ``digits`` (scikit-learn, embedded),
``fashion-mnist`` (IDX), ``cifar10`` / ``cifar100`` / ``cifar100-lt`` (python-version pickles), ``svhn`` (.mat), and
``imagefolder``: the user's own class folders or archive of them (``data_dir`` required; see
:mod:`datasets.imagefolder`), and ``imagenet`` (ILSVRC2012 folders; see :mod:`datasets.imagenet`). Sets larger
than memory (ImageNet; image folders above ``$BENCH_IMAGEFOLDER_LAZY_BYTES``) hold
:class:`datasets.lazy.LazyImages`, decoded on use: select images with :func:`take`, walk them with
:func:`iter_batches`. Official files are md5-verified; see :mod:`datasets._files` for where they are
looked for and how they are downloaded (progress bar, retries, resume, the ``BENCH_DATA_MIRROR`` mirror,
``BENCH_DATA_DIR`` / ``BENCH_CACHE_DIR``).
Every user-fixable problem raises :class:`bench.base.errors.UserError`.
"""
from __future__ import annotations

from ._base import ImageDataset, iter_batches, list_datasets, load_dataset, register_dataset, take
from .lazy import LazyImages

# Importing the loader modules registers them.
from . import cifar, digits, fashion_mnist, imagefolder, imagenet, svhn  # noqa: E402,F401  isort: skip

__all__ = ["ImageDataset", "LazyImages", "iter_batches", "list_datasets", "load_dataset", "register_dataset", "take"]
