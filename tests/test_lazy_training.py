"""Training and prediction on streamed images (``datasets.lazy``) give exactly what the in-memory arrays give:
the same images in the same shuffled order with the same crop and flip draws, so the same weights bit for bit,
while the streamed training set is decoded a batch at a time and never held whole."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bench.backbones.msdnet import MSDNetBackbone, MSDNetConfig, predict_exit_logits
from bench.backbones.vit import ViT, ViTConfig, predict_logits
from bench.pipeline.features import compute_features, feature_batches
from datasets import LazyImages, lazy, take
from tests.test_lazy_images import isolated, load, make_folder, streamed  # noqa: F401  (isolated: autouse)

VIT = ViTConfig(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, epochs=2, batch_size=8,
                augment="crop_flip", eval_batch_size=5)


@pytest.fixture
def pair(tmp_path, monkeypatch):
    """The same image folder in memory and streamed (decoded in 2 worker processes)."""
    make_folder(tmp_path / "zoo", n=10)
    monkeypatch.setenv(lazy.WORKERS_ENV_VAR, "2")
    memory = load(tmp_path / "zoo", tmp_path / "cache")
    lazy_ds = streamed(tmp_path / "zoo", tmp_path / "cache-streamed", monkeypatch)
    assert isinstance(lazy_ds.train_x, LazyImages) and isinstance(memory.train_x, np.ndarray)
    return memory, lazy_ds


def _train(plugin, cfg, ds):
    tr, va = np.arange(0, len(ds.train_y), 2), np.arange(1, len(ds.train_y), 2)
    return plugin.train(cfg, take(ds.train_x, tr), ds.train_y[tr], take(ds.train_x, va), ds.train_y[va],
                        ds.num_classes, seed=3)


def test_vit_trained_on_streamed_images_has_the_in_memory_weights(pair):
    memory, streamed_ds = pair
    a_model, a_acc, a_epoch, a_hist = _train(ViT, VIT, memory)
    b_model, b_acc, b_epoch, b_hist = _train(ViT, VIT, streamed_ds)
    assert (a_acc, a_epoch) == (b_acc, b_epoch)
    assert [h["train_loss"] for h in a_hist] == [h["train_loss"] for h in b_hist]
    for (name, a), b in zip(a_model.state_dict().items(), b_model.state_dict().values()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(predict_logits(a_model, memory.test_x, VIT),
                               predict_logits(a_model, streamed_ds.test_x, VIT), rtol=0, atol=0)


def test_a_different_order_would_change_the_weights(pair):
    """The equality above is not vacuous: streaming the training images in another order changes the weights."""
    memory, _ = pair
    tr = np.arange(0, len(memory.train_y), 2)
    base = ViT.train(VIT, memory.train_x[tr], memory.train_y[tr], memory.train_x[tr], memory.train_y[tr],
                     memory.num_classes, seed=3)[0]
    rolled = ViT.train(VIT, memory.train_x[np.roll(tr, 1)], memory.train_y[np.roll(tr, 1)], memory.train_x[tr],
                       memory.train_y[tr], memory.num_classes, seed=3)[0]
    assert not torch.equal(base.head.weight, rolled.head.weight)


def test_msdnet_exit_logits_on_streamed_images_equal_the_arrays(pair):
    memory, streamed_ds = pair
    cfg = dataclasses.replace(MSDNetConfig(), img_size=12, epochs=1, batch_size=8, eval_batch_size=5)
    model = MSDNetBackbone.create(cfg, memory.train_x.shape[-1], memory.num_classes).eval()
    torch.testing.assert_close(predict_exit_logits(model, memory.test_x, cfg),
                               predict_exit_logits(model, streamed_ds.test_x, cfg), rtol=0, atol=0)


def test_exit_features_of_streamed_images_equal_the_arrays(pair):
    """The feature cache's pass decodes streamed images in workers, in ranges too (a Dask shard's rows)."""
    memory, streamed_ds = pair
    model = ViT.create(VIT, in_chans=3, num_classes=memory.num_classes).eval()
    st = ViT.stages(model)
    whole = compute_features(st, memory.train_x, VIT.img_size, batch_size=4)
    assert whole.shape == (VIT.depth, len(memory.train_y), VIT.embed_dim)
    torch.testing.assert_close(compute_features(st, streamed_ds.train_x, VIT.img_size, batch_size=4), whole,
                               rtol=0, atol=0)
    rows = [(i, f) for i, f in feature_batches(st, streamed_ds.train_x, VIT.img_size, 4, start=8, stop=20)]
    assert [i for i, _ in rows] == [8, 12, 16]
    torch.testing.assert_close(torch.cat([f for _, f in rows], dim=1), whole[:, 8:20], rtol=0, atol=0)
