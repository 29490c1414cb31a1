"""The real early-exit runner equals the simulation from cached features, for every deployable method, and
never runs an exited sample through a later block."""
import pytest

from bench.backbones.vit import BackboneConfig, load_or_train_backbone, to_tensor
from bench.pipeline.features import load_or_compute_features
from bench.core.interface import METHODS, create_method
from bench.pipeline.run import build_task, count_macs
from bench.pipeline.runner import run_early_exit, timing_metrics
from bench.pipeline.splits import load_or_make_splits
from datasets import load_dataset
from tests._early_exit_check import assert_real_equals_simulated

TINY = BackboneConfig(img_size=8, patch_size=2, embed_dim=32, depth=4, num_heads=2, epochs=4, batch_size=128)
DEPLOYABLE = [m for m in METHODS.names() if not METHODS.get(m).bound]
FAST = {"epochs": 3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    ds = load_dataset("digits")
    splits = load_or_make_splits(cache, ds.name, ds.train_y, len(ds.test_y), 0)
    backbone = load_or_train_backbone(cache, TINY, ds, splits)
    feats = load_or_compute_features(cache, backbone, ds)
    task = build_task(ds, splits, backbone, feats, count_macs(backbone.model))
    return ds, backbone, task


def _fast_params(name):
    fields = create_method(name).params()
    return {k: v for k, v in FAST.items() if k in fields}


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_real_exits_equal_simulated(setup, name):
    ds, backbone, task = setup
    method = create_method(name, _fast_params(name)).fit(task)
    assert_real_equals_simulated(backbone.model, method, task, to_tensor(ds.test_x, TINY.img_size),
                                 [0.3, 0.5, 0.7, 0.9])


def test_budget_one_runs_every_block_and_small_budget_saves_blocks(setup):
    ds, backbone, task = setup
    method = create_method("threshold").fit(task)
    low, high = method.calibrate(task, [0.4, 1.0])
    x = to_tensor(ds.test_x, TINY.img_size)
    r_low = run_early_exit(backbone.model, method, low, x)
    r_high = run_early_exit(backbone.model, method, high, x)
    assert sum(r_low.block_rows) < 0.6 * len(x) * TINY.depth
    assert sum(r_high.block_rows) >= sum(r_low.block_rows)


def test_timing_metrics_are_sane(setup):
    ds, backbone, task = setup
    method = create_method("threshold").fit(task)
    point = method.calibrate(task, [0.5])[0]
    t = timing_metrics(backbone.model, method, point, ds.test_x, TINY.img_size, batch_size=128, n_latency=4,
                       repeats=2)
    assert set(t) == {"latency_ms", "latency_ms_p90", "throughput", "wall_rel"}
    assert 0 < t["latency_ms"] <= t["latency_ms_p90"] and t["throughput"] > 0 and t["wall_rel"] > 0


def test_bounds_cannot_run_for_real(setup):
    bounds = [m for m in METHODS.names() if METHODS.get(m).bound]
    if not bounds:
        pytest.skip("no bound registered")
    ds, backbone, task = setup
    method = create_method(bounds[0]).fit(task)
    with pytest.raises(ValueError, match="bound"):
        run_early_exit(backbone.model, method, method.native_points(task)[0], to_tensor(ds.test_x[:4], 8))
