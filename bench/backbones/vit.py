"""``vit`` — a timm Vision Transformer with an exit after every block (the backbone's card).

Exit k reads block k's CLS token after the backbone's final LayerNorm (JEI-DNN's choice), so the last exit's
feature fed to the backbone's own head reproduces ``model(x)`` exactly. The staged forward here
(``embed`` -> ``blocks[k]`` -> ``exit_feature``) is the one code path for feature caching and real early exit.

- **From scratch** (digits, fashion-mnist, image folders; every dataset with ``--backbone vit-scratch``): a small
  ViT at the images' own size, AdamW with warm-up and cosine decay, per-dataset recipes in ``defaults``.
- **Pretrained** (CIFAR-10/100, SVHN by default, the JEI-DNN paper's regime; any timm ViT-family name with
  ``--pretrained``, or ``--pretrained PATH`` for a local checkpoint loaded by timm, its sha256 recorded): the
  architecture is the checkpoint's (a conflicting ``--set`` exits 2), the images are resized on the device to
  the checkpoint's resolution (224 px for ``*_224``) unless ``img_size`` is set, and the fine-tuning recipe is
  ``FINETUNE``: SGD, momentum 0.9, lr 0.01, no weight decay, clipping at global norm 1, 0.5 warm-up epochs then
  cosine, 5 epochs at batch 128, label smoothing 0.1, crop and flip (the ViT paper's fine-tuning, shortened).
  The default is ``vit_small_patch16_224.augreg_in21k_ft_in1k`` (22 M parameters, 4.6 G MACs at 224 px, about
  T2T-ViT-14's 21.5 M and 4.8 G); ``vit_tiny_patch16_224.augreg_in21k_ft_in1k`` (5.7 M, 1.25 G) is about
  T2T-ViT-7's. Inputs are scaled to [-1, 1] (mean and std 0.5: the augreg checkpoints' own normalisation;
  DeiT's ImageNet statistics differ slightly and fine-tuning absorbs it).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.backbones.base import (AUGMENTATIONS, Backbone, Heads, fit_epochs, fused_optimizer, register_backbone,
                                  to_tensor, warmup_cosine_schedule)
from bench.base.errors import UserError
from bench.base.fields import bounded, check_fields, choice
from bench.base.hashing import file_sha256
from bench.base.registry import unknown_name_message
from bench.measure.flops import ExitMacs, analytic_vit_macs, fvcore_available, fvcore_vit_macs
from datasets import iter_batches

# timm model families with the ViT block structure this plugin drives (patch_embed, _pos_embed, blocks, norm)
VIT_FAMILIES = ("vit_", "deit_", "deit3_")


@dataclass
class ViTConfig:
    """Everything that determines a trained ViT (besides data, split and seed)."""

    model: str = "vit_tiny_patch16_224"  # timm name (a pretrained tag may follow a dot)
    img_size: int = bounded(32, min=1)
    # from scratch these override the named model's architecture; pretrained, they are the checkpoint's own
    patch_size: int = bounded(4, min=1)
    embed_dim: int = bounded(192, min=1)
    depth: int = bounded(12, min=1)
    num_heads: int = bounded(3, min=1)
    mlp_ratio: float = bounded(4.0, min=0.0)
    pretrained: bool = False  # fine-tune pretrained weights (timm's hub, or weights_file) instead of training
    weights_file: str = ""  # a local .safetensors / .pth checkpoint of ``model`` (``--pretrained PATH``)
    weights_sha256: str = ""  # of weights_file: filled in (recorded in run.json and the cache key), or checked
    epochs: int = bounded(30, min=1)
    batch_size: int = bounded(128, min=1)
    optimizer: str = choice("adamw", ("adamw", "sgd"))  # sgd: momentum 0.9
    lr: float = bounded(1e-3, min=0.0)
    weight_decay: float = bounded(0.05, min=0.0)
    warmup_epochs: float = bounded(1.0, min=0.0)
    label_smoothing: float = bounded(0.0, min=0.0, max=1.0)
    clip_grad: float = bounded(0.0, min=0.0)  # clip the gradients' global norm at this value; 0: never
    augment: str = choice("none", AUGMENTATIONS)
    eval_batch_size: int = bounded(512, min=1)


ARCHITECTURE = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
# Fine-tuning a pretrained checkpoint: the ViT paper's recipe (Dosovitskiy et al., ICLR 2021, appendix B.1.1:
# SGD with momentum 0.9, no weight decay, gradients clipped at global norm 1, cosine decay after a linear
# warm-up, at the checkpoint's resolution), shortened to 5 epochs at batch 128 for a single GPU, plus the label
# smoothing of T2T-ViT's training (the backbone of the JEI-DNN paper). Every field stays selectable by --set.
FINETUNE = dict(optimizer="sgd", lr=0.01, weight_decay=0.0, epochs=5, batch_size=128, warmup_epochs=0.5,
                label_smoothing=0.1, clip_grad=1.0, augment="crop_flip")
# the paper's setting for natural photographs: ViT-S/16 (about T2T-ViT-14's size and cost) pretrained on
# ImageNet-21k and fine-tuned on ImageNet-1k, fine-tuned again on the task at its own 224 px
PHOTO_DEFAULT = ViTConfig(model="vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=True, img_size=224,
                          **FINETUNE)


def vit_optimizer(model: torch.nn.Module, cfg, device) -> torch.optim.Optimizer:
    """The ViT recipe's optimiser: AdamW, or SGD with momentum 0.9 (``cfg.optimizer``); fused on CUDA."""
    fused = fused_optimizer(device)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


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
        # your photos (resized to 32 px unless img_size is set), chosen by measurement on the CIFAR-10 photos (lossy
        # JPEG) on 2 CPU cores: 6 blocks, 128 wide, 4-pixel patches, crop and flip; 13 epochs reach 0.663 test in
        # 31 min, 20 epochs 0.7164 +- 0.0012 (seeds 0-2) in 63-79 min on a busy machine (about 145 s per epoch
        # idle). The 12-block, 192-wide ViT costs 4.4 times as much (365 M MACs per image, not 84 M).
        "imagefolder": ViTConfig(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, epochs=20,
                                 augment="crop_flip"),
        "cifar10": PHOTO_DEFAULT,
        "cifar100": PHOTO_DEFAULT,
        "cifar100-lt": PHOTO_DEFAULT,
        "svhn": dataclasses.replace(PHOTO_DEFAULT, augment="crop"),  # no flips: digits
        # ImageNet: the default checkpoint was fine-tuned on ImageNet-1k already (its 1,000-class head is kept when
        # the classes are the 1,000 of ILSVRC2012); one epoch adapts it to the harness's own train part
        "imagenet": dataclasses.replace(PHOTO_DEFAULT, epochs=1),
    }

    @classmethod
    def from_name(cls, name: str) -> dict | None:
        import timm  # slow to import: only when a name must be resolved

        if name.startswith(VIT_FAMILIES) and timm.is_model(name):
            return {"model": name}
        return None

    @classmethod
    def configure(cls, dataset: str, changes: dict, owner: str = "backbone") -> ViTConfig:
        """From scratch: the dataset's default with ``changes``. Pretrained: the architecture is the checkpoint's
        (a conflicting ``--set`` is refused), the input size its pretraining resolution unless set, and a
        dataset default made for training from scratch gives way to the fine-tuning recipe (``FINETUNE``)."""
        checked = check_fields(cls.Config, owner, changes)
        base = cls.default_config(dataset)
        cfg = dataclasses.replace(base, **checked)
        if cfg.pretrained:
            arch = checkpoint_architecture(cfg.model)
            conflicts = [f"{owner}.{k}={checked[k]} (the checkpoint's: {arch[k]})"
                         for k in ARCHITECTURE if k in checked and checked[k] != arch[k]]
            if conflicts:
                raise UserError(f"--set {', '.join(conflicts)}: a pretrained {cfg.model!r} has its checkpoint's "
                                "architecture. Drop these --set values, or train from scratch without --pretrained "
                                "(e.g. --backbone vit-scratch).")
            recipe = {} if base.pretrained else FINETUNE  # the checkpoint's resolution unless img_size is set
            own = {k: arch[k] for k in (*ARCHITECTURE, "img_size")}
            cfg = dataclasses.replace(base, **{**recipe, **own, **checked})
            if cfg.weights_file:
                cfg = dataclasses.replace(cfg, weights_sha256=_checked_weights_sha256(cfg, owner))
        elif base.pretrained:
            raise UserError(f"--set {owner}.pretrained=false: on {dataset} the vit backbone fine-tunes a pretrained "
                            f"{base.model!r} at {base.img_size} px. To train a ViT from scratch use "
                            "--backbone vit-scratch (its own small-image defaults); to fine-tune another timm ViT "
                            "name it: --backbone NAME.")
        elif cfg.weights_file:
            raise UserError(f"--set {owner}.weights_file={cfg.weights_file}: a weights file is only read when "
                            "fine-tuning; pass it as --pretrained PATH.")
        cls.validate(cfg)
        return cfg

    @classmethod
    def validate(cls, cfg: ViTConfig) -> None:
        import timm

        if not cfg.model.startswith(VIT_FAMILIES) or not timm.is_model(cfg.model):
            known = [m for m in timm.list_models() if m.startswith(VIT_FAMILIES)]
            raise UserError(unknown_name_message("timm ViT", cfg.model, known))
        with torch.device("meta"):  # the sizes are checked without allocating the weights
            cls.create(cfg, in_chans=1, num_classes=2, load_weights=False)

    @classmethod
    def create(cls, cfg: ViTConfig, in_chans: int, num_classes: int, load_weights: bool = True) -> torch.nn.Module:
        """Build the timm model. With ``cfg.pretrained`` the architecture is the named model's own (only input
        size, channels and classifier adapt) and, if ``load_weights``, its pretrained weights are loaded by timm:
        from the hub, or from ``cfg.weights_file`` (timm's ``pretrained_cfg_overlay=dict(file=...)``, which also
        resamples the position embedding to ``img_size`` and adapts the input channels; the classifier is kept
        when its class count is the task's)."""
        import timm

        extra = {}
        if cfg.pretrained:
            kwargs = dict(img_size=cfg.img_size, in_chans=in_chans, num_classes=num_classes)
            if load_weights and cfg.weights_file:
                extra["pretrained_cfg_overlay"] = _file_overlay(cfg)
        else:
            kwargs = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=in_chans,
                          embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                          mlp_ratio=cfg.mlp_ratio, num_classes=num_classes)
        try:
            return timm.create_model(cfg.model, pretrained=cfg.pretrained and load_weights, **kwargs, **extra)
        except UserError:
            raise
        except Exception as e:  # unknown names, inconsistent sizes, unreachable hub: all fixable by the user
            if cfg.pretrained and load_weights and cfg.weights_file:
                raise UserError(f"Weights file {cfg.weights_file} could not be loaded into {cfg.model!r} "
                                f"({type(e).__name__}: {e}). Give a checkpoint of that model (--backbone NAME "
                                "names the architecture).") from None
            if cfg.pretrained and load_weights:
                raise UserError(
                    f"Pretrained weights for {cfg.model!r} could not be loaded ({type(e).__name__}: {e}). They come "
                    "from the Hugging Face hub: connect to the network, put them in the HF cache "
                    "(HF_HOME), pass a local file with --pretrained PATH, or drop --pretrained to train from "
                    "scratch.") from None
            raise UserError(f"Could not build backbone {cfg.model!r} with {kwargs} ({type(e).__name__}: {e}). "
                            "Check --backbone and the --set backbone.FIELD values (e.g. embed_dim must be "
                            "divisible by num_heads, img_size by patch_size).") from None

    @classmethod
    def train(cls, cfg: ViTConfig, train_x, train_y, val_x, val_y, num_classes, seed, device="cpu",
              desc="backbone"):
        """AdamW (or SGD with momentum 0.9), linear warm-up and cosine decay per step, gradient clipping if set;
        the epoch with the best validation accuracy."""
        torch.manual_seed(seed)
        model = cls.create(cfg, in_chans=train_x.shape[-1], num_classes=num_classes).to(device)
        opt = vit_optimizer(model, cfg, device)

        def validate() -> tuple[float, dict]:
            return (predict_logits(model, val_x, cfg, device).argmax(1).numpy() == val_y).mean().item(), {}

        return fit_epochs(model, opt, cfg, train_x, train_y, seed, device, desc,
                          lambda xb, yb: F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing),
                          validate, before_step=warmup_cosine_schedule(opt, cfg, len(train_x)))

    @classmethod
    def stages(cls, model) -> "ViTStages":
        return ViTStages(model)

    @classmethod
    def macs(cls, model) -> ExitMacs:
        """Per-block MACs from fvcore (attention included), checked against the analytic count (the arbiter);
        where fvcore is not installed (a lent GPU machine), the analytic count itself. ``macs_counter`` says
        which: ``fvcore+attention-handle`` or ``analytic``."""
        analytic = analytic_vit_macs(model)
        if not fvcore_available():
            return analytic
        counted = fvcore_vit_macs(model)
        if abs(counted.static - analytic.static) > 0.01 * analytic.static:
            raise RuntimeError(f"fvcore ({counted.static}) and analytic ({analytic.static}) MACs differ by > 1 %")
        return counted

    @classmethod
    def heads(cls, model) -> Heads:
        return Heads(model.head.weight.detach().cpu().float(), model.head.bias.detach().cpu().float())

    @classmethod
    def label(cls, cfg: ViTConfig) -> str:
        if cfg.pretrained:
            source = f"file-{cfg.weights_sha256[:8]}" if cfg.weights_file else "pretrained"
            return f"{cfg.model}-{source}-{cfg.img_size}px"
        return f"vit-d{cfg.depth}-w{cfg.embed_dim}-p{cfg.patch_size}-{cfg.img_size}px"


@register_backbone("vit-scratch")
class ViTScratch(ViT):
    """A timm ViT trained from scratch at the images' own size, also on CIFAR, SVHN and ImageNet (where ``vit``
    fine-tunes a pretrained ViT-S/16 at 224 px)."""

    # the harness's earlier photo defaults: a 12-block, 192-wide ViT on 4-pixel patches at 32 px; on ImageNet
    # (224 px unless $BENCH_IMAGENET_SIZE says otherwise: then set img_size to it) DeiT-Ti's architecture, a
    # 12-block, 192-wide ViT on 16-pixel patches, for a short 30 epochs (DeiT trains 300). Every dataset whose
    # ``vit`` default is pretrained needs one here: ``--set backbone.pretrained=false`` sends users to this backbone
    defaults = {**ViT.defaults,
                **{name: ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, epochs=100,
                                   augment="crop_flip") for name in ("cifar10", "cifar100", "cifar100-lt")},
                "svhn": ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, epochs=40,
                                  augment="crop"),
                "imagenet": ViTConfig(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, epochs=30,
                                      augment="crop_flip")}

    @classmethod
    def from_name(cls, name: str) -> dict | None:
        return None  # timm names go to ``vit``


# ---- pretrained checkpoints -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def checkpoint_architecture(model: str) -> dict:
    """A timm ViT's own architecture and pretraining resolution, read from the model built on the meta device
    (no memory, no weights)."""
    import timm

    try:
        with torch.device("meta"):
            m = timm.create_model(model, pretrained=False)
    except Exception as e:
        raise UserError(f"Could not build timm model {model!r} ({type(e).__name__}: {e}); check --backbone.") from None
    block = m.blocks[0]
    return {"patch_size": int(m.patch_embed.patch_size[0]), "embed_dim": int(m.embed_dim), "depth": len(m.blocks),
            "num_heads": int(block.attn.num_heads), "mlp_ratio": block.mlp.fc1.out_features / m.embed_dim,
            "img_size": int(m.pretrained_cfg.get("input_size", (3, 224, 224))[-1])}


def _checked_weights_sha256(cfg: ViTConfig, owner: str) -> str:
    path = Path(cfg.weights_file)
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin") or not path.is_file():
        problem = "does not exist" if not path.exists() else "is not a .safetensors, .pth, .pt or .bin file"
        raise UserError(f"--pretrained {cfg.weights_file}: the file {problem}. Give a timm checkpoint of "
                        f"{cfg.model!r} (a .safetensors or .pth state dict).")
    digest = file_sha256(path)
    if cfg.weights_sha256 and cfg.weights_sha256 != digest:
        raise UserError(f"--set {owner}.weights_sha256={cfg.weights_sha256}: {path} has sha256 {digest}; the file "
                        "changed, or the checksum is of another file.")
    return digest


def _file_overlay(cfg: ViTConfig) -> dict:
    """timm's ``pretrained_cfg_overlay`` that loads ``cfg.weights_file``: the file's own class count and input
    channels (so timm keeps a classifier that fits the task, and adapts channels only when they differ), and no
    custom (.npz) loader."""
    from timm.models import load_state_dict

    if file_sha256(cfg.weights_file) != cfg.weights_sha256:
        raise UserError(f"{cfg.weights_file} changed since the run was configured (sha256 differs); rerun.")
    try:
        state = load_state_dict(cfg.weights_file, weights_only=True)
    except Exception as e:
        raise UserError(f"Weights file {cfg.weights_file} could not be read ({type(e).__name__}: {e}). Give a "
                        "safetensors file or a torch state dict saved with torch.save.") from None
    overlay = {"file": str(cfg.weights_file), "custom_load": False}
    if "head.weight" in state:
        overlay["num_classes"] = int(state["head.weight"].shape[0])
    if "patch_embed.proj.weight" in state:
        overlay["input_size"] = (int(state["patch_embed.proj.weight"].shape[1]), cfg.img_size, cfg.img_size)
    return overlay


# ---- the staged forward -------------------------------------------------------------------------------
def embed(model, x: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] -> tokens [N, T, D] (patch embedding, class token, position embedding)."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def exit_feature(model, h: torch.Tensor) -> torch.Tensor:
    """Tokens [N, T, D] after a block -> the exit feature [N, D]: CLS token after the final LayerNorm (normed
    alone: LayerNorm works per token, so the other T-1 tokens' norms would be thrown away)."""
    return model.norm(h[:, 0])


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
@torch.no_grad()
def predict_logits(model, x_uint8: np.ndarray, cfg: ViTConfig, device: str = "cpu", forward=None, dim: int = 0
                   ) -> torch.Tensor:
    """``forward(model, images)`` (default: the model's logits [N, C]) over uint8 images in evaluation batches,
    concatenated along ``dim`` on the CPU."""
    model.eval()
    out = []
    for batch in iter_batches(x_uint8, cfg.eval_batch_size):  # slices of an array; streamed images decoded
        xb = to_tensor(batch, cfg.img_size, device)
        out.append((model(xb) if forward is None else forward(model, xb)).float().cpu())
    return torch.cat(out, dim=dim)
