"""Memory flat in the number of images (issue 25), as a pytest benchmark: ``tests/benchmarks/memory_flat.py`` on
10,000 and 100,000 generated 64x64 JPEGs, both streamed; the 100k run's peak RSS is at most 1.3x the 10k run's.

Marked ``slow``, not ``perf``: it generates 110,000 files (about 450 MB on disk, once) and runs two cold
``bench run`` processes, about 20 minutes on 2 CPU cores; ``make bench-perf`` (``-m "not slow"``) stays the
pytest-benchmark timings of a few minutes, and the default suite runs only the cheap generator test below.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -m slow -s tests/benchmarks/test_memory.py
    BENCH_MEMORY_OUT=results/runs/memory-flat ...   # keep the two run folders there (else a temporary folder)

To produce the run folders for the results page, ``python -m tests.benchmarks.memory_flat --out DIR`` does the same
without pytest.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from datasets import load_dataset
from tests.benchmarks import memory_flat as mf


def test_generated_folder_is_reused_and_loads(tmp_path, monkeypatch):
    """The generator's folder: n JPEGs at 64x64 in train/ and test/ class folders (a fifth of each class in test),
    reused when complete, and read by ``imagefolder`` streamed."""
    root = mf.generate(tmp_path / "images-230", 230, log=lambda _: None)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    assert len(files) == 230 and sum(f.startswith("test/") for f in files) == 10 * 5  # 23 or 24 per class: 5
    stamp = (root / "train" / "c00" / "000005.jpg").stat().st_mtime_ns
    assert mf.generate(root, 230, log=lambda _: None) == root
    assert (root / "train" / "c00" / "000005.jpg").stat().st_mtime_ns == stamp  # not generated again
    monkeypatch.setenv("BENCH_IMAGEFOLDER_LAZY_BYTES", mf.ENV["BENCH_IMAGEFOLDER_LAZY_BYTES"])
    ds = load_dataset("imagefolder", data_dir=root, cache_dir=tmp_path / "cache")
    assert ds.train_x.shape == (180, 64, 64, 3) and len(ds.test_y) == 50 and ds.num_classes == mf.CLASSES
    assert ds.source.endswith("streamed (decoded from the files on use)")
    a, b = ds.train_x[0], ds.train_x[1]
    assert a.std() > 20 and (a != b).mean() > 0.5  # structured, and no two alike


@pytest.mark.slow
def test_peak_rss_is_flat_in_the_number_of_images(tmp_path, capsys):
    out = Path(os.environ.get("BENCH_MEMORY_OUT") or tmp_path / "runs")
    data = mf.default_data_dir()
    data.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        results = mf.measure(out, data)
        ratio = mf.ratio(results)
        print(f"peak RSS ratio 100k / 10k: {ratio:.3f} (at most {mf.MAX_RATIO})")
    for name, n in mf.SIZES.items():
        run = json.loads((out / name / "run.json").read_text())
        assert run["env"] == mf.ENV and run["dataset_source"].endswith("streamed (decoded from the files on use)")
        stages = {s["stage"]: s for s in run["resources"]["stages"]}
        assert stages["features"]["images"] == n  # both sets built from nothing: the cold path, measured
        assert stages["backbone_training"]["images"] == run["seeds"]["0"]["split_sizes"]["train"]
    assert ratio <= mf.MAX_RATIO
