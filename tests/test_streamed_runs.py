"""Streamed images end to end through the command line (issue 25): an image folder run in memory and streamed gives
the same metrics.csv and decisions.csv.gz, ``--timing`` works on streamed test images, ``--dataset imagenet`` runs
on a miniature ILSVRC2012 tree with a from-scratch ViT (nothing downloaded) and its data mistakes exit 2 naming
the path. run.json records the peak memory, the images per second of the stages that ran, and the data settings
taken from the environment; the results page shows them."""
from __future__ import annotations

import gzip
import json
import resource
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.backbones.base import BACKBONES
from bench.cli import main
from bench.pipeline import resources
from bench.results.files import DECISION_COLUMNS, read_metrics, write_decisions
from bench.results.page import machine_line, resources_text, _provenance
from datasets import imagefolder, imagefolder_lazy, imagenet, lazy
from tests.test_imagenet import IDS, WNIDS, jpeg, meta_mat

LAZY = imagefolder_lazy.LAZY_ENV_VAR
TINY = ["--set", "backbone.depth=2", "--set", "backbone.embed_dim=16", "--set", "backbone.num_heads=2",
        "--set", "backbone.patch_size=4", "--set", "backbone.img_size=12", "--set", "backbone.epochs=2",
        "--set", "backbone.batch_size=16", "--set", "backbone.eval_batch_size=16", "--set", "threshold.epochs=3",
        "--set", "entropy.epochs=3", "--set", "jeidnn.epochs=2",
        "--set", "jeidnn.warmup_epochs=1"]
RUN = ["run", "--methods", "threshold,entropy,jeidnn", "--budgets", "0.5,0.8,1.0", *TINY]
TIMING = {"latency_ms", "latency_ms_p90", "throughput", "wall_rel", "timed_macs_rel", "host_syncs_per_block"}
CLASSES = ("ant", "bee", "cow", "dog")


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    for var in (*resources.DATA_ENV_VARS, "BENCH_CACHE_DIR", "BENCH_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)


def make_photos(root: Path, n_train: int = 80, n_test: int = 20) -> Path:
    """train/ and test/ folders of 4 classes, 12x12 PNGs (noise tinted by class: learnable): 400 images, so the
    streamed set is decoded in DataLoader workers (``datasets.lazy.SMALL`` = 256)."""
    for split, k in (("train", n_train), ("test", n_test)):
        for ci, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for i in range(k):
                a = np.random.default_rng([ci, i, split == "test"]).integers(0, 176, (12, 12, 3), dtype=np.uint8)
                a[..., ci % 3] += 80
                Image.fromarray(a).save(root / split / c / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("photos") / "zoo")


def run(args: list[str]) -> None:
    assert main(args) == 0


@pytest.fixture(scope="module")
def pair(photos, tmp_path_factory):
    """The same run in memory and streamed (``BENCH_IMAGEFOLDER_LAZY_BYTES=100``), each from its own cache."""
    base = tmp_path_factory.mktemp("pair")
    with pytest.MonkeyPatch.context() as mp:
        for var in resources.DATA_ENV_VARS:
            mp.delenv(var, raising=False)
        run([*RUN, "--dataset", "imagefolder", "--data-dir", str(photos), "--cache-dir", str(base / "c-memory"),
             "--out", str(base / "memory")])
        mp.setenv(LAZY, "100")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        decoded: list[int] = []  # images per decoding call in this process (workers' calls stay in the workers)
        real = lazy._decode_into
        mp.setattr(lazy, "_decode_into", lambda files, transform, hwc, positions: decoded.append(len(positions))
                   or real(files, transform, hwc, positions))
        run([*RUN, "--dataset", "imagefolder", "--data-dir", str(photos), "--cache-dir", str(base / "c-streamed"),
             "--out", str(base / "streamed")])
        mp.setattr(lazy, "_decode_into", real)
        mp.setenv(LAZY, "100")  # the same cache again, timed: backbone and features are read, not built
        run([*RUN, "--dataset", "imagefolder", "--data-dir", str(photos), "--cache-dir", str(base / "c-streamed"),
             "--out", str(base / "timed"), "--timing", "--timing-batch", "32"])
    return base, rss_before, decoded


def test_streamed_run_gives_the_in_memory_files(pair):
    base, *_ = pair
    memory, streamed = (json.loads((base / d / "run.json").read_text()) for d in ("memory", "streamed"))
    assert memory["dataset_source"] + "; streamed (decoded from the files on use)" == streamed["dataset_source"]
    a, b = read_metrics(base / "memory"), read_metrics(base / "streamed")
    assert len(a) > 500 and {"threshold", "entropy", "jeidnn", "static"} <= set(a["method"])
    pd.testing.assert_frame_equal(a.drop(columns="run_id"), b.drop(columns="run_id"))
    da, db = (pd.read_csv(base / d / "decisions.csv.gz") for d in ("memory", "streamed"))
    pd.testing.assert_frame_equal(da, db)
    sizes = da.groupby(["split", "method", "budget", "params"], dropna=False).size()
    assert set(sizes["test"]) == {80} and set(sizes["val"]) == {32}  # every sample of each point; val: 10 % of 320
    points = a[(a.metric == "accuracy") & a.value.notna() & (a.method != "static") & a.exit.isna()]
    assert len(sizes) == len(points) > 2 * 6  # one block per feasible point and split


def test_streamed_run_decodes_one_batch_at_a_time(pair):
    """Memory flat in the number of images: this process decodes no more than one batch (16 images) per call;
    the training split (256 images) is never decoded whole (training reads it batch by batch in workers)."""
    *_, decoded = pair
    assert decoded and max(decoded) <= 16, sorted(decoded)[-5:]


def test_timing_on_streamed_test_images(pair):
    base, *_ = pair
    timed = read_metrics(base / "timed")
    t = timed[timed.metric.isin(TIMING)]
    assert set(t["metric"]) == TIMING and (t.loc[t.metric != "host_syncs_per_block", "value"] > 0).all()
    assert (t.loc[t.metric == "throughput", "n"] == 80).all()  # every streamed test image timed
    rest = timed[~timed.metric.isin(TIMING)].reset_index(drop=True)
    pd.testing.assert_frame_equal(rest.drop(columns="run_id"),
                                  read_metrics(base / "streamed").drop(columns="run_id"))


def test_run_json_records_memory_rates_and_env(pair):
    base, rss_before, _ = pair
    memory, streamed, timed = (json.loads((base / d / "run.json").read_text())
                               for d in ("memory", "streamed", "timed"))
    assert "env" not in memory and streamed["env"] == {LAZY: "100"} == timed["env"]
    res = streamed["resources"]
    # this pytest process's peak, up to the run's end (recorded to 0.1 MiB: equal when the run added no peak)
    assert res["peak_rss_mib"] >= round(rss_before, 1) - 0.05 and rss_before > 100
    assert res["peak_rss_children_mib"] > 0  # the DataLoader workers that decoded the streamed images
    assert "cuda_max_allocated_mib" not in res and res["network"] == "vit"
    assert res["malloc_mmap_threshold_bytes"] == (1 << 20 if sys.platform.startswith("linux") else None)
    by = {s["stage"]: s for s in res["stages"]}
    assert set(by) == {"backbone_training", "features"}
    split_train = streamed["seeds"]["0"]["split_sizes"]["train"]
    assert by["backbone_training"]["images"] == 2 * split_train == 2 * 256  # 2 epochs of the train split
    assert by["backbone_training"]["epochs"] == 2 and by["features"]["images"] == 400  # train and test arrays
    for s in by.values():
        assert s["seed"] == 0 and s["seconds"] > 0 and s["images_per_s"] == pytest.approx(s["images"] / s["seconds"],
                                                                                          rel=0.01)
    assert timed["resources"]["stages"] == []  # the cached backbone and features: nothing built in that run


def test_page_shows_memory_rates_and_the_env(pair):
    base, *_ = pair
    run = json.loads((base / "streamed" / "run.json").read_text())
    line = machine_line(run)
    rss = run["resources"]["peak_rss_mib"]
    rates = {s["stage"]: s["images"] / s["seconds"] for s in run["resources"]["stages"]}
    assert f"peak RSS {rss:,.0f} MiB (largest child process " in line
    assert f"backbone training {rates['backbone_training']:,.0f} images/s" in line
    assert f"feature extraction {rates['features']:,.0f} images/s" in line
    block = _provenance(base / "streamed")
    assert block[1].startswith(f"{LAZY}=100 python -m bench run --methods threshold,entropy,jeidnn")
    old = {k: v for k, v in run.items() if k not in ("resources", "env")}  # a run from before: as it was
    assert "RSS" not in machine_line(old) and "images/s" not in machine_line(old)
    assert line.startswith(machine_line(old)[:-1] + " · peak RSS")
    assert not _provenance(base / "memory")[1].startswith(LAZY)


def test_resources_text_on_cuda_and_several_seeds():
    res = {"peak_rss_mib": 2048.4, "peak_rss_children_mib": 0.0, "cuda_max_allocated_mib": 1536.0, "network": "vit",
           "stages": [{"seed": 0, "network": "vit", "stage": "features", "images": 1000, "seconds": 2.0},
                      {"seed": 1, "network": "vit", "stage": "features", "images": 1000, "seconds": 6.0},
                      {"seed": 0, "network": "msdnet", "stage": "features", "images": 1000, "seconds": 100.0}]}
    assert resources_text(res) == ["peak RSS 2,048 MiB, CUDA peak allocated 1,536 MiB",
                                   "feature extraction 250 images/s"]  # the run's network over its seeds
    assert resources_text(None) == [] and resources_text({}) == []


def test_write_decisions_streams_blocks_into_one_table(tmp_path):
    blocks = [{"split": s, "seed": 0, "method": "m", "budget": b, "params": json.dumps({"p": i}),
               "sample_id": np.arange(n), "exit": np.arange(n) % 3, "pred": np.arange(n) % 5,
               "target": np.arange(n) % 4, "confidence": np.linspace(0.1, 0.9, n)}
              for i, (s, b, n) in enumerate((("val", 0.1, 7), ("test", None, 5), ("test", 0.5, 3)))]
    write_decisions(blocks, tmp_path / "a.csv.gz")
    write_decisions(iter(blocks), tmp_path / "b.csv.gz")
    assert (tmp_path / "a.csv.gz").read_bytes() == (tmp_path / "b.csv.gz").read_bytes()  # no time in the header
    text = gzip.decompress((tmp_path / "a.csv.gz").read_bytes()).decode()
    assert text.count("split,seed") == 1 and len(text.splitlines()) == 1 + 7 + 5 + 3
    df = pd.read_csv(tmp_path / "a.csv.gz")
    assert list(df.columns) == DECISION_COLUMNS
    np.testing.assert_array_equal(df["budget"].to_numpy(), [0.1] * 7 + [np.nan] * 5 + [0.5] * 3)
    np.testing.assert_array_equal(df["confidence"].to_numpy()[:7], np.linspace(0.1, 0.9, 7))  # exact (%.17g)
    write_decisions([], tmp_path / "empty.csv.gz")
    assert gzip.decompress((tmp_path / "empty.csv.gz").read_bytes()).decode().strip() == ",".join(DECISION_COLUMNS)


# ------------------------------------------------------------------------------------------------- imagenet


def make_imagenet(root: Path, per_class: int = 30, n_val: int = 15) -> Path:
    """A miniature ILSVRC2012 tree: train/<wnid>/ JPEGs of mixed sizes, flat val/ with the devkit's labels."""
    for k, w in enumerate(WNIDS):
        for i in range(per_class):
            jpeg(root / "train" / w / f"{w}_{i + 1}.JPEG", 100 * k + i, (24 + i % 5, 20 + i % 7))
    labels = [WNIDS[i % 3] for i in range(n_val)]
    for i in range(1, n_val + 1):
        jpeg(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", 1000 + i, (22, 26))
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / imagenet.GROUND_TRUTH).write_text("".join(f"{IDS[w]}\n" for w in labels))
    (data / imagenet.META).write_bytes(meta_mat())
    return root


IMAGENET = ["run", "--dataset", "imagenet", "--backbone", "vit-scratch", "--methods", "threshold,entropy,jeidnn",
            "--budgets", "0.5,1.0", *[t.replace("img_size=12", "img_size=16") for t in TINY]]


def test_vit_scratch_on_imagenet_trains_from_scratch():
    cfg = BACKBONES.get("vit-scratch").configure("imagenet", {})
    assert not cfg.pretrained and (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth) == (224, 16, 192, 12)
    assert BACKBONES.get("vit").configure("imagenet", {}).pretrained  # ``vit`` fine-tunes, as before


def test_imagenet_end_to_end_streamed(tmp_path, monkeypatch):
    monkeypatch.setenv(imagenet.SIZE_ENV_VAR, "16")
    root = make_imagenet(tmp_path / "ilsvrc")
    run([*IMAGENET, "--data-dir", str(root), "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
         "--timing", "--timing-batch", "8"])
    df = read_metrics(tmp_path / "o")
    test = df[(df.split == "test") & (df.metric == "accuracy") & df.value.notna()]
    assert set(test["method"]) == {"static", "threshold", "entropy", "jeidnn"} and (test["n"] == 15).all()
    assert set(df["dataset"]) == {"imagenet"} and set(df["backbone"]) == {"vit-d2-w16-p4-16px"}
    assert (df.loc[df.metric == "throughput", "n"] == 15).all()
    dec = pd.read_csv(tmp_path / "o" / "decisions.csv.gz")
    assert sorted(dec.loc[dec.split == "test", "sample_id"].unique()) == list(range(15))
    run_json = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run_json["env"] == {imagenet.SIZE_ENV_VAR: "16"} and "streamed" in run_json["dataset_source"]
    assert {s["stage"] for s in run_json["resources"]["stages"]} == {"backbone_training", "features"}


def _cli_error(args, capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    return err


def test_imagenet_data_mistakes_exit_2_naming_the_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(imagenet.SIZE_ENV_VAR, "16")
    flat = make_imagenet(tmp_path / "flat", per_class=3, n_val=3)
    truth = flat / "ILSVRC2012_devkit_t12" / "data" / imagenet.GROUND_TRUTH
    truth.unlink()
    err = _cli_error([*IMAGENET, "--data-dir", str(flat), "--cache-dir", str(tmp_path / "c"),
                      "--out", str(tmp_path / "o1")], capsys)
    assert str(flat / "val") in err and imagenet.GROUND_TRUTH in err
    folders = tmp_path / "folders"
    for k, w in enumerate(WNIDS):
        jpeg(folders / "train" / w / f"{w}_1.JPEG", k, (24, 24))
        if k < 2:  # the third class has no val folder
            jpeg(folders / "val" / w / f"ILSVRC2012_val_{k + 1:08d}.JPEG", 10 + k, (24, 24))
    err = _cli_error([*IMAGENET, "--data-dir", str(folders), "--cache-dir", str(tmp_path / "c"),
                      "--out", str(tmp_path / "o2")], capsys)
    assert str(folders / "train" / WNIDS[2]) in err and "val" in err
    assert not (tmp_path / "c" / "backbones").exists()  # nothing trained


def test_data_env_lists_only_what_is_set(monkeypatch):
    assert resources.data_env() == {}
    monkeypatch.setenv(imagefolder.SIZE_ENV_VAR, "32")
    monkeypatch.setenv(lazy.WORKERS_ENV_VAR, "0")
    assert resources.data_env() == {imagefolder.SIZE_ENV_VAR: "32", lazy.WORKERS_ENV_VAR: "0"}
