"""The real early-exit runner equals the simulation from cached features, for every deployable method, and
never runs an exited sample through a later block."""
import pytest

from bench.backbones.base import to_tensor
from bench.backbones.vit import ViT, ViTConfig
from bench.core.interface import METHODS, create_method, resolve_points
from bench.pipeline.config import RunConfig
from bench.pipeline.runner import run_early_exit, timing_metrics
from bench.pipeline.tasks import load_task
from tests._early_exit_check import assert_real_equals_simulated

TINY_FIELDS = dict(img_size=8, patch_size=2, embed_dim=32, depth=4, num_heads=2, epochs=4, batch_size=128,
                   augment="none")
TINY = ViTConfig(**TINY_FIELDS)
DEPLOYABLE = [m for m in METHODS.names() if not METHODS.get(m).bound]
FAST = {"epochs": 3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = RunConfig(methods=["threshold"], dataset="digits", cache_dir=str(tmp_path_factory.mktemp("cache")),
                    overrides={"backbone": TINY_FIELDS})
    loaded = load_task(cfg, seed=0)
    assert loaded.backbone.plugin is ViT and loaded.backbone.config == TINY
    assert loaded.task.backbone == "vit-d4-w32-p2-8px"
    return loaded.dataset, loaded.backbone, loaded.task


def _fast_params(name):
    fields = create_method(name).params()
    return {k: v for k, v in FAST.items() if k in fields}


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_real_exits_equal_simulated(setup, name):
    ds, backbone, task = setup
    method = create_method(name, _fast_params(name)).fit(task)
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


def test_timing_metrics_are_sane(setup):
    ds, backbone, task = setup
    method = create_method("threshold").fit(task)
    point = resolve_points(method, task, [0.5])[0]
    assert point.budget == 0.5 and not point.infeasible
    t = timing_metrics(backbone.stages(), method, point, ds.test_x, TINY.img_size, batch_size=128, n_latency=4,
                       repeats=2)
    assert set(t) == {"latency_ms", "latency_ms_p90", "throughput", "wall_rel"}
    assert 0 < t["latency_ms"] <= t["latency_ms_p90"] and t["throughput"] > 0 and t["wall_rel"] > 0


def test_bounds_cannot_run_for_real(setup):
    bounds = [m for m in METHODS.names() if METHODS.get(m).bound]
    if not bounds:
        pytest.skip("no bound registered")
    ds, backbone, task = setup
    method = create_method(bounds[0]).fit(task)
    point = resolve_points(method, task, [0.5])[-1]  # the bound's own point
    with pytest.raises(ValueError, match="bound"):
        run_early_exit(backbone.stages(), method, point, to_tensor(ds.test_x[:4], 8))
