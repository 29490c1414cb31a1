"""MSDNet as a multi-exit backbone: published per-exit costs, the staged forward, BoostedNet's gradient
rescaling, and the real early-exit runner on MSDNet equal to the simulation from its cached features."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.backbones import msdnet as msdnet_module
from bench.backbones.base import BACKBONES, block_features, to_tensor, warmup_cosine_lr
from bench.backbones.msdnet import MSDNet, MSDNetBackbone, MSDNetConfig, block_layout, msdnet_macs
from bench.base.errors import UserError
from bench.core.interface import METHODS, create_method, resolve_points
from bench.measure.flops import fvcore_macs
from bench.pipeline.config import RunConfig
from bench.pipeline.timing import timing_metrics
from bench.pipeline.tasks import load_task
from methods.boostednet import (BoostedMSDNet, BoostedMSDNetConfig, GradRescale, boosted_ensemble,
                                rescaled_exit_logits)
from tests._early_exit_check import assert_real_equals_simulated

# MSDNet-PyTorch's budgeted CIFAR-100 model, per-exit mul-adds from its own counter (reference/baselines.md)
PUBLISHED_MACS = np.array([6.9, 14.4, 27.5, 41.7, 58.5]) * 1e6
TINY_FIELDS = dict(img_size=16, n_blocks=3, channels=4, growth_rate=2, classifier_channels=16, epochs=3,
                   batch_size=64, lr=0.05, augment="none")
TINY = MSDNetConfig(**TINY_FIELDS)
DEPLOYABLE = [m for m in METHODS.names() if not METHODS.get(m).bound]


def test_budgeted_cifar_configuration_matches_published_per_exit_costs():
    model = MSDNetBackbone.create(MSDNetConfig(), in_chans=3, num_classes=100)
    assert block_layout(model.cfg) == [1, 2, 3, 4, 5]
    got = msdnet_macs(model).exit_costs()
    np.testing.assert_allclose(got, PUBLISHED_MACS, rtol=0.03)
    # and the harness's cost of leaving at exit k (threshold's heads = MSDNet's classifiers) is the same count
    macs = MSDNetBackbone.macs(model)
    assert macs.embed + sum(macs.blocks) + macs.head == got[-1] - sum(macs.exit_features) - 4 * 128 * 100


def test_tracing_only_the_exit_outputs_drops_the_finer_scales():
    """The convention matters: fvcore on a function that returns only exit 0's logits drops block 0's finer
    scales (unused by exit 0) and reads about 12 % low, as reference/baselines.md warns."""
    model = MSDNet(MSDNetConfig(), in_chans=3, num_classes=100).eval()
    x = torch.zeros(1, 3, 32, 32)

    def exit0_only(inp):
        xs = model.block(0, model.embed(inp))
        return model.exit_logits(0, model.exit_feature(0, xs))

    low = fvcore_macs(exit0_only, x)
    full = msdnet_macs(model).exit_costs()[0]
    assert 0.85 * full < low < 0.92 * full


def test_layouts():
    assert block_layout(MSDNetConfig(n_blocks=4, step_mode="even", step=2, base=3)) == [3, 2, 2, 2]
    assert block_layout(MSDNetConfig(n_blocks=3, step_mode="lin_grow", step=2, base=4)) == [4, 3, 5]


@pytest.mark.parametrize("cfg", [
    MSDNetConfig(prune="min", n_blocks=3), MSDNetConfig(step_mode="even", step=2, base=2, n_blocks=3),
    MSDNetConfig(bottleneck=False, n_blocks=2, gr_factor=(1, 2), bn_factor=(1, 2)),
    MSDNetConfig(img_size=28, n_blocks=4, channels=8, growth_rate=4, classifier_channels=32)])
def test_other_configurations_run_and_cost_more_at_every_exit(cfg):
    model = MSDNet(cfg, in_chans=1, num_classes=10).eval()
    outs = model(torch.randn(2, 1, cfg.img_size, cfg.img_size))
    assert len(outs) == cfg.n_blocks and all(o.shape == (2, 10) for o in outs)
    assert np.all(np.diff(msdnet_macs(model).exit_costs()) > 0)


def test_staged_forward_equals_forward_and_static_forward_is_the_last_exit():
    torch.manual_seed(0)
    model = MSDNet(TINY, in_chans=1, num_classes=10).eval()
    x = torch.randn(6, 1, 16, 16)
    outs = model(x)
    st = MSDNetBackbone.stages(model)
    feats = block_features(st, x)  # [K, N, D]
    assert feats.shape == (3, 6, 16) and st.num_exits == 3
    for k in range(3):
        assert torch.equal(model.exit_logits(k, feats[k]), outs[k])
    assert torch.equal(st.static_forward(x), outs[-1])


def test_boosted_ensemble_hand_computed():
    f = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[4.0, 4.0]])]
    got = boosted_ensemble(f, 0.5)
    assert [g.tolist() for g in got] == [[[1.0, 0.0]], [[0.5, 2.0]], [[4.25, 5.0]]]
    # in training the earlier ensemble is detached: no gradient reaches f_0 through F_1
    f0 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    f1 = torch.tensor([[0.0, 2.0]], requires_grad=True)
    boosted_ensemble([f0, f1], 0.5, detach=True)[1].sum().backward()
    assert f0.grad is None and f1.grad.tolist() == [[1.0, 1.0]]


def test_grad_rescale_is_identity_forward_and_scales_backward():
    x = torch.randn(3, requires_grad=True)
    y = GradRescale.apply(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), 0.25))


def test_gradient_rescaling_gives_each_block_the_mean_of_its_heads_gradients():
    """With one scale every path runs through the rescaled map, so block k (depended on by the K-k heads
    j >= k) must receive exactly 1/(K-k) of the plain summed-loss gradient; the classifiers are untouched."""
    cfg = MSDNetConfig(img_size=8, n_blocks=4, channels=4, growth_rate=2, gr_factor=(1,), bn_factor=(1,),
                       classifier_channels=8)
    torch.manual_seed(0)
    model = MSDNet(cfg, in_chans=1, num_classes=3).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    # the rescaled forward computes the same logits as the plain one
    with torch.no_grad():
        for a, b in zip(rescaled_exit_logits(model, x), model(x)):
            assert torch.equal(a, b)

    def grads(rescale):
        model.zero_grad()
        outs = rescaled_exit_logits(model, x) if rescale else model(x)
        sum(F.cross_entropy(o, y) for o in outs).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, rescaled = grads(False), grads(True)
    k_all = cfg.n_blocks
    for name in plain:
        if name.startswith("blocks."):
            k = int(name.split(".")[1])
            torch.testing.assert_close(rescaled[name], plain[name] / (k_all - k), rtol=1e-4, atol=1e-7)
        elif name.startswith("stem."):
            torch.testing.assert_close(rescaled[name], plain[name] / k_all, rtol=1e-4, atol=1e-7)
        else:
            torch.testing.assert_close(rescaled[name], plain[name])


def test_boosted_network_trains_on_the_rescaled_boosted_ensemble():
    """The msdnet-boosted plugin's training outputs are BoostedNet's detached ensemble of the rescaled exits,
    and its validated prediction is the last ensemble; the plain plugin uses the exits and the last exit."""
    torch.manual_seed(0)
    cfg = BoostedMSDNetConfig(**TINY_FIELDS, boost_weight=0.25)
    model = BoostedMSDNet.create(cfg, in_chans=1, num_classes=10).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        outs = model(x)
        want = boosted_ensemble(outs, 0.25)
        for a, b in zip(BoostedMSDNet.exit_outputs(cfg, model, x), want):
            torch.testing.assert_close(a, b)
        for a, b in zip(MSDNetBackbone.exit_outputs(TINY, model, x), outs):
            assert torch.equal(a, b)
    stacked = torch.stack(outs)
    torch.testing.assert_close(BoostedMSDNet.prediction(cfg, stacked), want[-1])
    assert torch.equal(MSDNetBackbone.prediction(TINY, stacked), outs[-1])


def test_invalid_configurations_are_user_errors():
    with pytest.raises(UserError, match="step_mode"):
        MSDNetBackbone.configure("digits", {"step_mode": "geometric"})
    with pytest.raises(UserError, match="schedule"):
        MSDNetBackbone.configure("digits", {"schedule": "linear"})
    with pytest.raises(UserError, match="too small"):
        MSDNet(MSDNetConfig(img_size=4), 3, 10)
    with pytest.raises(UserError, match="too small"):
        MSDNetBackbone.configure("digits", {"img_size": 4})


def test_warmup_cosine_lr_hand_computed():
    # 10 steps, 2 of warm-up, base 1: 1/2, 1, then 0.5 (1 + cos(pi (step - 2) / 8))
    lrs = [warmup_cosine_lr(step, 10, 2, 1.0) for step in range(11)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[4] == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))
    assert lrs[6] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # non-increasing after the warm-up
    assert warmup_cosine_lr(0, 10, 0, 0.1) == pytest.approx(0.1)  # no warm-up: starts at the base rate


# the fake loop steps the schedule with no optimizer step in between (the real loop steps both), which torch
# warns about
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_training_schedules_set_the_optimisers_learning_rate(monkeypatch, schedule):
    """The schedule MSDNet's training hands to the shared loop: cosine sets the rate before every step (warm-up
    included), step divides it by 10 at the milestone epochs."""
    seen = {}

    def fake_fit(model, opt, cfg, *args, before_step=None, after_epoch=None, **kwargs):
        seen.update(opt=opt, before_step=before_step, after_epoch=after_epoch)
        return model, 0.0, 0, []

    monkeypatch.setattr(msdnet_module, "fit_epochs", fake_fit)
    cfg = TINY.replace(schedule=schedule, epochs=4, batch_size=10, lr=0.2, warmup_epochs=0.5)
    x, y = np.zeros((100, 16, 16, 1), np.uint8), np.arange(100) % 10  # 10 steps per epoch, 40 in all
    MSDNetBackbone.train(cfg, x, y, x[:10], y[:10], 10, seed=0)
    opt = seen["opt"]
    if schedule == "cosine":
        assert seen["after_epoch"] is None
        end = 0.2 * 0.5 * (1 + np.cos(np.pi * 34 / 35))
        for step, want in [(0, 0.2 / 5), (4, 0.2), (5, 0.2), (12, 0.1 * (1 + np.cos(np.pi * 7 / 35))), (39, end)]:
            seen["before_step"](step)
            assert opt.param_groups[0]["lr"] == pytest.approx(want)
    else:
        assert seen["before_step"] is None
        rates = []
        for _ in range(4):
            rates.append(opt.param_groups[0]["lr"])
            seen["after_epoch"]()
        assert rates == pytest.approx([0.2, 0.2, 0.02, 0.002])  # milestones at 50 % and 75 % of 4 epochs


# ---- trained tiny MSDNets on digits ----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["msdnet", "msdnet-boosted"])
def trained(request, tmp_path_factory):
    """The tiny MSDNet trained with the plain summed loss (``msdnet``) or as BoostedNet (``msdnet-boosted``),
    its cached features and its task, through the harness's own loading (``load_task``)."""
    cfg = RunConfig(methods=["threshold"], dataset="digits", backbone=request.param,
                    cache_dir=str(tmp_path_factory.mktemp("cache")), overrides={"backbone": TINY_FIELDS})
    loaded = load_task(cfg, seed=0)
    plugin = BACKBONES.get(request.param)
    assert loaded.backbone.plugin is plugin and loaded.backbone.config == plugin.Config(**TINY_FIELDS)
    assert loaded.task.backbone == f"{request.param}-b3-c4-g2-16px"
    return loaded.dataset, loaded.backbone, loaded.task


def test_task_on_msdnet_carries_its_own_heads_and_costs(trained):
    ds, backbone, task = trained
    w, b = task.exit_heads
    assert w.shape == (3, 16, 10) and b.shape == (3, 10)
    # the cached features through the network's own heads give the network's own outputs
    x = to_tensor(ds.test_x[:50], TINY.img_size)
    with torch.no_grad():
        outs = backbone.model(x)
    for k in range(3):
        torch.testing.assert_close(task.splits["test"].features[k, :50] @ w[k] + b[k], outs[k])
    parts = msdnet_macs(backbone.model)
    threshold = create_method("threshold").fit(task)
    # leaving at exit k costs what MSDNet's convention counts, plus the decisions (2C each) taken on the way
    np.testing.assert_array_equal(threshold.costs_, parts.exit_costs() + 2 * 10 * np.array([1, 2, 2]))
    assert task.macs.static == parts.stem + sum(parts.blocks) + parts.classifier_features[-1] + \
        parts.classifier_linear[-1]


def test_threshold_on_msdnet_uses_the_networks_classifiers(trained):
    ds, backbone, task = trained
    m = create_method("threshold").fit(task)
    logits = m.exit_logits(task.splits["test"])
    w, b = task.exit_heads
    feats = task.splits["test"].features
    for k in range(3):
        torch.testing.assert_close(logits[k], feats[k] @ w[k] + b[k])


@pytest.mark.parametrize("name", DEPLOYABLE)
def test_real_exits_on_msdnet_equal_simulated(trained, name):
    """Block by block on raw images, survivors only (every scale map compacted), equal to deciding on the cached
    features: exits and argmax exactly, logits to 1e-5; block k sees exactly the samples still running."""
    ds, backbone, task = trained
    fast = {k: v for k, v in {"epochs": 3}.items() if k in create_method(name).params()}
    method = create_method(name, fast).fit(task)
    checked = assert_real_equals_simulated(backbone.model, backbone.stages(), method, task,
                                           to_tensor(ds.test_x, TINY.img_size), [0.3, 0.5, 0.8])
    assert checked, f"{name}: no feasible budget"


def test_timing_on_msdnet_uses_the_static_network(trained):
    ds, backbone, task = trained
    method = create_method("msdnet").fit(task)
    point = resolve_points(method, task, [0.6])[0]
    assert point.budget == 0.6 and not point.infeasible
    st = backbone.stages()
    # the timing denominator is the static network: every block, then the last classifier only
    x = to_tensor(ds.test_x[:8], TINY.img_size)
    with torch.no_grad():
        assert torch.equal(st.static_forward(x), backbone.model(x)[-1])
    t = timing_metrics(st, method, point, ds.test_x, TINY.img_size, batch_size=64, n_latency=3, repeats=2)
    assert 0 < t["latency_ms"] <= t["latency_ms_p90"] and t["throughput"] > 0 and t["wall_rel"] > 0


def test_boostednet_on_its_boosted_msdnet_combines_the_networks_heads(trained):
    ds, backbone, task = trained
    m = create_method("boostednet").fit(task)
    feats = task.splits["test"].features
    w, b = task.exit_heads
    f = [feats[k] @ w[k] + b[k] for k in range(3)]
    want = torch.stack(boosted_ensemble(f, 0.5))
    if backbone.plugin is BoostedMSDNet:
        torch.testing.assert_close(m.exit_logits(task.splits["test"]), want)
    else:  # on the plain MSDNet it trains its own boosted heads on the frozen features
        assert m.val_accuracy_ is not None and not torch.allclose(m.exit_logits(task.splits["test"]), want)


def test_jeidnn_on_msdnet_starts_its_ims_from_the_networks_classifiers(trained):
    ds, backbone, task = trained
    m = create_method("jeidnn", {"warmup_epochs": 0, "epochs": 1, "lambdas": [0.1]}).fit(task)
    w, b = task.exit_heads
    assert torch.equal(m.warm_w_, w[:-1]) and torch.equal(m.warm_b_, b[:-1])


# ---- the command line: methods x backbones ---------------------------------------------------------------------
def _tiny_msdnet(prefix: str) -> list[str]:
    """``--set PREFIX.FIELD=V`` for the tiny MSDNet (2 epochs): ``backbone`` when it is the run's backbone,
    ``backbone.msdnet`` / ``backbone.msdnet-boosted`` for a network a method brings."""
    fields = dict(img_size=16, n_blocks=3, channels=4, growth_rate=2, classifier_channels=16, epochs=2)
    return [a for k, v in fields.items() for a in ("--set", f"{prefix}.{k}={v}")]


VIT_TINY = ["--set", "backbone.depth=3", "--set", "backbone.embed_dim=32", "--set", "backbone.num_heads=2",
            "--set", "backbone.epochs=3"]  # the tiny ViT of tests/test_cli_end_to_end.py: trained once (shared_cache)
PLAIN, BOOSTED, VIT = "msdnet-b3-c4-g2-16px", "msdnet-boosted-b3-c4-g2-16px", "vit-d3-w32-p2-8px"


def _run(tmp_path, shared_cache, *args):
    from bench.cli import main
    from bench.results.files import read_metrics

    out = tmp_path / "out"
    rc = main(["run", "--dataset", "digits", "--cache-dir", str(shared_cache), "--out", str(out),
               "--budgets", "0.5,1.0", *args])
    assert rc == 0
    return read_metrics(out)


def test_backbone_msdnet_runs_every_method_on_msdnet_exits(tmp_path, shared_cache):
    df = _run(tmp_path, shared_cache, "--backbone", "msdnet", "--methods", "msdnet,boostednet,threshold,patience",
              *_tiny_msdnet("backbone"), *_tiny_msdnet("backbone.msdnet-boosted"), "--set", "patience.epochs=3")
    by_method = df.groupby("method")["backbone"].unique().to_dict()
    assert set(by_method) == {"static", "msdnet", "boostednet", "threshold", "patience"}
    assert {m: list(v) for m, v in by_method.items()} == {
        "static": [PLAIN], "msdnet": [PLAIN], "threshold": [PLAIN], "patience": [PLAIN], "boostednet": [BOOSTED]}
    # the same exits under two rules: MSDNet's r^k protocol and the harness's shared threshold
    params = df[(df["method"] == "msdnet") & (df["metric"] == "accuracy")]["params"].iloc[0]
    assert '"scheme":"geometric"' in params and '"ratio":' in params
    params = df[(df["method"] == "threshold") & (df["metric"] == "accuracy")]["params"].iloc[0]
    assert '"scheme":"shared"' in params
    macs = df[(df["split"] == "test") & (df["metric"] == "macs") & df["exit"].isna()]
    assert macs[macs["method"] == "static"]["value"].nunique() == 1  # one network, one static cost


def test_msdnet_method_on_a_vit_run_brings_its_own_network(tmp_path, shared_cache):
    df = _run(tmp_path, shared_cache, "--methods", "msdnet,threshold", *VIT_TINY, *_tiny_msdnet("backbone.msdnet"),
              "--set", "threshold.epochs=3")
    statics = df[df["method"] == "static"]["backbone"].unique()
    assert sorted(statics) == [PLAIN, VIT]
    assert df[df["method"] == "msdnet"]["backbone"].unique().tolist() == [PLAIN]
    assert df[df["method"] == "threshold"]["backbone"].unique().tolist() == [VIT]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"msdnet @ {PLAIN}" in summary and f"threshold @ {VIT}" in summary
    # bench report keeps both static networks apart and plots absolute MACs (macs_rel has two denominators)
    from bench.cli import main
    from bench.results.plots import plot_metric_vs_cost
    from bench.results.report import aggregate, load_runs

    agg = aggregate(load_runs([tmp_path / "out"]))
    statics = agg[(agg["method"] == "static") & (agg["metric"] == "accuracy")]
    assert sorted(statics["label"]) == [f"static backbone @ {PLAIN}", f"static backbone @ {VIT}"]
    fig = plot_metric_vs_cost(agg, "accuracy")
    assert fig.axes[0].get_xlabel().startswith("MACs per image, millions")
    xmax = max(line.get_xdata().max() for line in fig.axes[0].get_lines() if len(line.get_xdata()))
    assert xmax > 0.1  # millions of MACs, not a fraction
    assert main(["report", str(tmp_path / "out"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "accuracy_vs_cost.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--backbone", "msdnet", "--set", "backbone.n_blocks=0"], "n_blocks must be >= 1"),
    (["--backbone", "msdnet", "--set", "backbone.depth=3"], "backbone has no field 'depth'"),
    (["--set", "backbone.msdnet.depth=3"], "backbone.msdnet has no field 'depth'"),
    # msdnet.FIELD is the method's hyper-parameter; the network is configured through backbone.*
    (["--backbone", "msdnet", "--set", "msdnet.epochs=4"], "msdnet has no field 'epochs'"),
    (["--backbone", "msdnet", "--methods", "boostednet", "--set", "backbone.msdnet-boosted.boost_weight=0.3",
      "--set", "boostednet.boost_weight=0.4"], "disagrees"),
    (["--methods", "msdnet", "--set", "msdnet.scheme=bisect"], "scheme must be one of"),
    (["--methods", "threshold", "--set", "msdnet.epochs=4"], "neither 'backbone' nor one of the methods"),
    (["--methods", "threshold", "--set", "backbone.msdnet.epochs=4"], "'msdnet' is not a network of this run"),
    (["--backbone", "msdnet", "--pretrained"], "backbone 'msdnet' has no pretrained weights"),
    (["--backbone", "msdnet", "--methods", "boostednet", "--set", "backbone.boost_weight=0.3"],
     "backbone has no field 'boost_weight'"),
])
def test_msdnet_user_errors_exit_2(tmp_path, capsys, args, message):
    from bench.cli import main

    methods = [] if "--methods" in args else ["--methods", "msdnet"]
    rc = main(["run", "--dataset", "digits", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"),
               *methods, *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()  # refused before any work


def test_the_image_folder_default_is_the_measured_configuration():
    """The MSDNet default for image folders is the network and recipe of the committed CIFAR-10 photo run that
    measured it (results/data/cifar10-jpeg-msdnet-c16-e13-cpu), not the 300-epoch published configuration."""
    run = json.loads((Path(__file__).parents[1] / "results/data/cifar10-jpeg-msdnet-c16-e13-cpu/run.json").read_text())
    measured = run["config"]["resolved_backbones"]["msdnet"]
    default = dataclasses.asdict(MSDNetBackbone.default_config("imagefolder"))
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in default.items()} == \
        {k: v for k, v in measured.items() if k in default}
    assert MSDNetBackbone.default_config("imagefolder") != MSDNetConfig()
