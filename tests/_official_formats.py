"""Writers for small files in the exact official dataset formats (test fixtures).

* IDX (Fashion-MNIST): big-endian magic 2051/2049 and dims, C-order uint8 data, gzip-compressed with the
  original file name in the gzip header (as the official ``.gz`` files have).
* CIFAR python version: Python 2 pickles (protocol 2, strings as ``BINSTRING`` opcodes, numpy arrays via
  ``numpy.core.multiarray._reconstruct``, which is what the official files contain and why they are read with
  ``encoding="bytes"``), in the official folder names, as a real ``.tar.gz`` and/or extracted.
* SVHN: MATLAB v5 ``.mat`` written with :func:`scipy.io.savemat`, ``X`` uint8 ``[32, 32, 3, N]``, ``y`` uint8
  ``[N, 1]`` with 10 standing for the digit 0.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def md5(path: str | os.PathLike) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------ IDX


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    magic = 0x0800 | arr.ndim  # 0x00 0x00 0x08 (unsigned byte) ndim -> 2051 for 3-d, 2049 for 1-d
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx_gz(path: Path, arr: np.ndarray) -> Path:
    # gzip.open stores the file name without ".gz" in the header, like the official archives
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(arr))
    return path


def write_fashion_mnist(folder: Path, n_train: int = 30, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """The four official .gz files with random 28x28 images and labels covering 0..9; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8)[rng.permutation(n_train)],
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8)[rng.permutation(n_test)],
    }
    for stem, arr in arrays.items():
        write_idx_gz(folder / f"{stem}.gz", arr)
    return arrays


# --------------------------------------------------------------------------------------------- Py2 pickle


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    """Writes what Python 2's cPickle (protocol 2) wrote: ``str`` and ``bytes`` both as py2 byte strings."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x / Python 2 module path of the array reconstructor, as in the official files
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


# ------------------------------------------------------------------------------------------------- CIFAR


def cifar_rows(images_hwc: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 3] RGB -> official [N, 3072] rows (R plane, G plane, B plane, each row-major)."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072))


def _batch(label_key: bytes, images: np.ndarray, labels: np.ndarray, tag: str) -> bytes:
    return py2_pickle({
        b"batch_label": tag.encode(),
        label_key: [int(v) for v in labels],
        b"data": cifar_rows(images),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(labels))],
    })


def _tar_folder(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0, archive: bool = True,
                  extracted: bool = True) -> dict:
    """``root/cifar-10-batches-py/`` and/or ``root/cifar-10-python.tar.gz``; returns the HWC images/labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_x = rng.integers(0, 256, (5 * per_batch, 32, 32, 3), dtype=np.uint8)
    train_y = rng.integers(0, 10, 5 * per_batch)
    test_x = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    test_y = rng.integers(0, 10, n_test)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for b in range(5):
        s = slice(b * per_batch, (b + 1) * per_batch)
        (folder / f"data_batch_{b + 1}").write_bytes(
            _batch(b"labels", train_x[s], train_y[s], f"training batch {b + 1} of 5"))
    (folder / "test_batch").write_bytes(_batch(b"labels", test_x, test_y, "testing batch 1 of 1"))
    (folder / "batches.meta").write_bytes(py2_pickle(
        {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in names], b"num_vis": 3072}))
    (folder / "readme.html").write_text("<html>CIFAR-10</html>")
    _package(folder, root / "cifar-10-python.tar.gz", archive, extracted)
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=names)


def _package(folder: Path, tarball: Path, archive: bool, extracted: bool) -> None:
    """Leave the official folder, its official .tar.gz, or both."""
    if archive:
        _tar_folder(folder, tarball)
    if not extracted:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def write_cifar100(root: Path, train_y: np.ndarray, n_test: int = 10, seed: int = 0, archive: bool = True,
                   extracted: bool = True) -> dict:
    """``root/cifar-100-python/{train,test,meta}`` and/or the .tar.gz, train labels as given."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    train_y = np.asarray(train_y)
    train_x = rng.integers(0, 256, (len(train_y), 32, 32, 3), dtype=np.uint8)
    test_x = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    test_y = rng.integers(0, 100, n_test)
    fine = [f"fine_{i:02d}" for i in range(100)]

    def part(x, y, tag):
        return py2_pickle({
            b"filenames": [f"f_{i}.png".encode() for i in range(len(y))],
            b"batch_label": tag.encode(),
            b"fine_labels": [int(v) for v in y],
            b"coarse_labels": [int(v) // 5 for v in y],
            b"data": cifar_rows(x),
        })

    (folder / "train").write_bytes(part(train_x, train_y, "training batch 1 of 1"))
    (folder / "test").write_bytes(part(test_x, test_y, "testing batch 1 of 1"))
    (folder / "meta").write_bytes(py2_pickle({
        b"fine_label_names": [n.encode() for n in fine],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
    }))
    _package(folder, root / "cifar-100-python.tar.gz", archive, extracted)
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=fine)


# -------------------------------------------------------------------------------------------------- SVHN


def write_svhn_mat(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An official-layout .mat; returns (images [N,32,32,3], raw labels [N] in 1..10)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(n) % 10 + 1).astype(np.uint8)  # 1..10, 10 = digit 0
    savemat(path, {"X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)), "y": labels.reshape(n, 1)})
    return images, labels
