"""Pretrained timm ViTs (the paper's regime): a local checkpoint through ``--pretrained PATH``, the checkpoint's
architecture, the fine-tuning recipe, timm ViT-family names, and the CPU training-time estimate."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from bench.backbones import base
from bench.backbones.base import BACKBONES, resolve_backbone
from bench.backbones.msdnet import MSDNetBackbone
from bench.backbones.vit import FINETUNE, ViTConfig, checkpoint_architecture
from bench.base.errors import UserError
from bench.base.hashing import file_sha256
from bench.cli import main

VIT = BACKBONES.get("vit")
# vit_tiny_patch16_224 at 16 px: one patch and the class token, so a run on digits takes seconds
TINY = dict(img_size=16, in_chans=1, num_classes=10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.state_dict()


def test_a_local_checkpoint_is_loaded_exactly_and_its_sha256_recorded(checkpoint):
    path, state = checkpoint
    cfg = VIT.configure("digits", {"model": "vit_tiny_patch16_224", "pretrained": True, "weights_file": str(path),
                                   "img_size": 16})
    assert cfg.weights_sha256 == file_sha256(path) and len(cfg.weights_sha256) == 64
    assert VIT.label(cfg) == f"vit_tiny_patch16_224-file-{cfg.weights_sha256[:8]}-16px"
    loaded = VIT.create(cfg, in_chans=1, num_classes=10).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)  # classifier included: it fits the task


def test_a_checkpoint_with_another_class_count_keeps_the_body_and_a_fresh_head(checkpoint):
    path, state = checkpoint
    cfg = VIT.configure("digits", {"pretrained": True, "weights_file": str(path), "img_size": 16})
    loaded = VIT.create(cfg, in_chans=1, num_classes=3).state_dict()
    assert loaded["head.weight"].shape == (3, 192)
    assert all(torch.equal(loaded[k], state[k]) for k in state if not k.startswith("head."))


def test_the_run_records_the_checkpoint(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    rc = main(["run", "--methods", "threshold", "--dataset", "digits", "--backbone", "vit_tiny_patch16_224",
               "--pretrained", str(path), "--set", "backbone.img_size=16", "--set", "backbone.epochs=1",
               "--budgets", "0.5,1.0", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
    assert rc == 0
    backbone = json.loads((tmp_path / "o" / "run.json").read_text())["config"]["resolved_backbones"]["vit"]
    assert backbone["weights_sha256"] == file_sha256(path) and backbone["weights_file"] == str(path)
    # the architecture is the checkpoint's and the recipe the fine-tuning one, as run.json says
    assert (backbone["patch_size"], backbone["embed_dim"], backbone["depth"]) == (16, 192, 12)
    assert {k: backbone[k] for k in FINETUNE if k != "epochs"} == {k: v for k, v in FINETUNE.items() if k != "epochs"}


@pytest.mark.parametrize("args, message", [
    (["--set", "backbone.patch_size=4"], "backbone.patch_size=4 (the checkpoint's: 16)"),
    (["--set", "backbone.depth=6", "--set", "backbone.embed_dim=128"],
     "backbone.embed_dim=128 (the checkpoint's: 192)"),
    (["--pretrained", "/nonexistent/w.safetensors"], "the file does not exist"),
])
def test_conflicts_with_the_checkpoint_exit_2_before_any_work(tmp_path, capsys, args, message):
    argv = ["run", "--methods", "threshold", "--dataset", "digits", "--backbone", "vit_tiny_patch16_224",
            "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), *args]
    if "--pretrained" not in args:
        argv.append("--pretrained")
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_a_wrong_checksum_is_refused(checkpoint):
    path, _ = checkpoint
    with pytest.raises(UserError, match="has sha256"):
        VIT.configure("digits", {"pretrained": True, "weights_file": str(path), "weights_sha256": "0" * 64})


def test_deit_names_are_vit_family_and_their_architecture_is_read_from_timm():
    assert resolve_backbone("deit_tiny_patch16_224") == ("vit", {"model": "deit_tiny_patch16_224"})
    cfg = VIT.configure("digits", {"model": "deit_tiny_patch16_224", "pretrained": True})
    assert (cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size) == (16, 192, 12, 3, 224)
    assert checkpoint_architecture("vit_small_patch16_224.augreg_in21k_ft_in1k")["embed_dim"] == 384


def test_photo_datasets_fine_tune_vit_s16_at_224_and_the_scratch_vit_stays_by_name():
    for dataset in ("cifar10", "cifar100", "svhn"):
        cfg = VIT.configure(dataset, {})
        assert cfg.pretrained and cfg.model == "vit_small_patch16_224.augreg_in21k_ft_in1k"
        assert (cfg.img_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.optimizer) == (224, 384, 12, 6, "sgd")
    assert VIT.configure("svhn", {}).augment == "crop"  # no flips on house numbers
    assert VIT.configure("cifar10", {"model": "vit_base_patch16_384"}).img_size == 384  # each checkpoint its own
    scratch = BACKBONES.get("vit-scratch").configure("cifar100", {})
    assert not scratch.pretrained and BACKBONES.get("vit-scratch").label(scratch) == "vit-d12-w192-p4-32px"
    with pytest.raises(UserError, match="--backbone vit-scratch"):
        VIT.configure("cifar10", {"pretrained": False})
    # from scratch on digits, the dataset's own recipe is unchanged
    assert VIT.configure("digits", {}) == VIT.default_config("digits")
    assert isinstance(VIT.default_config("digits"), ViTConfig)


def test_a_long_cpu_training_prints_its_estimate_and_how_to_shrink_it(monkeypatch, capsys):
    monkeypatch.setattr(base, "ESTIMATE_ABOVE_S", 0.0)
    cfg = VIT.configure("digits", {"depth": 2, "embed_dim": 32, "num_heads": 2, "epochs": 1, "batch_size": 64})
    x = torch.randint(0, 256, (400, 8, 8, 1), dtype=torch.uint8).numpy()
    y = (torch.arange(400) % 10).numpy()
    VIT.train(cfg, x, y, x[:50], y[:50], 10, seed=0, desc="bb")
    out = capsys.readouterr()
    text = out.out + out.err
    assert "bb: about" in text and "1 epochs x 7 steps" in text and "--set backbone.epochs=N" in text
    assert "backbone.depth=N / backbone.embed_dim=N" in text and "growth_rate" not in text
    assert "resumes" not in text  # trained outside the backbone cache: nothing saves its state


def test_the_estimate_names_the_size_fields_of_the_backbone_it_trains(monkeypatch, capsys):
    monkeypatch.setattr(base, "ESTIMATE_ABOVE_S", 0.0)
    cfg = MSDNetBackbone.configure("digits", {"n_blocks": 2, "channels": 4, "growth_rate": 2, "epochs": 1})
    x = torch.randint(0, 256, (400, 16, 16, 1), dtype=torch.uint8).numpy()
    y = (torch.arange(400) % 10).numpy()
    MSDNetBackbone.train(cfg, x, y, x[:50], y[:50], 10, seed=0, desc="bb")
    out = capsys.readouterr()
    text = out.out + out.err
    assert "backbone.n_blocks=N / backbone.channels=N / backbone.growth_rate=N" in text and "embed_dim" not in text


def test_a_short_cpu_training_prints_no_estimate(capsys):
    cfg = VIT.configure("digits", {"depth": 2, "embed_dim": 32, "num_heads": 2, "epochs": 1})
    x = torch.randint(0, 256, (300, 8, 8, 1), dtype=torch.uint8).numpy()
    y = (torch.arange(300) % 10).numpy()
    VIT.train(cfg, x, y, x[:50], y[:50], 10, seed=0, desc="bb")
    out = capsys.readouterr()
    assert "bb: about" not in out.out + out.err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_under_bf16_autocast_learns_and_keeps_fp32_weights():
    cfg = VIT.configure("digits", {"depth": 2, "embed_dim": 32, "num_heads": 2, "epochs": 3, "augment": "crop"})
    from datasets import load_dataset

    d = load_dataset("digits")
    model, val_acc, _, _ = VIT.train(cfg, d.train_x, d.train_y, d.test_x, d.test_y, 10, seed=0, device="cuda")
    assert all(p.dtype == torch.float32 for p in model.parameters()) and val_acc > 0.5
