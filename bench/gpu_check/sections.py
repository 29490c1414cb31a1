"""The device check's sections but the early-exit timing (``early_exit.py``): the CUDA tests, the real runner
against the simulation, training and feature throughput, and the short CIFAR-10 run. Each takes the check's
context ``ctx`` and returns the figures it records; ``SectionSkipped`` / ``SectionFailed`` say otherwise."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

from bench.backbones.base import BACKBONES, TrainedBackbone, compiled_training, use_fast_cuda
from bench.cli import main as bench_main
from bench.core.interface import METHODS, create_method, resolve_points
from bench.gpu_check.common import (CUDA_TESTS, CUDA_TESTS_SELECT, FAST, ROOT, SectionFailed, SectionSkipped, find_data,
                                    inference_dtype, synthetic_images, train_dtype, vit_config)
from bench.pipeline.config import RunConfig
from bench.pipeline.features import compute_features
from bench.pipeline.runner import compare_with_simulation
from bench.pipeline.tasks import load_task
from bench.pipeline.timing import stage_inputs
from bench.results.summary import summary_table, timing_table


def note_counter(ctx: dict, label: str, macs) -> None:
    """Record which MACs counter a task of this check used (``ExitMacs.macs_counter``)."""
    ctx.setdefault("macs_counters", {})[label] = getattr(macs, "macs_counter", "") or "unknown"


def cuda_tests(ctx: dict) -> dict:
    """pytest on the CUDA tests (``-k cuda`` in ``CUDA_TESTS``) in a subprocess; counts from its JUnit XML.
    Skipped, with a note, where pytest is not importable (the interpreter of a lent machine may lack it). The
    project's ``addopts`` are replaced (``-o addopts``): they name pytest-benchmark's options, which an interpreter
    without that plugin refuses."""
    if importlib.util.find_spec("pytest") is None:
        raise SectionSkipped(f"pytest is not importable by {sys.executable}: the CUDA tests were not run "
                             "(the other sections test the runner on the device)")
    xml = Path(ctx["tmp"]) / "cuda-tests.xml"
    files = [f for f in CUDA_TESTS if (ROOT / f).exists()]
    cmd = [sys.executable, "-m", "pytest", *files, "-k", CUDA_TESTS_SELECT, "-o", "addopts=-ra",
           "-m", "perf or not perf", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ctx.get("sub_env", {})}
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
    if not cases:
        raise SectionFailed(f"no CUDA tests found (-k {CUDA_TESTS_SELECT} in {', '.join(files)})", out)
    if proc.returncode != 0 or counts["failed"] or counts["error"]:
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
    note_counter(ctx, backbone.label, task.macs)
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
    return {"backbone": backbone.label, "dataset": "digits", "test_images": len(ds.test_x),
            "macs_counter": task.macs.macs_counter, "methods": rows, **total,
            "max_logit_diff": max(r["max_logit_diff"] for r in rows)}


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
              "val_accuracy": float(val_acc), "first_epoch_s": history[0]["seconds"]}
    # a key of its own: methods that share heads memoise them per task key
    trained = TrainedBackbone(plugin, model, cfg, key=f"gpu-check-{plugin.label(cfg)}-{seed}",
                              val_accuracy=float(val_acc), best_epoch=int(best_epoch), history=history)
    return result, trained


def throughput(ctx: dict) -> dict:
    """ViT-S/16 at 224 px and the CIFAR-size ViT; both trained networks go on to the early-exit timing."""
    sizes, device = ctx["sizes"], ctx["device"]
    vit_s, ctx["vit_s16_224_backbone"] = _throughput(sizes.vit_s, sizes.train_images[0], sizes.feature_images[0],
                                                     device)
    vit_c, ctx["vit_cifar_backbone"] = _throughput(sizes.vit_cifar, sizes.train_images[1], sizes.feature_images[1],
                                                   device)
    ctx["cifar_train_rate"] = vit_c["train_images_per_s"]
    out = {"vit_s16_224": vit_s, "vit_cifar": vit_c}
    if sizes.compile_check:  # bench run --compile: does a torch.compile'd training step pay on this device?
        with compiled_training():
            comp, _ = _throughput(sizes.vit_s, sizes.train_images[0], sizes.feature_images[0], device)
        out["vit_s16_224_compiled"] = {
            "train_images_per_s": comp["train_images_per_s"], "first_epoch_s": comp["first_epoch_s"],
            "eager_first_epoch_s": vit_s["first_epoch_s"],
            "speedup": comp["train_images_per_s"] / vit_s["train_images_per_s"]}
    return out


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


def run_epochs(ctx: dict) -> tuple[int, str]:
    """The CIFAR-10 run's backbone epochs: the target training seconds (less where the check's time limit leaves
    less after the run's other work) at the measured training rate, within the sizes' bounds."""
    lo, hi, target_s = ctx["sizes"].run_epochs
    left = ctx["deadline"] - time.perf_counter() - ctx["sizes"].run_overhead_s if "deadline" in ctx else target_s
    train_s = max(0.0, min(target_s, left))
    rate = ctx.get("cifar_train_rate")
    epochs = lo if not rate or not math.isfinite(rate) else int(min(hi, max(lo, train_s * rate / 45_000)))
    return epochs, (f"{train_s:.0f} s of training (target {target_s:g} s, less what the time limit leaves) at the "
                    f"throughput section's rate on ~45,000 photos, {lo}-{hi} epochs")


def cifar10_from_scratch(ctx: dict) -> dict:
    """``bench run`` on the CIFAR-10 photographs (the dry run: a generated folder), then ``bench report``. Skipped,
    with a note naming where it looked, when the archive is nowhere (``common.find_data``)."""
    sizes, device, out = ctx["sizes"], ctx["device"], Path(ctx["out"])
    if ctx["dry"]:
        data = write_image_folder(Path(ctx["tmp"]) / "images")
    else:
        data, looked = find_data(ctx.get("data"))
        if data is None:
            raise SectionSkipped(f"no CIFAR-10 archive at {', '.join(map(str, looked))} (name one with --data PATH "
                                 "or DATA=PATH): the from-scratch CIFAR-10 comparison was skipped")
    epochs, epochs_rule = run_epochs(ctx)
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
                                                      "latency_ms", "latency_ms_p90", "host_syncs_per_block")
                        if m in values}})
    static_t = test[(test["method"] == "static") & test["metric"].isin(["throughput", "latency_ms", "latency_ms_p90"])]
    jei = {a.split("=", 1)[0].removeprefix("jeidnn."): a.split("=", 1)[1] for a in sizes.run_args
           if a.startswith("jeidnn.")}
    return {"command": shlex.join(["python", "-m", "bench", *argv]), "data": str(data), "backbone": seed["backbone"],
            "epochs": epochs, "epochs_rule": epochs_rule, "jeidnn_fit": jei,
            "backbone_val_accuracy": seed["backbone_val_accuracy"],
            "backbone_train_seconds": seed["backbone_train_seconds"], "run_seconds": run_s,
            "split_sizes": seed["split_sizes"], "rows": rows,
            "static_timing": {r["metric"]: float(r["value"]) for _, r in static_t.iterrows()},
            "run_dir": str(run_dir), "report": str(run_dir / "report" / "report.md"),
            "summary_md": summary_table(df), "timing_md": timing_table(df)}
