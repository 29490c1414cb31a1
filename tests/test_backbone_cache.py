"""The staged forward matches timm, and the checkpoint / feature caches never serve a stale or broken file."""
import dataclasses

import pytest
import torch

from bench.backbones.base import (apply_augmentation, augment_batch, block_features, epoch_draws,
                                  to_tensor)
from bench.backbones.vit import ViT, ViTConfig, head_logits
from bench.pipeline import features as F
from bench.pipeline.tasks import backbone_key, load_or_train_backbone
from bench.pipeline.splits import make_splits
from datasets import load_dataset

TINY = ViTConfig(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=2, epochs=2, batch_size=128)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_staged_forward_equals_timm(digits):
    torch.manual_seed(0)
    model = ViT.create(TINY, in_chans=1, num_classes=10).eval()
    x = to_tensor(digits.test_x[:16], 8)
    feats = block_features(ViT.stages(model), x)
    assert feats.shape == (3, 16, 32)
    with torch.no_grad():
        assert torch.allclose(head_logits(model, feats[-1]), model(x), atol=1e-6)
        inter = model.forward_intermediates(x, indices=3, norm=True, intermediates_only=True,
                                            output_fmt="NLC", return_prefix_tokens=True)
    for k, (tokens, prefix) in enumerate(inter):
        # timm applies the final norm to the whole sequence; the CLS token is its prefix token
        assert torch.allclose(prefix[:, 0], feats[k], atol=1e-5)


def test_features_do_not_depend_on_batch_composition(digits):
    torch.manual_seed(0)
    model = ViT.create(TINY, in_chans=1, num_classes=10).eval()
    x = to_tensor(digits.test_x[:32], 8)
    full = block_features(ViT.stages(model), x)
    part = block_features(ViT.stages(model), x[5:9])
    assert torch.allclose(full[:, 5:9], part, atol=1e-6)


def test_checkpoint_cache_reuses_and_rebuilds(tmp_path, digits, monkeypatch, caplog):
    splits = make_splits(digits.train_y, len(digits.test_y), 0)
    calls = []
    real = ViT.train.__func__
    monkeypatch.setattr(ViT, "train", classmethod(lambda cls, *a, **k: calls.append(1) or real(cls, *a, **k)))
    first = load_or_train_backbone(tmp_path, ViT, TINY, digits, splits)
    second = load_or_train_backbone(tmp_path, ViT, TINY, digits, splits)
    assert len(calls) == 1 and first.key == second.key
    x = to_tensor(digits.test_x[:8], 8)
    assert torch.equal(first.model(x), second.model(x))
    (ckpt,) = list((tmp_path / "backbones").glob("*.pt"))
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated
    third = load_or_train_backbone(tmp_path, ViT, TINY, digits, splits)
    assert len(calls) == 2 and "unusable" in caplog.text
    assert torch.equal(third.model(x), first.model(x))  # retraining is deterministic
    other = load_or_train_backbone(tmp_path, ViT, dataclasses.replace(TINY, epochs=1), digits, splits)
    assert len(calls) == 3 and other.key != first.key


def test_feature_cache_detects_corruption_and_foreign_keys(tmp_path, digits, monkeypatch, caplog):
    """Through a trained backbone: computed once, then read back; a damaged split file is gathered again from the
    shards, a damaged shard or a foreign header recomputes that array. (Every kind of damage, the hashing rules
    and the memory mapping: tests/test_feature_store.py.)"""
    splits = make_splits(digits.train_y, len(digits.test_y), 0)
    backbone = load_or_train_backbone(tmp_path, ViT, TINY, digits, splits)
    calls = []
    real = F.write_feature_range
    monkeypatch.setattr(F, "write_feature_range", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert {k: tuple(v.shape) for k, v in a.items()} == {
        "train": (3, len(splits.train), 32), "val": (3, len(splits.val), 32), "cal": (3, len(splits.cal), 32),
        "test": (3, len(digits.test_y), 32)}
    b = F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert len(calls) == 2 and torch.equal(a["test"], b["test"])  # 2 = train + test arrays, computed once
    want = {k: v.clone() for k, v in a.items()}
    key = F.feature_key(backbone)
    directory = F.feature_dir(tmp_path, digits.name, key)
    path = directory / "split-test.npy"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte (writing it moves the mtime)
    path.write_bytes(bytes(raw))
    c = F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert len(calls) == 2 and "sha256 mismatch" in caplog.text and torch.equal(c["test"], want["test"])
    for group in ("test", "splits"):
        header = F.header_path(directory, group)
        header.write_text(header.read_text().replace(key, "0" * len(key)))
    d = F.load_or_compute_features(tmp_path, backbone, digits, splits)
    assert len(calls) == 3 and "built for key" in caplog.text  # the test array again, not the train array
    assert all(torch.equal(d[k], want[k]) for k in want)


@pytest.mark.parametrize("mode", ["crop", "crop_flip"])
def test_batched_augmentation_equals_the_per_image_crops(mode):
    """The batched crop reads the same random draws as cropping image by image, and gives the same pixels."""
    x = torch.randn(37, 3, 16, 16)
    got = augment_batch(x, mode, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    pad = 2
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
    dy = torch.randint(0, 2 * pad + 1, (37,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (37,), generator=gen).tolist()
    want = torch.stack([xp[i, :, a:a + 16, b:b + 16] for i, (a, b) in enumerate(zip(dy, dx))])
    if mode == "crop_flip":
        flip = torch.rand(37, generator=gen) < 0.5
        want[flip] = want[flip].flip(-1)
    assert torch.equal(got, want)
    assert (got == -1.0).any()  # some crops reach into the padding


@pytest.mark.parametrize("mode", ["none", "crop", "crop_flip"])
def test_epoch_draws_are_the_step_by_step_draws(mode):
    """One epoch's draws, made up front and moved once, are exactly the draws the loop made step by step (the
    permutation, then dy, dx and flip per mini-batch), so a seed trains the same CPU weights as before."""
    n, bs, side = 103, 25, 16
    perm, draws = epoch_draws(n, bs, side, mode, torch.Generator().manual_seed(3), "cpu")
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(perm, torch.randperm(n, generator=gen))
    x = torch.randn(n, 3, side, side)
    for i in range(0, n, bs):
        xb = x[perm[i:i + bs]]
        want = augment_batch(xb, mode, gen)  # the old loop's call, drawing from the generator
        assert torch.equal(apply_augmentation(xb, tuple(d[i:i + bs] for d in draws)), want)
    assert (len(draws) == 0) == (mode == "none")


def test_training_is_bit_identical_for_a_seed(digits):
    """Two CPU trainings with the same seed give bit-identical weights; another seed does not."""
    cfg = dataclasses.replace(TINY, epochs=1, augment="crop_flip")
    x, y = digits.train_x[:300], digits.train_y[:300]

    def train(seed):
        return ViT.train(cfg, x, y, x[:50], y[:50], 10, seed, "cpu")[0].state_dict()

    a, b, c = train(0), train(0), train(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_exit_feature_norms_only_the_class_token(digits):
    """The exit feature LayerNorms the CLS token alone: the same numbers as norming every token, then taking it."""
    torch.manual_seed(0)
    model = ViT.create(TINY, in_chans=1, num_classes=10).eval()
    st = ViT.stages(model)
    with torch.no_grad():
        h = st.block(0, st.embed(to_tensor(digits.test_x[:64], 8)))
        assert torch.allclose(st.exit_feature(0, h), model.norm(h)[:, 0], rtol=0, atol=1e-6)


def test_cache_keys_name_the_device_type_and_precision(digits):
    """A checkpoint trained under CUDA's bf16 autocast, or features computed with TF32, are not a CPU run's."""
    splits = make_splits(digits.train_y, len(digits.test_y), 0)
    keys = {d: backbone_key(ViT, TINY, digits.name, splits.sha256, 0, digits.source, d) for d in ("cpu", "cuda",
                                                                                                 "cuda:1")}
    assert keys["cpu"] != keys["cuda"] and keys["cuda"] == keys["cuda:1"]  # the type, not the card's index
    trained = dataclasses.make_dataclass("B", ["key"])(keys["cpu"])
    assert F.feature_key(trained, "cpu") != F.feature_key(trained, "cuda")


def test_compiled_training_compiles_the_step_and_is_cached_apart(digits, monkeypatch):
    """``--compile``: inside ``compiled_training`` the shared training loop hands its loss to torch.compile (here a
    recorder that returns it unchanged, so the weights are the eager ones), outside it does not; a compiled
    checkpoint has its own cache key, and every other key is what it was (nothing named unless compiled)."""
    from bench.backbones import base

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or fn)
    cfg = dataclasses.replace(TINY, epochs=1)
    x, y = digits.train_x[:200], digits.train_y[:200]
    eager = ViT.train(cfg, x, y, x[:50], y[:50], 10, 0, "cpu")[0].state_dict()
    assert calls == []
    with base.compiled_training():
        recorded = ViT.train(cfg, x, y, x[:50], y[:50], 10, 0, "cpu")[0].state_dict()
    assert len(calls) == 1 and callable(calls[0]) and not base._COMPILE_TRAINING
    assert all(torch.equal(eager[k], recorded[k]) for k in eager)
    splits = make_splits(digits.train_y, len(digits.test_y), 0)
    key = lambda compiled: backbone_key(ViT, TINY, digits.name, splits.sha256, 0, digits.source, "cpu", compiled)
    assert key(True) != key(False)
    assert base.arithmetic("cpu", True) == {"device_type": "cpu", "precision": "fp32"}  # the keys of eager runs
    from bench.cli import build_parser
    from bench.pipeline.config import RunConfig

    assert build_parser().parse_args(["run", "--compile"]).compile
    assert RunConfig(["threshold"], compile=True).run_id != RunConfig(["threshold"]).run_id


@pytest.mark.slow
def test_compiled_training_runs_for_real(digits):
    """A real torch.compile'd training (inductor, minutes on 2 CPU cores): it trains and the validation accuracy
    lands near the eager one's (compiled kernels round differently, so not bit-identical)."""
    from bench.backbones import base

    cfg = dataclasses.replace(TINY, epochs=2)
    x, y = digits.train_x[:600], digits.train_y[:600]
    eager = ViT.train(cfg, x, y, digits.train_x[600:900], digits.train_y[600:900], 10, 0, "cpu")[1]
    with base.compiled_training():
        compiled = ViT.train(cfg, x, y, digits.train_x[600:900], digits.train_y[600:900], 10, 0, "cpu")[1]
    assert abs(compiled - eager) < 0.05, (compiled, eager)
