"""The device check's early-exit timing: every deployable method that runs on a ViT (at least ``REQUIRED_TIMED``)
fitted on the exit features of a small synthetic image set and timed on the device by the real runner, at one
budget, at the timing batch and at batch 1, on two backbones: ViT-S/16 at 224 px (the timm
``vit_small_patch16_224`` architecture, the paper's backbone; the weights of the throughput section's 3 epochs,
else random: enough for timing) and the CIFAR-size 32 px ViT.

Per method: the realised test ``macs_rel`` beside ``wall_rel`` (the early exit's time over the static backbone's on
the same images and batches), throughput, batch-1 ``wall_rel`` and latency, and ``host_syncs_per_block`` (the
runner's host reads per block: its contract is at most one). The GPU target, ``wall_rel <= 1.1 x macs_rel`` at the
timing batch on ViT-S/16-224 for every method, gets a pass or fail per method on CUDA only; on the CPU (the dry
run) the figures are reported without a verdict.
"""
from __future__ import annotations

import math
import time
import traceback

import numpy as np
import torch

from bench.backbones.base import BACKBONES, TrainedBackbone, use_fast_cuda
from bench.core.interface import METHODS, create_method, resolve_points
from bench.gpu_check.common import (REQUIRED_TIMED, TARGET_RATIO, SectionFailed, inference_dtype, synthetic_images,
                                    vit_config)
from bench.gpu_check.sections import note_counter
from bench.pipeline.features import compute_features
from bench.pipeline.splits import Splits
from bench.pipeline.tasks import build_task
from bench.pipeline.timing import stage_inputs, static_timing, timing_metrics
from datasets import ImageDataset

BACKBONE_KEYS = ("vit_s16_224", "vit_cifar")  # ViT-S/16-224 first: the paper's backbone, the one with the target


def target_text(batch: int) -> str:
    return f"wall_rel <= {TARGET_RATIO:g} x macs_rel at batch {batch}, every method, on ViT-S/16-224 (CUDA)"


def timed_methods(network: str = "vit") -> list[str]:
    """Every registered method that is deployable (not a bound) and runs on this network (not on its own, as
    MSDNet's does)."""
    return [n for n in METHODS.names() if not METHODS.get(n).bound and METHODS.get(n).backbone_for(network) == network]


def _timing(st, method, point, img, device, batch, n_latency, repeats, x, static_macs, dtype) -> dict:
    """``timing_metrics`` as a plain dict with the image counts under ``n``."""
    t = timing_metrics(st, method, point, None, img, device, batch, n_latency, repeats, x=x, dtype=dtype,
                       static_macs=static_macs)
    return {**t, "n": dict(t.n)}


def _point(method, task, sizes):
    """The operating point at the sizes' budget, else at the first feasible fallback budget (a method with few
    exits may have no point at 0.5), else the method's own cheapest point (``budget`` None); None if it has none."""
    points = resolve_points(method, task, [sizes.ee_budget, *sizes.ee_fallback_budgets])
    feasible = [p for p in points if p.budget is not None and not p.infeasible]
    if feasible:
        return feasible[0]
    own = [p for p in points if p.budget is None and not p.infeasible]
    return min(own, key=lambda p: p.val_macs_rel) if own else None


def _backbone(ctx: dict, key: str, fields: dict) -> tuple[TrainedBackbone, str]:
    trained = ctx.get(f"{key}_backbone")
    if trained is not None:
        return trained, "trained 3 epochs on synthetic images in the throughput section"
    plugin = BACKBONES.get("vit")
    torch.manual_seed(0)
    cfg = vit_config(fields)
    model = plugin.create(cfg, in_chans=3, num_classes=10, load_weights=False).eval().requires_grad_(False)
    return (TrainedBackbone(plugin, model, cfg, key=f"gpu-check-random-{key}", val_accuracy=math.nan, best_epoch=-1),
            "random initialisation (pretrained=False; the throughput section did not train one)")


def _fit_info(method) -> dict:
    """What a fit ran, where the method says (JEI-DNN's warm-up and joint epochs)."""
    names = ("warmup_epochs_run_", "joint_epochs_run_")
    return {n.rstrip("_"): int(getattr(method, n)) for n in names if getattr(method, n, None) is not None}


def time_method(name: str, params: dict, task, st, xs: torch.Tensor, x1: torch.Tensor, sizes, device: str) -> dict:
    """One method: fitted on the task, its operating point at the budget, the realised test ``macs_rel``, and the
    real runner timed at the timing batch on ``xs`` and at batch 1 on ``x1``."""
    img, b = xs.shape[-1], sizes.timing_batch
    t0 = time.perf_counter()
    method = create_method(name, params).fit(task)
    fit_s = time.perf_counter() - t0
    point = _point(method, task, sizes)
    if point is None:
        raise RuntimeError("no feasible operating point")
    exits = method.decide(method.exit_logits(task.splits["test"], point), point)
    macs_rel = float((method.costs_[exits] / task.macs.static).mean())
    at_b = _timing(st, method, point, img, device, b, 1, 3, xs, task.macs.static, sizes.dtype)
    at_1 = _timing(st, method, point, img, device, 1, sizes.n_latency, 2, x1, task.macs.static, sizes.dtype)
    ref = at_b.get("timed_macs_rel", macs_rel)  # the cost of exactly the timed images, where reported
    return {"budget": sizes.ee_budget, "budget_used": point.budget, "params": point.params,
            "fit_seconds": round(fit_s, 2), **_fit_info(method),
            "macs_rel": macs_rel, "timed_macs_rel": at_b.get("timed_macs_rel"),
            "wall_rel": at_b["wall_rel"], "throughput": at_b["throughput"],
            "host_syncs_per_block": at_b["host_syncs_per_block"],
            "wall_rel_b1": at_1["wall_rel"], "latency_ms": at_1["latency_ms"],
            "latency_ms_p90": at_1["latency_ms_p90"], "host_syncs_per_block_b1": at_1["host_syncs_per_block"],
            "n": at_b["n"].get("throughput", len(xs)), "n_b1": at_1["n"].get("throughput", len(x1)),
            "n_latency": at_1["n"].get("latency_ms", sizes.n_latency),
            "wall_over_macs": at_b["wall_rel"] / ref if ref > 0 else math.nan, "meets_target": None}


def time_backbone(ctx: dict, key: str, fields: dict, n_fit: int, n_test: int, methods: list[str]) -> dict:
    """One backbone: the task from its exit features on synthetic images, the static backbone timed, then every
    method fitted and timed at one operating point."""
    sizes, device = ctx["sizes"], ctx["device"]
    backbone, weights = _backbone(ctx, key, fields)
    cfg, img, b = backbone.config, backbone.config.img_size, sizes.timing_batch
    x, y = synthetic_images(2 * n_fit, 32, seed=7)
    test_x, test_y = synthetic_images(n_test, 32, seed=8)
    ds = ImageDataset("gpu-check-images", x, y, test_x, test_y, 10, tuple(map(str, range(10))), "synthetic")
    val = np.arange(n_fit, 2 * n_fit, dtype=np.int64)
    splits = Splits(0, train=np.arange(n_fit, dtype=np.int64), val=val, cal=val,
                    test=np.arange(n_test, dtype=np.int64))
    use_fast_cuda(device)
    backbone.model.to(device).eval()
    st = backbone.stages()
    feats = {"train": compute_features(st, x, img, 256, device), "test": compute_features(st, test_x, img, 256, device)}
    task = build_task(ds, splits, backbone, feats)  # counts the MACs on the CPU (moves the model there)
    note_counter(ctx, backbone.label, task.macs)
    backbone.model.to(device).eval()
    st = backbone.stages()
    xs = stage_inputs(test_x, img, device, b, sizes.ee_b1)
    x1 = xs[:sizes.ee_b1]
    static_b = static_timing(st, None, img, device, b, 1, 3, x=xs, dtype=sizes.dtype)
    static_1 = static_timing(st, None, img, device, 1, sizes.n_latency, 2, x=x1, dtype=sizes.dtype)
    cuda = device.startswith("cuda")
    rows = {}
    for name in methods:  # a method that fails is recorded with its error; the next one still runs
        params = {k: v for k, v in sizes.method_params.get(name, {}).items() if k in create_method(name).params()}
        try:
            rows[name] = {"fit_params": params, **time_method(name, params, task, st, xs, x1, sizes, device)}
        except Exception as e:  # noqa: BLE001
            rows[name] = {"fit_params": params, "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()[-2000:]}
        if cuda and key == "vit_s16_224" and "wall_over_macs" in rows[name]:
            # the target's verdict: CUDA only (on a CPU the figures stand without one)
            rows[name]["meets_target"] = bool(rows[name]["wall_over_macs"] <= TARGET_RATIO)
    return {"backbone": backbone.label, "timm_model": getattr(cfg, "model", None), "img_size": img,
            "architecture": {k: getattr(cfg, k, None) for k in ("img_size", "patch_size", "embed_dim", "depth",
                                                                 "num_heads")},
            "reduced_for_dry_run": bool(ctx["dry"]), "weights": weights, "dtype": inference_dtype(device),
            "macs_counter": task.macs.macs_counter, "static_macs": int(task.macs.static),
            "fit_images": n_fit, "test_images": n_test, "timing_batch": b,
            "inputs": "synthetic 32 px uint8 images, resized on the device to the network's size",
            "static": {"throughput": static_b["throughput"], "throughput_b1": static_1["throughput"],
                       "latency_ms": static_1["latency_ms"], "latency_ms_p90": static_1["latency_ms_p90"],
                       "n": static_b.n["throughput"], "n_b1": static_1.n["throughput"]},
            "methods": rows}


def verdicts(report: dict, device: str) -> dict:
    """The target's status: per method pass / fail on CUDA; on the CPU, no verdict (the target is for CUDA)."""
    rows = report.get("backbones", {}).get("vit_s16_224", {}).get("methods", {})
    if not device.startswith("cuda"):
        return {"status": "not judged: the target is for CUDA; this run is on the CPU (figures reported, no verdict)"}
    judged = {m: r["meets_target"] for m, r in rows.items() if r.get("meets_target") is not None}
    failing = sorted(m for m, ok in judged.items() if not ok)
    return {"status": f"{len(judged) - len(failing)} of {len(judged)} methods pass" if judged else "no method timed",
            "pass": sorted(m for m, ok in judged.items() if ok), "fail": failing}


def early_exit_timing(ctx: dict) -> dict:
    """Both backbones (a failure on one is recorded and the other still runs), then the target's verdicts."""
    sizes, device = ctx["sizes"], ctx["device"]
    methods = timed_methods()
    missing = [m for m in REQUIRED_TIMED if m not in methods]
    out: dict = {"target": target_text(sizes.timing_batch), "budget": sizes.ee_budget,
                 "timing_batch": sizes.timing_batch, "methods": methods, "backbones": {}}
    errors = {}
    for key, fields, i in (("vit_s16_224", sizes.vit_s, 0), ("vit_cifar", sizes.vit_cifar, 1)):
        try:
            out["backbones"][key] = time_backbone(ctx, key, fields, sizes.ee_fit[i], sizes.ee_test[i], methods)
        except Exception as e:  # noqa: BLE001  (recorded; the other backbone still runs)
            errors[key] = f"{type(e).__name__}: {e}"
            out.setdefault("tracebacks", {})[key] = traceback.format_exc()[-3000:]
    out["targets"] = verdicts(out, device)
    failed_methods = {f"{k}/{m}": r["error"] for k, v in out["backbones"].items() for m, r in v["methods"].items()
                      if "error" in r}
    if errors or missing or failed_methods:
        out["errors"] = {**errors, **failed_methods, **({"missing": missing} if missing else {})}
        raise SectionFailed("; ".join(f"{k}: {v}" for k, v in out["errors"].items()), out)
    return out
