"""SDN (methods/sdn.py) against the authors' code, and its networks trained on digits.

``tests/data/sdn_official.npz`` (made from yigitcankaya/Shallow-Deep-Networks ``model_funcs.py`` and gmum/Zero-Time-
Waste ``ztw_cv``; how, in the .md beside it) holds SDN's IC-weight schedule per epoch, the losses of
``sdn_training_step`` / ztw_cv's training loop on fixed logits and targets (and their gradients), and ztw_cv's ViT IC
head on fixed weights and tokens. Floats must match to float32 rounding.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.backbones.base import BACKBONES, to_tensor
from bench.core.interface import create_method, resolve_points, stream_exits
from bench.core.task import synthetic_task
from bench.pipeline.config import RunConfig
from bench.pipeline.tasks import backbone_key, load_task
from methods.sdn import (SDNMSDNet, SDNViT, SDNViTConfig, _epoch_loss, ic_max_weights, ic_weights, sdn_loss,
                         sdn_vit_forward)
from tests._early_exit_check import assert_real_equals_simulated

REF = Path(__file__).parent / "data" / "sdn_official.npz"
F32 = dict(rtol=1.2e-7, atol=1e-9)  # float32 rounding
# 4-pixel patches on 8 px digits: 5 epochs reach 0.7-0.9 validation accuracy at every exit in seconds
TINY_FIELDS = dict(img_size=8, patch_size=4, embed_dim=32, depth=3, num_heads=2, epochs=5, batch_size=32, lr=3e-3,
                   warmup_epochs=0.5, augment="none")


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REF, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---- against the authors' code -----------------------------------------------------------------------------
def test_ic_weight_schedule_equals_sdn_train(ref):
    """tau_i per epoch, as ``model_funcs.sdn_train`` hands them to the training step, for 100 and 7 epochs."""
    np.testing.assert_allclose(ic_max_weights(6), [0.15, 0.3, 0.45, 0.6, 0.75, 0.9], **F32)
    for epochs in (100, 7):
        ours = np.stack([ic_weights(e, epochs, ic_max_weights(6)) for e in range(1, epochs + 1)])
        np.testing.assert_allclose(ours, ref[f"coeffs_epochs{epochs}"], **F32)


def _loss_and_grad(ref, mode, weights=None):
    t = torch.from_numpy(ref["logits"]).clone().requires_grad_(True)
    loss = sdn_loss(list(t), torch.from_numpy(ref["targets"]), mode, weights)
    loss.backward()
    return float(loss.detach()), t.grad.numpy()


def test_weighted_loss_equals_sdn_training_step(ref):
    loss, grad = _loss_and_grad(ref, "weighted", ref["loss_coeffs"])
    np.testing.assert_allclose(loss, ref["sdn_weighted_loss"], **F32)
    np.testing.assert_allclose(grad, ref["sdn_weighted_grad"], **F32)


def test_mean_loss_equals_ztw_cv_training_loop(ref):
    loss, grad = _loss_and_grad(ref, "mean")
    np.testing.assert_allclose(loss, ref["ztw_mean_loss"], **F32)
    np.testing.assert_allclose(grad, ref["ztw_mean_grad"], **F32)
    # SDN's IC-only objective (our fallback's shared heads) is the plain sum of the ICs' cross-entropies
    ic_only = sum(float(torch.nn.functional.cross_entropy(o, torch.from_numpy(ref["targets"])))
                  for o in torch.from_numpy(ref["logits"])[:-1])
    np.testing.assert_allclose(ic_only, ref["sdn_ic_only_loss"], rtol=1e-6)


def test_vit_ic_equals_ztw_vit_standard_head(ref):
    """The vit-sdn plugin's IC (its exit feature of block 0, through the IC weights ``heads`` reports) on the
    fixed tokens equals ztw_cv's ``vit_standard_head``: the raw CLS token through a Linear, no LayerNorm."""
    cfg = SDNViTConfig(img_size=4, patch_size=2, embed_dim=12, depth=2, num_heads=2)
    model = SDNViT.create(cfg, in_chans=1, num_classes=10, load_weights=False).eval()
    with torch.no_grad():
        model.sdn_heads[0].weight.copy_(torch.from_numpy(ref["head_weight"]))
        model.sdn_heads[0].bias.copy_(torch.from_numpy(ref["head_bias"]))
        feat = SDNViT.stages(model).exit_feature(0, torch.from_numpy(ref["head_tokens"]))
        w, b = SDNViT.heads(model).exits
        np.testing.assert_allclose((feat @ w[0] + b[0]).numpy(), ref["head_out"], rtol=1e-6, atol=1e-6)
        # the last exit is the ViT's own: CLS after the final LayerNorm, the network's head
        assert torch.equal(w[-1], model.head.weight.T) and torch.equal(b[-1], model.head.bias)


def test_training_loss_follows_the_schedule_epoch_by_epoch():
    """The loss the networks train on is SDN's at the current epoch: the hook advances tau after each epoch."""
    cfg = SDNViTConfig(epochs=5)
    loss, after_epoch = _epoch_loss(cfg, 3)
    g = torch.Generator().manual_seed(0)
    outs, y = list(torch.randn(4, 8, 5, generator=g)), torch.randint(0, 5, (8,), generator=g)
    for epoch in range(1, 6):
        want = sdn_loss(outs, y, "weighted", ic_weights(epoch, 5, ic_max_weights(3)))
        assert torch.equal(loss(outs, y), want)
        after_epoch()
    mean_loss, _ = _epoch_loss(dataclasses.replace(cfg, sdn_loss="mean"), 3)
    assert torch.equal(mean_loss(outs, y), sdn_loss(outs, y, "mean"))


# ---- configuration --------------------------------------------------------------------------------------------
def test_networks_and_cache_keys_carry_the_sdn_fields():
    vit = RunConfig(methods=["sdn", "threshold"], dataset="digits", overrides={"sdn": {"sdn_loss": "mean"}})
    assert vit.networks() == ["vit", "vit-sdn"]
    cfg = vit.backbone_config("vit-sdn")
    assert cfg.sdn_loss == "mean" and cfg.depth == vit.backbone_config("vit").depth
    assert BACKBONES.get("vit-sdn").label(cfg) == "vit-d6-w64-p2-8px-sdn-mean"
    default = RunConfig(methods=["sdn"], dataset="digits").backbone_config("vit-sdn")
    keys = {backbone_key(SDNViT, c, "digits", "s", 0, "d") for c in
            (cfg, default, dataclasses.replace(default, ic_max_weight=0.5))}
    assert len(keys) == 3
    assert RunConfig(methods=["sdn"], backbone="msdnet").method_backbone("sdn") == "msdnet-sdn"
    assert RunConfig(methods=["sdn"], backbone="vit-scratch").method_backbone("sdn") == "vit-scratch-sdn"
    # the run's --backbone NAME, --pretrained and --set backbone.FIELD reach the SDN network (the same architecture
    # and starting weights, trained the SDN way)
    timm = RunConfig(methods=["sdn"], dataset="cifar10", backbone="deit_tiny_patch16_224", pretrained=True,
                     overrides={"backbone": {"epochs": 2}})
    sdn_cfg, run_cfg = timm.backbone_config("vit-sdn"), timm.backbone_config("vit")
    assert (sdn_cfg.model, sdn_cfg.pretrained, sdn_cfg.epochs) == (run_cfg.model, run_cfg.pretrained,
                                                                   run_cfg.epochs) == ("deit_tiny_patch16_224", True, 2)


def test_ic_only_on_a_single_exit_network():
    task = synthetic_task()
    m = create_method("sdn").fit(task)
    assert m.ic_only_ and m.exit_logits(task.splits["test"]).shape == (4, 200, 5)
    assert np.array_equal(m.costs_, create_method("threshold").fit(task).costs_)


# ---- trained tiny SDNs on digits ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = RunConfig(methods=["sdn"], dataset="digits", cache_dir=str(tmp_path_factory.mktemp("cache")),
                    overrides={"backbone": TINY_FIELDS})
    loaded = load_task(cfg, seed=0, network=cfg.method_backbone("sdn"))
    assert loaded.backbone.plugin is SDNViT and loaded.task.backbone == "vit-d3-w32-p4-8px-sdn"
    return loaded


def test_tiny_vit_sdn_trains(trained):
    """Training lowers SDN's loss (at the last epoch's weights) on the training images, and every IC learns."""
    ds, model, cfg = trained.dataset, trained.backbone.model, trained.backbone.config
    x = to_tensor(ds.train_x[trained.splits.train], cfg.img_size)
    y = torch.from_numpy(ds.train_y[trained.splits.train])
    torch.manual_seed(0)
    fresh = SDNViT.create(cfg, in_chans=x.shape[1], num_classes=10).eval()
    w = ic_weights(cfg.epochs, cfg.epochs, ic_max_weights(2))
    with torch.no_grad():
        before = float(sdn_loss(sdn_vit_forward(fresh, x), y, "weighted", w))
        after = float(sdn_loss(sdn_vit_forward(model, x), y, "weighted", w))
    assert after < 0.5 * before, (before, after)
    hist = trained.backbone.history
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    best = hist[trained.backbone.best_epoch]
    assert len(best["val_exit_accuracy"]) == 3 and min(best["val_exit_accuracy"]) > 0.5


def test_cached_features_through_the_ics_are_the_networks_exits(trained):
    ds, model, task = trained.dataset, trained.backbone.model, trained.task
    w, b = task.exit_heads
    assert w.shape == (3, 32, 10) and b.shape == (3, 10)
    with torch.no_grad():
        outs = sdn_vit_forward(model, to_tensor(ds.test_x[:50], 8))
    feats = task.splits["test"].features
    for k in range(3):
        torch.testing.assert_close(feats[k, :50] @ w[k] + b[k], outs[k], atol=1e-5, rtol=1e-5)
    m = create_method("sdn").fit(task)
    assert not m.ic_only_
    torch.testing.assert_close(m.exit_logits(task.splits["test"])[0], feats[0] @ w[0] + b[0])
    # cost: blocks, each IC (D*C) and decision (2C) on the way; the static network's head at the last exit
    per_exit = 32 * 10 + 2 * 10
    np.testing.assert_array_equal(m.costs_, task.macs.cumulative_blocks() + per_exit * np.array([1, 2, 2])
                                  + np.array([0, 0, task.macs.head]))


def test_stream_equals_decide_and_the_real_runner(trained):
    ds, backbone, task = trained.dataset, trained.backbone, trained.task
    m = create_method("sdn").fit(task)
    feats = task.splits["test"].features
    for point in resolve_points(m, task, [0.4, 0.7]):
        if point.infeasible:
            continue
        exits, _ = stream_exits(m, feats, point)
        assert np.array_equal(exits, m.decide(m.exit_logits(task.splits["test"]), point))
    checked = assert_real_equals_simulated(backbone.model, backbone.stages(), m, task, to_tensor(ds.test_x, 8),
                                           [0.4, 0.6, 0.8])
    assert checked >= 2


def test_tiny_msdnet_sdn_trains(tmp_path_factory):
    fields = dict(img_size=16, n_blocks=3, channels=4, growth_rate=2, classifier_channels=16, epochs=3,
                  batch_size=64, lr=0.05, augment="none")
    cfg = RunConfig(methods=["sdn"], dataset="digits", backbone="msdnet",
                    cache_dir=str(tmp_path_factory.mktemp("cache")), overrides={"backbone": fields})
    loaded = load_task(cfg, seed=0, network=cfg.method_backbone("sdn"))
    assert loaded.backbone.plugin is SDNMSDNet and loaded.task.backbone == "msdnet-sdn-b3-c4-g2-16px"
    hist = loaded.backbone.history
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] and min(hist[-1]["val_exit_accuracy"]) > 0.2
    m = create_method("sdn").fit(loaded.task)
    assert not m.ic_only_ and torch.equal(m.heads_.weight, loaded.task.exit_heads[0][:-1])
