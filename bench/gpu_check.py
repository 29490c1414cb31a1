"""``python -m bench.gpu_check [--out DIR] [--dry] [--data PATH]``: the device check, in one call.

``make gpu-check`` runs it on a machine with a CUDA device (results in ``$OUT``, else ``results/gpu-check/``);
``make gpu-check-dry`` runs the same code end to end on the CPU at tiny sizes (under 2 minutes on 2 cores,
no data needed). It needs only the working tree and, for its last section, ``../shared/data/cifar10-jpeg.tar.gz``
(relative to the repository root; ``--data`` names another); no network (it sets ``HF_HUB_OFFLINE=1``). Sized to
finish in about 7 of its 8 minutes on one H100. It writes ``gpu-check.json`` (every figure, each section's
status, error and seconds) and ``gpu-check.md`` (the same figures as tables, naming the device), both rewritten
after each section (a check stopped at a time limit keeps what it finished and names what it did not reach), plus
the bench run of section 4 under ``run/``; it prints their paths and exits 1 when any section failed (the others
still ran), 2 on a usage error (no CUDA device without ``--dry``).

Sections:
1. ``cuda_tests``: pytest on the CUDA tests (``CUDA_TESTS``; they skip without a GPU), pass/fail/skip counts;
   ``runner_vs_simulation``: the real early-exit runner against the simulation from the feature cache on the
   device, for every deployable method (``bench.pipeline.runner.compare_with_simulation``): exit mismatches,
   prediction flips and the largest logit difference (all 0 on CPU).
2. ``throughput``: training (the harness's ``train``, so its bf16 autocast on CUDA; the first epoch is warm-up)
   and feature-extraction (``compute_features``, fp32 with TF32 on CUDA) images per second for ViT-S/16 at
   224 px (timm ``vit_small_patch16_224``, random init: no weights can be downloaded) and for the CIFAR-size ViT
   (12 blocks, 192 wide, 4-pixel patches, 32 px), on synthetic 32 px images (resized to 224 on the device).
3. ``early_exit_timing``: real early exit ``wall_rel`` against the realised ``macs_rel`` at batch 256 and at
   batch 1 (threshold: decided on the device; jeidnn: on the host), on the CIFAR-size ViT trained in section 2,
   with the issue's target ``wall_rel <= 1.25 x macs_rel`` at batch 256 marked.
4. ``cifar10_from_scratch``: ``python -m bench run --dataset imagefolder --data-dir <tar.gz> --methods
   threshold,entropy,jeidnn --timing`` on the CIFAR-10 photographs with the from-scratch 32 px ViT for a few
   epochs (as many as section 2's measured speed allows in about 75 s), then ``bench report`` on it; accuracy,
   cost and timing rows. Skipped, with a note, when the archive is missing (``--dry``: a generated image folder).
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no network: a hub lookup would hang, and weights cannot be fetched anyway
os.environ.setdefault("TQDM_DISABLE", "1")  # one line per section instead of progress bars

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import methods  # noqa: E402,F401  (registers the methods)
from bench.backbones.base import BACKBONES, TrainedBackbone, use_fast_cuda  # noqa: E402
from bench.base.errors import UserError  # noqa: E402
from bench.base.hashing import atomic_write_text  # noqa: E402
from bench.cli import main as bench_main  # noqa: E402
from bench.core.interface import METHODS, create_method, resolve_points  # noqa: E402
from bench.pipeline.config import RunConfig  # noqa: E402
from bench.pipeline.features import compute_features  # noqa: E402
from bench.pipeline.runner import compare_with_simulation  # noqa: E402
from bench.pipeline.timing import stage_inputs, static_timing, timing_metrics  # noqa: E402
from bench.pipeline.splits import Splits  # noqa: E402
from bench.pipeline.tasks import build_task, load_task  # noqa: E402
from bench.results.summary import summary_table, timing_table  # noqa: E402
from datasets import ImageDataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# the tests that need a CUDA device (they skip without one), run in this order; the perf one (marked perf, hence
# -m below) first: its simulation's features come from the CPU in full fp32, and the runner tests' CUDA fixture
# turns TF32 on for the rest of the process, as a --device cuda run does
CUDA_TESTS = ("tests/benchmarks/test_perf.py::test_real_early_exit_cuda_vit12",
              "tests/test_runner.py::test_real_runner_on_cuda_agrees_with_the_simulation",
              "tests/test_runner.py::test_cuda_timing_is_positive_and_counts_the_images")
FAST = {"epochs": 3}  # method fits of section 1 (heads and JEI-DNN epochs): the comparison, not the accuracy


@dataclass(frozen=True)
class Sizes:
    """Everything the full check and the dry run do differently: sizes only, never code paths."""

    digits_vit: dict  # section 1's backbone (--set backbone.* fields), on the embedded digits data
    vit_s: dict  # section 2: ViT-S/16 at 224 px (the dry run: a tiny stand-in)
    vit_cifar: dict  # the CIFAR-size ViT (sections 2, 3 and 4)
    train_images: tuple[int, int]  # section 2's training images (ViT-S, CIFAR-size); 3 epochs, the first warm-up
    feature_images: tuple[int, int]  # images through compute_features
    ee_fit: int  # section 3: train (= val = cal) images of the task
    ee_test: int  # its test images (timed at batch ``timing_batch``)
    ee_b1: int  # images timed at batch 1
    n_latency: int
    timing_batch: int
    run_epochs: tuple[int, int, float]  # section 4: backbone epochs (min, max, target training seconds)
    run_args: tuple[str, ...]  # section 4's further arguments
    pytest_timeout: int


FULL = Sizes(
    digits_vit=dict(img_size=8, patch_size=2, embed_dim=64, depth=6, num_heads=4, epochs=30, batch_size=64,
                    augment="none"),
    vit_s=dict(model="vit_small_patch16_224", img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
               batch_size=128, augment="crop_flip"),
    vit_cifar=dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, batch_size=128,
                   augment="crop_flip"),
    train_images=(4096, 32768), feature_images=(8192, 32768), ee_fit=4096, ee_test=10000, ee_b1=128, n_latency=64,
    timing_batch=256, run_epochs=(2, 15, 75.0),
    run_args=("--budgets", "0.3,0.5,0.7", "--set", "threshold.epochs=20", "--set", "entropy.epochs=20",
              "--set", "jeidnn.epochs=8"),
    pytest_timeout=300)
DRY = Sizes(
    digits_vit=dict(img_size=8, patch_size=2, embed_dim=16, depth=3, num_heads=2, epochs=2, batch_size=128,
                    augment="none"),
    vit_s=dict(model="vit_small_patch16_224", img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
               batch_size=32, augment="crop_flip"),
    vit_cifar=dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, batch_size=32, augment="crop_flip"),
    train_images=(64, 128), feature_images=(64, 128), ee_fit=128, ee_test=128, ee_b1=8, n_latency=4,
    timing_batch=64, run_epochs=(1, 1, 1.0),
    run_args=("--budgets", "0.5", "--set", "threshold.epochs=2", "--set", "entropy.epochs=2",
              "--set", "jeidnn.epochs=2", "--set", "jeidnn.warmup_epochs=1", "--set", "jeidnn.lambdas=[0.1,1.0]",
              "--timing-batch", "32", "--threads", "1"),
    pytest_timeout=300)


# ------------------------------------------------------------------------------------------------ helpers

def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def vit_config(fields: dict, **changes):
    """A from-scratch ViT config with these fields (only those the plugin's Config has)."""
    plugin = BACKBONES.get("vit")
    names = {f.name for f in dataclasses.fields(plugin.Config)}
    fields = {**fields, **changes, **({"pretrained": False} if "pretrained" in names else {})}
    return dataclasses.replace(plugin.Config(), **{k: v for k, v in fields.items() if k in names})


def synthetic_images(n: int, size: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, size, size, 3] images and labels: each class a fixed random colour pattern (the same for every
    seed) plus per-image noise of random strength, so a network learns something and its confidence varies."""
    templates = torch.rand(classes, 3, size, size, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    noise = torch.rand(n, 3, size, size, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 2
    x = ((templates[y] + noise) / 3 * 255).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(x), y.numpy().astype(np.int64)


def train_dtype(device: str) -> str:
    return "bfloat16 autocast, fp32 master weights, TF32 matmuls" if device.startswith("cuda") else "float32"


def inference_dtype(device: str) -> str:
    return "float32 (TF32 matmuls)" if device.startswith("cuda") else "float32"


# ------------------------------------------------------------------------------------------------ sections

def cuda_tests(ctx: dict) -> dict:
    """pytest on ``CUDA_TESTS`` in a subprocess; counts from its JUnit XML."""
    xml = Path(ctx["tmp"]) / "cuda-tests.xml"
    cmd = [sys.executable, "-m", "pytest", *CUDA_TESTS, "-m", "perf or not perf", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ctx["sizes"].pytest_timeout)
    if not xml.exists():
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}")
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}",
                      "outcome": {"failure": "failed", "error": "error", "skipped": "skipped"}.get(
                          kinds[0] if kinds else "", "passed"), "seconds": float(case.get("time", 0))})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    out = {"command": shlex.join(["python", *cmd[1:-1]]), "exit_code": proc.returncode, **counts, "cases": cases,
           "tail": (proc.stdout + proc.stderr)[-800:]}
    if proc.returncode not in (0, 5) or counts["failed"] or counts["error"]:  # 5: every test deselected
        raise SectionFailed(f"{counts['failed']} failed, {counts['error']} errors (pytest exit {proc.returncode})",
                            out)
    return out


def runner_vs_simulation(ctx: dict) -> dict:
    """Every deployable method on a small digits ViT: the real runner on the device against the simulation."""
    device, sizes = ctx["device"], ctx["sizes"]
    cfg = RunConfig(methods=["threshold"], dataset="digits", cache_dir=str(Path(ctx["tmp"]) / "cache-digits"),
                    overrides={"backbone": sizes.digits_vit}, device=device)
    loaded = load_task(cfg, seed=0)
    backbone, task, ds = loaded.backbone, loaded.task, loaded.dataset
    use_fast_cuda(device)
    backbone.model.to(device).eval()
    x = stage_inputs(ds.test_x, backbone.config.img_size, device, 256)
    rows = []
    for name in [m for m in METHODS.names() if not METHODS.get(m).bound]:
        fields = create_method(name).params()
        method = create_method(name, {k: v for k, v in FAST.items() if k in fields}).fit(task)
        points = resolve_points(method, task, [0.3, 0.5, 0.7, 0.9])
        found = compare_with_simulation(backbone.stages(), method, task, x, points, batch_size=100)
        rows.append({"method": name, "points": len(found), "n": len(ds.test_x),
                     "exit_mismatches": sum(r["exit_mismatches"] for r in found),
                     "prediction_flips": sum(r["prediction_flips"] for r in found),
                     "max_logit_diff": max((r["max_logit_diff"] for r in found), default=0.0),
                     "block_rows_equal": all(r["block_rows_equal"] for r in found)})
    total = {k: sum(r[k] for r in rows) for k in ("points", "exit_mismatches", "prediction_flips")}
    return {"backbone": backbone.label, "dataset": "digits", "test_images": len(ds.test_x), "methods": rows,
            **total, "max_logit_diff": max(r["max_logit_diff"] for r in rows)}


def _throughput(fields: dict, n_train: int, n_feat: int, device: str, seed: int = 0) -> tuple[dict, TrainedBackbone]:
    """Training images/s (the harness's ``train``, 3 epochs: the first is warm-up, the rate is over the other
    two from its per-epoch clock) and feature-extraction images/s (``compute_features`` after a warm-up call)."""
    plugin = BACKBONES.get("vit")
    cfg = vit_config(fields, epochs=3)
    x, y = synthetic_images(n_train + 64, 32, seed)
    model, val_acc, best_epoch, history = plugin.train(cfg, x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10,
                                                       seed, device, desc=f"gpu-check {plugin.label(cfg)}")
    secs = history[-1]["seconds"] - history[0]["seconds"]  # epochs 2-3, validation on 64 images included
    st = plugin.stages(model)
    xf, _ = synthetic_images(n_feat, 32, seed + 1)
    compute_features(st, xf[:cfg.eval_batch_size], cfg.img_size, cfg.eval_batch_size, device)  # warm-up
    t0 = time.perf_counter()
    compute_features(st, xf, cfg.img_size, cfg.eval_batch_size, device)  # returns on the CPU: synchronised
    feat_s = time.perf_counter() - t0
    result = {"backbone": plugin.label(cfg), "timm_model": cfg.model, "img_size": cfg.img_size,
              "batch_size": cfg.batch_size, "train_images": n_train, "timed_epochs": len(history) - 1,
              "train_images_per_s": n_train * (len(history) - 1) / secs if secs > 0 else math.nan,
              "train_dtype": train_dtype(device), "feature_images": n_feat,
              "feature_batch_size": cfg.eval_batch_size, "feature_images_per_s": n_feat / feat_s,
              "feature_dtype": inference_dtype(device), "inputs": "synthetic 32 px uint8, resized by the harness",
              "val_accuracy": float(val_acc)}
    trained = TrainedBackbone(plugin, model, cfg, key=f"gpu-check-{seed}", val_accuracy=float(val_acc),
                              best_epoch=int(best_epoch), history=history)
    return result, trained


def throughput(ctx: dict) -> dict:
    sizes, device = ctx["sizes"], ctx["device"]
    vit_s, _ = _throughput(sizes.vit_s, sizes.train_images[0], sizes.feature_images[0], device)
    vit_c, trained = _throughput(sizes.vit_cifar, sizes.train_images[1], sizes.feature_images[1], device)
    ctx["cifar_backbone"], ctx["cifar_train_rate"] = trained, vit_c["train_images_per_s"]
    return {"vit_s16_224": vit_s, "vit_cifar": vit_c}


def early_exit_timing(ctx: dict) -> dict:
    """Threshold (heads and decisions on the device) and JEI-DNN (its numpy stream on the host) on the CIFAR-size
    ViT of section 2 (a fresh random one if that section failed): realised test macs_rel, wall_rel and throughput
    at the timing batch, wall_rel and latency at batch 1."""
    sizes, device = ctx["sizes"], ctx["device"]
    plugin = BACKBONES.get("vit")
    backbone = ctx.get("cifar_backbone")
    note = "trained in section 2 (3 epochs on the synthetic images)"
    if backbone is None:
        torch.manual_seed(0)
        cfg = vit_config(sizes.vit_cifar)
        model = plugin.create(cfg, in_chans=3, num_classes=10, load_weights=False).eval().requires_grad_(False)
        backbone = TrainedBackbone(plugin, model.to(device), cfg, key="gpu-check-random", val_accuracy=math.nan,
                                   best_epoch=-1)
        note = "random initialisation (section 2 failed)"
    n = sizes.ee_fit
    x, y = synthetic_images(2 * n, 32, seed=7)
    test_x, test_y = synthetic_images(sizes.ee_test, 32, seed=8)
    ds = ImageDataset("gpu-check-images", x, y, test_x, test_y, 10, tuple(map(str, range(10))), "synthetic")
    val = np.arange(n, 2 * n, dtype=np.int64)
    splits = Splits(0, train=np.arange(n, dtype=np.int64), val=val, cal=val,
                    test=np.arange(len(test_x), dtype=np.int64))
    st = backbone.stages()
    img = backbone.config.img_size
    feats = {"train": compute_features(st, x, img, 512, device), "test": compute_features(st, test_x, img, 512, device)}
    task = build_task(ds, splits, backbone, feats)  # (counts MACs on the CPU)
    use_fast_cuda(device)
    backbone.model.to(device).eval()
    st = backbone.stages()
    xs = stage_inputs(test_x, img, device, sizes.timing_batch, sizes.ee_b1)
    b = sizes.timing_batch
    static_b = static_timing(st, None, img, device, b, 1, 3, x=xs)
    static_1 = static_timing(st, None, img, device, 1, sizes.n_latency, 2, x=xs[:sizes.ee_b1])
    points_out = []
    for name, params in (("threshold", {"epochs": 20}), ("jeidnn", {"epochs": 6})):
        method = create_method(name, params).fit(task)
        seen = []
        for point in resolve_points(method, task, [0.25, 0.5, 0.75, 1.0]):
            if point.budget is None or point.infeasible or point.params in seen:
                continue  # a budget that repeats a smaller budget's point is timed once
            seen.append(point.params)
            exits = method.decide(method.exit_logits(task.splits["test"], point), point)
            macs_rel = float((method.costs_[exits] / task.macs.static).mean())
            at_b = timing_metrics(st, method, point, None, img, device, b, 1, 3, x=xs)
            at_1 = timing_metrics(st, method, point, None, img, device, 1, sizes.n_latency, 2, x=xs[:sizes.ee_b1])
            points_out.append({"method": name, "decided_on": "device" if name == "threshold" else "host",
                               "budget": point.budget, "macs_rel": macs_rel,
                               f"wall_rel_b{b}": at_b["wall_rel"], f"throughput_b{b}": at_b["throughput"],
                               "wall_rel_b1": at_1["wall_rel"], "latency_ms": at_1["latency_ms"],
                               "latency_ms_p90": at_1["latency_ms_p90"], f"n_b{b}": at_b.n["throughput"],
                               "n_b1": at_1.n["throughput"], "n_latency": at_1.n["latency_ms"],
                               f"within_1.25x_at_b{b}": bool(at_b["wall_rel"] <= 1.25 * macs_rel)})
    return {"backbone": backbone.label, "weights": note, "dtype": inference_dtype(device), "timing_batch": b,
            "static": {f"throughput_b{b}": static_b["throughput"], "throughput_b1": static_1["throughput"],
                       "latency_ms": static_1["latency_ms"], "latency_ms_p90": static_1["latency_ms_p90"],
                       f"n_b{b}": static_b.n["throughput"], "n_b1": static_1.n["throughput"]},
            "points": points_out}


def write_image_folder(root: Path, classes: int = 3, train: int = 24, test: int = 8, size: int = 16) -> Path:
    """A tiny ``train/<class>/`` + ``test/<class>/`` folder of PNGs (the dry run's stand-in for the CIFAR-10
    archive): each class a colour pattern plus noise, so the tiny network learns a little."""
    from PIL import Image

    x, y = synthetic_images(classes * (train + test), size, seed=3, classes=classes)
    counts = {}
    for img, c in zip(x, y):
        k = counts.get(c, 0)
        counts[c] = k + 1
        part = "train" if k < train else "test" if k < train + test else None
        if part is None:
            continue
        folder = root / part / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{k:03d}.png")
    for c in range(classes):  # every class in both parts, whatever the random labels gave
        for part in ("train", "test"):
            folder = root / part / f"class{c}"
            if not folder.exists() or not any(folder.iterdir()):
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x[0]).save(folder / "extra.png")
    return root


def cifar10_from_scratch(ctx: dict) -> dict:
    """``bench run`` on the CIFAR-10 photographs (the dry run: a generated folder), then ``bench report``."""
    sizes, device, out = ctx["sizes"], ctx["device"], Path(ctx["out"])
    if ctx["dry"]:
        data = write_image_folder(Path(ctx["tmp"]) / "images")
    else:
        data = Path(ctx["data"])
        if not data.exists():
            raise SectionSkipped(f"{data} is missing: the from-scratch CIFAR-10 comparison was skipped")
    lo, hi, target_s = sizes.run_epochs
    rate = ctx.get("cifar_train_rate")
    epochs = lo if not rate else int(min(hi, max(lo, target_s * rate / 45_000)))  # ~45k training photos
    plugin = "vit-scratch" if "vit-scratch" in BACKBONES else "vit"
    arch = vit_config(sizes.vit_cifar)
    fields = {f.name for f in dataclasses.fields(arch)}
    sets = [f"backbone.{k}={getattr(arch, k)}" for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads",
                                                          "batch_size", "augment")]
    sets += ["backbone.pretrained=false"] if "pretrained" in fields else []
    sets.append(f"backbone.epochs={epochs}")
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run each check (the cache is fresh too)
    argv = ["run", "--dataset", "imagefolder", "--data-dir", str(data), "--backbone", plugin,
            "--methods", "threshold,entropy,jeidnn", *[a for s in sets for a in ("--set", s)], *sizes.run_args,
            "--device", device, "--timing", "--cache-dir", str(Path(ctx["tmp"]) / "cache-run"), "--out", str(run_dir)]
    t0 = time.perf_counter()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # its tables are in the JSON and the markdown
        rc = bench_main(argv)
        run_s = time.perf_counter() - t0
        if rc == 0:
            rc_report = bench_main(["report", str(run_dir)])
    if rc != 0:
        raise SectionFailed(f"bench run exited {rc}", {"command": shlex.join(["python", "-m", "bench", *argv]),
                                                       "output_tail": printed.getvalue()[-1500:]})
    if rc_report != 0:
        raise SectionFailed(f"bench report exited {rc_report}", {"command": f"python -m bench report {run_dir}",
                                                                 "output_tail": printed.getvalue()[-1500:]})
    df = pd.read_csv(run_dir / "metrics.csv")
    run = json.loads((run_dir / "run.json").read_text())
    seed = next(iter(run["seeds"].values()))
    test = df[(df["split"] == "test") & df["exit"].isna()]
    rows = []
    for (method, budget), g in test.groupby(["method", test["budget"].fillna(-1.0)], sort=False):
        values = g.groupby("metric")["value"].first()
        if "accuracy" not in values:
            continue
        rows.append({"method": method, "budget": None if budget < 0 else float(budget),
                     **{m: float(values[m]) for m in ("accuracy", "macs_rel", "ece", "wall_rel", "throughput",
                                                      "latency_ms", "latency_ms_p90") if m in values}})
    static_t = test[(test["method"] == "static") & test["metric"].isin(["throughput", "latency_ms", "latency_ms_p90"])]
    return {"command": shlex.join(["python", "-m", "bench", *argv]), "data": str(data), "backbone": seed["backbone"],
            "epochs": epochs, "epochs_rule": f"{target_s:g} s of training at section 2's rate, {lo}-{hi} epochs",
            "backbone_val_accuracy": seed["backbone_val_accuracy"],
            "backbone_train_seconds": seed["backbone_train_seconds"], "run_seconds": run_s,
            "split_sizes": seed["split_sizes"], "rows": rows,
            "static_timing": {r["metric"]: float(r["value"]) for _, r in static_t.iterrows()},
            "run_dir": str(run_dir), "report": str(run_dir / "report" / "report.md"),
            "summary_md": summary_table(df), "timing_md": timing_table(df)}


class SectionFailed(Exception):
    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        self.partial = partial or {}


class SectionSkipped(Exception):
    pass


SECTIONS = (("cuda_tests", cuda_tests), ("runner_vs_simulation", runner_vs_simulation),
            ("throughput", throughput), ("early_exit_timing", early_exit_timing),
            ("cifar10_from_scratch", cifar10_from_scratch))


def run_sections(ctx: dict, log=print, after=None) -> dict:
    """Each section in turn, each wrapped: a failure is recorded (error and traceback) and the next one runs.
    ``after(results)``, if given, is called after each section (the files are rewritten: a check stopped at a time
    limit keeps the figures of the sections it finished)."""
    results = {}
    for name, fn in SECTIONS:
        t0 = time.perf_counter()
        log(f"gpu-check: {name} ...", flush=True)
        try:
            entry = {"status": "ok", **fn(ctx)}
        except SectionSkipped as e:
            entry = {"status": "skipped", "note": str(e)}
        except Exception as e:  # noqa: BLE001  (recorded; the other sections still run)
            entry = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()[-3000:], **getattr(e, "partial", {})}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = entry
        log(f"gpu-check: {name} {entry['status']} in {entry['seconds']:.0f} s"
            + (f": {entry.get('error') or entry.get('note')}" if entry["status"] != "ok" else ""), flush=True)
        if after is not None:
            after(results)
    return results


# ------------------------------------------------------------------------------------------------ markdown

def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_f(c) for c in r) + " |" for r in rows)]


def markdown(report: dict) -> str:
    s = report["sections"]
    lines = [f"# Device check on {report['device_name']}{' (dry run)' if report['dry'] else ''}", "",
             f"`{report['command']}` · device {report['device']} · torch {report['torch']} · "
             f"{report['date']} · {report['total_seconds']:.0f} s · git {report['git_sha'][:12]}", "",
             "| section | status | seconds | note |", "|---|---|---|---|",
             *(f"| {k} | {v['status']} | {v['seconds']:.0f} | {v.get('error') or v.get('note') or ''} |"
               for k, v in s.items()), ""]
    if report["not_reached"]:
        lines += [f"Not reached (the check stopped before them): {', '.join(report['not_reached'])}.", ""]
    t = s.get("cuda_tests", {})
    if "cases" in t:
        lines += ["## 1. CUDA tests and the real runner against the simulation", "",
                  f"pytest: {t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped "
                  f"(`{t['command']}`).", ""]
        lines += _table(["test", "outcome", "s"], [[c["test"], c["outcome"], c["seconds"]] for c in t["cases"]]) + [""]
    r = s.get("runner_vs_simulation", {})
    if "methods" in r:
        lines += [f"Real runner on {report['device']} against the simulation from the feature cache ({r['backbone']}, "
                  f"{r['dataset']}, {r['test_images']} test images per point): {r['exit_mismatches']} exit "
                  f"mismatches and {r['prediction_flips']} prediction flips over {r['points']} points.", ""]
        lines += _table(["method", "points", "exit mismatches", "prediction flips", "max |Δlogit|",
                         "block rows equal"],
                        [[m["method"], m["points"], m["exit_mismatches"], m["prediction_flips"],
                          f"{m['max_logit_diff']:.2e}", m["block_rows_equal"]] for m in r["methods"]]) + [""]
    t = s.get("throughput", {})
    if "vit_cifar" in t:
        lines += ["## 2. Training and feature-extraction throughput (images/s, synthetic inputs)", ""]
        lines += _table(["backbone", "timm model", "px", "train batch", "train img/s", "train dtype",
                         "features img/s", "features dtype"],
                        [[v["backbone"], v["timm_model"], v["img_size"], v["batch_size"], v["train_images_per_s"],
                          v["train_dtype"], v["feature_images_per_s"], v["feature_dtype"]]
                         for v in (t["vit_s16_224"], t["vit_cifar"])]) + [""]
    e = s.get("early_exit_timing", {})
    if "points" in e:
        b = e["timing_batch"]
        st = e["static"]
        lines += [f"## 3. Real early exit, wall_rel against macs_rel ({e['backbone']}, {e['weights']}, {e['dtype']})",
                  "", f"Static backbone: {_f(st[f'throughput_b{b}'])} img/s at batch {b} (n={st[f'n_b{b}']}), "
                  f"{_f(st['throughput_b1'])} img/s at batch 1, latency p50 {_f(st['latency_ms'], 2)} ms / p90 "
                  f"{_f(st['latency_ms_p90'], 2)} ms.", ""]
        lines += _table(["method", "decided on", "budget", "macs_rel", f"wall_rel b{b}", f"img/s b{b}",
                         "wall_rel b1", "latency p50 ms", "latency p90 ms", f"≤ 1.25 × macs_rel at b{b}"],
                        [[p["method"], p["decided_on"], p["budget"], p["macs_rel"], p[f"wall_rel_b{b}"],
                          p[f"throughput_b{b}"], p["wall_rel_b1"], p["latency_ms"], p["latency_ms_p90"],
                          p[f"within_1.25x_at_b{b}"]] for p in e["points"]]) + [""]
    c = s.get("cifar10_from_scratch")
    if c is None:
        return "\n".join(lines)
    lines += ["## 4. From scratch on the CIFAR-10 photographs", ""]
    if c["status"] == "ok":
        lines += [f"```bash\n{c['command']}\n```", "",
                  f"{c['backbone']}, {c['epochs']} epochs ({c['epochs_rule']}): backbone val accuracy "
                  f"{_f(c['backbone_val_accuracy'], 4)}, trained in {_f(c['backbone_train_seconds'], 0)} s; the whole "
                  f"run {c['run_seconds']:.0f} s. Report: `{c['report']}`.", "", c["summary_md"], ""]
        if c.get("timing_md"):
            lines += [c["timing_md"], ""]
    else:
        lines += [c.get("note") or c.get("error", ""), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ driver

def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else results/gpu-check/, "
                                               "results/gpu-check-dry/ with --dry)")
    p.add_argument("--dry", action="store_true", help="the same code path on the CPU at tiny sizes (< 2 minutes)")
    p.add_argument("--data", default=str(DATA), help=f"the CIFAR-10 photographs archive (default {DATA})")
    return p


def main(argv: list[str] | None = None, log=print) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "results" / ("gpu-check-dry" if args.dry else "gpu-check"))
    if args.dry:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("error: torch sees no CUDA device; run the CPU dry run with --dry (make gpu-check-dry)",
              file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot write to --out {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="gpu-check-")
    ctx = {"device": device, "dry": args.dry, "sizes": DRY if args.dry else FULL, "out": str(out), "tmp": tmp,
           "data": args.data}
    log(f"gpu-check on {device_name(device)}{' (dry run)' if args.dry else ''}; results in {out}/", flush=True)
    threads = torch.get_num_threads()
    if args.dry:  # one thread: on a small shared CPU a second one mostly waits for its turn (100 ms stalls)
        torch.set_num_threads(1)
    json_path, md_path = out / "gpu-check.json", out / "gpu-check.md"
    fixed = {"device": device, "device_name": device_name(device), "dry": args.dry, "torch": torch.__version__,
             "cuda": torch.version.cuda, "python": platform.python_version(), "git_sha": _git_sha(),
             "command": shlex.join(["python", "-m", "bench.gpu_check", *(argv if argv is not None else sys.argv[1:])])}
    report: dict = {}

    def save(sections: dict) -> None:  # after each section: the last call writes the final files
        report.clear()
        report.update(fixed, date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                      total_seconds=round(time.perf_counter() - t0, 1),
                      failed=[k for k, v in sections.items() if v["status"] == "failed"],
                      not_reached=[name for name, _ in SECTIONS if name not in sections], sections=sections)
        atomic_write_text(json_path, json.dumps(report, indent=1, default=str) + "\n")
        atomic_write_text(md_path, markdown(report) + "\n")

    try:
        sections = run_sections(ctx, log, after=save)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)
    failed = report["failed"]
    log(f"gpu-check: {len(sections) - len(failed)}/{len(sections)} sections without failure in "
        f"{report['total_seconds']:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    log(f"wrote {json_path}")
    log(f"wrote {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
