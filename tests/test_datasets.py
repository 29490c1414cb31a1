"""Tests of the dataset loaders on small files written in the exact official formats.

The expected md5 entries in ``datasets._files.CHECKSUMS`` are replaced by the md5 of the generated files, so
the real verification code runs. The network is never used: ``_fetch`` is replaced by a fake that either copies
a generated file, writes garbage, or raises.
"""
from __future__ import annotations

import gzip
import shutil
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402
from bench.base.errors import UserError  # noqa: E402
from datasets import ImageDataset, _files, list_datasets, load_dataset, register_dataset  # noqa: E402

import _official_formats as off  # noqa: E402
from _dataset_helpers import isolated, one_paragraph, patch_md5  # noqa: E402,F401  (isolated: autouse fixture)

FMNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
REAL_FETCH = _files._fetch


# -------------------------------------------------------------------------------------------- registry


def test_list_datasets_sorted():
    assert list_datasets() == ["cifar10", "cifar100", "cifar100-lt", "digits", "fashion-mnist", "imagefolder",
                               "imagenet", "svhn"]


def test_unknown_name_suggests():
    with pytest.raises(UserError) as e:
        load_dataset("cifar-10")
    msg = str(e.value)
    assert "did you mean" in msg.lower() and "'cifar10'" in msg and "fashion-mnist" in msg and one_paragraph(msg)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(lambda data_dir, download: None)


def test_data_dir_must_exist(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "nope")


def test_image_dataset_validates_and_shapes():
    x = np.zeros((4, 5, 6, 3), np.uint8)
    y = np.array([0, 1, 2, 1], np.int64)
    d = ImageDataset("t", x, y, x[:2], y[:2], 3, ("a", "b", "c"), "src")
    assert d.image_shape == (3, 5, 6)
    with pytest.raises(ValueError):
        ImageDataset("t", x.astype(np.float32), y, x, y, 3, ("a", "b", "c"), "src")
    with pytest.raises(ValueError):
        ImageDataset("t", x, y, x, y, 2, ("a", "b"), "src")  # label 2 out of range


# ---------------------------------------------------------------------------------------------- digits


def test_digits_fixed_stratified_split():
    a = load_dataset("digits")
    b = load_dataset("digits", download=False)
    assert a.train_x.shape == (1437, 8, 8, 1) and a.test_x.shape == (360, 8, 8, 1)
    assert a.train_x.dtype == np.uint8 and a.train_y.dtype == np.int64 and a.image_shape == (1, 8, 8)
    assert a.num_classes == 10 and a.classes == tuple(str(i) for i in range(10))
    assert a.train_x.max() == 255 and a.train_x.min() == 0 and a.source == "sklearn.datasets.load_digits"
    np.testing.assert_array_equal(a.test_x, b.test_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    total = np.bincount(np.concatenate([a.train_y, a.test_y]), minlength=10)
    test = np.bincount(a.test_y, minlength=10)
    assert np.all(np.abs(test - 0.2 * total) <= 1)
    # pixel scaling: value v in 0..16 becomes round(v * 255 / 16)
    from sklearn.datasets import load_digits

    raw = load_digits().images
    assert set(np.unique(a.train_x)) <= set(np.round(np.arange(17) * 255 / 16).astype(int))
    assert len(np.unique(np.concatenate([a.train_x, a.test_x]).reshape(1797, -1), axis=0)) == len(
        np.unique(raw.reshape(1797, -1), axis=0))


# --------------------------------------------------------------------------------------- fashion-mnist


def make_fmnist(folder: Path, monkeypatch, patch: bool = True) -> dict[str, np.ndarray]:
    arrays = off.write_fashion_mnist(folder)
    if patch:
        for stem in FMNIST_STEMS:
            patch_md5(monkeypatch, f"{stem}.gz", folder / f"{stem}.gz")
    return arrays


def check_fmnist(ds, arrays):
    assert ds.name == "fashion-mnist" and ds.num_classes == 10 and ds.classes[7] == "Sneaker"
    assert ds.train_x.shape == (30, 28, 28, 1) and ds.test_x.shape == (20, 28, 28, 1)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_x[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_y, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_x[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_y, arrays["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_reads_official_gz(tmp_path, monkeypatch):
    data = tmp_path / "data"
    arrays = make_fmnist(data, monkeypatch)
    ds = load_dataset("fashion-mnist", data_dir=data, download=False)
    check_fmnist(ds, arrays)
    for stem in FMNIST_STEMS:
        assert str(data / f"{stem}.gz") in ds.source and _files.CHECKSUMS[f"{stem}.gz"] in ds.source


def test_fashion_mnist_subfolder_and_env_cache(tmp_path, monkeypatch, isolated):
    arrays = make_fmnist(tmp_path / "data" / "fashion-mnist", monkeypatch)
    check_fmnist(load_dataset("fashion-mnist", data_dir=tmp_path / "data", download=False), arrays)
    shutil.move(tmp_path / "data" / "fashion-mnist", isolated / "fashion-mnist")  # $BENCH_DATA_DIR/<name>
    ds = load_dataset("fashion-mnist", download=False)
    check_fmnist(ds, arrays)
    assert str(isolated / "fashion-mnist") in ds.source


def test_fashion_mnist_data_dir_wins_over_cache(tmp_path, monkeypatch, isolated):
    off.write_fashion_mnist(isolated / "fashion-mnist", seed=1)  # a different set in the cache
    arrays = make_fmnist(tmp_path / "data", monkeypatch)
    check_fmnist(load_dataset("fashion-mnist", data_dir=tmp_path / "data", download=False), arrays)


def test_fashion_mnist_system_dir(tmp_path, monkeypatch):
    arrays = make_fmnist(tmp_path / "usr-share", monkeypatch)
    monkeypatch.setattr(_files, "SYSTEM_DIRS", {"fashion-mnist": (tmp_path / "usr-share",)})
    check_fmnist(load_dataset("fashion-mnist", download=False), arrays)


def test_fashion_mnist_recompressed_and_uncompressed(tmp_path, monkeypatch):
    """A re-compressed .gz (Debian's: other gzip header, same IDX bytes) is accepted by its content md5, and
    so is an uncompressed IDX file."""
    data = tmp_path / "data"
    arrays = make_fmnist(data, monkeypatch, patch=False)
    for stem in FMNIST_STEMS:
        patch_md5(monkeypatch, stem, off.idx_bytes(arrays[stem]))  # official content md5
    # train files: re-compressed without a file name in the header (gz md5 != official archive md5)
    for stem in FMNIST_STEMS[:2]:
        (data / f"{stem}.gz").write_bytes(gzip.compress(off.idx_bytes(arrays[stem]), mtime=0))
    # test files: uncompressed
    for stem in FMNIST_STEMS[2:]:
        (data / f"{stem}.gz").unlink()
        (data / stem).write_bytes(off.idx_bytes(arrays[stem]))
    ds = load_dataset("fashion-mnist", data_dir=data, download=False)
    check_fmnist(ds, arrays)
    assert "re-compressed copy" in ds.source and str(data / FMNIST_STEMS[3]) in ds.source


def test_fashion_mnist_wrong_checksum(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_fmnist(data, monkeypatch)
    monkeypatch.setitem(_files.CHECKSUMS, "t10k-labels-idx1-ubyte.gz", "0" * 32)
    with pytest.raises(UserError) as e:
        load_dataset("fashion-mnist", data_dir=data, download=False)
    msg = str(e.value)
    assert str(data / "t10k-labels-idx1-ubyte.gz") in msg and "0" * 32 in msg
    assert off.md5(data / "t10k-labels-idx1-ubyte.gz") in msg and "Delete it" in msg and one_paragraph(msg)


def test_fashion_mnist_truncated_gzip(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_fmnist(data, monkeypatch)
    path = data / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError) as e:
        load_dataset("fashion-mnist", data_dir=data, download=False)
    assert str(path) in str(e.value) and "truncated" in str(e.value) and one_paragraph(str(e.value))


def test_fashion_mnist_truncated_idx_payload(tmp_path, monkeypatch):
    """A well-formed gzip whose IDX content is short (checksum matching, so the parser must catch it)."""
    data = tmp_path / "data"
    arrays = make_fmnist(data, monkeypatch)
    path = data / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(off.idx_bytes(arrays["train-images-idx3-ubyte"])[:-28]))
    patch_md5(monkeypatch, "train-images-idx3-ubyte.gz", path)
    with pytest.raises(UserError) as e:
        load_dataset("fashion-mnist", data_dir=data, download=False)
    assert str(path) in str(e.value) and "truncated" in str(e.value) and "[30, 28, 28]" in str(e.value)


def test_fashion_mnist_wrong_magic(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_fmnist(data, monkeypatch)
    images, labels = data / "train-images-idx3-ubyte.gz", data / "train-labels-idx1-ubyte.gz"
    images.write_bytes(labels.read_bytes())  # a labels file where the images belong
    patch_md5(monkeypatch, "train-images-idx3-ubyte.gz", images)
    with pytest.raises(UserError, match="magic number 2049, expected 2051"):
        load_dataset("fashion-mnist", data_dir=data, download=False)


def test_missing_files_no_download(tmp_path, isolated):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(UserError) as e:
        load_dataset("fashion-mnist", data_dir=data, download=False)
    msg = str(e.value)
    for stem in FMNIST_STEMS:
        assert f"{stem}.gz" in msg
    assert str(data) in msg and str(isolated / "fashion-mnist") in msg
    assert "--data-dir" in msg and "--no-download" in msg and one_paragraph(msg)


def test_download_failure_is_quick_user_error(tmp_path, monkeypatch, isolated):
    calls = []

    def unreachable(url, dest):
        calls.append(url)
        Path(dest).write_bytes(b"partial")  # kept under the .part name only, for the next run to resume
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(_files, "_fetch", unreachable)
    with pytest.raises(UserError) as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    assert calls == [_files.URLS["train-images-idx3-ubyte.gz"]] and calls[0] in msg
    assert "Name or service not known" in msg and "--data-dir" in msg and "train-images-idx3-ubyte.gz" in msg
    assert str(isolated / "fashion-mnist") in msg and one_paragraph(msg)
    assert "7 bytes received so far are kept" in msg  # a name-resolution failure is not retried
    assert [p.name for p in (isolated / "fashion-mnist").iterdir()] == ["train-images-idx3-ubyte.gz.part"]


def test_download_oserror_is_user_error(monkeypatch, isolated):
    def boom(url, dest):
        raise OSError("connection reset")

    monkeypatch.setattr(_files, "_fetch", boom)
    with pytest.raises(UserError, match="connection reset"):
        load_dataset("svhn")


def test_download_success_leaves_no_temp_files(tmp_path, monkeypatch, isolated):
    src = tmp_path / "server"
    arrays = make_fmnist(src, monkeypatch)
    fetched = []

    def fake_fetch(url, dest):
        fetched.append(url)
        shutil.copyfile(src / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(_files, "_fetch", fake_fetch)
    ds = load_dataset("fashion-mnist")
    check_fmnist(ds, arrays)
    assert fetched == [_files.URLS[f"{s}.gz"] for s in FMNIST_STEMS]
    cache = isolated / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s}.gz" for s in FMNIST_STEMS)
    assert str(cache) in ds.source
    # a second load uses the cache, no download
    monkeypatch.setattr(_files, "_fetch", lambda url, dest: pytest.fail("downloaded again"))
    check_fmnist(load_dataset("fashion-mnist"), arrays)


def test_download_with_wrong_checksum_saves_nothing(tmp_path, monkeypatch, isolated):
    make_fmnist(tmp_path / "server", monkeypatch)
    monkeypatch.setattr(_files, "_fetch", lambda url, dest: Path(dest).write_bytes(b"<html>captive portal</html>"))
    with pytest.raises(UserError) as e:
        load_dataset("fashion-mnist")
    assert "md5" in str(e.value) and "nothing was saved" in str(e.value)
    assert list((isolated / "fashion-mnist").iterdir()) == []


def test_real_fetch_over_file_url(tmp_path, monkeypatch, isolated):
    """The real ``_fetch`` (urllib) end to end, with file:// URLs standing in for the official server."""
    train = off.write_svhn_mat(tmp_path / "train_32x32.mat", 5)
    off.write_svhn_mat(tmp_path / "test_32x32.mat", 3)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        patch_md5(monkeypatch, name, tmp_path / name)
        monkeypatch.setitem(_files.URLS, name, (tmp_path / name).as_uri())
    monkeypatch.setattr(_files, "_fetch", REAL_FETCH)
    ds = load_dataset("svhn")
    np.testing.assert_array_equal(ds.train_x, train[0])
    assert sorted(p.name for p in (isolated / "svhn").iterdir()) == ["test_32x32.mat", "train_32x32.mat"]


def test_real_fetch_times_out(monkeypatch, isolated):
    """A server that accepts the connection but never answers: the read times out, is retried after 1, 2 and 4 s
    (not waited here), and turns into a UserError; nothing is left in the cache."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # room for every try's connection (the kernel completes them; nothing accepts them)
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/train_32x32.mat"
        monkeypatch.setitem(_files.URLS, "train_32x32.mat", url)
        monkeypatch.setattr(_files, "READ_TIMEOUT_S", 0.3)
        monkeypatch.setattr(_files, "_fetch", REAL_FETCH)
        sleeps = []
        monkeypatch.setattr(_files, "_sleep", sleeps.append)
        t0 = time.monotonic()
        with pytest.raises(UserError) as e:
            load_dataset("svhn")
        assert time.monotonic() - t0 < 3 and url in str(e.value) and "timed out" in str(e.value)
        assert sleeps == [1, 2, 4] and "after 4 tries" in str(e.value)
        assert list((isolated / "svhn").iterdir()) == []
    finally:
        server.close()


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files(monkeypatch):
    monkeypatch.setattr(_files, "SYSTEM_DIRS", {"fashion-mnist": (DEBIAN_FMNIST,)})
    ds = load_dataset("fashion-mnist", download=False)  # its speed: tests/benchmarks/test_perf.py
    assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
    assert ds.image_shape == (1, 28, 28) and ds.train_x.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(ds.train_y), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_y), [1000] * 10)
    # every file matched an official checksum (archive or content)
    for stem in FMNIST_STEMS:
        assert _files.CHECKSUMS[stem] in ds.source or _files.CHECKSUMS[f"{stem}.gz"] in ds.source
    assert ds.classes == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                          "Bag", "Ankle boot")


def test_package_exports():
    assert set(datasets.__all__) == {"ImageDataset", "LazyImages", "iter_batches", "list_datasets", "load_dataset",
                                     "register_dataset", "take"}
