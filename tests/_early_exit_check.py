"""The one check that the real early-exit runner equals the simulation, shared by the ViT and MSDNet tests."""
import numpy as np
import torch

from bench.backbones.base import Stages
from bench.core.interface import resolve_points
from bench.pipeline.runner import run_early_exit


def assert_real_equals_simulated(model: torch.nn.Module, st: Stages, method, task, x: torch.Tensor, budgets
                                 ) -> int:
    """At every feasible budget (``resolve_points``): run the network block by block through its staged forward
    ``st`` (``plugin.stages(model)``) on images ``x`` (the test split) and compare with deciding on the cached
    features: exits and argmax exactly, logits to 1e-5, and block k (``model.blocks[k]``, hooked) sees exactly
    the samples still running. A block's input is a tensor (ViT tokens) or a list of per-scale maps (MSDNet).
    Returns the number of budgets checked."""
    depth = st.num_exits
    assert len(model.blocks) == depth
    rows_in = []

    def hook(mod, inp, out, k):
        first = inp[0][0] if isinstance(inp[0], (list, tuple)) else inp[0]
        rows_in.append((k, first.shape[0]))

    hooks = [blk.register_forward_hook(lambda mod, inp, out, k=k: hook(mod, inp, out, k))
             for k, blk in enumerate(model.blocks)]
    resolved = resolve_points(method, task, budgets)
    assert [p.budget for p in resolved[:len(budgets)]] == list(budgets)
    points = [p for p in resolved[:len(budgets)] if not p.infeasible]
    try:
        for point in points:
            logits = method.exit_logits(task.splits["test"], point)
            sim = method.decide(logits, point)
            rows_in.clear()
            real = run_early_exit(st, method, point, x, batch_size=100)
            assert np.array_equal(real.exits, sim), f"{(real.exits != sim).sum()} flipped decisions"
            sim_logits = logits[sim, np.arange(len(sim))]
            assert torch.equal(real.logits.argmax(1), sim_logits.argmax(1))
            torch.testing.assert_close(real.logits, sim_logits, atol=1e-5, rtol=1e-5)
            # survivor compaction: block k saw exactly the samples that had not exited before it
            seen = np.zeros(depth, dtype=int)
            for k, r in rows_in:
                seen[k] += r
            assert seen.tolist() == [(sim >= k).sum() for k in range(depth)] == real.block_rows
    finally:
        for h in hooks:
            h.remove()
    return len(points)
