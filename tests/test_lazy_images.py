"""Streamed images (``datasets.lazy.LazyImages``) and ``imagefolder`` above its size threshold.

A generated image folder (JPEGs and PNGs of mixed sizes, some grayscale, one EXIF-rotated) is loaded twice: in
memory (the default threshold) and streamed (``BENCH_IMAGEFOLDER_LAZY_BYTES`` forced low); every way of reading the
streamed images must give the in-memory arrays' exact pixels.
"""
from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.base.errors import UserError
from datasets import (ImageDataset, LazyImages, imagefolder, imagefolder_lazy, imagenet, iter_batches, lazy, load_dataset,
                      take)

LAZY = imagefolder_lazy.LAZY_ENV_VAR


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    for var in (imagefolder.SIZE_ENV_VAR, imagefolder.FRACTION_ENV_VAR, "BENCH_CACHE_DIR", LAZY,
                lazy.WORKERS_ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def image(seed: int, size: tuple[int, int], gray: bool) -> Image.Image:
    w, h = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    return Image.fromarray(base, "L" if gray else "RGB")


def make_folder(root: Path, classes=("ant", "bee", "cow"), n=9) -> int:
    """train/ and test/ class folders; mostly 12x10 images, some 16x12 and 9x13, some grayscale, JPEG and PNG."""
    count = 0
    for split, k in (("train", n), ("test", 3)):
        for ci, c in enumerate(classes):
            for i in range(k):
                seed = 1000 * ci + 10 * i + (split == "test")
                size = [(12, 10), (12, 10), (16, 12), (9, 13)][i % 4]
                im = image(seed, size, gray=(i % 3 == 1))
                path = root / split / c / f"{i:02d}.{'png' if i % 2 else 'jpg'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                im.save(path, format="PNG" if i % 2 else "JPEG", quality=90)
                count += 1
    rot = image(7, (10, 12), gray=False)  # stored 10x12 (w x h), shown rotated: 12x10, the common size
    exif = rot.getexif()
    exif[0x0112] = 6
    rot.save(root / "train" / "bee" / "rot.jpg", format="JPEG", exif=exif, quality=95)
    return count + 1


def targz(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as t:
        t.add(folder, arcname=folder.name)
    return dest


def load(path, cache) -> ImageDataset:
    return load_dataset("imagefolder", data_dir=path, cache_dir=cache)


def streamed(path, cache, monkeypatch) -> ImageDataset:
    monkeypatch.setenv(LAZY, "100")
    try:
        return load(path, cache)
    finally:
        monkeypatch.delenv(LAZY)


@pytest.fixture
def folder(tmp_path) -> Path:
    make_folder(tmp_path / "zoo")
    return tmp_path / "zoo"


def assert_same_dataset(lazy_ds: ImageDataset, mem: ImageDataset) -> None:
    assert isinstance(lazy_ds.train_x, LazyImages) and isinstance(mem.train_x, np.ndarray)
    assert lazy_ds.train_x.shape == mem.train_x.shape and lazy_ds.test_x.shape == mem.test_x.shape
    assert lazy_ds.train_x.dtype == np.uint8 and lazy_ds.train_x.ndim == 4
    np.testing.assert_array_equal(lazy_ds.train_x[:], mem.train_x)
    np.testing.assert_array_equal(lazy_ds.test_x[:], mem.test_x)
    np.testing.assert_array_equal(lazy_ds.train_y, mem.train_y)
    np.testing.assert_array_equal(lazy_ds.test_y, mem.test_y)
    assert lazy_ds.classes == mem.classes and lazy_ds.num_classes == mem.num_classes
    assert list(lazy_ds.train_ids) == list(mem.train_ids) and list(lazy_ds.test_ids) == list(mem.test_ids)
    assert lazy_ds.image_shape == mem.image_shape and lazy_ds.name == mem.name


# ------------------------------------------------------------------------------------------ lazy == memory


def test_streamed_folder_equals_in_memory(folder, tmp_path, monkeypatch):
    mem = load(folder, tmp_path / "c1")
    assert mem.train_x.shape == (28, 10, 12, 3)  # 12x10 is the most common size; RGB since some are colour
    lz = streamed(folder, tmp_path / "c2", monkeypatch)
    assert_same_dataset(lz, mem)
    assert lz.source.startswith(f"imagefolder:{mem.source.split(':')[1]}:") and "streamed" in lz.source
    assert lz.source.replace("; streamed (decoded from the files on use)", "") == mem.source
    assert not (tmp_path / "c2" / "imagefolder" / mem.source.split(":")[1] / "arrays.npz").exists()
    x, ref = lz.train_x, mem.train_x
    np.testing.assert_array_equal(x[3], ref[3])
    np.testing.assert_array_equal(x[-1], ref[-1])
    np.testing.assert_array_equal(x[np.int64(5)], ref[5])
    np.testing.assert_array_equal(x[2:11:3], ref[2:11:3])
    np.testing.assert_array_equal(x[::-4], ref[::-4])
    np.testing.assert_array_equal(x[20:100], ref[20:])
    idx = np.array([27, 0, 5, 5, -2])
    np.testing.assert_array_equal(x[idx], ref[idx])
    np.testing.assert_array_equal(x[[4, 1]], ref[[4, 1]])
    mask = np.arange(len(ref)) % 3 == 0
    np.testing.assert_array_equal(x[mask], ref[mask])
    np.testing.assert_array_equal(x[2, :, :, 0], ref[2, :, :, 0])
    np.testing.assert_array_equal(x[1:4, 3], ref[1:4, 3])
    assert x[np.array([], np.int64)].shape == (0, 10, 12, 3)
    assert x.shape[-1] == 3 and len(x) == 28 and x.nbytes == ref.nbytes
    with pytest.raises(IndexError):
        x[28]
    with pytest.raises(IndexError):
        x[np.array([0, 28])]
    with pytest.raises(TypeError, match="not turned into an array"):
        np.asarray(x)


def test_take_and_batches_equal_in_memory(folder, tmp_path, monkeypatch):
    mem = load(folder, tmp_path / "c1")
    lz = streamed(folder, tmp_path / "c2", monkeypatch)
    x, ref = lz.train_x, mem.train_x
    sel = np.array([9, 2, 2, 17, 0, 26])
    sub = take(x, sel)
    assert isinstance(sub, LazyImages) and sub.shape == (6, 10, 12, 3)
    np.testing.assert_array_equal(sub[:], ref[sel])
    np.testing.assert_array_equal(take(sub, np.array([1, 3]))[:], ref[[2, 17]])  # a view of a view
    np.testing.assert_array_equal(take(sub, slice(1, None, 2))[:], ref[sel[1::2]])
    np.testing.assert_array_equal(take(ref, sel), ref[sel])  # numpy arrays: plain indexing
    order = np.random.default_rng(0).permutation(len(ref))
    for workers in (0, 2):
        got = list(x.batches(5, order=order, workers=workers))
        assert [len(b) for b in got] == [5, 5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.concatenate(got), ref[order])
        got = list(sub.batches(4, workers=workers))
        np.testing.assert_array_equal(np.concatenate(got), ref[sel])
    np.testing.assert_array_equal(np.concatenate(list(iter_batches(x, 7))), ref)
    np.testing.assert_array_equal(np.concatenate(list(iter_batches(x, 7, order[:9]))), ref[order[:9]])
    np.testing.assert_array_equal(np.concatenate(list(iter_batches(ref, 7, order[:9]))), ref[order[:9]])
    views = list(iter_batches(ref, 10))
    assert [len(b) for b in views] == [10, 10, 8] and all(np.shares_memory(b, ref) for b in views)
    assert list(x.batches(4, order=np.array([], np.int64), workers=2)) == []


def test_streamed_targz_equals_in_memory_and_is_decompressed_once(folder, tmp_path, monkeypatch):
    path = targz(folder, tmp_path / "zoo.tar.gz")
    mem = load(path, tmp_path / "c1")
    lz = streamed(path, tmp_path / "c2", monkeypatch)
    assert_same_dataset(lz, mem)
    tars = list((tmp_path / "c2" / "imagefolder" / "tars").glob("*.tar"))
    assert [t.name for t in tars] == [f"{imagefolder.file_sha256(path)}.tar"]
    assert lz.train_x.files.path == str(tars[0]) and lz.train_x.files.label == str(path)
    np.testing.assert_array_equal(np.concatenate(list(lz.test_x.batches(4, workers=2))), mem.test_x)
    # the second load reads the cached index and member offsets: the archive is not parsed, nothing decoded
    monkeypatch.setattr(imagefolder, "_Tree", lambda *a: pytest.fail("archive parsed again"))
    monkeypatch.setattr(imagefolder_lazy, "check_images", lambda *a, **k: pytest.fail("decoded again"))
    again = streamed(path, tmp_path / "c2", monkeypatch)
    assert again.source == lz.source
    np.testing.assert_array_equal(again.train_x[:], mem.train_x)
    # the in-memory cache is untouched by streaming, and below the threshold the archive loads as before
    assert load(path, tmp_path / "c1").source == mem.source


def test_plain_tar_is_read_in_place(folder, tmp_path, monkeypatch):
    path = tmp_path / "zoo.tar"
    with tarfile.open(path, "w") as t:
        t.add(folder, arcname="zoo")
    mem = load(path, tmp_path / "c1")
    lz = streamed(path, tmp_path / "c2", monkeypatch)
    assert_same_dataset(lz, mem)
    assert lz.train_x.files.path == str(path) and not (tmp_path / "c2" / "imagefolder" / "tars").exists()


def test_streamed_zip_equals_in_memory(folder, tmp_path, monkeypatch):
    path = tmp_path / "zoo.zip"
    with zipfile.ZipFile(path, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    mem = load(path, tmp_path / "c1")
    lz = streamed(path, tmp_path / "c2", monkeypatch)
    assert_same_dataset(lz, mem)
    np.testing.assert_array_equal(np.concatenate(list(lz.train_x.batches(8, workers=2))), mem.train_x)


def test_grayscale_set_streams_one_channel_and_size_setting(tmp_path, monkeypatch):
    root = tmp_path / "g"
    for c in ("a", "b"):
        for i in range(4):
            path = root / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image(10 * i + len(c), [(8, 6), (5, 7)][i % 2], gray=True).save(path)
    monkeypatch.setenv(imagefolder.SIZE_ENV_VAR, "6x4")
    mem = load(root, tmp_path / "c1")
    lz = streamed(root, tmp_path / "c2", monkeypatch)
    assert lz.train_x.shape[1:] == (4, 6, 1)
    assert_same_dataset(lz, mem)


# ---------------------------------------------------------------------------------------------------- errors


def test_corrupt_file_fails_at_load_and_the_check_is_cached(folder, tmp_path, monkeypatch):
    bad = folder / "test" / "cow" / "01.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    calls = []
    real = imagefolder_lazy.check_images
    monkeypatch.setattr(imagefolder_lazy, "check_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(UserError) as e:
        streamed(folder, tmp_path / "c", monkeypatch)
    assert str(bad) in str(e.value) and "\n" not in str(e.value) and calls == [1]
    image(5, (12, 10), gray=False).save(bad)  # fixed: a new key, one check, then none
    first = streamed(folder, tmp_path / "c", monkeypatch)
    assert calls == [1, 1]
    second = streamed(folder, tmp_path / "c", monkeypatch)
    assert calls == [1, 1] and second.source == first.source
    np.testing.assert_array_equal(second.test_x[:], load(folder, tmp_path / "mem").test_x)


def test_check_reports_the_first_bad_file_in_order_from_workers(folder, tmp_path):
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*"))
    (folder / names[3]).write_bytes(b"not an image")
    (folder / names[20]).write_bytes(b"neither")
    files = lazy.ImageFiles("folder", folder, names)
    with pytest.raises(UserError) as e:
        lazy.check_images(files, workers=2)
    msg = str(e.value)
    assert msg.startswith(f"{folder / names[3]} is not an image") and str(folder / names[20]) in msg
    x = LazyImages(files, lazy.FitTo(12, 10, 3), (10, 12, 3))
    with pytest.raises(UserError, match=names[3]):
        x[3]
    with pytest.raises(UserError, match=names[20]):
        list(x.batches(4, order=np.arange(10, 30), workers=2))


def test_bad_settings_are_user_errors(folder, tmp_path, monkeypatch):
    monkeypatch.setenv(LAZY, "lots")
    with pytest.raises(UserError, match=LAZY):
        load(folder, tmp_path / "c")
    monkeypatch.setenv(lazy.WORKERS_ENV_VAR, "-1")
    with pytest.raises(UserError, match=lazy.WORKERS_ENV_VAR):
        lazy.decode_workers(10_000)


def test_worker_count(monkeypatch):
    assert lazy.decode_workers(10) == 0  # small: in this process
    assert lazy.decode_workers(10_000) == min(4, lazy.cpu_count()) >= 1
    assert lazy.decode_workers(10, workers=2) == 2
    monkeypatch.setenv(lazy.WORKERS_ENV_VAR, "0")
    assert lazy.decode_workers(10_000) == 0
    monkeypatch.setenv(lazy.WORKERS_ENV_VAR, "3")
    assert lazy.decode_workers(10_000) == 3 and lazy.decode_workers(10) == 0


# ------------------------------------------------------------------------------------------------- pickling


def test_pickle_is_small_and_round_trips(folder, tmp_path, monkeypatch):
    lz = streamed(folder, tmp_path / "c", monkeypatch)
    x = take(lz.train_x, np.array([4, 0, 7]))
    x[0]
    blob = pickle.dumps(x)
    names_bytes = sum(len(n) for n in lz.train_x.files.names)
    assert len(blob) < 1000 + 2 * names_bytes < lz.train_x.nbytes / 4  # paths and offsets, not pixels
    big = LazyImages(x.files, lazy.FitTo(512, 512, 3), (512, 512, 3), np.array([4, 0, 7]))
    assert abs(len(pickle.dumps(big)) - len(blob)) < 16  # 2.3 MB of pixels decoded: the pickle does not grow
    back = pickle.loads(blob)
    assert back.shape == x.shape and back.files.names == x.files.names
    np.testing.assert_array_equal(back[:], x[:])
    zipped = tmp_path / "z.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("a.png", _png(1))
    zx = LazyImages(lazy.ImageFiles("zip", zipped, ["a.png"]), lazy.FitTo(12, 10, 3), (10, 12, 3))
    first = zx[0]
    again = pickle.loads(pickle.dumps(zx))
    assert again.files._handle is None
    np.testing.assert_array_equal(again[0], first)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    image(seed, (12, 10), gray=False).save(buf, format="PNG")
    return buf.getvalue()


def test_names_round_trip_non_utf8_and_unicode():
    names = ["a/b.png", "caf\u00e9/\u732b.jpg", b"raw/\xff\xfe.png".decode("utf-8", "surrogateescape"), ""]
    packed = lazy.Names.of(names)
    assert list(packed) == names and len(packed) == 4 and packed[-3] == names[1]
    assert list(packed[1:3]) == names[1:3]
    assert lazy.Names.load(packed.arrays("n"), "n") == packed


def test_dataset_validates_lazy_images(folder, tmp_path, monkeypatch):
    lz = streamed(folder, tmp_path / "c", monkeypatch)
    with pytest.raises(ValueError, match="train_y"):
        ImageDataset("x", lz.train_x, lz.train_y[:-1], lz.test_x, lz.test_y, 3, lz.classes, "s")
    small = LazyImages(lz.test_x.files, lazy.FitTo(6, 5, 3), (5, 6, 3))
    with pytest.raises(ValueError, match="train images"):
        ImageDataset("x", lz.train_x, lz.train_y, small, np.zeros(len(small), np.int64), 3, lz.classes, "s")
    with pytest.raises(ValueError, match="lazy images"):
        ImageDataset("x", [[1]], lz.train_y, lz.test_x, lz.test_y, 3, lz.classes, "s")


def test_large_compressed_archive_is_decompressed_before_listing(folder, tmp_path, monkeypatch):
    path = targz(folder, tmp_path / "zoo.tar.gz")
    ref = load(folder, tmp_path / "c0")
    monkeypatch.setattr(imagefolder_lazy, "TAR_HOLD_BYTES", 0)  # every compressed archive counts as large
    mem = load(path, tmp_path / "c1")  # in memory, read by offset from the decompressed copy
    np.testing.assert_array_equal(mem.train_x, ref.train_x)
    np.testing.assert_array_equal(mem.test_x, ref.test_x)
    assert mem.source == ref.source
    assert (tmp_path / "c1" / "imagefolder" / "tars" / f"{imagefolder.file_sha256(path)}.tar").is_file()


def test_raising_the_threshold_decodes_into_memory_and_a_damaged_index_is_rebuilt(folder, tmp_path, monkeypatch):
    lz = streamed(folder, tmp_path / "c", monkeypatch)
    mem = load(folder, tmp_path / "c")  # the default threshold: in memory, from the same cache folder
    assert isinstance(mem.train_x, np.ndarray) and "streamed" not in mem.source
    np.testing.assert_array_equal(lz.train_x[:], mem.train_x)
    entry = tmp_path / "c" / "imagefolder" / mem.source.split(":")[1]
    (entry / "arrays.npz").unlink()
    (entry / imagefolder_lazy.INDEX_FILE).write_bytes(b"garbage")
    again = streamed(folder, tmp_path / "c", monkeypatch)
    assert again.source == lz.source and isinstance(again.train_x, LazyImages)
    np.testing.assert_array_equal(again.test_x[:], mem.test_x)


@pytest.mark.parametrize("var, read, bad, good, expected", [
    (LAZY, imagefolder_lazy.lazy_threshold, "-1", "0", 0),
    (imagefolder.FRACTION_ENV_VAR, imagefolder._test_fraction, "1", "0.25", 0.25),
    (imagenet.SIZE_ENV_VAR, imagenet._size, "0", "64", 64),
])
def test_numeric_data_settings_read_their_value_and_refuse_a_bad_one(monkeypatch, var, read, bad, good, expected):
    monkeypatch.setenv(var, good)
    assert read() == expected
    for value in (bad, "abc", "nan"):
        monkeypatch.setenv(var, value)
        with pytest.raises(UserError, match=f"{var}='{value}' is not "):
            read()
    monkeypatch.setenv(var, "  ")
    assert read() not in (None, expected)  # blank: the default
