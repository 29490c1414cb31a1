"""Tests of the CIFAR-10/100, CIFAR-100-LT and SVHN loaders (and the CIFAR-10 JPEG archive builder) on small
files written in the exact official formats; the fixtures are those of tests/test_datasets.py
(``_dataset_helpers``: empty cache, no network, checksums patched to the generated files)."""
from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.base.errors import UserError  # noqa: E402
from datasets import _files, load_dataset  # noqa: E402
from datasets.cifar import LT_MAX_PER_CLASS, long_tail_counts, long_tail_indices  # noqa: E402

import _official_formats as off  # noqa: E402
from _dataset_helpers import isolated, one_paragraph, patch_md5  # noqa: E402,F401  (isolated: autouse fixture)


# ----------------------------------------------------------------------------------------------- CIFAR


def patch_cifar(monkeypatch, root: Path, folder: str, archive: str, members: list[str]):
    for m in members:
        patch_md5(monkeypatch, f"{folder}/{m}", root / folder / m)
    if (root / archive).exists():
        patch_md5(monkeypatch, archive, root / archive)


CIFAR10_MEMBERS = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def check_cifar10(ds, ref, root):
    assert ds.train_x.shape == (20, 32, 32, 3) and ds.test_x.shape == (6, 32, 32, 3) and ds.image_shape == (3, 32, 32)
    np.testing.assert_array_equal(ds.train_x, ref["train_x"])
    np.testing.assert_array_equal(ds.train_y, ref["train_y"])
    np.testing.assert_array_equal(ds.test_x, ref["test_x"])
    np.testing.assert_array_equal(ds.test_y, ref["test_y"])
    assert ds.classes == tuple(ref["classes"]) and ds.num_classes == 10
    # channel order, independently of the writer: row = [R plane | G plane | B plane], each row-major
    with open(root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        rows = pickle.load(f, encoding="bytes")[b"data"]
    for ch in range(3):
        np.testing.assert_array_equal(ds.train_x[4:8, :, :, ch].reshape(4, 1024), rows[:, ch * 1024:(ch + 1) * 1024])


@pytest.mark.parametrize("form", ["archive", "extracted", "extracted-in-place"])
def test_cifar10_official_forms(tmp_path, monkeypatch, form):
    root = tmp_path / "src"
    ref = off.write_cifar10(root)
    patch_cifar(monkeypatch, root, "cifar-10-batches-py", "cifar-10-python.tar.gz", CIFAR10_MEMBERS)
    data = tmp_path / "data"
    data.mkdir()
    if form == "archive":
        shutil.copy(root / "cifar-10-python.tar.gz", data)
        expect = str(data / "cifar-10-python.tar.gz")
    elif form == "extracted":
        shutil.copytree(root / "cifar-10-batches-py", data / "cifar10" / "cifar-10-batches-py")
        expect = str(data / "cifar10" / "cifar-10-batches-py")
    else:  # --data-dir pointing at the extracted folder itself
        data = root / "cifar-10-batches-py"
        expect = str(data)
    ds = load_dataset("cifar10", data_dir=data, download=False)
    check_cifar10(ds, ref, root)
    assert expect in ds.source


def test_cifar10_archive_checksum_and_member_checksum(tmp_path, monkeypatch):
    root = tmp_path / "src"
    off.write_cifar10(root, extracted=True)
    patch_cifar(monkeypatch, root, "cifar-10-batches-py", "cifar-10-python.tar.gz", CIFAR10_MEMBERS)
    archive_only = tmp_path / "a"
    archive_only.mkdir()
    shutil.copy(root / "cifar-10-python.tar.gz", archive_only)
    monkeypatch.setitem(_files.CHECKSUMS, "cifar-10-python.tar.gz", "1" * 32)
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", data_dir=archive_only, download=False)
    assert "cifar-10-python.tar.gz" in str(e.value) and "1" * 32 in str(e.value)
    # extracted folder with one altered member
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    raw = bytearray(batch.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one pixel changed: still a valid pickle, only the md5 can tell
    batch.write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", data_dir=root, download=False)
    assert str(batch) in str(e.value) and "Checksum mismatch" in str(e.value)


def test_cifar_pickle_with_foreign_global_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "src"
    off.write_cifar10(root, archive=False)
    evil = root / "cifar-10-batches-py" / "test_batch"
    evil.write_bytes(b"cos\nsystem\n(S'echo pwned > " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    patch_cifar(monkeypatch, root, "cifar-10-batches-py", "cifar-10-python.tar.gz", CIFAR10_MEMBERS)
    with pytest.raises(UserError, match="refusing to load global os.system"):
        load_dataset("cifar10", data_dir=root, download=False)
    assert not (tmp_path / "pwned").exists()


def test_cifar10_download_of_archive(tmp_path, monkeypatch, isolated):
    root = tmp_path / "server"
    ref = off.write_cifar10(root)
    patch_cifar(monkeypatch, root, "cifar-10-batches-py", "cifar-10-python.tar.gz", CIFAR10_MEMBERS)
    monkeypatch.setattr(_files, "_fetch", lambda url, dest: shutil.copyfile(root / url.rsplit("/", 1)[1], dest))
    ds = load_dataset("cifar10")
    check_cifar10(ds, ref, root)
    assert [p.name for p in (isolated / "cifar10").iterdir()] == ["cifar-10-python.tar.gz"]


CIFAR100_MEMBERS = ["train", "test", "meta"]


@pytest.mark.parametrize("form", ["archive", "extracted"])
def test_cifar100(tmp_path, monkeypatch, form):
    labels = np.arange(100).repeat(2)
    ref = off.write_cifar100(tmp_path, labels, archive=form == "archive", extracted=form == "extracted")
    if form == "archive":
        patch_md5(monkeypatch, "cifar-100-python.tar.gz", tmp_path / "cifar-100-python.tar.gz")
        with tarfile_members(tmp_path / "cifar-100-python.tar.gz") as members:
            for m, data in members.items():
                patch_md5(monkeypatch, m, data)
    else:
        patch_cifar(monkeypatch, tmp_path, "cifar-100-python", "cifar-100-python.tar.gz", CIFAR100_MEMBERS)
    ds = load_dataset("cifar100", data_dir=tmp_path, download=False)
    assert ds.num_classes == 100 and ds.classes[:2] == ("fine_00", "fine_01") and len(ds.classes) == 100
    for k in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(ds, k), ref[k])


class tarfile_members:
    def __init__(self, path):
        import tarfile

        self.tar = tarfile.open(path, "r:gz")

    def __enter__(self):
        return {m.name: self.tar.extractfile(m).read() for m in self.tar if m.isfile()}

    def __exit__(self, *exc):
        self.tar.close()


# ------------------------------------------------------------------------------------------- CIFAR-100-LT


def test_long_tail_counts_profile():
    counts = long_tail_counts(500, 100, 100)
    assert len(counts) == 100 and counts[0] == 500 and counts[-1] == 5 and sum(counts) == 10847
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert counts[50] == int(500 * 0.01 ** (50 / 99))
    assert long_tail_counts(5000, 10, 10)[-1] == 500


def test_long_tail_indices_on_labels():
    rng = np.random.default_rng(123)
    labels = rng.permutation(np.arange(100).repeat(500))
    counts = long_tail_counts(500, 100, 100)
    keep = long_tail_indices(labels, counts)
    assert len(keep) == 10847 and np.all(np.diff(keep) > 0)
    np.testing.assert_array_equal(np.bincount(labels[keep], minlength=100), counts)
    np.testing.assert_array_equal(keep, long_tail_indices(labels, counts))  # fixed seed -> one fixed subset
    assert not np.array_equal(keep, long_tail_indices(labels, counts, seed=1))
    # capping: a class with fewer examples than its quota keeps all of them
    short = labels[~((labels == 3) & (np.cumsum(labels == 3) > 7))]
    kept = np.bincount(short[long_tail_indices(short, counts)], minlength=100)
    assert kept[3] == 7 and kept[4] == counts[4]


def test_cifar100_lt_loader(tmp_path, monkeypatch):
    per_class = 12  # below the quota of classes 0..80 (capped), above that of classes 81..99 (subsampled)
    labels = np.random.default_rng(5).permutation(np.arange(100).repeat(per_class))
    ref = off.write_cifar100(tmp_path, labels, archive=False)
    patch_cifar(monkeypatch, tmp_path, "cifar-100-python", "cifar-100-python.tar.gz", CIFAR100_MEMBERS)
    ds = load_dataset("cifar100-lt", data_dir=tmp_path, download=False)
    counts = np.minimum(long_tail_counts(LT_MAX_PER_CLASS, 100, 100), per_class)
    np.testing.assert_array_equal(np.bincount(ds.train_y, minlength=100), counts)
    keep = long_tail_indices(labels, long_tail_counts(500, 100, 100), seed=0)
    np.testing.assert_array_equal(ds.train_x, ref["train_x"][keep])
    np.testing.assert_array_equal(ds.train_y, labels[keep])
    np.testing.assert_array_equal(ds.test_x, ref["test_x"])  # balanced official test set untouched
    assert ds.name == "cifar100-lt" and "long-tail" in ds.source
    again = load_dataset("cifar100-lt", data_dir=tmp_path, download=False)
    np.testing.assert_array_equal(again.train_x, ds.train_x)


# ------------------------------------------------------------------------------------------------- SVHN


def make_svhn(folder: Path, monkeypatch):
    folder.mkdir(parents=True, exist_ok=True)
    train = off.write_svhn_mat(folder / "train_32x32.mat", 25, seed=1)
    test = off.write_svhn_mat(folder / "test_32x32.mat", 11, seed=2)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        patch_md5(monkeypatch, name, folder / name)
    return train, test


def test_svhn_reads_mat(tmp_path, monkeypatch):
    (train_x, train_raw), (test_x, test_raw) = make_svhn(tmp_path / "svhn", monkeypatch)
    ds = load_dataset("svhn", data_dir=tmp_path, download=False)
    assert ds.train_x.shape == (25, 32, 32, 3) and ds.test_x.shape == (11, 32, 32, 3) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.train_x, train_x)
    np.testing.assert_array_equal(ds.test_x, test_x)
    np.testing.assert_array_equal(ds.train_y, np.where(train_raw == 10, 0, train_raw))
    np.testing.assert_array_equal(ds.test_y, test_raw % 10)
    assert ds.train_y.dtype == np.int64 and 0 in ds.train_y and ds.train_y.max() == 9
    from scipy.io import loadmat  # layout, independently of the writer: X[h, w, c, n] == image n at (h, w, c)

    X = loadmat(tmp_path / "svhn" / "train_32x32.mat")["X"]
    assert ds.train_x[7, 3, 5, 2] == X[3, 5, 2, 7] and ds.train_x[24, 31, 0, 1] == X[31, 0, 1, 24]


def test_svhn_wrong_checksum_and_truncated(tmp_path, monkeypatch):
    make_svhn(tmp_path, monkeypatch)
    monkeypatch.setitem(_files.CHECKSUMS, "test_32x32.mat", "2" * 32)
    with pytest.raises(UserError) as e:
        load_dataset("svhn", data_dir=tmp_path, download=False)
    assert "test_32x32.mat" in str(e.value) and "2" * 32 in str(e.value)
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:5000])
    patch_md5(monkeypatch, "test_32x32.mat", path)
    with pytest.raises(UserError) as e:
        load_dataset("svhn", data_dir=tmp_path, download=False)
    assert str(path) in str(e.value) and one_paragraph(str(e.value))


def test_svhn_missing_names_files(tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset("svhn", data_dir=tmp_path, download=False)
    msg = str(e.value)
    assert "train_32x32.mat" in msg and "test_32x32.mat" in msg and str(tmp_path / "svhn") in msg
    assert _files.URLS["train_32x32.mat"] in msg and "--data-dir" in msg


def test_cifar10_jpeg_rebuilds_the_photo_archive_from_the_official_files(tmp_path, monkeypatch, capsys):
    """``python -m datasets.cifar10_jpeg``: the official archive's images in order, as quality-75 JPEGs in the
    shared archive's layout (class folders, NNNN = index within split and class), the same bytes on a rerun; a
    bad quality is exit 2."""
    import io
    import tarfile

    from PIL import Image

    from datasets.cifar10_jpeg import jpeg_bytes, main

    root = tmp_path / "src"
    ref = off.write_cifar10(root)
    patch_cifar(monkeypatch, root, "cifar-10-batches-py", "cifar-10-python.tar.gz", CIFAR10_MEMBERS)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(root / "cifar-10-python.tar.gz", data)
    out = tmp_path / "cifar10-jpeg.tar.gz"
    args = ["--data-dir", str(data), "--out", str(out), "--no-download"]
    assert main(args) == 0
    first = out.read_bytes()
    assert main(args) == 0 and out.read_bytes() == first  # deterministic
    with tarfile.open(out) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    for split, xs, ys in (("train", ref["train_x"], ref["train_y"]), ("test", ref["test_x"], ref["test_y"])):
        count = {}
        for x, y in zip(xs, ys):
            name = f"cifar10-jpeg/{split}/{ref['classes'][y]}/{count.get(y, 0):04d}.jpg"
            count[y] = count.get(y, 0) + 1
            img = Image.open(io.BytesIO(files.pop(name)))
            assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
            # quality 75: the quantisation tables Pillow writes at 75; and the pixels are this image's (of the
            # split's images, the nearest to the decoded one; the test images are noise, JPEG's worst case)
            assert img.quantization == Image.open(io.BytesIO(jpeg_bytes(x, 75))).quantization
            err = np.abs(np.asarray(img, dtype=float)[None] - xs.astype(float)).mean(axis=(1, 2, 3))
            assert np.array_equal(xs[np.argmin(err)], x)
    assert files == {}  # nothing else in the archive
    assert main(args + ["--quality", "0"]) == 2 and "--quality 0" in capsys.readouterr().err
