"""Memory flat in the number of images (issue 25): the same small-ViT comparison on a generated folder of 10,000
and one of 100,000 JPEGs at 64x64, both streamed, each run as ``python -m bench run`` in its own process; run.json's
``resources`` gives each run's peak RSS (and device memory on CUDA) and images per second.

    python -m tests.benchmarks.memory_flat --out results/runs/memory-flat   # writes images-10k/ and images-100k/

prints both runs' figures and exits 1 when the 100k run's peak RSS is above ``MAX_RATIO`` x the 10k run's
(``tests/benchmarks/test_memory.py`` is the same as a pytest benchmark: ``pytest -m slow tests/benchmarks``).

The folders are generated once (``generate``: 10 classes, smooth class-dependent stripes with a random phase and
some noise, JPEG quality 90, about 1-2 KB each; train/ and test/ class folders, a fifth of each class in test) and
kept under ``--data`` (default ``$BENCH_MEMORY_DATA``, else ``~/.cache/bench/memory-flat``): a rerun reuses them.
Every run starts from an empty harness cache (a temporary ``--cache-dir``), so each one lists, hashes and checks
its images, trains its backbone, extracts its features and fits its methods: the whole cold path is measured.
``BENCH_IMAGEFOLDER_LAZY_BYTES=0`` streams both sets (decoded 123 MB and 1.2 GB: under the 2 GiB default both
would not), so the two runs take the same code path and differ only in the number of images.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SIZES = {"images-10k": 10_000, "images-100k": 100_000}
MAX_RATIO = 1.3
SIDE = 64
CLASSES = 10
TEST_FRACTION = 0.2
GENERATOR_VERSION = 1
ENV = {"BENCH_IMAGEFOLDER_LAZY_BYTES": "0"}  # stream whatever the size: one code path for both runs
# a 4-block, 64-wide ViT on 16-pixel patches at the images' 64 px (16 tokens and the class token), one epoch;
# JEI-DNN for 4 epochs (2 of them warm-up) instead of 20, the shared heads at their default 50: on 2 CPU cores the
# 100k run then takes about a quarter of an hour
BACKBONE = {"depth": 4, "embed_dim": 64, "num_heads": 4, "patch_size": 16, "img_size": SIDE, "epochs": 1}
METHOD_SETTINGS = {"jeidnn.epochs": 4, "jeidnn.warmup_epochs": 2}
METHODS = "threshold,entropy,jeidnn"


def default_data_dir() -> Path:
    return Path(os.environ.get("BENCH_MEMORY_DATA") or Path.home() / ".cache" / "bench" / "memory-flat")


def _images(rng: np.random.Generator, label: int, count: int) -> np.ndarray:
    """``count`` uint8 [64, 64, 3] images of class ``label``: stripes at the class's angle and frequency, in the
    class's colours, shifted by a random phase, plus noise (compressible, yet not two alike)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    angle, freq = np.pi * label / CLASSES, 2.0 + label % 4
    wave = np.cos(angle) * xx + np.sin(angle) * yy  # [H, W]
    phase = rng.uniform(0, 2 * np.pi, (count, 1, 1)).astype(np.float32)
    stripes = np.sin(2 * np.pi * freq * wave[None] + phase)  # [n, H, W]
    colour = np.array([[(label * 97) % 256, (label * 57 + 80) % 256, (label * 31 + 160) % 256]], np.float32)
    base = 128 + (colour[:, None, None, :] - 128) * 0.6 * stripes[..., None]  # [n, H, W, 3]
    noise = rng.normal(0, 12, base.shape).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def generate(root: Path, n: int, log=print) -> Path:
    """``root`` holding ``n`` JPEGs (``train/cNN/`` and ``test/cNN/``), generated unless a complete copy is there
    (``root/.complete``, a hidden file the loader skips); written to a temporary folder, then renamed."""
    from PIL import Image

    marker = {"images": n, "side": SIDE, "classes": CLASSES, "version": GENERATOR_VERSION}
    done = root / ".complete"
    if done.is_file() and json.loads(done.read_text()) == marker:
        return root
    shutil.rmtree(root, ignore_errors=True)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng([GENERATOR_VERSION, n])
    per_class = n // CLASSES
    n_test = round(TEST_FRACTION * per_class)
    for label in range(CLASSES):
        count = per_class + (1 if label < n % CLASSES else 0)
        for split in ("train", "test"):
            (tmp / split / f"c{label:02d}").mkdir(parents=True, exist_ok=True)
        for start in range(0, count, 1000):
            for j, a in enumerate(_images(rng, label, min(1000, count - start)), start=start):
                split = "test" if j < n_test else "train"
                Image.fromarray(a).save(tmp / split / f"c{label:02d}" / f"{j:06d}.jpg", format="JPEG", quality=90)
        log(f"generating {n} images in {root}: class {label + 1}/{CLASSES} ({time.perf_counter() - t0:.0f} s)")
    (tmp / ".complete").write_text(json.dumps(marker))
    tmp.rename(root)
    return root


def bench_command(data: Path, out: Path, cache: Path) -> list[str]:
    """The ``bench run`` command of one size (run from the repository root: ``--out`` relative to it if inside)."""
    sets = [f"backbone.{k}={v}" for k, v in BACKBONE.items()] + [f"{k}={v}" for k, v in METHOD_SETTINGS.items()]
    out = out.resolve()
    return [sys.executable, "-m", "bench", "run", "--dataset", "imagefolder", "--data-dir", str(data.resolve()),
            "--methods", METHODS, *[w for s in sets for w in ("--set", s)], "--cache-dir", str(cache),
            "--out", str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)]


def run_one(data: Path, out: Path, log=print) -> dict:
    """One ``bench run`` on ``data`` into ``out`` (from an empty, temporary cache), in its own process; returns
    run.json's resources with the process's wall seconds (``wall_s``) and run.json's ``duration_s``."""
    if (out / "run.json").exists():
        raise SystemExit(f"{out} holds a run already: remove it (each measurement starts from nothing)")
    with tempfile.TemporaryDirectory(prefix="memory-flat-cache-", dir=data.parent) as cache:
        cmd = bench_command(data, out, Path(cache))
        log("$ " + " ".join(f"{k}={v}" for k, v in ENV.items()) + " " + shlex.join(cmd))
        env = {**os.environ, **ENV, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        env.pop("OMP_NUM_THREADS", None)  # torch's default threads: every core (the tests' conftest sets 1)
        t0 = time.perf_counter()
        with tempfile.TemporaryFile("w+") as log_file:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
            sampled = sample_memory(proc)
            wall = time.perf_counter() - t0
            log_file.seek(0)
            output = log_file.read()
    if proc.returncode != 0:
        raise RuntimeError(f"bench run on {data} exited {proc.returncode}:\n{output[-4000:]}")
    run = json.loads((out / "run.json").read_text())
    return {**run["resources"], "sampled": sampled, "wall_s": round(wall, 1), "duration_s": run["duration_s"]}


def sample_memory(proc: subprocess.Popen, every_s: float = 0.5) -> dict[str, float]:
    """Until ``proc`` exits: the largest ``RssAnon`` and ``RssFile`` (MiB) of its /proc status seen every
    ``every_s`` seconds (Linux; empty elsewhere): which kind of pages the peak RSS is made of (anonymous memory,
    or file pages mapped: shared libraries, memory-mapped features)."""
    peak: dict[str, float] = {}
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            for key in ("RssAnon", "RssFile"):
                mib = int(fields[key].split()[0]) / 1024
                peak[f"{key}_max_mib"] = round(max(peak.get(f"{key}_max_mib", 0.0), mib), 1)
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(every_s)
    return peak


def rate(resources: dict, stage: str) -> float | None:
    got = [s for s in resources["stages"] if s["stage"] == stage]
    return sum(s["images"] for s in got) / sum(s["seconds"] for s in got) if got else None


def describe(name: str, r: dict) -> str:
    cuda = f", CUDA peak {r['cuda_max_allocated_mib']:.0f} MiB" if "cuda_max_allocated_mib" in r else ""
    train, feats = rate(r, "backbone_training"), rate(r, "features")
    kinds = ", ".join(f"{k.split('_')[0]} at most {v:.0f} MiB" for k, v in r.get("sampled", {}).items())
    return (f"{name}: peak RSS {r['peak_rss_mib']:.0f} MiB ({kinds or 'not sampled'}; largest child process "
            f"{r['peak_rss_children_mib']:.0f} MiB){cuda}; training {train:.0f} images/s, features {feats:.0f} "
            f"images/s; wall {r['wall_s']:.0f} s (run.json: {r['duration_s']:.0f} s)")


def measure(out: Path, data_dir: Path, sizes: dict[str, int] = SIZES, log=print) -> dict[str, dict]:
    """Generate (or reuse) the folders, run the comparison on each into ``out/<name>``; returns resources per name."""
    results = {}
    for name, n in sizes.items():
        data = generate(data_dir / name, n, log)
        results[name] = run_one(data, out / name, log)
        log(describe(name, results[name]))
    return results


def ratio(results: dict[str, dict]) -> float:
    small, large = (results[k]["peak_rss_mib"] for k in results)
    return large / small


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.memory_flat", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the run folders go to OUT/images-10k and OUT/images-100k")
    p.add_argument("--data", default=None, help="where the generated image folders are kept (default: "
                                                "$BENCH_MEMORY_DATA, else ~/.cache/bench/memory-flat)")
    args = p.parse_args(argv)
    data_dir = Path(args.data) if args.data else default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    results = measure(Path(args.out), data_dir)
    r = ratio(results)
    print(f"peak RSS ratio 100k / 10k: {r:.3f} (at most {MAX_RATIO}: {'met' if r <= MAX_RATIO else 'MISSED'})")
    return 0 if r <= MAX_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
