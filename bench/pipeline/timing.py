"""Wall-clock of the real early-exit runner (``bench.pipeline.runner``) and of the static backbone.

Timing (``timing_metrics``, ``static_timing``): CUDA events around every timed region on CUDA (the clock on the
device's stream, after a synchronisation), ``perf_counter`` on CPU; warm-up calls first; throughput and
``wall_rel`` over the whole test split batched at ``batch_size`` (or the first images that fit in
``STAGE_BYTES`` of device memory; the rows' n says how many); batch-1 latency p50 and p90 over ``n_latency``
single images, for each method point and for the static backbone.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from bench.backbones.base import Stages, to_tensor
from bench.core.interface import ExitMethod, OperatingPoint
from bench.pipeline.runner import method_on_device, run_early_exit, streams_on_device

# images staged on the device for the throughput passes: at most this many bytes of float input (CIFAR at 32 px:
# the whole 10,000-image test split in 123 MB; at 224 px the first ~7,000 images)
STAGE_BYTES = 4 * 2 ** 30


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_call(fn, device, repeats: int = 5, warmup: int = 2) -> np.ndarray:
    """Seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs. On CUDA each run sits between two CUDA
    events on the current stream, after a synchronisation: the time from the start of its first kernel to the
    end of its last, host waits inside included; on CPU, ``perf_counter``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    cuda = str(device).startswith("cuda")
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return np.array(times)


class Timings(dict):
    """metric -> value, with ``n``: metric -> the number of images the value was measured on."""

    def __init__(self, values: dict[str, float], n: dict[str, int]):
        super().__init__(values)
        self.n = n


def stage_inputs(x_uint8: np.ndarray, img_size: int, device, batch_size: int, n_min: int = 0) -> torch.Tensor:
    """The images the throughput passes time, converted and on the device: the whole array, or its first images
    that fit in ``STAGE_BYTES`` (whole batches, at least one batch and ``n_min``). Converted batch by batch."""
    n_total = len(x_uint8)
    first = to_tensor(x_uint8[:1], img_size)
    per_image = first.element_size() * first.numel()
    fit = max(batch_size, STAGE_BYTES // per_image // batch_size * batch_size, n_min)
    n = min(n_total, fit)
    chunks = [to_tensor(x_uint8[i:min(i + batch_size, n)], img_size, device) for i in range(0, n, batch_size)]
    return torch.cat(chunks)


def _latencies(fn, x: torch.Tensor, device, n_latency: int) -> np.ndarray:
    """Batch-1 milliseconds of ``fn(xi)`` per image of the first ``n_latency`` (median of 3 runs after 1 warm-up)."""
    return np.array([np.median(time_call(lambda xi=x[i:i + 1]: fn(xi), device, 3, 1))
                     for i in range(min(n_latency, len(x)))]) * 1000


@torch.no_grad()
def timing_metrics(st: Stages, method: ExitMethod, point: OperatingPoint, x_uint8: np.ndarray, img_size: int,
                   device: str = "cpu", batch_size: int = 256, n_latency: int = 64, repeats: int = 3,
                   x: torch.Tensor | None = None) -> Timings:
    """One operating point, timed: ``throughput`` (images/s of the real early exit over the staged test images
    at ``batch_size``), ``wall_rel`` (its time / the static backbone's on exactly the same images and batches;
    the two passes alternate, ``repeats`` each after a warm-up, medians compared), ``latency_ms`` and
    ``latency_ms_p90`` (batch 1: p50 and p90 over the first ``n_latency`` images). ``x``: the staged images
    (``stage_inputs``), to reuse them over points. ``.n`` gives each metric's number of images."""
    x = stage_inputs(x_uint8, img_size, device, batch_size, n_latency) if x is None else x
    m = method_on_device(method, device) if streams_on_device(method) else method

    def early_exit():
        run_early_exit(st, m, point, x, batch_size, to_cpu=False)

    def static():
        for i in range(0, len(x), batch_size):
            st.static_forward(x[i:i + batch_size])

    first = x[:batch_size]
    time_call(lambda: run_early_exit(st, m, point, first, batch_size, to_cpu=False), device, 0, 2)
    time_call(lambda: st.static_forward(first), device, 0, 2)
    ee, base = [], []
    for _ in range(repeats):
        ee.append(time_call(early_exit, device, 1, 0)[0])
        base.append(time_call(static, device, 1, 0)[0])
    ee_s, base_s = float(np.median(ee)), float(np.median(base))
    lat = _latencies(lambda xi: run_early_exit(st, m, point, xi, 1, to_cpu=False), x, device, n_latency)
    values = {"latency_ms": float(np.median(lat)), "latency_ms_p90": float(np.percentile(lat, 90)),
              "throughput": len(x) / ee_s, "wall_rel": ee_s / base_s}
    return Timings(values, {"latency_ms": len(lat), "latency_ms_p90": len(lat), "throughput": len(x),
                            "wall_rel": len(x)})


@torch.no_grad()
def static_timing(st: Stages, x_uint8: np.ndarray, img_size: int, device: str = "cpu", batch_size: int = 256,
                  n_latency: int = 64, repeats: int = 3, x: torch.Tensor | None = None) -> Timings:
    """The static backbone timed like ``timing_metrics`` times a method: ``throughput`` at ``batch_size`` over the
    staged test images, ``latency_ms`` / ``latency_ms_p90`` at batch 1 over the first ``n_latency`` images."""
    x = stage_inputs(x_uint8, img_size, device, batch_size, n_latency) if x is None else x

    def static():
        for i in range(0, len(x), batch_size):
            st.static_forward(x[i:i + batch_size])

    time_call(lambda: st.static_forward(x[:batch_size]), device, 0, 2)
    secs = float(np.median(time_call(static, device, repeats, 0)))
    lat = _latencies(st.static_forward, x, device, n_latency)
    values = {"latency_ms": float(np.median(lat)), "latency_ms_p90": float(np.percentile(lat, 90)),
              "throughput": len(x) / secs}
    return Timings(values, {"latency_ms": len(lat), "latency_ms_p90": len(lat), "throughput": len(x)})
