"""The on-disk feature cache (bench.pipeline.features): the values are bit-identical to the in-memory pass, a
load hashes nothing unless a file's size or mtime changed, damaged files are reported and rebuilt, and the
tensors methods get are memory-mapped from the split files (building a Task reads none of them into RAM)."""
from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.backbones.base import TrainedBackbone, block_features, to_tensor
from bench.backbones.vit import ViT, ViTConfig
from bench.pipeline import features as F
from bench.pipeline.splits import make_splits
from bench.pipeline.tasks import task_from_split_features
from datasets import ImageDataset, load_dataset

# eval batches of 128: digits' 1437 train and 360 test images end in partial batches
TINY = ViTConfig(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2, epochs=2, batch_size=128,
                 eval_batch_size=128)


def old_compute_features(st, x_uint8, img_size, batch_size=512):
    """The in-memory computation the cache replaced, verbatim (tqdm aside): the reference values."""
    chunks = []
    for i in range(0, len(x_uint8), batch_size):
        xb = to_tensor(x_uint8[i:i + batch_size], img_size, "cpu")
        chunks.append(block_features(st, xb).float().cpu())
    return torch.cat(chunks, dim=1)


def random_backbone(cfg=TINY, seed=0, in_chans=1) -> TrainedBackbone:
    torch.manual_seed(seed)
    model = ViT.create(cfg, in_chans=in_chans, num_classes=10, load_weights=False).eval().requires_grad_(False)
    return TrainedBackbone(ViT, model, cfg, key=f"random-{seed}-{cfg.embed_dim}-{cfg.depth}", val_accuracy=0.0,
                           best_epoch=0)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def setup(digits):
    backbone = random_backbone()
    return backbone, make_splits(digits.train_y, len(digits.test_y), 0)


def entry(cache: Path, digits, backbone) -> Path:
    return F.feature_dir(cache, digits.name, F.feature_key(backbone))


def count_computes(monkeypatch) -> list[int]:
    calls = []
    real = F.write_feature_range
    monkeypatch.setattr(F, "write_feature_range", lambda st, x, *a, **k: calls.append(len(x)) or real(st, x, *a, **k))
    return calls


def test_cached_values_are_bit_identical_to_the_in_memory_pass(tmp_path, digits, setup):
    backbone, splits = setup
    feats = F.load_or_compute_features(tmp_path, backbone, digits, splits)
    st = backbone.stages()
    old = {"train": old_compute_features(st, digits.train_x, 8, 128), "test": old_compute_features(st, digits.test_x, 8, 128)}
    assert old["train"].shape == (3, 1437, 32)
    for name in ("train", "val", "cal"):
        assert torch.equal(feats[name], old["train"][:, torch.from_numpy(splits[name])]), name
    assert torch.equal(feats["test"], old["test"])
    assert torch.equal(F.compute_features(st, digits.train_x, 8, 128), old["train"])  # the in-memory one too
    shards = [np.load(p, allow_pickle=False) for p in sorted(entry(tmp_path, digits, backbone).glob("train-k*.npy"))]
    assert len(shards) == 3 and all(np.array_equal(s, old["train"][k].numpy()) for k, s in enumerate(shards))


def test_ranges_at_batch_multiples_give_the_whole_pass(digits, setup):
    """What a Dask worker would do: rows [256, 1437) and [0, 256) computed apart equal one pass."""
    backbone, _ = setup
    st, x = backbone.stages(), digits.train_x
    outs = [np.full((len(x), 32), np.nan, dtype=np.float32) for _ in range(3)]
    F.write_feature_range(st, x, 256, len(x), outs, 8, 128)
    assert np.isnan(outs[0][:256]).all() and not np.isnan(outs[0][256:]).any()
    F.write_feature_range(st, x, 0, 256, outs, 8, 128)
    whole = old_compute_features(st, x, 8, 128)
    assert all(np.array_equal(o, whole[k].numpy()) for k, o in enumerate(outs))
    part = [np.zeros((128, 32), dtype=np.float32) for _ in range(3)]  # a range shard of its own, offset rows
    F.write_feature_range(st, x, 384, 512, part, 8, 128, offset=384)
    assert np.array_equal(part[2], whole[2, 384:512].numpy())
    with pytest.raises(ValueError, match="not aligned"):
        F.write_feature_range(st, x, 100, 300, outs, 8, 128)


def test_a_second_load_hashes_nothing_unless_a_file_was_touched(tmp_path, digits, setup, monkeypatch):
    backbone, splits = setup
    computes = count_computes(monkeypatch)
    first = F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert computes == [1437, 360]
    hashed = []
    real = F.file_sha256
    monkeypatch.setattr(F, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    again = F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert hashed == [] and computes == [1437, 360] and torch.equal(again["cal"], first["cal"])
    path = entry(tmp_path, digits, backbone) / "split-val.npy"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, another mtime (a copy)
    F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert hashed == ["split-val.npy"]  # re-hashed, matched, used
    F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert hashed == ["split-val.npy"] and computes == [1437, 360]  # the header now records the new mtime


def _flip_keep_size(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # make sure the mtime moves


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign_key(directory: Path, group: str) -> None:
    h = F.header_path(directory, group)
    header = json.loads(h.read_text())
    header["key"] = "0" * 16
    h.write_text(json.dumps(header))


def _wrong_shape(directory: Path, group: str) -> None:
    """A consistent header and file, both of another shape (e.g. another network's width)."""
    h = F.header_path(directory, group)
    header = json.loads(h.read_text())
    entry0 = header["files"][0]
    path = directory / entry0["name"]
    np.save(path, np.zeros([*entry0["shape"][:-1], 7], dtype=np.float32))
    st = path.stat()
    entry0.update(shape=[*entry0["shape"][:-1], 7], sha256=F.file_sha256(path), size=st.st_size,
                  mtime_ns=st.st_mtime_ns)
    h.write_text(json.dumps(header))


DAMAGE = {
    "truncated": (lambda d, g, f: _truncate(d / f), "sha256 mismatch"),
    "byte flipped": (lambda d, g, f: _flip_keep_size(d / f), "sha256 mismatch"),
    "deleted": (lambda d, g, f: (d / f).unlink(), "is missing"),
    "foreign key": (lambda d, g, f: _foreign_key(d, g), "built for key"),
    "wrong shape": (lambda d, g, f: _wrong_shape(d, g), "need"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_split_file_is_reported_and_rederived_without_a_forward_pass(tmp_path, digits, setup,
                                                                               monkeypatch, caplog, damage):
    backbone, splits = setup
    computes = count_computes(monkeypatch)
    first = {k: v.clone() for k, v in F.load_or_compute_features(tmp_path, backbone, digits, splits).items()}
    do, message = DAMAGE[damage]
    do(entry(tmp_path, digits, backbone), "splits", "split-train.npy")
    feats = F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert "unusable" in caplog.text and message in caplog.text
    assert computes == [1437, 360]  # the shards were intact: only the split files were gathered again
    assert all(torch.equal(feats[k], first[k]) for k in first)
    caplog.clear()
    F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert "unusable" not in caplog.text


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_array_shard_is_recomputed_when_needed(tmp_path, digits, setup, monkeypatch, caplog, damage):
    """The shards are read when split files must be (re)derived: a damaged train shard is recomputed then (and
    only the train array), never gathered from."""
    backbone, splits = setup
    computes = count_computes(monkeypatch)
    first = {k: v.clone() for k, v in F.load_or_compute_features(tmp_path, backbone, digits, splits).items()}
    directory = entry(tmp_path, digits, backbone)
    DAMAGE[damage][0](directory, "train", "train-k01.npy")
    F.header_path(directory, "splits").unlink()  # the split files must be derived again
    feats = F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert DAMAGE[damage][1] in caplog.text and str(F.header_path(directory, "train")) in caplog.text
    assert computes == [1437, 360, 1437]
    assert all(torch.equal(feats[k], first[k]) for k in first)


def test_a_half_written_entry_is_never_read(tmp_path, digits, setup, monkeypatch):
    """An interrupted build leaves no header (written last) and no temporary files: the next load rebuilds."""
    backbone, splits = setup

    def fail(outs):
        outs[0][:5] = 1.0
        raise KeyboardInterrupt

    monkeypatch.setattr(F, "write_feature_range", lambda *a, **k: fail(a[4]))
    with pytest.raises(KeyboardInterrupt):
        F.load_or_compute_features(tmp_path, backbone, digits, splits)
    directory = entry(tmp_path, digits, backbone)
    assert list(directory.iterdir()) == [] and not list((tmp_path / "locks").iterdir())
    monkeypatch.undo()
    assert F.load_or_compute_features(tmp_path, backbone, digits, splits)["test"].shape == (3, 360, 32)


def _mappings_of(ptr: int) -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= ptr < hi:
            return line
    return ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_methods_get_tensors_mapped_from_the_split_files(tmp_path, digits, setup):
    backbone, splits = setup
    F.load_or_compute_features(tmp_path, backbone, digits, splits)
    feats = F.load_or_compute_features(tmp_path, backbone, digits, splits)
    directory = entry(tmp_path, digits, backbone)
    task = task_from_split_features(digits, splits, backbone, feats)
    for name in ("train", "val", "cal", "test"):
        t = task.splits[name].features
        assert isinstance(t, torch.Tensor) and t.is_contiguous() and t.shape[1] == len(splits[name])
        assert str(directory / f"split-{name}.npy") in _mappings_of(t.data_ptr()), name
    before = (directory / "split-val.npy").read_bytes()
    task.splits["val"].features[0, 0, 0] = 123.0  # copy-on-write: the method's change stays private
    assert (directory / "split-val.npy").read_bytes() == before
    assert F.load_or_compute_features(tmp_path, backbone, digits, splits)["val"][0, 0, 0] != 123.0


def _rss_kib() -> dict[str, int]:
    return {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith(("VmRSS", "VmHWM", "RssAnon"))}


def synthetic_entry(cache: Path, n_train: int, n_test: int, k: int, d: int, seed: int = 0):
    """A dataset of ``n_train`` + ``n_test`` tiny images and a backbone of width ``d`` and depth ``k`` whose cache
    entry is filled with known synthetic features (row i of block b: i + b / 8, then a ramp over D)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n_train).astype(np.int64)
    ds = ImageDataset("synthetic-feats", np.zeros((n_train, 2, 2, 1), np.uint8), y,
                      np.zeros((n_test, 2, 2, 1), np.uint8), rng.integers(0, 10, n_test).astype(np.int64), 10,
                      tuple(map(str, range(10))), "synthetic")
    splits = make_splits(y, n_test, seed)
    cfg = ViTConfig(img_size=8, patch_size=2, embed_dim=d, depth=k, num_heads=2)
    backbone = random_backbone(cfg, in_chans=1)
    key = F.feature_key(backbone)
    directory = F.feature_dir(cache, ds.name, key)
    shapes = {"train": (k, n_train, d), "test": (k, n_test, d)}

    def fill(outs):
        ramp = np.arange(d, dtype=np.float32) / d
        for b, out in enumerate(outs):
            for i in range(0, out.shape[0], 10_000):
                rows = np.arange(i, min(i + 10_000, out.shape[0]), dtype=np.float32)
                out[i:i + len(rows)] = (rows + b / 8)[:, None] + ramp

    def build_arrays(names):
        for name in names:
            F.write_array(directory, key, name, shapes[name], fill)

    F.load_or_build(directory, key, splits, shapes, build_arrays, "synthetic features")
    return ds, splits, backbone


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads /proc (Linux)")
def test_building_a_task_reads_no_split_into_memory(tmp_path):
    """A 40k x 6 x 128 entry (98 MiB of split files): loading it and building the Task raises the peak RSS by far
    less than one split, and the values are the rows the splits name."""
    ds, splits, backbone = synthetic_entry(tmp_path, 40_000, 2_000, 6, 128)
    split_bytes = sum((F.feature_dir(tmp_path, ds.name, F.feature_key(backbone)) / f).stat().st_size
                      for f in F.split_files())
    assert split_bytes > 90 << 20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak
    before = _rss_kib()
    feats = F.load_or_compute_features(tmp_path, backbone, ds, splits)
    task = task_from_split_features(ds, splits, backbone, feats)
    after = _rss_kib()
    grew = (after["VmHWM"] - before["VmRSS"]) << 10
    assert grew < 0.05 * split_bytes, (grew, split_bytes)
    train = task.splits["train"].features
    assert train.shape == (6, len(splits.train), 128)
    i = splits.train[1234]
    assert torch.allclose(train[2, 1234], torch.tensor(i + 2 / 8 + np.arange(128) / 128, dtype=torch.float32))
    assert torch.equal(task.splits["test"].features[5, :, 0], torch.arange(2_000, dtype=torch.float32) + 5 / 8)


def test_nothing_in_the_cache_is_unpickled():
    """Every np.load in the feature cache passes allow_pickle=False, and nothing calls torch.load or pickle (a
    planted pickle is refused at run time: tests/test_safety.py)."""
    source = Path(F.__file__).read_text()
    assert not re.search(r"\bpickle\.|torch\.load|allow_pickle=True", source)
    loads = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and ast.unparse(node.func) == "np.load"]
    assert loads and all(any(kw.arg == "allow_pickle" and ast.unparse(kw.value) == "False" for kw in node.keywords)
                         for node in loads)
