"""``vit`` — a timm Vision Transformer with an exit after every block.

Exit k reads block k's CLS token after the backbone's final LayerNorm (JEI-DNN's choice), so the last exit's
feature fed to the backbone's own head reproduces ``model(x)`` exactly. The staged forward here
(``embed`` -> ``blocks[k]`` -> ``exit_feature``) is the one code path for feature caching and real early exit.
``--backbone vit_small_patch16_224`` (any timm ViT/DeiT name) selects a timm architecture by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench.backbones.base import (AUGMENTATIONS, Backbone, Heads, fit_epochs, register_backbone,
                                  to_tensor)
from bench.base.errors import UserError
from bench.base.fields import bounded, choice
from bench.base.registry import unknown_name_message
from bench.measure.flops import ExitMacs, analytic_vit_macs, fvcore_vit_macs

# timm model families with the ViT block structure this plugin drives (patch_embed, _pos_embed, blocks, norm)
VIT_FAMILIES = ("vit_", "deit_", "deit3_")


@dataclass
class ViTConfig:
    """Everything that determines a trained ViT (besides data, split and seed)."""

    model: str = "vit_tiny_patch16_224"  # timm name; the fields below override its architecture
    img_size: int = bounded(32, min=1)
    patch_size: int = bounded(4, min=1)
    embed_dim: int = bounded(192, min=1)
    depth: int = bounded(12, min=1)
    num_heads: int = bounded(3, min=1)
    mlp_ratio: float = bounded(4.0, min=0.0)
    pretrained: bool = False  # fine-tune timm's pretrained weights instead of training from scratch
    epochs: int = bounded(30, min=1)
    batch_size: int = bounded(128, min=1)
    lr: float = bounded(1e-3, min=0.0)
    weight_decay: float = bounded(0.05, min=0.0)
    warmup_epochs: float = bounded(1.0, min=0.0)
    label_smoothing: float = bounded(0.0, min=0.0, max=1.0)
    augment: str = choice("none", AUGMENTATIONS)
    eval_batch_size: int = bounded(512, min=1)


@register_backbone("vit")
class ViT(Backbone):
    """A timm ViT trained from scratch (small per-dataset defaults) or fine-tuned from timm's weights."""

    Config = ViTConfig
    # Small defaults that train on 2 CPU cores in minutes and reach a useful accuracy.
    defaults = {
        # digits: 1,149 training images; crop augmentation and 120 epochs lift test accuracy from about 0.90 to
        # 0.95-0.97 over seeds 0-2 (80 epochs: 0.933-0.944), about a minute on 2 cores. No label smoothing: it
        # caps the final head's confidence near 0.91, so JEI-DNN's CE-argmin exit targets sent 75 % of the
        # samples the final head got right to earlier, more confident heads.
        "digits": ViTConfig(img_size=8, patch_size=2, embed_dim=64, depth=6, num_heads=4, epochs=120,
                            batch_size=64, lr=1e-3, augment="crop"),
        "fashion-mnist": ViTConfig(img_size=28, patch_size=7, embed_dim=128, depth=6, num_heads=4, epochs=8,
                                   batch_size=128, lr=1e-3),
        "cifar10": ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, epochs=100,
                             augment="crop_flip"),
        "cifar100": ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, epochs=100,
                              augment="crop_flip"),
        "cifar100-lt": ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, epochs=100,
                                 augment="crop_flip"),
        "svhn": ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, epochs=40,
                          augment="crop"),
    }

    @classmethod
    def from_name(cls, name: str) -> dict | None:
        import timm  # slow to import: only when a name must be resolved

        if name.startswith(VIT_FAMILIES) and timm.is_model(name):
            return {"model": name}
        return None

    @classmethod
    def validate(cls, cfg: ViTConfig) -> None:
        import timm

        if not cfg.model.startswith(VIT_FAMILIES) or not timm.is_model(cfg.model):
            known = [m for m in timm.list_models() if m.startswith(VIT_FAMILIES)]
            raise UserError(unknown_name_message("timm ViT", cfg.model, known))
        cls.create(cfg, in_chans=1, num_classes=2, load_weights=False)

    @classmethod
    def create(cls, cfg: ViTConfig, in_chans: int, num_classes: int, load_weights: bool = True) -> torch.nn.Module:
        """Build the timm model. With ``cfg.pretrained`` the architecture is the named model's own (only input
        size, channels and classifier adapt) and, if ``load_weights``, its pretrained weights are fetched."""
        import timm

        if cfg.pretrained:
            kwargs = dict(img_size=cfg.img_size, in_chans=in_chans, num_classes=num_classes)
        else:
            kwargs = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=in_chans,
                          embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                          mlp_ratio=cfg.mlp_ratio, num_classes=num_classes)
        try:
            return timm.create_model(cfg.model, pretrained=cfg.pretrained and load_weights, **kwargs)
        except Exception as e:  # unknown names, inconsistent sizes, unreachable hub: all fixable by the user
            if cfg.pretrained and load_weights:
                raise UserError(
                    f"Pretrained weights for {cfg.model!r} could not be loaded ({type(e).__name__}: {e}). They come "
                    "from the Hugging Face hub: connect to the network, put them in the HF cache "
                    "(HF_HOME), or drop --pretrained to train from scratch.") from None
            raise UserError(f"Could not build backbone {cfg.model!r} with {kwargs} ({type(e).__name__}: {e}). "
                            "Check --backbone and the --set backbone.FIELD values (e.g. embed_dim must be "
                            "divisible by num_heads, img_size by patch_size).") from None

    @classmethod
    def train(cls, cfg: ViTConfig, train_x, train_y, val_x, val_y, num_classes, seed, device="cpu",
              desc="backbone"):
        """AdamW, linear warm-up and cosine decay per step; the epoch with the best validation accuracy."""
        torch.manual_seed(seed)
        model = cls.create(cfg, in_chans=train_x.shape[-1], num_classes=num_classes).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
        total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)

        def set_lr(step: int) -> None:
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, warmup, cfg.lr)

        def validate() -> tuple[float, dict]:
            return (predict_logits(model, val_x, cfg, device).argmax(1).numpy() == val_y).mean().item(), {}

        return fit_epochs(model, opt, cfg, train_x, train_y, seed, device, desc,
                          lambda xb, yb: F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing),
                          validate, before_step=set_lr)

    @classmethod
    def stages(cls, model) -> "ViTStages":
        return ViTStages(model)

    @classmethod
    def macs(cls, model) -> ExitMacs:
        """Per-block MACs from fvcore (attention included), checked against the analytic count (the arbiter)."""
        counted, analytic = fvcore_vit_macs(model), analytic_vit_macs(model)
        if abs(counted.static - analytic.static) > 0.01 * analytic.static:
            raise RuntimeError(f"fvcore ({counted.static}) and analytic ({analytic.static}) MACs differ by > 1 %")
        return counted

    @classmethod
    def heads(cls, model) -> Heads:
        return Heads(model.head.weight.detach().cpu().float(), model.head.bias.detach().cpu().float())

    @classmethod
    def label(cls, cfg: ViTConfig) -> str:
        if cfg.pretrained:
            return f"{cfg.model}-pretrained-{cfg.img_size}px"
        return f"vit-d{cfg.depth}-w{cfg.embed_dim}-p{cfg.patch_size}-{cfg.img_size}px"


# ---- the staged forward -------------------------------------------------------------------------------
def embed(model, x: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] -> tokens [N, T, D] (patch embedding, class token, position embedding)."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def exit_feature(model, h: torch.Tensor) -> torch.Tensor:
    """Tokens [N, T, D] after a block -> the exit feature [N, D]: CLS token after the final LayerNorm."""
    return model.norm(h)[:, 0]


def head_logits(model, feat: torch.Tensor) -> torch.Tensor:
    """The backbone's own head on a final exit feature [N, D] -> logits [N, C]."""
    return model.head(model.fc_norm(feat))


class ViTStages:
    """The staged-forward protocol (``bench.backbones.base.Stages``) over a timm ViT."""

    def __init__(self, model):
        self.model = model

    @property
    def num_exits(self) -> int:
        return len(self.model.blocks)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return embed(self.model, x)

    def block(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.model.blocks[k](h)

    def exit_feature(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return exit_feature(self.model, h)

    @staticmethod
    def select(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return h[keep]

    def static_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ---- training -------------------------------------------------------------------------------------------
def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def predict_logits(model, x_uint8: np.ndarray, cfg: ViTConfig, device: str = "cpu") -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(x_uint8), cfg.eval_batch_size):
        xb = to_tensor(x_uint8[i:i + cfg.eval_batch_size], cfg.img_size).to(device)
        out.append(model(xb).float().cpu())
    return torch.cat(out)
