"""The real early-exit runner equals the simulation from cached features, for every deployable method, and
never runs an exited sample through a later block; score rules decide on the model's device (the timings:
tests/test_timing.py). The CUDA tests skip without a GPU (``python -m bench.gpu_check`` runs them on one)."""
import dataclasses

import numpy as np
import pytest
import torch

from bench.backbones.base import to_tensor
from bench.backbones.vit import ViT, ViTConfig
from bench.core.interface import METHODS, create_method, resolve_points
from bench.pipeline.config import RunConfig
from bench.pipeline.runner import CPU_LOGIT_TOLERANCE, compare_with_simulation, method_on_device, run_early_exit
from bench.pipeline.tasks import load_task
from tests._early_exit_check import assert_real_equals_simulated

TINY_FIELDS = dict(img_size=8, patch_size=2, embed_dim=32, depth=4, num_heads=2, epochs=4, batch_size=128,
                   augment="none")
TINY = ViTConfig(**TINY_FIELDS)
DEPLOYABLE = [m for m in METHODS.names() if not METHODS.get(m).bound]
FAST = {"epochs": 3}


def _loaded(tmp_path_factory, device: str):
    cfg = RunConfig(methods=["threshold"], dataset="digits", cache_dir=str(tmp_path_factory.mktemp("cache")),
                    overrides={"backbone": TINY_FIELDS}, device=device)
    loaded = load_task(cfg, seed=0)
    assert loaded.backbone.plugin is ViT and loaded.backbone.config == TINY
    assert loaded.task.backbone == "vit-d4-w32-p2-8px"
    return loaded.dataset, loaded.backbone, loaded.task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Trained and cached on the CPU whatever the machine: the exactness tests compare CPU with CPU."""
    return _loaded(tmp_path_factory, "cpu")


@pytest.fixture(scope="module")
def cuda_setup(tmp_path_factory):
    """Trained and cached on CUDA, as a --device cuda run does: the simulation's features come from the device."""
    return _loaded(tmp_path_factory, "cuda")


@pytest.fixture(scope="module")
def fitted(setup):
    """name -> the method fitted once on the CPU task (the runner copies it to a device; it never changes it)."""
    _, _, task = setup
    memo = {}

    def get(name):
        if name not in memo:
            memo[name] = create_method(name, _fast_params(name)).fit(task)
        return memo[name]
    return get


def _fast_params(name):
    fields = create_method(name).params()
    return {k: v for k, v in FAST.items() if k in fields}


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_real_exits_equal_simulated(setup, fitted, name):
    ds, backbone, task = setup
    method = fitted(name)
    checked = assert_real_equals_simulated(backbone.model, backbone.stages(), method, task,
                                           to_tensor(ds.test_x, TINY.img_size), [0.3, 0.5, 0.7, 0.9])
    assert checked, f"{name}: no feasible budget"


def test_budget_one_runs_every_block_and_small_budget_saves_blocks(setup):
    ds, backbone, task = setup
    method = create_method("threshold").fit(task)
    low, high = resolve_points(method, task, [0.4, 1.0])
    assert (low.budget, high.budget) == (0.4, 1.0) and not low.infeasible and not high.infeasible
    x = to_tensor(ds.test_x, TINY.img_size)
    r_low = run_early_exit(backbone.stages(), method, low, x)
    r_high = run_early_exit(backbone.stages(), method, high, x)
    assert r_low.block_rows[0] == r_high.block_rows[0] == len(x)  # every sample enters block 0
    assert sum(r_low.block_rows) < 0.6 * len(x) * TINY.depth
    assert sum(r_high.block_rows) >= sum(r_low.block_rows)


def test_method_copies_on_the_device_are_made_once(setup):
    _, _, task = setup
    method = create_method("threshold").fit(task)
    assert method_on_device(method, "cpu") is method
    # the "meta" device moves tensors without a GPU: every head tensor moves, the method itself stays put
    meta = method_on_device(method, "meta")
    assert meta is not method and meta.heads_.weight.device.type == "meta" and meta.head_weight_.is_meta
    assert method.heads_.weight.device.type == "cpu" and method.head_weight_.device.type == "cpu"
    assert np.array_equal(meta.costs_, method.costs_) and meta.params() == method.params()
    assert method_on_device(method, "meta") is meta  # made once
    method.heads_ = dataclasses.replace(method.heads_)  # a refit replaces the fitted state: a new copy
    assert method_on_device(method, "meta") is not meta


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_every_method_streams_on_the_device_without_host_reads(setup, fitted, name):
    """Every method's ``stream`` runs on the meta device (tensors with shapes and no data: any read of a value,
    a copy to the host or a data-dependent shape raises there), so nothing in it waits for the host; its mask
    and state are tensors on that device with one row per running sample."""
    ds, backbone, task = setup
    method = fitted(name)
    point = next(p for p in resolve_points(method, task, [0.5, 0.7]) if not p.infeasible)
    meta = method_on_device(method, "meta")
    feats = task.splits["test"].features.to("meta")
    state = None
    for k in range(task.num_exits):
        logits, leave, state = meta.stream(k, feats[k, :50], point, state)
        assert logits.is_meta and logits.shape == (50, task.num_classes)
        assert leave.is_meta and leave.dtype == torch.bool and leave.shape == (50,)
        assert all(v.is_meta and v.shape[0] == 50 for v in state.values())
    assert name not in {"patience", "jeidnn", "boostednet"} or state or k == task.num_exits - 1


@pytest.mark.parametrize("batch", [1, 7, 100])
@pytest.mark.parametrize("name", DEPLOYABLE)
def test_the_runner_reads_the_host_once_per_block(setup, fitted, name, batch):
    """At most one host read per block and batch for every method (the survivors' count; at batch 1 the leave
    flag), counted by the runner; every exited block is one fewer read, so a budget below 1 reads less than once
    per block in all."""
    ds, backbone, task = setup
    method = fitted(name)
    point = next(p for p in resolve_points(method, task, [0.5, 0.7]) if not p.infeasible)
    x = to_tensor(ds.test_x[:100], TINY.img_size)
    r = run_early_exit(backbone.stages(), method, point, x, batch_size=batch)
    depth = TINY.depth
    last = [int(r.exits[i:i + batch].max()) for i in range(0, 100, batch)]  # the last exit each batch ran
    assert r.block_calls == sum(k + 1 for k in last)  # a batch stops once all its samples have left
    # one read per block run, except at the last exit (it takes everyone left, nothing to read)
    assert r.host_syncs == r.block_calls - sum(k == depth - 1 for k in last)
    assert 0 < r.host_syncs_per_block <= 1


@pytest.mark.parametrize("name", ["threshold", "patience"])
def test_compare_with_simulation_counts_nothing_on_cpu(setup, fitted, name):
    ds, backbone, task = setup
    method = fitted(name)
    points = resolve_points(method, task, [0.4, 0.7])  # the budgets', then the method's own points
    found = compare_with_simulation(backbone.stages(), method, task, to_tensor(ds.test_x, TINY.img_size), points,
                                    batch_size=100)
    assert [r["params"] for r in found] == [p.params for p in points if not p.infeasible] and len(found) >= 2
    for r in found:
        assert (r["exit_mismatches"], r["prediction_flips"]) == (0, 0) and r["max_logit_diff"] < CPU_LOGIT_TOLERANCE
        assert r["block_rows_equal"] and r["n"] == len(ds.test_x)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@CUDA
@pytest.mark.parametrize("batch", [1, 256])
def test_the_timed_loop_makes_no_other_synchronisation_on_cuda(cuda_setup, batch):
    """Every method's timed early exit (``to_cpu=False``) under ``torch.cuda.set_sync_debug_mode("error")``: any
    synchronisation but the runner's one read per block (``runner.host_read``) raises, on the first GPU that runs
    it."""
    ds, backbone, task = cuda_setup
    x = to_tensor(ds.test_x, TINY.img_size, "cuda")
    st = backbone.stages()
    for name in DEPLOYABLE:
        method = create_method(name, _fast_params(name)).fit(task)
        point = next(p for p in resolve_points(method, task, [0.5, 0.7]) if not p.infeasible)
        run_early_exit(st, method, point, x[:batch], batch, to_cpu=False)  # warm: the device copy is made once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            r = run_early_exit(st, method, point, x[:batch], batch, to_cpu=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert r.host_syncs_per_block <= 1, name


@CUDA
@pytest.mark.parametrize("name", DEPLOYABLE)
def test_real_runner_on_cuda_agrees_with_the_simulation(cuda_setup, name):
    """On CUDA the full batches of the feature cache and the real runner's compacted ones round differently: a
    few near-threshold decisions may flip (at most 1 % of the test samples), the survivor compaction is still
    exact with respect to the real exits, and the logits agree to TF32 precision."""
    ds, backbone, task = cuda_setup
    method = create_method(name, _fast_params(name)).fit(task)
    points = [p for p in resolve_points(method, task, [0.3, 0.5, 0.7, 0.9]) if p.budget is not None]
    backbone.model.cuda()
    x = to_tensor(ds.test_x, TINY.img_size).cuda()
    found = compare_with_simulation(backbone.stages(), method, task, x, points, batch_size=100)
    real = run_early_exit(backbone.stages(), method, points[0], x, 100)
    assert found
    for r in found:
        assert r["exit_mismatches"] <= 0.01 * r["n"] and r["prediction_flips"] <= 0.01 * r["n"], r
        assert r["max_logit_diff"] < 0.1, r  # a wrong head or row would be off by whole units
    assert real.logits.device.type == "cpu" and real.block_rows[0] == len(ds.test_x)
    assert real.block_rows == [int((real.exits >= k).sum()) for k in range(TINY.depth)]


def test_bounds_cannot_run_for_real(setup):
    bounds = [m for m in METHODS.names() if METHODS.get(m).bound]
    if not bounds:
        pytest.skip("no bound registered")
    ds, backbone, task = setup
    method = create_method(bounds[0]).fit(task)
    point = resolve_points(method, task, [0.5])[-1]  # the bound's own point
    with pytest.raises(ValueError, match="bound"):
        run_early_exit(backbone.stages(), method, point, to_tensor(ds.test_x[:4], 8))
