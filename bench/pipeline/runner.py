"""Real early exit: run the backbone block by block on raw images and drop samples as they exit.

After block k the survivors' exit-k features go through the method's streaming form (``stream``: exit k's
logits and who leaves); the rows that leave are removed from the block state (survivor compaction: the ViT's
tokens, or every scale map of MSDNet), so an exited sample never enters a later block. The backbone is driven
through its staged forward (``bench.backbones.base.Stages``). The predictions and exits must equal the
simulated ones computed from the feature cache: exactly on CPU in float32 (tested), within a stated tolerance
on CUDA.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.backbones.base import Stages, to_tensor
from bench.core.interface import ExitMethod, OperatingPoint


@dataclass
class EarlyExitResult:
    exits: np.ndarray  # [N]
    logits: torch.Tensor  # [N, C] logits of the exit each sample left from
    block_rows: list[int] = field(default_factory=list)  # rows that entered each block, summed over batches


@torch.no_grad()
def run_early_exit(st: Stages, method: ExitMethod, point: OperatingPoint, x: torch.Tensor, batch_size: int = 256
                   ) -> EarlyExitResult:
    """Early-exit inference on images x [N, C, H, W] (already on the model's device)."""
    if method.bound:
        raise ValueError(f"{method.name} is a bound that reads labels; it cannot run as a real early exit")
    depth = st.num_exits
    n = x.shape[0]
    exits = np.full(n, depth - 1, dtype=np.int64)
    out: torch.Tensor | None = None
    block_rows = [0] * depth
    for start in range(0, n, batch_size):
        h = st.embed(x[start:start + batch_size])
        alive = np.arange(start, min(start + batch_size, n))
        state = None
        for k in range(depth):
            block_rows[k] += len(alive)
            h = st.block(k, h)
            logits, leave, state = method.stream(k, st.exit_feature(k, h).float().cpu(), point, state)
            leave = np.ones(len(alive), dtype=bool) if k == depth - 1 else np.asarray(leave, dtype=bool)
            if out is None:
                out = torch.empty(n, logits.shape[1], dtype=torch.float32)
            out[alive[leave]] = logits[torch.from_numpy(leave).to(logits.device)].float().cpu()
            exits[alive[leave]] = k
            keep = ~leave
            if not keep.any():
                break
            alive = alive[keep]
            h = st.select(h, torch.from_numpy(keep).to(x.device))
            state = {key: np.asarray(v)[keep] for key, v in (state or {}).items()}
    return EarlyExitResult(exits, out, block_rows)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str, repeats: int = 5, warmup: int = 2) -> np.ndarray:
    """Wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return np.array(times)


@torch.no_grad()
def timing_metrics(st: Stages, method: ExitMethod, point: OperatingPoint, x_uint8: np.ndarray, img_size: int,
                   device: str = "cpu", batch_size: int = 256, n_latency: int = 64, repeats: int = 5
                   ) -> dict[str, float]:
    """latency_ms (batch 1, median over ``n_latency`` single images), latency_ms_p90, throughput (samples/s
    at ``batch_size``) and wall_rel (early-exit time / static backbone time on the same batch)."""
    x = to_tensor(x_uint8[:batch_size], img_size).to(device)
    ee = np.median(time_call(lambda: run_early_exit(st, method, point, x, batch_size), device, repeats))
    static = np.median(time_call(lambda: st.static_forward(x), device, repeats))
    singles = to_tensor(x_uint8[:n_latency], img_size).to(device)
    lat = []
    for i in range(len(singles)):
        xi = singles[i:i + 1]
        lat.append(np.median(time_call(lambda: run_early_exit(st, method, point, xi, 1), device, 3, 1)))
    lat = np.array(lat) * 1000
    return {"latency_ms": float(np.median(lat)), "latency_ms_p90": float(np.percentile(lat, 90)),
            "throughput": float(len(x) / ee), "wall_rel": float(ee / static)}
