"""Real early exit: run the backbone block by block on raw images and drop samples as they exit.

After block k the survivors' exit-k features go through the method's streaming form (exit k's logits and who
leaves); the rows that leave are removed from the block state (survivor compaction: the ViT's tokens, or every
scale map of MSDNet), so an exited sample never enters a later block. The backbone is driven through its staged
forward (``bench.backbones.base.Stages``). The predictions and exits must equal the simulated ones computed from
the feature cache: exactly on CPU in float32 (tested), within a stated tolerance on CUDA, where the matmuls of a
compacted batch round differently from the full batch the cache saw (``compare_with_simulation`` counts the
flips; ``python -m bench.gpu_check`` reports them).

Where the exit heads and decisions run. Score rules (``ScoreExitMethod`` with its own ``stream``: threshold,
entropy, msdnet and any ``score(logits)`` plugin) run on the model's device: a copy of the method with its
tensors on the device is made once (``method_on_device``), the head, the float64 score and the comparison with
the threshold stay there, and the only host synchronisation per block is reading how many samples stay (the
compaction needs that size; the rows are then gathered by index, which needs none). The other methods' ``stream``
(patience, jeidnn, jeidnn_consistent, boostednet) is numpy-based by the method contract (a numpy mask and
per-sample numpy state, ``bench.core.interface``): for them each block's exit features [N_k, D] go to the host
once, the method runs there, and the leavers' index and logits come back; that transfer is unavoidable without
a device form of their ``stream``. Either way the outputs are collected on the device and copied once at the end.

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
from bench.core.interface import ExitMethod, OperatingPoint, ScoreExitMethod

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


def streams_on_device(method: ExitMethod) -> bool:
    """Whether the runner takes this method's exit heads and decisions on the model's device: a score rule whose
    ``stream`` is ``ScoreExitMethod``'s (head, then ``score(logits) >= threshold``), which needs nothing but
    torch. Other methods' ``stream`` returns numpy masks and state, so it runs on the host."""
    return isinstance(method, ScoreExitMethod) and type(method).stream is ScoreExitMethod.stream


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


@torch.no_grad()
def run_early_exit(st: Stages, method: ExitMethod, point: OperatingPoint, x: torch.Tensor, batch_size: int = 256,
                   to_cpu: bool = True) -> EarlyExitResult:
    """Early-exit inference on images x [N, C, H, W] (already on the model's device), ``batch_size`` images at a
    time. Returns the exits and logits on the CPU (one copy at the end), or left on the device with
    ``to_cpu=False`` (the timed form: the static backbone's logits stay there too)."""
    if method.bound:
        raise ValueError(f"{method.name} is a bound that reads labels; it cannot run as a real early exit")
    device = x.device
    on_device = streams_on_device(method)
    m = method_on_device(method, device) if on_device else method
    depth = st.num_exits
    n = x.shape[0]
    exits = torch.full((n,), depth - 1, dtype=torch.int64, device=device)
    out: torch.Tensor | None = None
    block_rows = [0] * depth
    for start in range(0, n, batch_size):
        h = st.embed(x[start:start + batch_size])
        alive = torch.arange(start, min(start + batch_size, n), device=device)
        state = None
        for k in range(depth):
            block_rows[k] += len(alive)
            h = st.block(k, h)
            feats = st.exit_feature(k, h).float()
            last = k == depth - 1
            if on_device:
                logits = m.exit_head(k, feats, point)
                leave = None if last else m.score(logits.double()) >= float(m._threshold(point, k))
            else:  # numpy-based stream: the features go to the host, the leavers' index and logits come back
                logits, leave, state = m.stream(k, feats.cpu(), point, state)
                leave = None if last else np.asarray(leave, dtype=bool)
            if out is None:
                out = torch.empty(n, logits.shape[1], dtype=torch.float32, device=device)
            if last:
                out[alive] = logits.float().to(device)
                break
            if isinstance(leave, np.ndarray):
                if leave.shape != (len(alive),):
                    raise ValueError(f"{method.name}.stream({k}) returned a mask of shape {leave.shape}, "
                                     f"expected ({len(alive)},)")
                keep_np = ~leave
                n_keep = int(keep_np.sum())
                rows = torch.from_numpy(np.flatnonzero(leave))
                pick = logits[rows]
                leave_idx = rows.to(device)
                keep_idx = torch.from_numpy(np.flatnonzero(keep_np)).to(device)
            else:
                keep = ~leave
                n_keep = int(keep.sum())  # the block's one host synchronisation: the survivors' count
                # keepers first, then leavers, each in their original order (a stable sort of the keep flag)
                order = torch.sort(keep.to(torch.int32), descending=True, stable=True).indices
                keep_idx, leave_idx = order[:n_keep], order[n_keep:]
                pick = logits[leave_idx]
            if n_keep < len(alive):
                out[alive[leave_idx]] = pick.float().to(device)
                exits[alive[leave_idx]] = k
            if n_keep == 0:
                break
            if n_keep < len(alive):
                alive = alive[keep_idx]
                h = st.select(h, keep_idx)  # an index tensor: gathering by it needs no host synchronisation
                if state:
                    state = {key: np.asarray(v)[keep_np] for key, v in state.items()}
    if not to_cpu:
        return EarlyExitResult(exits, out, block_rows)
    return EarlyExitResult(exits.cpu().numpy(), None if out is None else out.cpu(), block_rows)


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
