"""Nothing read back from a cache can run code, and one process builds each cache entry while others wait.
(Job files planted in a run folder: tests/test_sweeps.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.backbones.vit import ViT, ViTConfig
from bench.base import locks
from bench.base.hashing import file_sha256
from bench.pipeline import features as F
from bench.pipeline.splits import make_splits
from bench.pipeline.tasks import backbone_key, load_or_train_backbone
from datasets import load_dataset

ROOT = Path(__file__).resolve().parent.parent
TINY = ViTConfig(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2, epochs=2, batch_size=128)


class Planted:
    """Unpickling this runs a shell command: what an attacker with write access to a shared cache would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_a_planted_checkpoint_is_never_executed(tmp_path, digits, caplog):
    splits = make_splits(digits.train_y, len(digits.test_y), 0)
    key = backbone_key(ViT, TINY, digits.name, splits.sha256, 0, digits.source)
    path = tmp_path / "backbones" / f"{digits.name}-vit-{key}.pt"
    path.parent.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    torch.save({"key": key, "state_dict": Planted(marker), "val_accuracy": 1.0, "best_epoch": 0, "history": []},
               path)
    backbone = load_or_train_backbone(tmp_path, ViT, TINY, digits, splits)
    assert not marker.exists()
    assert "unusable" in caplog.text and str(path) in caplog.text  # reported, then retrained
    assert backbone.history and len(backbone.history) == TINY.epochs
    assert torch.load(path, weights_only=True)["key"] == key  # replaced by a safe checkpoint


def test_a_planted_feature_cache_is_never_executed(tmp_path, digits, caplog):
    """A pickled object array planted as a split file, with a header whose sha256, size and mtime all match: the
    loader refuses it (np.load(allow_pickle=False)), says so and rebuilds."""
    splits = make_splits(digits.train_y, len(digits.test_y), 0)
    backbone = load_or_train_backbone(tmp_path, ViT, TINY, digits, splits)
    first = F.load_or_compute_features(tmp_path, backbone, digits, splits)["test"].clone()
    directory = F.feature_dir(tmp_path, digits.name, F.feature_key(backbone))
    marker = tmp_path / "PWNED"
    path = directory / "split-test.npy"
    np.save(path, np.array([Planted(marker)], dtype=object), allow_pickle=True)
    header = json.loads(F.header_path(directory, "splits").read_text())
    entry = next(e for e in header["files"] if e["name"] == path.name)
    entry.update(sha256=file_sha256(path), size=path.stat().st_size, mtime_ns=path.stat().st_mtime_ns)
    F.header_path(directory, "splits").write_text(json.dumps(header))
    feats = F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert not marker.exists() and "unusable" in caplog.text and "split-test.npy: " in caplog.text
    assert feats["test"].shape == (3, len(digits.test_y), 32) and torch.equal(feats["test"], first)


def test_a_lock_held_by_a_live_process_makes_others_wait(tmp_path):
    lock = tmp_path / "entry.lock"
    said, order = [], []

    def second():
        with locks.exclusive(lock, "the entry", say=said.append):
            order.append("second")

    with locks.exclusive(lock, "the entry"):
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"]
        t = threading.Thread(target=second)
        t.start()
        time.sleep(1.0)
        order.append("first")
    t.join(10)
    assert order == ["first", "second"]
    assert len(said) == 1 and f":{os.getpid()}, which is building the entry" in said[0]
    assert not lock.exists()


def test_a_stale_lock_is_taken_over(tmp_path, caplog, monkeypatch):
    lock = tmp_path / "entry.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": locks.socket.gethostname(), "pid": int(dead.stdout), "since": time.time()}))
    with locks.exclusive(lock, "the entry"):
        pass
    assert "stale lock" in caplog.text
    monkeypatch.setenv("BENCH_LOCK_STALE_S", "1")  # a holder on another host, silent for too long
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": time.time() - 5}))
    with locks.exclusive(lock, "the entry"):
        pass
    assert not lock.exists()


def test_a_long_holder_keeps_its_lock_alive(tmp_path, monkeypatch):
    """A holder busy for longer than the stale age (a multi-hour training) is not taken over: its heartbeat keeps
    the lock fresh; once released, the lock is gone for good."""
    monkeypatch.setenv("BENCH_LOCK_STALE_S", "0.6")  # a beat every 0.15 s
    lock = tmp_path / "entry.lock"
    order = []

    def second():
        with locks.exclusive(lock, "the entry", say=lambda _: None):
            order.append("second")

    with locks.exclusive(lock, "the entry"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(2.0)  # over three stale ages
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["beat"] > info["since"] + 1.0 and not locks._stale(info)
        order.append("first")
    t.join(10)
    assert order == ["first", "second"]
    time.sleep(0.5)
    assert not list(tmp_path.iterdir())  # neither the lock nor a beat's temporary file is left


def test_two_runs_on_one_empty_cache_train_one_backbone(tmp_path):
    """Started at once on the same empty cache: one trains, the other waits (and says so), both write the same
    rows."""
    tiny = ["--set", "backbone.depth=2", "--set", "backbone.embed_dim=16", "--set", "backbone.num_heads=2",
            "--set", "backbone.epochs=20", "--set", "threshold.epochs=3"]
    env = {**{k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "bench", "run", "--methods", "threshold", "--threads", "1",
                               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / f"out{i}"), *tiny],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in logs]
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert all(out.splitlines()[0].startswith(f"device: {want} (--device auto: torch sees ") for out, _ in logs)
    trained = [("train backbone" in err) for _, err in logs]
    waited = [("which is building backbone" in err) for _, err in logs]
    # one trains; the other waits for it (or, had it started late, found the checkpoint): never both
    assert sorted(trained) == [False, True] and not any(w and t for w, t in zip(waited, trained)), logs
    assert len(list((tmp_path / "cache" / "backbones").glob("*.pt"))) == 1
    a, b = (pd.read_csv(tmp_path / f"out{i}" / "metrics.csv") for i in range(2))
    pd.testing.assert_frame_equal(a, b)
