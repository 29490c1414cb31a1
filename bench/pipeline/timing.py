"""Wall-clock of the real early-exit runner (``bench.pipeline.runner``) and of the static backbone, measured so
that the numbers mean the same thing on any card.

What is measured (``timing_metrics`` per operating point, ``static_timing`` for the backbone):

- ``throughput``: images per second of the real early exit (survivors only, block by block) over the staged
  test images at ``batch_size``; ``wall_rel``: its time over the static backbone's on exactly the same images,
  batches, device and dtype (the two passes alternate, ``repeats`` each after a warm-up; medians compared).
  ``wall_rel`` is the measured counterpart of ``macs_rel``.
- ``latency_ms`` / ``latency_ms_p90``: batch-1 p50 and p90 over the first ``n_latency`` images.
- ``timed_macs_rel``: the real runner's mean cost over exactly the timed images (each image's exit from the
  timed pass, ``method.costs_`` [K] MACs, over the static MACs), so ``wall_rel`` always stands next to the cost of
  the images it was measured on, even when not every test image fits on the device. When every image is timed
  (and in fp32 on CPU, where the runner equals the simulation) it equals the test ``macs_rel``.
- ``host_syncs_per_block``: the runner's host reads per (batch, block) in the timed pass (its contract: at most
  one, the survivors' count); 0 for the static backbone, one forward per batch that reads nothing back.

How, and why:

- Clock: on CUDA, ``torch.cuda.Event`` pairs recorded on the current stream *of the model's device* (not of the
  process's current device: a ``cuda:1`` model would otherwise be timed on ``cuda:0``'s stream), after
  synchronising that device; each span runs from the first kernel to the end of the last, host waits inside it
  included. On CPU, ``perf_counter``.
- Inputs: staged on the device once (``stage_inputs``), so no host-to-device copy is timed. On CUDA as many test
  images as fit in the free memory less a headroom (``STAGE_HEADROOM_*``), preallocated in one tensor and filled
  batch by batch; on CPU the whole split. The rows record how many images were timed out of the split.
- dtype: ``fp32``, or ``bf16`` (both passes, and the latency ones, under ``torch.autocast(bfloat16)``).
- No cuDNN autotuning inside timed regions (``no_autotuning``): survivor compaction changes the batch size at
  every block, so ``cudnn.benchmark`` (set process-wide by ``use_fast_cuda``) would autotune inside the clock.
- One timing at a time per GPU (``timing_lock``): jobs of ``--executor local --workers N`` or Dask workers sharing
  a card would otherwise time each other. The lock does not stop other jobs' CPU work (method fitting) from
  sharing the host's cores; CPU timings under a process pool share cores the same way.
"""
from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bench.backbones.base import Stages, to_tensor
from bench.base.locks import exclusive
from bench.core.interface import ExitMethod, OperatingPoint
from bench.pipeline.runner import method_on_device, run_early_exit

# --timing-dtype -> the autocast dtype of the timed passes (None: plain fp32) and the name the rows record
TIMING_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
DTYPE_LABELS = {"fp32": "float32", "bf16": "bfloat16-autocast"}

# Memory left free on a CUDA device beside the staged images: the larger of a fraction of the free memory and a
# floor. It holds one batch's activations of the static and the early-exit pass (a ViT-S/16 at 224 px, batch
# 256, in fp32: about 1-2 GiB of attention maps and MLP activations), one batch's uint8 -> float conversion while
# staging, the cuBLAS/cuDNN workspaces and the caching allocator's fragmentation; the fraction scales it with
# larger cards, on which runs use larger networks and batches. On an 80 GB card about 60 GB is left for images:
# ~97,000 at 224 px, so a 10,000-image test split is timed whole.
STAGE_HEADROOM_FRACTION = 0.25
STAGE_HEADROOM_MIN_BYTES = 2 * 2 ** 30


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def cuda_device(device) -> torch.device:
    """``device`` as a CUDA device with its index (``cuda`` -> ``cuda:<current device>``)."""
    d = torch.device(device)
    return d if d.index is not None else torch.device("cuda", torch.cuda.current_device())


def _sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(cuda_device(device))


def time_call(fn, device, repeats: int = 5, warmup: int = 2) -> np.ndarray:
    """Seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs. On CUDA each run sits between two CUDA
    events recorded on the model's device's current stream, after synchronising that device: the time from the
    start of its first kernel to the end of its last, host waits inside included; on CPU, ``perf_counter``."""
    if not is_cuda(device):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return np.array(times)
    dev = cuda_device(device)
    times = []
    with torch.cuda.device(dev):  # tensors fn makes on "cuda" land on the model's device too
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(dev)
        stream = torch.cuda.current_stream(dev)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    return np.array(times)


@contextlib.contextmanager
def no_autotuning() -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` off for the block, then restored: with survivor compaction every block
    sees another batch size, and autotuning would run (and be timed) at each new shape."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def check_dtype(dtype: str) -> str:
    if dtype not in TIMING_DTYPES:
        raise ValueError(f"timing dtype {dtype!r}: use one of {', '.join(TIMING_DTYPES)}")
    return dtype


def precision(device, dtype: str = "fp32"):
    """The context the timed passes run in: nothing for ``fp32``, ``torch.autocast`` to bfloat16 for ``bf16``
    (on the device's type; CPU autocast works too)."""
    amp = TIMING_DTYPES[check_dtype(dtype)]
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp)


def stage_budget(device) -> int | None:
    """Bytes of staged float images the device may hold: on CUDA the free memory (``mem_get_info`` of that
    device) less the headroom; None on CPU, where the whole split is staged (host memory is no limit at the
    sizes timed here: a 10,000-image test split is 6 GB at 224 px, and a CPU times far fewer images than that
    in any reasonable time)."""
    if not is_cuda(device):
        return None
    free, _ = torch.cuda.mem_get_info(cuda_device(device))
    return max(0, free - max(int(STAGE_HEADROOM_FRACTION * free), STAGE_HEADROOM_MIN_BYTES))


def images_to_stage(n_total: int, per_image: int, budget: int | None, batch_size: int, n_min: int = 0) -> int:
    """How many of ``n_total`` images to stage at ``per_image`` bytes within ``budget`` bytes (None: all): every
    image if they fit, else whole batches only (the throughput passes then time full batches), at least one
    batch and ``n_min`` images (a device that cannot hold those fails with the allocator's out-of-memory error)."""
    if budget is None or n_total * per_image <= budget:
        return n_total
    fit = budget // per_image // batch_size * batch_size
    return min(n_total, max(fit, batch_size, n_min))


def stage_inputs(x_uint8, img_size: int, device, batch_size: int, n_min: int = 0) -> torch.Tensor:
    """The images the throughput passes time, converted and on the device: the first
    ``images_to_stage(...)`` of uint8 images [N, H, W, C] as one preallocated float tensor [n, C, img_size,
    img_size], filled batch by batch (converted and resized on the device; never a second full copy)."""
    n_total, channels = len(x_uint8), x_uint8.shape[-1]
    per_image = channels * img_size * img_size * torch.finfo(torch.float32).bits // 8
    n = images_to_stage(n_total, per_image, stage_budget(device), batch_size, n_min)
    x = torch.empty((n, channels, img_size, img_size), dtype=torch.float32, device=device)
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        x[i:j] = to_tensor(x_uint8[i:j], img_size, device)
    return x


def device_key(device) -> str:
    """A name of the physical device for its timing lock: the GPU's UUID (the same card under any
    ``CUDA_VISIBLE_DEVICES`` and on any host sharing the cache), else host and index."""
    dev = cuda_device(device)
    uuid = str(getattr(torch.cuda.get_device_properties(dev), "uuid", None) or "")  # a _CUuuid: its hex text
    return f"gpu-{uuid}" if uuid else f"{socket.gethostname()}-cuda{dev.index}"


@contextlib.contextmanager
def timing_lock(cache_dir, device, say=None) -> Iterator[None]:
    """On CUDA, hold ``<cache_dir>/locks/timing-<device_key>.lock`` for the block, so one timing section at a
    time runs on a GPU whatever the executor; on leaving, the memory this process's allocator keeps cached is
    returned, so the next holder sizes its staging on the same free memory. On CPU, nothing."""
    if not is_cuda(device):
        yield
        return
    path = Path(cache_dir) / "locks" / f"timing-{device_key(device)}.lock"
    with exclusive(path, f"timings on {device}", say):
        try:
            yield
        finally:
            torch.cuda.empty_cache()


class Timings(dict):
    """metric -> value, with ``n``: metric -> the number of images the value was measured on, and ``exits``:
    the exit [n] of each timed image in the timed early-exit pass (None for the static backbone)."""

    def __init__(self, values: dict[str, float], n: dict[str, int], exits: np.ndarray | None = None):
        super().__init__(values)
        self.n = n
        self.exits = exits


def timed_macs_rel(method: ExitMethod, exits, static_macs: float) -> float:
    """Mean cost of the images behind ``exits`` [n] (``method.costs_`` [K] cumulative MACs per exit) over the
    static backbone's MACs: the cost that a ``wall_rel`` measured on those images compares with."""
    return float(np.asarray(method.costs_, dtype=np.float64)[np.asarray(exits)].mean() / static_macs)


def _latencies(fn, x: torch.Tensor, device, n_latency: int) -> np.ndarray:
    """Batch-1 milliseconds of ``fn(xi)`` per image of the first ``n_latency`` (median of 3 runs after 1 warm-up)."""
    return np.array([np.median(time_call(lambda xi=x[i:i + 1]: fn(xi), device, 3, 1))
                     for i in range(min(n_latency, len(x)))]) * 1000


def _static_pass(st: Stages, x: torch.Tensor, batch_size: int):
    def static():
        for i in range(0, len(x), batch_size):
            st.static_forward(x[i:i + batch_size])

    return static


@torch.no_grad()
def timing_metrics(st: Stages, method: ExitMethod, point: OperatingPoint, x_uint8: np.ndarray, img_size: int,
                   device: str = "cpu", batch_size: int = 256, n_latency: int = 64, repeats: int = 3,
                   x: torch.Tensor | None = None, dtype: str = "fp32", static_macs: float | None = None) -> Timings:
    """One operating point, timed (the module docstring says how): ``throughput``, ``wall_rel``, ``latency_ms``,
    ``latency_ms_p90``, ``host_syncs_per_block`` and, given the static backbone's MACs ``static_macs``,
    ``timed_macs_rel``. ``x``: the staged images (``stage_inputs``), to reuse them over points; ``dtype``:
    ``fp32`` or ``bf16`` (autocast). ``.n`` gives each metric's number of images, ``.exits`` the timed images'
    exits."""
    check_dtype(dtype)
    x = stage_inputs(x_uint8, img_size, device, batch_size, n_latency) if x is None else x
    m = method_on_device(method, device)  # the device copy is made before any clock runs
    last = {}

    def early_exit():
        last["result"] = run_early_exit(st, m, point, x, batch_size, to_cpu=False)

    static = _static_pass(st, x, batch_size)
    first = x[:batch_size]
    with no_autotuning(), precision(device, dtype):
        time_call(lambda: run_early_exit(st, m, point, first, batch_size, to_cpu=False), device, 0, 2)
        time_call(lambda: st.static_forward(first), device, 0, 2)
        ee, base = [], []
        for _ in range(repeats):
            ee.append(time_call(early_exit, device, 1, 0)[0])
            base.append(time_call(static, device, 1, 0)[0])
        result = last["result"]  # the last timed pass over every staged image
        lat = _latencies(lambda xi: run_early_exit(st, m, point, xi, 1, to_cpu=False), x, device, n_latency)
    ee_s, base_s = float(np.median(ee)), float(np.median(base))
    exits = result.exits.cpu().numpy() if isinstance(result.exits, torch.Tensor) else np.asarray(result.exits)
    values = {"latency_ms": float(np.median(lat)), "latency_ms_p90": float(np.percentile(lat, 90)),
              "throughput": len(x) / ee_s, "wall_rel": ee_s / base_s,
              "host_syncs_per_block": float(result.host_syncs_per_block)}
    n = {"latency_ms": len(lat), "latency_ms_p90": len(lat), "throughput": len(x), "wall_rel": len(x),
         "host_syncs_per_block": len(x)}
    if static_macs is not None:
        values["timed_macs_rel"] = timed_macs_rel(method, exits, static_macs)
        n["timed_macs_rel"] = len(x)
    return Timings(values, n, exits)


@torch.no_grad()
def static_timing(st: Stages, x_uint8: np.ndarray, img_size: int, device: str = "cpu", batch_size: int = 256,
                  n_latency: int = 64, repeats: int = 3, x: torch.Tensor | None = None, dtype: str = "fp32"
                  ) -> Timings:
    """The static backbone timed like ``timing_metrics`` times a method: ``throughput`` at ``batch_size`` over the
    staged test images, ``latency_ms`` / ``latency_ms_p90`` at batch 1 over the first ``n_latency`` images, and
    ``host_syncs_per_block`` 0 (one forward per batch; nothing is read back inside it)."""
    check_dtype(dtype)
    x = stage_inputs(x_uint8, img_size, device, batch_size, n_latency) if x is None else x
    static = _static_pass(st, x, batch_size)
    with no_autotuning(), precision(device, dtype):
        time_call(lambda: st.static_forward(x[:batch_size]), device, 0, 2)
        secs = float(np.median(time_call(static, device, repeats, 0)))
        lat = _latencies(st.static_forward, x, device, n_latency)
    values = {"latency_ms": float(np.median(lat)), "latency_ms_p90": float(np.percentile(lat, 90)),
              "throughput": len(x) / secs, "host_syncs_per_block": 0.0}
    return Timings(values, {"latency_ms": len(lat), "latency_ms_p90": len(lat), "throughput": len(x),
                            "host_syncs_per_block": len(x)})
