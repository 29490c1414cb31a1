"""Real early exit: run the backbone block by block on raw images and drop samples as they exit.

After block k the survivors' exit-k features go through the method's streaming form (exit k's logits and who
leaves); the rows that leave are removed from the block state (survivor compaction: the ViT's tokens, or every
scale map of MSDNet), so an exited sample never enters a later block. The backbone is driven through its staged
forward (``bench.backbones.base.Stages``). The predictions and exits must equal the simulated ones computed from
the feature cache: exactly on CPU in float32 (tested), within a stated tolerance on CUDA, where the matmuls of a
compacted batch round differently from the full batch the cache saw (``compare_with_simulation`` counts the
flips; ``python -m bench.gpu_check`` reports them).

Where the exit heads and decisions run: on the model's device, for every method. A copy of the method with its
fitted tensors on the device is made once (``method_on_device``); its ``stream`` (the tensor contract of
``bench.core.interface``) computes exit k's logits, who leaves and the per-sample state there. The runner reads
one value per block and batch from the device, the survivors' count, which the compaction needs as a size; the
survivors' rows of the block state and of the method's state are then gathered by one index tensor (a stable
sort of the keep flag), which needs no further synchronisation. At batch 1 the one read is the leave flag
itself, and nothing is sorted or gathered. The runner counts its own reads (``EarlyExitResult.host_syncs``) and
the (batch, block) pairs it ran, so every timing row can say ``host_syncs_per_block``; the outputs are collected
on the device and copied to the host once, at the end (not in the timed form, ``to_cpu=False``).

Timing lives in ``bench.pipeline.timing``.
"""
from __future__ import annotations

import copy
import dataclasses
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.backbones.base import Stages
from bench.core.interface import ExitMethod, OperatingPoint, check_stream_output

@dataclass
class EarlyExitResult:
    exits: np.ndarray  # [N] (a device tensor with ``to_cpu=False``)
    logits: torch.Tensor  # [N, C] logits of the exit each sample left from (float32; CPU unless ``to_cpu=False``)
    block_rows: list[int] = field(default_factory=list)  # rows that entered each block, summed over batches
    host_syncs: int = 0  # host reads of device values and device-to-host copies inside the block loop
    block_calls: int = 0  # (batch, block) pairs run

    @property
    def host_syncs_per_block(self) -> float:
        """Host synchronisations per block run (the contract: at most 1, the survivors' count)."""
        return self.host_syncs / max(1, self.block_calls)


def _moved(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _moved(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_moved(v, device) for v in value)
    return value


_ON_DEVICE: dict[tuple[int, str], tuple[weakref.ref, tuple, ExitMethod]] = {}


def method_on_device(method: ExitMethod, device: str | torch.device) -> ExitMethod:
    """A shallow copy of a fitted method whose tensors (head weights, also inside dataclasses such as the shared
    heads) live on ``device``; the method itself on CPU. Made once per (method, device) and reused while the
    method's fitted state is the same objects (a refit makes a new copy), so timed calls never pay the copy."""
    device = torch.device(device)
    if device.type == "cpu":
        return method
    key = (id(method), str(device))
    state = tuple((k, id(v)) for k, v in vars(method).items() if k != "_scores_memo")
    hit = _ON_DEVICE.get(key)
    if hit is not None and hit[0]() is method and hit[1] == state:
        return hit[2]
    moved = copy.copy(method)  # ScoreExitMethod's __getstate__ leaves its scores memo behind
    for k, v in vars(method).items():
        if k != "_scores_memo":
            setattr(moved, k, _moved(v, device))
    for stale in [k for k, (ref, _, _) in _ON_DEVICE.items() if ref() is None]:
        del _ON_DEVICE[stale]
    _ON_DEVICE[key] = (weakref.ref(method), state, moved)
    return moved


def host_read(t: torch.Tensor) -> int:
    """The runner's one intended read from the device per block (an int of a 0-d or one-element tensor). Under
    ``torch.cuda.set_sync_debug_mode("error")`` (the CUDA test's guard against any other synchronisation) this
    read alone is let through."""
    mode = torch.cuda.get_sync_debug_mode() if t.is_cuda else 0
    if not mode:
        return int(t)
    torch.cuda.set_sync_debug_mode(0)
    try:
        return int(t)
    finally:
        torch.cuda.set_sync_debug_mode(mode)


@torch.no_grad()
def run_early_exit(st: Stages, method: ExitMethod, point: OperatingPoint, x: torch.Tensor, batch_size: int = 256,
                   to_cpu: bool = True) -> EarlyExitResult:
    """Early-exit inference on images x [N, C, H, W] (already on the model's device), ``batch_size`` images at a
    time. Returns the exits and logits on the CPU (one copy at the end), or left on the device with
    ``to_cpu=False`` (the timed form)."""
    if method.bound:
        raise ValueError(f"{method.name} is a bound that reads labels; it cannot run as a real early exit")
    device = x.device
    m = method_on_device(method, device)
    depth = st.num_exits
    n = x.shape[0]
    exits = torch.full((n,), depth - 1, dtype=torch.int64, device=device)
    out: torch.Tensor | None = None
    block_rows = [0] * depth
    syncs = calls = 0
    for start in range(0, n, batch_size):
        h = st.embed(x[start:start + batch_size])
        n_alive = min(batch_size, n - start)
        alive = torch.arange(start, start + n_alive, device=device)
        state: dict | None = None
        for k in range(depth):
            block_rows[k] += n_alive
            calls += 1
            h = st.block(k, h)
            logits, leave, state = m.stream(k, st.exit_feature(k, h).float(), point, state)
            check_stream_output(method, k, n_alive, logits, leave, state)
            if out is None:
                out = torch.empty(n, logits.shape[1], dtype=torch.float32, device=device)
            if k == depth - 1:  # the last exit takes everyone left
                out[alive] = logits.float()
                break
            if n_alive == 1:  # batch 1: the leave flag is the one read; nothing to sort or gather
                syncs += 1
                if host_read(leave[0]):
                    out[alive] = logits.float()
                    exits[alive] = k
                    break
                continue
            keep = ~leave
            n_keep = host_read(keep.sum())  # the block's one host synchronisation: the survivors' count
            syncs += 1
            if n_keep == n_alive:
                continue
            # keepers first, then leavers, each in their original order (a stable sort of the keep flag)
            order = torch.sort(keep.to(torch.int32), descending=True, stable=True).indices
            keep_idx, leave_idx = order[:n_keep], order[n_keep:]
            out[alive[leave_idx]] = logits[leave_idx].float()
            exits[alive[leave_idx]] = k
            if n_keep == 0:
                break
            alive, n_alive = alive[keep_idx], n_keep
            h = st.select(h, keep_idx)  # an index tensor: gathering by it needs no host synchronisation
            state = {key: v[keep_idx] for key, v in (state or {}).items()}
    if not to_cpu:
        return EarlyExitResult(exits, out, block_rows, syncs, calls)
    return EarlyExitResult(exits.cpu().numpy(), None if out is None else out.cpu(), block_rows, syncs, calls)


# float32 rounding of a matrix product summed in another order, far below a wrong head or row (whole units)
CPU_LOGIT_TOLERANCE = 1e-4


def compare_with_simulation(st: Stages, method: ExitMethod, task, x: torch.Tensor, points, batch_size: int = 256
                            ) -> list[dict]:
    """The real runner on images ``x`` (the task's test split, on the model's device) against deciding on the
    cached test features, per operating point: budget, ``exit_mismatches`` (samples leaving at another exit),
    ``prediction_flips`` (another argmax), ``max_logit_diff`` (largest absolute difference of the emitted
    logits), ``block_rows_equal`` (each block saw exactly the samples the simulation keeps running) and n. On
    CPU in float32 both counts are 0 and the logits agree within ``CPU_LOGIT_TOLERANCE`` (the tests assert it):
    the runner's compacted batches are smaller than the cache's, and on some CPUs the matrix kernels then sum in
    another order (1.5e-7 on CI's); on CUDA the gpu check reports them."""
    test = task.splits["test"]
    out = []
    for point in points:
        if point.infeasible:
            continue
        logits = method.exit_logits(test, point)
        sim = np.asarray(method.decide(logits, point))
        sim_logits = logits[torch.from_numpy(sim), torch.arange(len(sim))]
        real = run_early_exit(st, method, point, x, batch_size)
        rows = [int((sim >= k).sum()) for k in range(st.num_exits)]
        out.append({"budget": point.budget, "params": point.params, "n": int(len(sim)),
                    "exit_mismatches": int((real.exits != sim).sum()),
                    "prediction_flips": int((real.logits.argmax(1) != sim_logits.argmax(1)).sum()),
                    "max_logit_diff": float((real.logits - sim_logits.float()).abs().max()),
                    "block_rows_equal": rows == real.block_rows})
    return out
