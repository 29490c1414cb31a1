"""The ``imagefolder`` dataset: the user's own class folders, as a folder or a .tar(.gz)/.zip archive.

Images are tiny PNGs (lossless, so decoded arrays can be compared with the pixels written) and a few JPEGs,
generated with Pillow under tmp_path. The slow test loads the real CIFAR-10 JPEG archive.
"""
from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from bench.base.errors import UserError
from bench.cli import main
from datasets import ImageDataset, imagefolder, list_datasets, load_dataset

CIFAR10_JPEG = Path("/work/shared/data/cifar10-jpeg.tar.gz")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No cache or setting from the environment: the default cache root points into tmp_path."""
    for var in (imagefolder.SIZE_ENV_VAR, imagefolder.FRACTION_ENV_VAR, "BENCH_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def pixels(seed: int, size=(8, 8), mode="RGB") -> np.ndarray:
    w, h = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_png(path: Path, seed: int, size=(8, 8), mode="RGB") -> np.ndarray:
    a = pixels(seed, size, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode).save(path, format="PNG")
    return a


def make_split_folder(root: Path, classes=("cat", "dog", "emu"), n_train=3, n_test=2, **kw) -> dict:
    """train/<class>/<i>.png and test/<class>/<i>.png; returns {relative path: pixels}."""
    out = {}
    seed = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            for i in range(n):
                rel = f"{split}/{c}/{i:02d}.png"
                out[rel] = write_png(root / rel, seed, **kw)
                seed += 1
    return out


def make_tree(root: Path, counts: dict[str, int]) -> dict:
    out = {}
    for k, (c, n) in enumerate(counts.items()):
        for i in range(n):
            rel = f"{c}/img{i:03d}.png"
            out[rel] = write_png(root / rel, 100 * k + i)
    return out


def archive(folder: Path, dest: Path, top: bool) -> Path:
    """``folder``'s files in a .tar/.tar.gz/.tgz/.zip, under ``folder.name/`` when ``top``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    dirs = sorted(p for p in folder.rglob("*") if p.is_dir())
    arc = lambda p: (f"{folder.name}/" if top else "") + p.relative_to(folder).as_posix()  # noqa: E731
    if dest.name.endswith(".zip"):
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
            for p in files:
                z.write(p, arc(p))
    else:
        mode = "w" if dest.name.endswith(".tar") else "w:gz"
        with tarfile.open(dest, mode) as t:
            for p in dirs + files:
                t.add(p, arc(p), recursive=False)
    return dest


def load(path, cache, **kw) -> ImageDataset:
    return load_dataset("imagefolder", data_dir=path, cache_dir=cache, **kw)


def sha(ds: ImageDataset) -> str:
    assert ds.source.startswith("imagefolder:")
    return ds.source.split(":")[1]


def user_error(path, cache) -> str:
    with pytest.raises(UserError) as e:
        load(path, cache)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ---------------------------------------------------------------------------------------------- layouts


def test_registered():
    assert "imagefolder" in list_datasets()


def test_train_test_folder(tmp_path):
    root = tmp_path / "pets"
    ref = make_split_folder(root)
    ds = load(root, tmp_path / "c")
    assert ds.name == "pets" and ds.classes == ("cat", "dog", "emu") and ds.num_classes == 3
    assert ds.train_x.shape == (9, 8, 8, 3) and ds.test_x.shape == (6, 8, 8, 3) and ds.train_x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train_y, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(ds.test_y, [0, 0, 1, 1, 2, 2])
    assert list(ds.train_ids[:4]) == ["train/cat/00.png", "train/cat/01.png", "train/cat/02.png", "train/dog/00.png"]
    for split in ("train", "test"):
        for rel, x in zip(getattr(ds, f"{split}_ids"), getattr(ds, f"{split}_x")):
            np.testing.assert_array_equal(x, ref[rel])
    key = sha(ds)
    assert len(key) == 64 and (tmp_path / "c" / "imagefolder" / key / "arrays.npz").is_file()
    assert "train/ and test/" in ds.source and "8x8 RGB" in ds.source and str(root) not in ds.source


def test_default_cache_is_bench_cache_dir_env(tmp_path, monkeypatch):
    root = tmp_path / "pets"
    make_split_folder(root)
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "env"))
    ds = load_dataset("imagefolder", data_dir=root)
    assert (tmp_path / "env" / "imagefolder" / sha(ds) / "arrays.npz").is_file()
    monkeypatch.delenv("BENCH_CACHE_DIR")
    ds = load_dataset("imagefolder", data_dir=root)
    assert (tmp_path / "xdg" / "bench" / "imagefolder" / sha(ds) / "arrays.npz").is_file()


@pytest.mark.parametrize("suffix,top", [(".tar.gz", True), (".tgz", False), (".tar", True), (".zip", False),
                                        (".zip", True)])
def test_archive_matches_folder(tmp_path, suffix, top):
    root = tmp_path / "pets"
    make_split_folder(root)
    (root / ".DS_Store").write_bytes(b"\0junk")  # skipped in both forms
    folder = load(root, tmp_path / "c1")
    path = archive(root, tmp_path / f"pets-arch{suffix}", top)
    ds = load(path, tmp_path / "c2")  # own cache: decoded from the archive, not served from the folder's
    assert ds.name == "pets-arch" and sha(ds) == sha(folder) and ds.source == folder.source
    for k in ("train_x", "train_y", "test_x", "test_y", "train_ids", "test_ids"):
        np.testing.assert_array_equal(getattr(ds, k), getattr(folder, k))
    assert ds.classes == folder.classes
    assert load(path, tmp_path / "c1").source == folder.source  # same key: the folder's cache entry serves it


def test_single_tree_holds_out_a_fixed_stratified_test_part(tmp_path, monkeypatch):
    root = tmp_path / "top" / "birds"  # inside one top folder, in an archive
    ref = make_tree(root, {"crow": 10, "gull": 7, "wren": 5})
    path = archive(root, tmp_path / "birds.zip", top=True)
    ds = load(path, tmp_path / "c")
    assert ds.name == "birds" and ds.classes == ("crow", "gull", "wren")
    # round(0.2 * n), at least 1 and at most n - 1 per class
    np.testing.assert_array_equal(np.bincount(ds.test_y), [2, 1, 1])
    np.testing.assert_array_equal(np.bincount(ds.train_y), [8, 6, 4])
    assert set(ds.train_ids) | set(ds.test_ids) == set(ref) and not set(ds.train_ids) & set(ds.test_ids)
    for rel, x, y in zip(ds.test_ids, ds.test_x, ds.test_y):
        assert rel.startswith(ds.classes[y] + "/")
        np.testing.assert_array_equal(x, ref[rel])
    assert "fraction 0.2" in ds.source and "seed 0" in ds.source
    again = load(root, tmp_path / "other")  # the folder, decoded afresh: the same split and key
    assert list(again.test_ids) == list(ds.test_ids) and sha(again) == sha(ds)
    # the held-out files depend on their own names only: adding a file moves no other file
    write_png(root / "crow" / "img999.png", 999)
    grown = load(root, tmp_path / "other")  # crow: 11 files, still 2 held out
    lost, gained = set(ds.test_ids) - set(grown.test_ids), set(grown.test_ids) - set(ds.test_ids)
    assert gained <= {"crow/img999.png"} and len(lost) == len(gained) and sha(grown) != sha(ds)
    monkeypatch.setenv(imagefolder.FRACTION_ENV_VAR, "0.5")
    half = load(path, tmp_path / "c")
    np.testing.assert_array_equal(np.bincount(half.test_y), [5, 4, 3])
    assert sha(half) != sha(ds) and "fraction 0.5" in half.source


def test_single_tree_test_part_is_stable_when_files_are_added(tmp_path):
    root = tmp_path / "t"
    make_tree(root, {"a": 20, "b": 20})
    before = set(load(root, tmp_path / "c").test_ids)
    make_tree(root, {"a": 25, "b": 20})  # 5 more in a (the 20 others unchanged): its quota goes from 4 to 5
    after = set(load(root, tmp_path / "c").test_ids)
    b = {f for f in before if f.startswith("b/")}
    assert len(b) == 4 and {f for f in after if f.startswith("b/")} == b  # other classes do not move
    new_in_test = len({f for f in after if f >= "a/img020"} - {f for f in after if f.startswith("b/")})
    assert len(after) == 9 and len(before - after) == max(0, new_in_test - 1)  # only displaced by new files


def test_grayscale_gives_one_channel(tmp_path):
    root = tmp_path / "gray"
    ref = make_split_folder(root, classes=("a", "b"), mode="L")
    ds = load(root, tmp_path / "c")
    assert ds.train_x.shape == (6, 8, 8, 1) and ds.image_shape == (1, 8, 8) and "8x8 L" in ds.source
    np.testing.assert_array_equal(ds.train_x[0, :, :, 0], ref["train/a/00.png"])
    # one colour image: everything becomes RGB, a gray image with its channel repeated
    write_png(root / "test" / "b" / "color.png", 7)
    ds = load(root, tmp_path / "c")
    assert ds.train_x.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(ds.train_x[0], np.repeat(ref["train/a/00.png"][:, :, None], 3, axis=2))


def test_mixed_sizes_use_the_most_common(tmp_path, monkeypatch, caplog):
    root = tmp_path / "mixed"
    make_split_folder(root, classes=("a", "b"))  # 10 images of 8x8
    odd = write_png(root / "train" / "b" / "wide.png", 5, size=(12, 6))
    with caplog.at_level(logging.WARNING, logger="datasets.imagefolder"):
        ds = load(root, tmp_path / "c")
    assert ds.train_x.shape[1:] == (8, 8, 3) and "most common size, 10 of 11" in ds.source and "1 resized" in ds.source
    i = list(ds.train_ids).index("train/b/wide.png")
    want = np.asarray(Image.fromarray(odd).resize((8, 8), imagefolder.RESAMPLE))
    np.testing.assert_array_equal(ds.train_x[i], want)
    assert len([r for r in caplog.records if "8x8 RGB" in r.getMessage()]) == 1  # said once
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="datasets.imagefolder"):
        load(root, tmp_path / "c")  # cached: nothing decoded, nothing said
    assert not caplog.records
    monkeypatch.setenv(imagefolder.SIZE_ENV_VAR, "6x4")  # W x H
    ds2 = load(root, tmp_path / "c")
    assert ds2.train_x.shape[1:] == (4, 6, 3) and sha(ds2) != sha(ds) and "BENCH_IMAGEFOLDER_SIZE=6x4" in ds2.source
    monkeypatch.setenv(imagefolder.SIZE_ENV_VAR, "5")
    assert load(root, tmp_path / "c").train_x.shape[1:] == (5, 5, 3)
    monkeypatch.setenv(imagefolder.SIZE_ENV_VAR, "big")
    assert "BENCH_IMAGEFOLDER_SIZE" in user_error(root, tmp_path / "c")


def test_images_beyond_the_hold_budget_are_decoded_again(tmp_path, monkeypatch):
    root = tmp_path / "m"
    make_split_folder(root, classes=("a", "b"))
    write_png(root / "train" / "b" / "wide.png", 5, size=(12, 6))
    full = load(root, tmp_path / "c1")
    monkeypatch.setattr(imagefolder, "HOLD_BYTES", 500)  # two 8x8 RGB images
    small = load(root, tmp_path / "c2")
    np.testing.assert_array_equal(small.train_x, full.train_x)
    np.testing.assert_array_equal(small.test_x, full.test_x)


def test_exif_orientation_is_applied(tmp_path):
    root = tmp_path / "exif"
    make_split_folder(root, classes=("a", "b"), size=(4, 6))
    a = pixels(9, (6, 4))  # stored 6 wide x 4 high, shown rotated: 4 wide x 6 high
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(root / "train" / "a" / "rot.jpg", format="JPEG", exif=exif, quality=100)
    ds = load(root, tmp_path / "c")
    assert ds.train_x.shape[1:] == (6, 4, 3)  # no resize needed: after rotation it has the common size


# ------------------------------------------------------------------------------------------------- cache


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    root = tmp_path / "pets"
    make_split_folder(root)
    calls = []
    real = imagefolder._decode
    monkeypatch.setattr(imagefolder, "_decode", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    first = load(root, tmp_path / "c")
    assert len(calls) == 15
    calls.clear()
    second = load(root, tmp_path / "c")
    assert calls == [] and second.source == first.source
    np.testing.assert_array_equal(second.train_x, first.train_x)
    assert list(second.train_ids) == list(first.train_ids) and second.classes == first.classes
    old = tmp_path / "c" / "imagefolder" / sha(first) / "arrays.npz"
    old_bytes = old.read_bytes()
    write_png(root / "test" / "dog" / "01.png", 12345)  # one file's bytes change
    third = load(root, tmp_path / "c")
    assert len(calls) == 15 and sha(third) != sha(first) and old.read_bytes() == old_bytes
    assert not np.array_equal(third.test_x, first.test_x)
    calls.clear()
    (root / "test" / "dog" / "01.png").rename(root / "test" / "dog" / "09.png")  # a rename too
    assert sha(load(root, tmp_path / "c")) not in (sha(first), sha(third)) and len(calls) == 15


def test_cached_archive_is_not_parsed_again(tmp_path, monkeypatch):
    make_split_folder(tmp_path / "p")
    path = archive(tmp_path / "p", tmp_path / "p.tar.gz", top=True)
    first = load(path, tmp_path / "c")

    def no_parse(*a):
        raise AssertionError("archive parsed although cached")

    monkeypatch.setattr(imagefolder, "_Tree", no_parse)
    assert load(path, tmp_path / "c").source == first.source
    monkeypatch.setenv(imagefolder.SIZE_ENV_VAR, "4")  # other settings: another entry, so the archive is read
    with pytest.raises(AssertionError, match="parsed"):
        load(path, tmp_path / "c")


def test_damaged_cache_entry_is_rebuilt(tmp_path, caplog):
    root = tmp_path / "pets"
    make_split_folder(root)
    first = load(root, tmp_path / "c")
    entry = tmp_path / "c" / "imagefolder" / sha(first) / "arrays.npz"
    entry.write_bytes(entry.read_bytes()[:1000])
    again = load(root, tmp_path / "c")
    np.testing.assert_array_equal(again.train_x, first.train_x)
    assert "unusable" in caplog.text and np.load(entry, allow_pickle=False)["train_x"].shape == (9, 8, 8, 3)


def test_failed_load_leaves_earlier_cache_intact(tmp_path):
    root = tmp_path / "pets"
    make_split_folder(root)
    first = load(root, tmp_path / "c")
    cache = tmp_path / "c" / "imagefolder"
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    (root / "train" / "cat" / "bad.png").write_bytes(b"not a png")
    assert "bad.png" in user_error(root, tmp_path / "c")
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before
    (root / "train" / "cat" / "bad.png").unlink()
    assert load(root, tmp_path / "c").source == first.source


def test_ids_length_is_checked():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    y = np.array([0, 1], np.int64)
    assert ImageDataset("t", x, y, x, y, 2, ("a", "b"), "s").train_ids is None
    ImageDataset("t", x, y, x, y, 2, ("a", "b"), "s", train_ids=("p", "q"), test_ids=np.array(["r", "s"]))
    with pytest.raises(ValueError, match="train_ids"):
        ImageDataset("t", x, y, x, y, 2, ("a", "b"), "s", train_ids=("p",))


# --------------------------------------------------------------------------------------------- bad input


def test_hidden_and_system_files_are_skipped(tmp_path):
    root = tmp_path / "pets"
    ref = make_split_folder(root, classes=("a", "b"))
    for junk in ("train/a/.DS_Store", "train/a/._00.png", "test/b/Thumbs.db", ".git/config", "train/.hidden/x.png",
                 "__MACOSX/train/a/._00.png"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"\0\1junk")
    (root / "README.md").write_text("my photos")  # a loose non-image file outside the class folders
    ds = load(root, tmp_path / "c")
    assert len(ds.train_y) == 6 and set(ds.train_ids) | set(ds.test_ids) == set(ref) and ds.classes == ("a", "b")
    zipped = load(archive(root, tmp_path / "z.zip", top=True), tmp_path / "c2")
    assert zipped.source == ds.source


def bad_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A broken dataset and the text (a file or folder) its error must name."""
    root = tmp_path / "d"
    if case == "empty class folder":
        make_split_folder(root)
        (root / "test" / "emu" / "00.png").unlink()
        (root / "test" / "emu" / "01.png").unlink()
        (root / "test" / "emu" / ".DS_Store").write_bytes(b"x")
        return root, str(root / "test" / "emu")
    if case == "text file":
        make_split_folder(root)
        (root / "train" / "dog" / "notes.txt").write_text("hello")
        return root, str(root / "train" / "dog" / "notes.txt")
    if case == "text with image extension":
        make_split_folder(root)
        (root / "train" / "dog" / "fake.jpg").write_text("hello")
        return root, str(root / "train" / "dog" / "fake.jpg")
    if case == "truncated jpeg":
        make_split_folder(root)
        buf = io.BytesIO()
        Image.fromarray(pixels(3, (64, 64))).save(buf, format="JPEG", quality=95)
        (root / "test" / "cat" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        return root, str(root / "test" / "cat" / "cut.jpg")
    if case == "different classes":
        make_split_folder(root)
        shutil.rmtree(root / "test" / "dog")
        return root, "dog"
    if case == "single class (split)":
        make_split_folder(root, classes=("cat",))
        return root, str(root / "train" / "cat")
    if case == "single class (tree)":
        make_tree(root, {"cat": 4})
        return root, str(root / "cat")
    if case == "single image in a class (tree)":
        make_tree(root, {"cat": 4, "dog": 1})
        return root, str(root / "dog")
    if case == "no images":
        (root / "train" / "a").mkdir(parents=True)
        (root / "test" / "a").mkdir(parents=True)
        (root / "README.txt").write_text("nothing yet")
        return root, str(root)
    if case == "empty folder":
        root.mkdir()
        return root, str(root)
    if case == "missing path":
        return root, str(root)
    if case == "train without test":
        make_tree(root / "train", {"a": 2, "b": 2})
        return root, str(root / "train")
    if case == "loose image":
        make_split_folder(root)
        write_png(root / "train" / "stray.png", 1)
        return root, str(root / "train" / "stray.png")
    if case == "not an archive":
        path = tmp_path / "d.rar"
        path.write_bytes(b"Rar!")
        return path, str(path)
    if case == "garbage tar.gz":
        path = tmp_path / "d.tar.gz"
        path.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
        return path, str(path)
    if case == "truncated zip":
        make_split_folder(root)
        path = archive(root, tmp_path / "d.zip", top=False)
        path.write_bytes(path.read_bytes()[:200])
        return path, str(path)
    path = tmp_path / ("d.zip" if "zip" in case else "d.tar.gz")
    member = {"tar absolute": "/etc/evil.png", "tar dotdot": "d/../../evil.png", "zip dotdot": "../evil.png",
              "zip absolute": "/abs/evil.png", "tar symlink": "train/a/link.png",
              "tar duplicate": "train/a/0.png"}[case]
    make_split_folder(root, classes=("a", "b"))
    data = (root / "train" / "a" / "00.png").read_bytes()
    if "zip" in case:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("train/a/0.png", data)
            z.writestr(member, data)
    else:
        with tarfile.open(path, "w:gz") as t:
            archive_add = lambda name, payload: t.addfile(  # noqa: E731
                tarfile.TarInfo(name) if payload is None else _info(name, len(payload)),
                None if payload is None else io.BytesIO(payload))
            archive_add("train/a/0.png", data)
            if case == "tar symlink":
                info = tarfile.TarInfo(member)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                t.addfile(info)
            else:
                archive_add(member, data)
    return path, f"{path}:{member}" if case != "tar dotdot" and case != "zip dotdot" else member


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


BAD_CASES = ["empty class folder", "text file", "text with image extension", "truncated jpeg", "different classes",
             "single class (split)", "single class (tree)", "single image in a class (tree)", "no images",
             "empty folder", "missing path", "train without test", "loose image", "not an archive",
             "garbage tar.gz", "truncated zip", "tar absolute", "tar dotdot", "zip dotdot", "zip absolute",
             "tar symlink", "tar duplicate"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_a_user_error_naming_it(tmp_path, case):
    path, named = bad_case(tmp_path, case)
    msg = user_error(path, tmp_path / "c")
    if case in ("tar absolute", "zip absolute", "tar dotdot", "zip dotdot"):
        assert str(path) in msg and repr(named.split(":")[-1]) in msg and "refused" in msg
    else:
        assert named in msg, msg
    assert not (tmp_path / "c" / "imagefolder").exists() or not any((tmp_path / "c" / "imagefolder").iterdir())


def test_bad_input_in_an_archive_names_the_member(tmp_path):
    path, _ = bad_case(tmp_path, "truncated jpeg")
    tgz = archive(path, tmp_path / "photos.tgz", top=True)
    assert f"{tgz}:d/test/cat/cut.jpg" in user_error(tgz, tmp_path / "c")


def test_truncated_image_fails_even_if_pillow_was_told_to_accept_them(tmp_path, monkeypatch):
    path, named = bad_case(tmp_path, "truncated jpeg")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as another library might set it
    assert named in user_error(path, tmp_path / "c") and ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_folder_holding_an_archive_says_to_pass_the_archive(tmp_path):
    make_split_folder(tmp_path / "pets")
    (tmp_path / "data").mkdir()
    archive(tmp_path / "pets", tmp_path / "data" / "pets.tar.gz", top=True)
    msg = user_error(tmp_path / "data", tmp_path / "c")
    assert f"--data-dir {tmp_path / 'data' / 'pets.tar.gz'}" in msg


def test_non_utf8_file_names(tmp_path):
    root = tmp_path / "pets"
    make_split_folder(root, classes=("a", "b"))
    raw = bytes(root / "train" / "a") + b"/caf\xe9.png"  # latin-1 name, not valid UTF-8
    with open(raw, "wb") as f:
        Image.fromarray(pixels(1)).save(f, format="PNG")
    ds = load(root, tmp_path / "c")
    assert "train/a/caf\udce9.png" in list(ds.train_ids)
    assert list(load(root, tmp_path / "c").train_ids) == list(ds.train_ids)  # cached copy keeps the name


def test_data_dir_is_required(tmp_path):
    with pytest.raises(UserError, match="--data-dir"):
        load_dataset("imagefolder", cache_dir=tmp_path)


def test_bad_fraction(tmp_path, monkeypatch):
    make_tree(tmp_path / "t", {"a": 3, "b": 3})
    monkeypatch.setenv(imagefolder.FRACTION_ENV_VAR, "1.5")
    assert imagefolder.FRACTION_ENV_VAR in user_error(tmp_path / "t", tmp_path / "c")


# ------------------------------------------------------------------------------------------- end to end


def test_cli_run_on_a_zip(tmp_path):
    root = tmp_path / "shapes"
    for split, n in (("train", 24), ("test", 6)):
        for k, c in enumerate(("ring", "star", "wave")):
            for i in range(n):  # a class-dependent mean so that something can be learnt
                a = np.clip(pixels(1000 * k + i + (0 if split == "train" else 500)).astype(int) // 2 + 60 * k, 0, 255)
                p = root / split / c / f"{i:02d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(a.astype(np.uint8)).save(p)
    zpath = archive(root, tmp_path / "shapes-v1.zip", top=True)
    out = tmp_path / "out"
    rc = main(["run", "--methods", "threshold", "--dataset", "imagefolder", "--data-dir", str(zpath),
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
               "--set", "backbone.img_size=8", "--set", "backbone.patch_size=4", "--set", "backbone.depth=2",
               "--set", "backbone.embed_dim=16", "--set", "backbone.num_heads=2", "--set", "backbone.epochs=1",
               "--set", "threshold.epochs=2"])
    assert rc == 0
    df = pd.read_csv(out / "metrics.csv")
    assert set(df["dataset"]) == {"shapes-v1"}
    run = json.loads((out / "run.json").read_text())
    assert run["dataset_source"].startswith("imagefolder:")


def test_cli_missing_data_dir_exits_2(tmp_path, capsys):
    rc = main(["run", "--methods", "threshold", "--dataset", "imagefolder", "--cache-dir", str(tmp_path / "c"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "--data-dir" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- real


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10_JPEG.exists(), reason=f"{CIFAR10_JPEG} not present")
def test_cifar10_jpeg_archive(tmp_path):
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        ds = load(CIFAR10_JPEG, tmp_path / "c")
        times.append(time.perf_counter() - t0)
        assert ds.name == "cifar10-jpeg" and ds.num_classes == 10 and len(ds.classes) == 10
        assert ds.train_x.shape == (50000, 32, 32, 3) and ds.test_x.shape == (10000, 32, 32, 3)
        np.testing.assert_array_equal(np.bincount(ds.train_y), [5000] * 10)
        np.testing.assert_array_equal(np.bincount(ds.test_y), [1000] * 10)
    print(f"cifar10-jpeg: first load {times[0]:.1f} s, cached {times[1]:.2f} s")
    assert times[1] < times[0]


def cifar_subset_zip(tmp_path: Path, classes: tuple[str, ...], n_train: int, n_test: int) -> Path:
    """A .zip of the first images of some classes of the CIFAR-10 photographs, in the train/test layout."""
    zpath = tmp_path / f"cifar10-{'-'.join(classes)}.zip"
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR10_JPEG) as tar, zipfile.ZipFile(zpath, "w") as z:
        for member in tar:
            parts = Path(member.name).parts  # cifar10-jpeg/<split>/<class>/NNNN.jpg
            if not member.isfile() or len(parts) != 4 or parts[2] not in classes:
                continue
            key = (parts[1], parts[2])
            if counts.get(key, 0) < (n_train if parts[1] == "train" else n_test):
                counts[key] = counts.get(key, 0) + 1
                z.writestr("/".join(parts[1:]), tar.extractfile(member).read())
    return zpath


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10_JPEG.exists(), reason=f"{CIFAR10_JPEG} not present")
def test_the_photo_comparison_end_to_end_on_two_classes(tmp_path):
    """The whole comparison of the photographs, reduced: two classes no other test uses (cat and ship), 300 + 100
    images each, in a .zip; every method on the ViT and the MSDNet family on MSDNet, ten budgets, then the
    report. Works without changes: only --data-dir and small --set values differ from the real run."""
    zpath = cifar_subset_zip(tmp_path, ("cat", "ship"), 300, 100)
    budgets = ",".join(f"{b / 10:g}" for b in range(1, 11))
    small = ["--set", "backbone.epochs=3", "--set", "threshold.epochs=5", "--set", "jeidnn.epochs=3",
             "--set", "jeidnn.warmup_epochs=1", "--set", "jeidnn_consistent.epochs=3"]
    common = ["--dataset", "imagefolder", "--data-dir", str(zpath), "--budgets", budgets,
              "--cache-dir", str(tmp_path / "cache")]
    vit_methods = "jeidnn,jeidnn_consistent,threshold,entropy,patience,boostednet,oracle"
    assert main(["run", "--methods", vit_methods, *common, "--out", str(tmp_path / "vit"),
                 "--set", "backbone.depth=4", "--set", "backbone.embed_dim=64", "--set", "backbone.num_heads=2",
                 *small]) == 0
    assert main(["run", "--backbone", "msdnet", "--methods", f"msdnet,{vit_methods}", *common,
                 "--out", str(tmp_path / "msdnet"), *small]) == 0
    for run, extra in (("vit", set()), ("msdnet", {"msdnet"})):
        df = pd.read_csv(tmp_path / run / "metrics.csv")
        assert set(df["dataset"]) == {"cifar10-cat-ship"}
        assert set(vit_methods.split(",")) | extra | {"static"} <= set(df["method"])
        test = df[(df.split == "test") & (df.metric == "accuracy") & df.exit.isna()]
        assert test.loc[test.method == "static", "value"].iloc[0] > 0.6  # two classes: something was learnt
        assert set(test.loc[test.method == "threshold", "budget"].dropna().round(1)) == {b / 10 for b in range(1, 11)}
    assert main(["report", str(tmp_path / "vit"), str(tmp_path / "msdnet"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").read_text().count("cifar10-cat-ship") >= 1
