"""The frozen backbone: a timm Vision Transformer with an exit after every block.

Exit k reads block k's CLS token after the backbone's final LayerNorm (JEI-DNN's choice), so the last exit's
feature fed to the backbone's own head reproduces ``model(x)`` exactly. The staged forward here
(``embed`` -> ``blocks[k]`` -> ``exit_feature``) is the one code path for feature caching and real early exit.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.base.errors import UserError
from bench.base.hashing import atomic_write, config_hash

log = logging.getLogger(__name__)


@dataclass
class BackboneConfig:
    """Everything that determines a trained backbone (besides data, split and seed)."""

    model: str = "vit_tiny_patch16_224"  # timm name; the fields below override its architecture
    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    pretrained: bool = False  # fine-tune timm's pretrained weights instead of training from scratch
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    augment: str = "none"  # none | crop | crop_flip
    eval_batch_size: int = 512

    def replace(self, **changes) -> "BackboneConfig":
        return dataclasses.replace(self, **changes)


# Small defaults that train on 2 CPU cores in minutes and reach a useful accuracy (numbers in the README).
DATASET_DEFAULTS: dict[str, BackboneConfig] = {
    # digits: 1,149 training images; crop augmentation and 120 epochs lift test accuracy from about 0.90 to
    # 0.953-0.964 over seeds 0-2 (80 epochs: 0.933-0.944), about a minute on 2 cores. No label smoothing: it
    # caps the final head's confidence near 0.91, so JEI-DNN's CE-argmin exit targets sent 75 % of the samples
    # the final head got right to earlier, more confident heads (accuracy is the same without it).
    "digits": BackboneConfig(img_size=8, patch_size=2, embed_dim=64, depth=6, num_heads=4, epochs=120,
                             batch_size=64, lr=1e-3, augment="crop"),
    "fashion-mnist": BackboneConfig(img_size=28, patch_size=7, embed_dim=128, depth=6, num_heads=4, epochs=8,
                                    batch_size=128, lr=1e-3),
    "cifar10": BackboneConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, epochs=100,
                              augment="crop_flip"),
    "cifar100": BackboneConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, epochs=100,
                               augment="crop_flip"),
    "cifar100-lt": BackboneConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, epochs=100,
                                  augment="crop_flip"),
    "svhn": BackboneConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, epochs=40,
                           augment="crop"),
}


def default_config(dataset: str) -> BackboneConfig:
    return copy.deepcopy(DATASET_DEFAULTS.get(dataset, BackboneConfig()))


def create_backbone(cfg: BackboneConfig, in_chans: int, num_classes: int, load_weights: bool = True
                    ) -> torch.nn.Module:
    """Build the timm model. With ``cfg.pretrained`` the architecture is the named model's own (only input size,
    channels and classifier adapt) and, if ``load_weights``, its pretrained weights are fetched."""
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
        raise UserError(f"Could not build backbone {cfg.model!r} with {kwargs} ({type(e).__name__}: {e}). Check "
                        "--backbone and the --set backbone.FIELD values (e.g. embed_dim must be divisible by "
                        "num_heads, img_size by patch_size).") from None


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
    """The staged-forward protocol over a timm ViT; ``bench.backbones.msdnet.MSDNet`` implements the same methods itself.
    ``embed(x) -> h``, ``block(k, h) -> h``, ``exit_feature(k, h) -> [N, D]``, ``select(h, keep) -> h`` (the
    survivors' rows), ``static_forward(x) -> [N, C]`` (the static network, the timing denominator), and
    ``exit_logits(K-1, feat)`` (the network's own last head)."""

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

    def exit_logits(self, k: int, feat: torch.Tensor) -> torch.Tensor:
        assert k == self.num_exits - 1, "a ViT has its own head at the last exit only"
        return head_logits(self.model, feat)

    @staticmethod
    def select(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return h[keep]

    def static_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def stages(model):
    """The staged forward of any backbone this harness runs: the model itself if it implements it (MSDNet),
    else the ViT adapter."""
    return model if hasattr(model, "static_forward") else ViTStages(model)


def head_params(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's own last head as (weight [C, D], bias [C]) on the last exit's feature."""
    head = model.classifiers[-1].linear if hasattr(model, "classifiers") else model.head
    return head.weight.detach().cpu().float(), head.bias.detach().cpu().float()


def exit_head_params(model) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A multi-exit backbone's own exit classifiers (MSDNet's) as (weight [K, D, C], bias [K, C]); None for a
    backbone with one head (the ViT), whose intermediate heads the methods train."""
    if not hasattr(model, "classifiers"):
        return None
    lins = [c.linear for c in model.classifiers]
    return (torch.stack([lin.weight.detach().cpu().float().T for lin in lins]),
            torch.stack([lin.bias.detach().cpu().float() for lin in lins]))


@torch.no_grad()
def block_features(model, x: torch.Tensor) -> torch.Tensor:
    """Per-exit features [K, N, D] for images [N, C, H, W] (K = depth), through the staged forward."""
    st = stages(model)
    h = st.embed(x)
    feats = []
    for k in range(st.num_exits):
        h = st.block(k, h)
        feats.append(st.exit_feature(k, h))
    return torch.stack(feats)


def to_tensor(x_uint8: np.ndarray, img_size: int) -> torch.Tensor:
    """uint8 images [N, H, W, C] -> float [N, C, img_size, img_size] in [-1, 1] (resized if needed)."""
    x = torch.from_numpy(np.ascontiguousarray(x_uint8)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random crop after padding by 1/8 of the side (and a horizontal flip for ``crop_flip``)."""
    if mode == "none":
        return x
    if mode not in ("crop", "crop_flip"):
        raise UserError(f"Unknown augmentation {mode!r}; use none, crop or crop_flip.")
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="constant", value=-1.0)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    out = torch.stack([xp[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])
    if mode == "crop_flip":
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


# ---- training -------------------------------------------------------------------------------------------
@dataclass
class TrainedBackbone:
    model: torch.nn.Module  # eval mode, frozen
    config: "BackboneConfig | MSDNetConfig"  # bench.backbones.msdnet.MSDNetConfig for MSDNet
    key: str  # cache key: hash of everything that produced the weights
    val_accuracy: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def predict_logits(model, x_uint8: np.ndarray, cfg: BackboneConfig, device: str = "cpu") -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(x_uint8), cfg.eval_batch_size):
        xb = to_tensor(x_uint8[i:i + cfg.eval_batch_size], cfg.img_size).to(device)
        out.append(model(xb).float().cpu())
    return torch.cat(out)


def train_backbone(cfg: BackboneConfig, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                   val_y: np.ndarray, num_classes: int, seed: int, device: str = "cpu",
                   desc: str = "backbone") -> tuple[torch.nn.Module, float, int, list[dict]]:
    """Train (or fine-tune) with AdamW, linear warm-up and cosine decay; keep the epoch with the best
    *validation* accuracy (never test). Returns (model, val_accuracy, best_epoch, history)."""
    torch.manual_seed(seed)
    model = create_backbone(cfg, in_chans=train_x.shape[-1], num_classes=num_classes).to(device)
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


def fit_epochs(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg, train_x: np.ndarray, train_y: np.ndarray,
               seed: int, device: str, desc: str, batch_loss, validate, before_step=None, after_epoch=None
               ) -> tuple[torch.nn.Module, float, int, list[dict]]:
    """The training loop every backbone shares. Each epoch: shuffle (a generator seeded with ``seed``), then per
    mini-batch of ``cfg.batch_size`` images (augmented with ``cfg.augment``) ``before_step(step)``, the loss
    ``batch_loss(xb, yb)`` and an optimiser step; then ``after_epoch()`` and ``validate() -> (val_accuracy,
    extra history fields)``. The epoch with the best validation accuracy is kept (never test). Returns (model
    with those weights, eval mode, frozen; val_accuracy; best_epoch; history)."""
    gen = torch.Generator().manual_seed(seed)
    y_all = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    best: tuple[float, int, dict | None] = (-1.0, -1, None)
    history: list[dict] = []
    t0 = time.perf_counter()
    step = 0
    bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb = augment_batch(to_tensor(train_x[idx.numpy()], cfg.img_size), cfg.augment, gen).to(device)
            if before_step is not None:
                before_step(step)
            loss = batch_loss(xb, y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            step += 1
        if after_epoch is not None:
            after_epoch()
        val_acc, extra = validate()
        history.append({"epoch": epoch, "train_loss": loss_sum / len(perm), "val_accuracy": val_acc, **extra,
                        "seconds": round(time.perf_counter() - t0, 1)})
        if val_acc > best[0]:
            best = (val_acc, epoch, copy.deepcopy(model.state_dict()))
        bar.set_postfix(loss=f"{loss_sum / len(perm):.3f}", val_acc=f"{val_acc:.3f}", best=f"{best[0]:.3f}")
    model.load_state_dict(best[2])
    model.eval().requires_grad_(False)
    return model, best[0], best[1], history


def _builders(cfg):
    """(create, train) functions for a backbone configuration: timm ViT or MSDNet."""
    from bench.backbones.msdnet import MSDNetConfig, create_msdnet, train_msdnet

    return (create_msdnet, train_msdnet) if isinstance(cfg, MSDNetConfig) else (create_backbone, train_backbone)


def backbone_key(cfg, dataset: str, split_sha: str, seed: int, data_source: str) -> str:
    return config_hash({"backbone": dataclasses.asdict(cfg), "dataset": dataset, "split": split_sha,
                        "seed": seed, "data": data_source, "torch": torch.__version__.split("+")[0], "v": 1})


def load_or_train_backbone(cache_dir: Path, cfg, dataset, splits, device: str = "cpu",
                           ) -> TrainedBackbone:
    """The backbone for (dataset, split, seed, config): from the checkpoint cache when a valid one exists,
    otherwise trained and saved. A checkpoint that fails to load or was made by another config is rebuilt."""
    create, train = _builders(cfg)
    key = backbone_key(cfg, dataset.name, splits.sha256, splits.seed, dataset.source)
    path = Path(cache_dir) / "backbones" / f"{dataset.name}-{key}.pt"
    if path.exists():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            if ckpt.get("key") != key:
                raise ValueError("checkpoint was made by another configuration")
            model = create(cfg, dataset.train_x.shape[-1], dataset.num_classes, load_weights=False)
            model.load_state_dict(ckpt["state_dict"])
            model.eval().requires_grad_(False)
            return TrainedBackbone(model.to(device), cfg, key, ckpt["val_accuracy"], ckpt["best_epoch"],
                                   ckpt["history"])
        except Exception as e:  # truncated, corrupt or foreign file: never use it, rebuild
            log.warning("backbone checkpoint %s is unusable (%s: %s); retraining", path, type(e).__name__, e)
    tr, va = splits.train, splits.val
    name = cfg.model + ("-boosted" if getattr(cfg, "training", "") == "boosted" else "")
    model, val_acc, best_epoch, history = train(
        cfg, dataset.train_x[tr], dataset.train_y[tr], dataset.train_x[va], dataset.train_y[va],
        dataset.num_classes, splits.seed, device, desc=f"train backbone {name} ({dataset.name}, seed {splits.seed})")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save({"key": key, "state_dict": state, "val_accuracy": val_acc,
                                               "best_epoch": best_epoch, "history": history,
                                               "config": dataclasses.asdict(cfg)}, tmp))
    return TrainedBackbone(model, cfg, key, val_acc, best_epoch, history)
