"""Sharded feature extraction on Dask (bench.pipeline.feature_ranges): the ranges cover each array exactly at
batch boundaries, the shards assembled from range files are bit-identical to the sequential build's, an intact
range file is reused and a half-written or damaged one is not, a range that keeps failing is named; on a real
cluster (in-process, then a scheduler and two worker processes outside the repository, one SIGKILLed while the
ranges are being written) the features and the sweep's rows equal the sequential run's."""
from __future__ import annotations

import ast
import re
import signal
import sys
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.base.errors import UserError
from bench.cli import main
from bench.pipeline import feature_ranges as R
from bench.pipeline import features as F
from bench.pipeline.config import RunConfig
from bench.pipeline.backbone_cache import checkpoint_path
from bench.pipeline.tasks import load_task
from tests.test_packaging import DaskProcesses
from tests.test_sweeps import SWEEP, _same

# eval batches of 128: digits' 1437 train and 360 test images; ranges of 256 rows: 6 train + 2 test ranges
BACKBONE = {"depth": 3, "embed_dim": 32, "num_heads": 2, "epochs": 1, "eval_batch_size": 128}
ROWS = 256
RANGES = [("train", a, min(a + ROWS, 1437)) for a in range(0, 1437, ROWS)] + [("test", 0, 256), ("test", 256, 360)]


def _cfg(cache: Path, **kw) -> RunConfig:
    return RunConfig(methods=["threshold"], dataset="digits", cache_dir=str(cache), threads=1, device="cpu",
                     overrides={"backbone": dict(BACKBONE)}, **kw)


def _entry_bytes(directory: Path) -> dict[str, bytes]:
    """The bytes of every .npy of a feature entry (the array shards and the split files)."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*.npy"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny backbone trained on digits and its features built sequentially: the reference."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = _cfg(cache)
    loaded = load_task(cfg, 0)
    key = F.feature_key(loaded.backbone)
    directory = F.feature_dir(cache, "digits", key)
    reference = _entry_bytes(directory)
    assert len(reference) == 3 + 3 + 4  # K=3 shards of train and of test, four split files
    feats = {name: loaded.task.splits[name].features.clone() for name in ("train", "val", "cal", "test")}
    return cfg, loaded, directory, key, reference, feats


def _source(built) -> R.RangeSource:
    cfg, loaded, directory, key, _, _ = built
    shapes = {"train": (3, 1437, 32), "test": (3, 360, 32)}
    checkpoint = checkpoint_path(cfg.cache_dir, loaded.backbone.plugin, "digits", loaded.backbone.key)
    return R.range_source(cfg, cfg.cache_dir, loaded.backbone, loaded.dataset, checkpoint, directory, key, shapes,
                          "cpu")


def _clear(directory: Path) -> None:
    """Remove the entry's shards, split files and headers (the backbone checkpoint stays)."""
    for p in list(directory.glob("*.npy")) + list(directory.glob("*.json")):
        p.unlink()


def _now(calls: list, fail: set = frozenset()):
    """A submit function that runs each task at once in this process (a finished future), recording it."""
    def submit(fn, src, name, start, stop):
        calls.append((name, start, stop))
        fut = Future()
        try:
            if (name, start, stop) in fail:
                raise RuntimeError("disk on fire")
            fut.set_result(fn(src, name, start, stop))
        except Exception as e:
            fut.set_exception(e)
        return fut
    return submit


@pytest.fixture
def rows(monkeypatch):
    monkeypatch.setenv(R.RANGE_ROWS_ENV, str(ROWS))


# ---------------------------------------------------------------------------------------------- planning


@pytest.mark.parametrize("n", [0, 1, 127, 128, 1437, 4096, 5000])
@pytest.mark.parametrize("batch, rows", [(1, 1), (32, 100), (128, 256), (500, 4096), (512, None)])
def test_ranges_cover_the_array_exactly_at_batch_boundaries(n, batch, rows):
    ranges = R.plan_ranges(n, batch, rows)
    size = {None: 4096, 100: 128, 4096: 4500}.get(rows, rows)
    assert np.array_equal(np.concatenate([np.arange(a, b) for a, b in ranges] or [np.arange(0)]), np.arange(n))
    assert all(a % batch == 0 and b - a == min(size, n - a) for a, b in ranges)
    assert len(ranges) == -(-n // size)


def test_range_size_from_the_environment(monkeypatch):
    monkeypatch.setenv(R.RANGE_ROWS_ENV, "50")
    assert R.range_rows(32) == 64 and R.plan_ranges(100, 32) == [(0, 64), (64, 100)]
    monkeypatch.delenv(R.RANGE_ROWS_ENV)
    assert R.range_rows(512) == R.RANGE_ROWS == 4096
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(R.RANGE_ROWS_ENV, bad)
        with pytest.raises(UserError, match=R.RANGE_ROWS_ENV):
            R.range_rows(32)


# ---------------------------------------------------------------------------------------------- assembly


def test_assembled_shards_are_bit_identical_to_the_sequential_build(built, rows):
    cfg, loaded, directory, key, reference, feats = built
    _clear(directory)
    calls: list = []
    counts = {}

    def extract(backbone, dataset, where, k, shapes, device):
        assert (where, k, device, list(shapes)) == (directory, key, "cpu", ["train", "test"])
        counts.update(R.extract_arrays(_source(built), list(shapes), _now(calls), 128))

    again = F.load_or_compute_features(cfg.cache_dir, loaded.backbone, loaded.dataset, loaded.splits, "cpu", extract)
    assert sorted(calls) == sorted(RANGES) and counts == {"ranges": 8, "computed": 8, "reused": 0}
    assert _entry_bytes(directory) == reference  # shards and split files, byte for byte
    assert all(torch.equal(again[name], feats[name]) for name in feats)
    assert not (directory / "ranges").exists()  # the range files are deleted once assembled


def test_intact_ranges_are_reused_and_half_written_or_damaged_ones_are_not(built, rows, monkeypatch):
    cfg, loaded, directory, key, reference, _ = built
    _clear(directory)
    src = _source(built)
    folder = directory / "ranges"
    R.compute_range(src, "train", 0, 256)  # finished by an earlier attempt
    R.compute_range(src, "train", 512, 768)
    damaged = R.range_path(directory, "train", 512, 768)
    with open(damaged, "r+b") as f:  # one value changed after it was written
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    R.range_path(directory, "train", 768, 1024).write_bytes(b"\x93NUMPY")  # renamed, its .json never written
    temp = folder / ".train-00000256-00000512.npy.0123456789ab.tmp"  # a writer killed mid-range
    temp.write_bytes(b"\x93NUMPY half a range")
    computed = []
    real = R.write_feature_range
    monkeypatch.setattr(R, "write_feature_range", lambda st, x, a, b, *rest, **kw: computed.append((len(x), a, b))
                        or real(st, x, a, b, *rest, **kw))
    calls: list = []
    assert R.extract_arrays(src, ["train", "test"], _now(calls), 128) == {"ranges": 8, "computed": 7, "reused": 1}
    assert ("train", 0, 256) not in calls and sorted(calls) == sorted(set(RANGES) - {("train", 0, 256)})
    assert len(computed) == 7 and (1437, 0, 256) not in computed  # the forward passes: the reused range had none
    shards = {n: b for n, b in reference.items() if not n.startswith("split-")}
    assert _entry_bytes(directory) == shards  # the array shards, byte for byte
    assert not folder.exists()  # the temporary file with it


def test_a_range_that_keeps_failing_is_named_and_the_finished_ones_are_kept(built, rows):
    cfg, loaded, directory, key, reference, _ = built
    _clear(directory)
    src = _source(built)
    calls: list = []
    with pytest.raises(R.FeatureRangeFailures, match=r"failed for 1 of 8 ranges .* after 2 attempt\(s\): test rows "
                       r"\[256, 360\): RuntimeError: disk on fire\. The 7 finished ranges are kept") as e:
        R.extract_arrays(src, ["train", "test"], _now(calls, {("test", 256, 360)}), 128, attempts=2)
    assert e.value.exit_code == 1 and len(calls) == 8
    assert len(list((directory / "ranges").glob("*.npy"))) == 7 and not (directory / "train.json").exists()
    calls.clear()  # the rerun computes only the missing range
    assert R.extract_arrays(src, ["train", "test"], _now(calls), 128)["computed"] == 1
    assert calls == [("test", 256, 360)]
    for name in ("train-k00.npy", "train-k02.npy", "test-k01.npy"):
        assert (directory / name).read_bytes() == reference[name]


def test_a_worker_refuses_other_data_or_a_missing_checkpoint(built, tmp_path):
    src = _source(built)
    R._WORKER_MEMO.clear()
    with pytest.raises(RuntimeError, match="is not the driver's"):
        R.compute_range(replace(src, labels_sha256="0" * 64, directory=str(tmp_path)), "test", 0, 128)
    R._WORKER_MEMO.clear()
    with pytest.raises(RuntimeError, match="missing or unusable on worker .* --cache-dir"):
        R.compute_range(replace(src, checkpoint=str(tmp_path / "none.pt"), directory=str(tmp_path)), "test", 0, 128)
    assert not list(tmp_path.rglob("*.npy"))
    R._WORKER_MEMO.clear()


def test_nothing_a_range_file_holds_is_unpickled():
    """Range files are read with np.load(allow_pickle=False) and JSON only; the backbone comes through
    backbone_cache.load_checkpoint (torch.load(weights_only=True), tests/test_safety.py)."""
    calls = [node for node in ast.walk(ast.parse(Path(R.__file__).read_text())) if isinstance(node, ast.Call)]
    assert not [c for c in calls if re.match(r"(pickle|torch)\.load|.*unpickl", ast.unparse(c.func))]
    loads = [node for node in calls if ast.unparse(node.func) == "np.load"]
    assert loads and all(any(kw.arg == "allow_pickle" and ast.unparse(kw.value) == "False" for kw in node.keywords)
                         for node in loads)


# ---------------------------------------------------------------------------------------------- on a cluster


def test_load_task_extracts_on_a_local_cluster_bit_identically(built, rows):
    from distributed import Client, LocalCluster, get_task_stream

    cfg, loaded, directory, key, reference, feats = built
    _clear(directory)
    R._WORKER_MEMO.clear()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dask_cfg = _cfg(Path(cfg.cache_dir), executor="dask", scheduler=cluster.scheduler_address)
        with get_task_stream(client) as stream:
            again = load_task(dask_cfg, 0, dataset=loaded.dataset)
        tasks = [t["key"] for t in stream.data]
    assert len(tasks) == 8 and all("bench-features-" in str(t) for t in tasks)
    assert R._WORKER_MEMO  # the workers loaded the dataset and the checkpoint themselves
    assert _entry_bytes(directory) == reference
    assert all(torch.equal(again.task.splits[n].features, feats[n]) for n in feats)
    R._WORKER_MEMO.clear()


# eval batches of 32 and ranges of 32 rows: 45 train + 12 test ranges per seed, so a kill lands mid-extraction
DASK_SWEEP = [*SWEEP, "--set", "backbone.eval_batch_size=32"]
PER_SEED = 45 + 12


def test_dask_sweep_extracts_features_on_the_workers_and_survives_a_killed_worker(tmp_path):
    """A `bench run --executor dask` on a fresh cache: the features are extracted by two `dask worker` processes
    (started outside the repository), one of which is SIGKILLed while the first seed's ranges are being written.
    The run finishes, its tables equal a sequential run's (on its own cache) and every feature file is the same
    bytes; no range file or temporary is left."""
    with DaskProcesses(tmp_path, nanny=False) as cluster:
        workers = cluster.workers
        t0 = time.time()
        assert main([*DASK_SWEEP, "--cache-dir", str(tmp_path / "seq-cache"), "--out", str(tmp_path / "seq")]) == 0
        t_seq = time.time() - t0
        from distributed import Client

        with Client(cluster.address, timeout="30s") as client:  # it only watches: workers import what tasks need
            client.wait_for_workers(2, timeout=60)
            cache, out = tmp_path / "cache", tmp_path / "dask"
            t0 = time.time()
            sweep = cluster.start("sweep", sys.executable, "-m", "bench", *DASK_SWEEP, "--executor", "dask",
                                  "--scheduler", cluster.address, "--cache-dir", str(cache), "--out", str(out),
                                  env={**cluster.outside["env"], R.RANGE_ROWS_ENV: "32"})
            finished, deadline = [], time.time() + 120
            while time.time() < deadline and sweep.poll() is None and not finished:
                for entry in (cache / "features").glob("*"):
                    done = list((entry / "ranges").glob("*.npy"))
                    if done and not (entry / "train.json").exists():  # ranges written, shards not assembled yet
                        finished = done
                        break
                time.sleep(0.005)
            held = client.processing(workers=[workers["worker-a"]]).get(workers["worker-a"], [])
            cluster.procs["worker-a"].send_signal(signal.SIGKILL)  # it dies while the ranges are computed
            assert 1 <= len(finished) < PER_SEED, cluster.report()
            assert any(str(k).startswith("bench-features-") for k in held), (held, cluster.report())  # it had ranges
            assert sweep.wait(timeout=300) == 0, cluster.report()
        t_dask = time.time() - t0
        _same(tmp_path / "seq", out)
        seq_entries = sorted((tmp_path / "seq-cache" / "features").glob("*"))
        assert len(seq_entries) == 2  # one per seed
        for entry in seq_entries:
            assert _entry_bytes(cache / "features" / entry.name) == _entry_bytes(entry), entry.name
        assert not list((cache / "features").rglob("ranges")) and not list(cache.rglob("*.tmp"))
        print(f"sequential {t_seq:.1f} s, dask {t_dask:.1f} s, killed with {len(finished)} of {PER_SEED} ranges "
              f"written and {len(held)} task(s) in its hands")
