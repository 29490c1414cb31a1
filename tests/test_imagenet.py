"""``imagenet``: a miniature ILSVRC2012 tree (3 wnids x 4 train JPEGs, 6 val images) generated under tmp_path.

Val comes flat with the devkit's ground truth and ``meta.mat`` (written with scipy in the devkit's ``synsets``
structure, an internal node among the leaves), in folders, in the devkit archive, or with Kaggle's CSV. Pixels are
checked against torchvision's ``Resize`` + ``CenterCrop``, the standard evaluation transform.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from torchvision import transforms

from bench.base.errors import UserError
from bench.cli import main
from datasets import LazyImages, imagenet, lazy, list_datasets, load_dataset

WNIDS = ("n01440764", "n01443537", "n01484850")  # tench, goldfish, great white shark: ILSVRC2012_IDs 449, 450, 442
IDS = {"n01440764": 449, "n01443537": 450, "n01484850": 442}
VAL_LABELS = ("n01443537", "n01440764", "n01484850", "n01484850", "n01443537", "n01440764")  # val 1..6
SIZE = 32


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    for var in ("BENCH_CACHE_DIR", "BENCH_DATA_DIR", lazy.WORKERS_ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(imagenet.SIZE_ENV_VAR, str(SIZE))


def jpeg(path: Path, seed: int, size: tuple[int, int], mode: str = "RGB") -> None:
    w, h = size
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode).save(path, format="JPEG", quality=90)


def meta_mat(extra: tuple[tuple[int, str, int], ...] = ((1001, "n00001740", 2),)) -> bytes:
    """A devkit-style meta.mat: leaf synsets for WNIDS (num_children 0) plus internal nodes."""
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
             ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    rows = [(IDS[w], w, 0) for w in WNIDS] + list(extra)
    synsets = np.zeros((len(rows), 1), dtype=dtype)
    for i, (ident, wnid, children) in enumerate(rows):
        synsets[i, 0] = (np.array([[ident]], np.uint16), wnid, f"words {wnid}", "gloss",
                         np.array([[children]], np.uint8), np.zeros((1, children), np.uint16),
                         np.array([[0]], np.uint8), np.array([[4]], np.uint16))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def make_tree(root: Path, val: str = "flat") -> dict[str, Path]:
    """train/<wnid>/*.JPEG (mixed sizes, one grayscale) and val/ as ``flat`` (+ devkit files in data/),
    ``folders`` or ``kaggle``; returns where each image is, by relative path."""
    sizes = [(48, 40), (40, 56), (37, 37), (64, 36)]
    for k, w in enumerate(WNIDS):
        for i in range(4):
            jpeg(root / "train" / w / f"{w}_{i + 1}.JPEG", 10 * k + i, sizes[i], "L" if (k, i) == (1, 2) else "RGB")
    for i, w in enumerate(VAL_LABELS, start=1):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        jpeg(root / "val" / (f"{w}/{name}" if val == "folders" else name), 100 + i, sizes[i % 4])
    if val == "flat":
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        (data / imagenet.GROUND_TRUTH).write_text("".join(f"{IDS[w]}\n" for w in VAL_LABELS))
        (data / imagenet.META).write_bytes(meta_mat())
    if val == "kaggle":
        rows = "".join(f"ILSVRC2012_val_{i:08d},{w} 1 2 30 40 {w} 3 4 20 20\n" for i, w in enumerate(VAL_LABELS, 1))
        (root / imagenet.KAGGLE_SOLUTION).write_text("ImageId,PredictionString\n" + rows)
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*.JPEG")}


def load(root, tmp_path):
    return load_dataset("imagenet", data_dir=root, cache_dir=tmp_path / "cache")


def reference(path: Path) -> np.ndarray:
    """torchvision's ImageNet evaluation transform at SIZE: Resize(round(SIZE*256/224)) + CenterCrop(SIZE)."""
    t = transforms.Compose([transforms.Resize(round(SIZE * 256 / 224)), transforms.CenterCrop(SIZE)])
    with Image.open(path) as im:
        return np.asarray(t(im.convert("RGB")))


def user_error(root, tmp_path) -> str:
    with pytest.raises(UserError) as e:
        load(root, tmp_path)
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    return str(e.value)


# ------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("val", ["flat", "folders", "kaggle"])
def test_miniature_tree_loads_with_devkit_labels(tmp_path, val):
    files = make_tree(tmp_path / "in", val)
    ds = load(tmp_path / "in", tmp_path)
    assert "imagenet" in list_datasets()
    assert ds.name == "imagenet" and ds.classes == WNIDS and ds.num_classes == 3
    assert isinstance(ds.train_x, LazyImages) and isinstance(ds.test_x, LazyImages)
    assert ds.train_x.shape == (12, SIZE, SIZE, 3) and ds.test_x.shape == (6, SIZE, SIZE, 3)
    np.testing.assert_array_equal(ds.train_y, np.repeat([0, 1, 2], 4))
    numbers = [int(i[-13:-5]) for i in ds.test_ids]  # ILSVRC2012_val_<number>.JPEG
    assert numbers == (list(range(1, 7)) if val != "folders" else [2, 6, 1, 5, 3, 4])  # folders: by class
    np.testing.assert_array_equal(ds.test_y, [WNIDS.index(VAL_LABELS[i - 1]) for i in numbers])
    assert list(ds.train_ids)[:2] == ["train/n01440764/n01440764_1.JPEG", "train/n01440764/n01440764_2.JPEG"]
    expected_val = [f"val/{w + '/' if val == 'folders' else ''}ILSVRC2012_val_{i:08d}.JPEG"
                    for i, w in enumerate(VAL_LABELS, 1)]
    assert sorted(ds.test_ids) == sorted(expected_val)
    test_ids = list(ds.test_ids)
    for split, x, ids in (("train", ds.train_x, list(ds.train_ids)), ("test", ds.test_x, test_ids)):
        ref = np.stack([reference(files[i]) for i in ids])
        np.testing.assert_array_equal(x[:], ref)
        np.testing.assert_array_equal(np.concatenate(list(x.batches(5, workers=2))), ref)
    assert ds.source.startswith("imagenet:") and "12 train + 6 val" in ds.source and "streamed" in ds.source
    assert f"centre crop {SIZE}x{SIZE}" in ds.source and f"shorter side {round(SIZE * 256 / 224)}" in ds.source


def test_devkit_archive_and_flat_labels_agree(tmp_path):
    make_tree(tmp_path / "in", "flat")
    loose = load(tmp_path / "in", tmp_path)
    data = tmp_path / "in" / "ILSVRC2012_devkit_t12"
    with tarfile.open(tmp_path / "in" / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
        t.add(data, arcname="ILSVRC2012_devkit_t12")
    for f in data.rglob("*"):
        if f.is_file():
            f.unlink()
    packed = load(tmp_path / "in", tmp_path)
    np.testing.assert_array_equal(packed.test_y, loose.test_y)
    assert "ILSVRC2012_devkit_t12.tar.gz" not in packed.source and packed.source == loose.source


def test_check_runs_once_and_size_changes_only_the_transform(tmp_path, monkeypatch):
    make_tree(tmp_path / "in")
    calls = []
    real = imagenet.check_images
    monkeypatch.setattr(imagenet, "check_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load(tmp_path / "in", tmp_path)
    second = load(tmp_path / "in", tmp_path)
    assert calls == [1] and second.source == first.source
    monkeypatch.setenv(imagenet.SIZE_ENV_VAR, "24")
    third = load(tmp_path / "in", tmp_path)
    assert calls == [1] and third.train_x.shape[1:] == (24, 24, 3) and third.source != first.source
    jpeg(tmp_path / "in" / "train" / WNIDS[0] / "extra.JPEG", 5, (30, 30))  # a new file: a new key, checked once
    load(tmp_path / "in", tmp_path)
    assert calls == [1, 1]


def test_kaggle_folder_layout_is_found_from_its_root(tmp_path):
    make_tree(tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC", "folders")
    ds = load(tmp_path / "kaggle", tmp_path)
    assert ds.train_x.shape[0] == 12 and ds.classes == WNIDS


def test_cli_lists_imagenet(capsys):
    assert main(["ls"]) == 0
    assert "imagenet" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------- errors


def test_missing_data_dir_says_how_to_obtain_it(tmp_path):
    msg = user_error(None, tmp_path)
    assert "image-net.org" in msg and str(tmp_path / "cache" / "data" / "imagenet") in msg


def test_missing_train_or_val(tmp_path):
    make_tree(tmp_path / "a")
    for p in (tmp_path / "a" / "train").rglob("*"):
        p.unlink() if p.is_file() else None
    (tmp_path / "b").mkdir()
    make_tree(tmp_path / "c")
    for p in sorted((tmp_path / "c" / "val").rglob("*"), reverse=True):
        p.unlink()
    (tmp_path / "c" / "val").rmdir()
    assert str(tmp_path / "b" / "train") in user_error(tmp_path / "b", tmp_path)
    assert str(tmp_path / "c" / "val") in user_error(tmp_path / "c", tmp_path)
    msg = user_error(tmp_path / "a", tmp_path)  # empty class folders
    assert str(tmp_path / "a" / "train" / WNIDS[0]) in msg and "holds no images" in msg


def test_class_in_one_split_only(tmp_path):
    make_tree(tmp_path / "a", "folders")
    for p in (tmp_path / "a" / "val" / WNIDS[2]).iterdir():
        p.unlink()
    (tmp_path / "a" / "val" / WNIDS[2]).rmdir()
    assert str(tmp_path / "a" / "train" / WNIDS[2]) in user_error(tmp_path / "a", tmp_path)
    make_tree(tmp_path / "b", "folders")
    jpeg(tmp_path / "b" / "val" / "n09999999" / "x.JPEG", 1, (40, 40))
    msg = user_error(tmp_path / "b", tmp_path)
    assert str(tmp_path / "b" / "val" / "n09999999" / "x.JPEG") in msg and "n09999999" in msg


def test_flat_val_without_ground_truth(tmp_path):
    make_tree(tmp_path / "a")
    (tmp_path / "a" / "ILSVRC2012_devkit_t12" / "data" / imagenet.GROUND_TRUTH).unlink()
    msg = user_error(tmp_path / "a", tmp_path)
    assert str(tmp_path / "a" / "val") in msg and imagenet.GROUND_TRUTH in msg


def test_ground_truth_with_wrong_line_count_or_unknown_id(tmp_path):
    make_tree(tmp_path / "a")
    gt = tmp_path / "a" / "ILSVRC2012_devkit_t12" / "data" / imagenet.GROUND_TRUTH
    gt.write_text(gt.read_text() + "449\n")
    msg = user_error(tmp_path / "a", tmp_path)
    assert str(gt) in msg and "7 lines" in msg and "6 images" in msg
    gt.write_text("".join(f"{IDS[w]}\n" for w in VAL_LABELS[:-1]) + "1001\n")  # an internal node, not a class
    msg = user_error(tmp_path / "a", tmp_path)
    assert str(gt) in msg and "line 6" in msg and "1001" in msg
    gt.write_text("".join(f"{IDS[w]}\n" for w in VAL_LABELS[:-1]) + "7\n")  # in no table at all
    assert "ILSVRC2012_ID 7" in user_error(tmp_path / "a", tmp_path)


def test_non_image_files(tmp_path):
    make_tree(tmp_path / "a")
    notes = tmp_path / "a" / "train" / WNIDS[1] / "notes.txt"
    notes.write_text("hello")
    assert str(notes) in user_error(tmp_path / "a", tmp_path)
    notes.unlink()
    (tmp_path / "a" / "train" / WNIDS[1] / ".DS_Store").write_bytes(b"\0")  # hidden files are skipped
    bad = tmp_path / "a" / "val" / "ILSVRC2012_val_00000004.JPEG"
    bad.write_bytes(bad.read_bytes()[:-300])  # a truncated JPEG: found by the decode check, before training
    msg = user_error(tmp_path / "a", tmp_path)
    assert str(bad) in msg and "truncated" in msg
    loose = tmp_path / "a" / "train" / "stray.JPEG"
    jpeg(loose, 3, (40, 40))
    assert str(loose) in user_error(tmp_path / "a", tmp_path)


def test_bad_size_setting(tmp_path, monkeypatch):
    make_tree(tmp_path / "a")
    monkeypatch.setenv(imagenet.SIZE_ENV_VAR, "big")
    assert imagenet.SIZE_ENV_VAR in user_error(tmp_path / "a", tmp_path)
