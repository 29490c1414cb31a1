"""MSDNet (Huang et al., ICLR 2018), the multi-scale dense network for 32x32 inputs, as a multi-exit backbone.

Architecture (reference/baselines.md): 3 scales (32, 16, 8 px for a 32 px input); a stem builds one feature map
per scale; every layer of a block adds ``growth_rate * gr_factor[s]`` channels to scale s from a normal 3x3
conv of the same scale and a strided 3x3 conv of the next finer scale (each with a 1x1 bottleneck); with
``prune="max"`` the finest scales are dropped in later layers, a 1x1 transition halving the channels each
time; a classifier (two strided 3x3 convs with 128 channels, 2x2 average pooling, linear) reads the coarsest
scale after each block. Blocks have ``base`` layers, then ``step`` more (``even``) or ``step * k + 1``
(``lin_grow``). The default is the budgeted CIFAR configuration: 5 blocks, lin_grow, step 1, base 1, 16
channels, growth rate 6 with factors 1/2/4; image folders get a CPU-sized one chosen by measurement
(``MSDNET_DEFAULTS``). Smaller or non-square images are resized to ``img_size``.

Staged forward (one code path for training, the feature cache, MAC counting and the real early-exit runner):
``embed(x) -> xs`` (a list of per-scale maps), ``block(k, xs) -> xs``, ``exit_feature(k, xs) -> [N, D]`` (the
classifier's pooled conv features, D = ``classifier_channels``), ``exit_logits(k, feat) -> [N, C]``.

Training: SGD (lr 0.1, momentum 0.9, wd 1e-4, batch 64), lr / 10 at 50 % and 75 % of the epochs, loss the
plain sum of the per-exit cross-entropies; the checkpoint with the best validation accuracy at the last exit is
kept. BoostedNet's network (``msdnet-boosted``: boosted losses with gradient rescaling) is a subclass that
lives next to the method, in ``methods/boostednet.py``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.backbones.base import (AUGMENTATIONS, Backbone, Heads, fit_epochs, fused_optimizer, register_backbone,
                                  to_tensor, warmup_cosine_schedule)
from bench.base.errors import UserError
from bench.base.fields import bounded, choice
from bench.measure.flops import FVCORE, TORCH, ExitMacs, fvcore_available, fvcore_macs, torch_macs
from datasets import iter_batches


@dataclass
class MSDNetConfig:
    """Everything that determines a trained MSDNet (besides data, split and seed)."""

    img_size: int = bounded(32, min=2)
    n_blocks: int = bounded(5, min=1)
    step_mode: str = choice("lin_grow", ("even", "lin_grow"))
    step: int = bounded(1, min=1)
    base: int = bounded(1, min=1)
    channels: int = bounded(16, min=1)  # of the finest scale; scale s has channels * gr_factor[s]
    growth_rate: int = bounded(6, min=1)
    gr_factor: tuple[int, ...] = bounded((1, 2, 4), min=1, nonempty=True)  # one per scale
    bn_factor: tuple[int, ...] = bounded((1, 2, 4), min=1, nonempty=True)  # bottleneck width factor per scale
    bottleneck: bool = True
    prune: str = choice("max", ("max", "min"))
    reduction: float = bounded(0.5, min=0.0, max=1.0)  # transition layers' channel compression
    classifier_channels: int = bounded(128, min=1)
    epochs: int = bounded(300, min=1)
    batch_size: int = bounded(64, min=1)
    lr: float = bounded(0.1, min=0.0)
    momentum: float = bounded(0.9, min=0.0)
    weight_decay: float = bounded(1e-4, min=0.0)
    # "step": lr / 10 at the lr_milestones (fractions of the epochs); "cosine": linear warm-up over
    # warmup_epochs, then cosine decay to 0 per optimiser step (better when there are few epochs)
    schedule: str = choice("step", ("step", "cosine"))
    lr_milestones: tuple[float, ...] = bounded((0.5, 0.75), min=0.0, max=1.0)
    warmup_epochs: float = bounded(0.0, min=0.0)
    augment: str = choice("crop_flip", AUGMENTATIONS)
    eval_batch_size: int = bounded(512, min=1)

    def replace(self, **changes) -> "MSDNetConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        problems = []
        if self.step_mode not in ("even", "lin_grow"):
            problems.append(f"step_mode {self.step_mode!r} is not even or lin_grow")
        if self.schedule not in ("step", "cosine"):
            problems.append(f"schedule {self.schedule!r} is not step or cosine")
        if self.prune not in ("max", "min"):
            problems.append(f"prune {self.prune!r} is not max or min")
        if len(self.gr_factor) != len(self.bn_factor):
            problems.append("gr_factor and bn_factor need one entry per scale")
        if self.img_size < 2 ** len(self.gr_factor):
            problems.append(f"img_size {self.img_size} is too small for {len(self.gr_factor)} scales")
        if problems:
            raise UserError(f"MSDNet configuration is invalid: {'; '.join(problems)}. Fix the --set "
                            "backbone.FIELD values.")

    @property
    def n_scales(self) -> int:
        return len(self.gr_factor)


# Small defaults that train on 2 CPU cores in minutes; CIFAR-size data gets the published budgeted configuration.
MSDNET_DEFAULTS: dict[str, MSDNetConfig] = {
    "digits": MSDNetConfig(img_size=16, n_blocks=4, channels=8, growth_rate=4, classifier_channels=32,
                           epochs=60, batch_size=64, lr=0.05, augment="crop"),
    "fashion-mnist": MSDNetConfig(img_size=28, n_blocks=4, channels=8, growth_rate=4, classifier_channels=32,
                                  epochs=4, batch_size=64, lr=0.05, augment="none"),
    "svhn": MSDNetConfig(epochs=40, augment="crop"),
    # your photos (resized to 32 px unless img_size is set), chosen by measurement on the CIFAR-10 photos (lossy
    # JPEG) on 2 idle CPU cores: 4 blocks, 16 channels, growth 6, 64-channel classifiers, warm-up and cosine
    # decay; 13 epochs reach 0.8038 test in 44 min (12: 0.7959). The 8-channel network reaches 0.7768 in 18
    # step-schedule epochs; the published 5-block configuration needs 300 epochs.
    "imagefolder": MSDNetConfig(n_blocks=4, channels=16, growth_rate=6, classifier_channels=64, epochs=13,
                                batch_size=128, lr=0.1, schedule="cosine", warmup_epochs=0.5, augment="crop_flip"),
}


# ---- layers -----------------------------------------------------------------------------------------------
def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def bottleneck_conv(c_in: int, c_out: int, stride: int, bottleneck: bool, width: int) -> nn.Sequential:
    """[1x1 bottleneck to min(c_in, width * c_out)] then a 3x3 conv (stride 1 or 2), each with BN + ReLU."""
    layers: list[nn.Module] = []
    inner = c_in
    if bottleneck:
        inner = min(c_in, width * c_out)
        layers += list(conv_bn_relu(c_in, inner, kernel=1))
    layers += list(conv_bn_relu(inner, c_out, kernel=3, stride=stride))
    return nn.Sequential(*layers)


class ScaleUnit(nn.Module):
    """New channels for one scale: a 3x3 conv of that scale's map, plus (when a finer scale is read) a strided
    3x3 conv of the finer map, each producing half of them; the output is the input map with both appended."""

    def __init__(self, c_fine: int | None, c_same: int, c_new: int, bottleneck: bool, w_fine: int, w_same: int):
        super().__init__()
        half = c_new // 2 if c_fine is not None else c_new
        self.down = None if c_fine is None else bottleneck_conv(c_fine, half, 2, bottleneck, w_fine)
        self.same = bottleneck_conv(c_same, half, 1, bottleneck, w_same)

    def forward(self, fine: torch.Tensor | None, same: torch.Tensor) -> torch.Tensor:
        parts = [same] if self.down is None else [same, self.down(fine)]
        return torch.cat([*parts, self.same(same)], dim=1)


class MSDLayer(nn.Module):
    """One dense layer over the scales it keeps: scales [offset, n_scales) in, the same out. When a scale is
    dropped (in_scales > out_scales), the first kept scale also reads the dropped finer one."""

    def __init__(self, c_in: int, growth: int, cfg: MSDNetConfig, in_scales: int, out_scales: int):
        super().__init__()
        s_all = cfg.n_scales
        self.offset, self.discard = s_all - out_scales, in_scales - out_scales
        units = []
        for s in range(self.offset, s_all):
            reads_finer = s > self.offset or self.discard > 0
            units.append(ScaleUnit(c_in * cfg.gr_factor[s - 1] if reads_finer else None, c_in * cfg.gr_factor[s],
                                   growth * cfg.gr_factor[s], cfg.bottleneck,
                                   cfg.bn_factor[s - 1] if reads_finer else 0, cfg.bn_factor[s]))
        self.units = nn.ModuleList(units)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        # xs holds the input scales, finest first; the output keeps the coarsest len(units) of them
        skip = len(xs) - len(self.units)
        out = []
        for i, unit in enumerate(self.units):
            j = skip + i
            out.append(unit(xs[j - 1] if (i > 0 or self.discard > 0) else None, xs[j]))
        return out


class Transition(nn.Module):
    """1x1 conv + BN + ReLU per kept scale, compressing the channels."""

    def __init__(self, c_in: int, c_out: int, out_scales: int, cfg: MSDNetConfig):
        super().__init__()
        offset = cfg.n_scales - out_scales
        self.convs = nn.ModuleList(conv_bn_relu(c_in * cfg.gr_factor[offset + i], c_out * cfg.gr_factor[offset + i],
                                                kernel=1) for i in range(out_scales))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class Stem(nn.Module):
    """The first layer: one map per scale, each a (strided) 3x3 conv of the previous."""

    def __init__(self, in_chans: int, cfg: MSDNetConfig):
        super().__init__()
        convs, c = [], in_chans
        for s, g in enumerate(cfg.gr_factor):
            convs.append(conv_bn_relu(c, cfg.channels * g, 3, 1 if s == 0 else 2))
            c = cfg.channels * g
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return out


class Classifier(nn.Module):
    """Two strided 3x3 convs, 2x2 average pooling (adaptive, so any input size works), then a linear layer."""

    def __init__(self, c_in: int, width: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(c_in, width, 3, 2), conv_bn_relu(width, width, 3, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(width, num_classes)


def block_layout(cfg: MSDNetConfig) -> list[int]:
    """Layers per block: ``base``, then ``step`` (even) or ``step * k + 1`` (lin_grow) for block k >= 1."""
    return [cfg.base] + [cfg.step if cfg.step_mode == "even" else cfg.step * k + 1 for k in range(1, cfg.n_blocks)]


class MSDNet(nn.Module):
    def __init__(self, cfg: MSDNetConfig, in_chans: int, num_classes: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.stem = Stem(in_chans, cfg)
        steps = block_layout(cfg)
        total, done, c = sum(steps), 0, cfg.channels
        s_all = cfg.n_scales
        blocks, classifiers = [], []
        for n_layers in steps:
            layers: list[nn.Module] = []
            for _ in range(n_layers):
                done += 1
                if cfg.prune == "max":
                    interval = math.ceil(total / s_all)
                    in_scales = s_all - (max(0, done - 2) // interval)
                    out_scales = s_all - ((done - 1) // interval)
                else:
                    in_scales = min(s_all, total - done + 2)
                    out_scales = min(s_all, total - done + 1)
                layers.append(MSDLayer(c, cfg.growth_rate, cfg, in_scales, out_scales))
                c += cfg.growth_rate
                transition = (cfg.reduction > 0 and
                              (in_scales > out_scales if cfg.prune == "max"
                               else done in (total // 3, 2 * total // 3)))
                if transition:
                    layers.append(Transition(c, math.floor(cfg.reduction * c), out_scales, cfg))
                    c = math.floor(cfg.reduction * c)
            blocks.append(nn.Sequential(*layers))
            classifiers.append(Classifier(c * cfg.gr_factor[-1], cfg.classifier_channels, num_classes))
        self.blocks = nn.ModuleList(blocks)
        self.classifiers = nn.ModuleList(classifiers)
        for m in self.modules():  # MSDNet's initialisation
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    # ---- the staged forward ----------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.stem(x)

    def block(self, k: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.blocks[k](xs)

    def exit_feature(self, k: int, xs: list[torch.Tensor]) -> torch.Tensor:
        """The classifier's pooled feature [N, D] from the coarsest scale."""
        return self.classifiers[k].features(xs[-1])

    def exit_logits(self, k: int, feat: torch.Tensor) -> torch.Tensor:
        return self.classifiers[k].linear(feat)

    @staticmethod
    def select(xs: list[torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
        return [x[keep] for x in xs]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's own logits f_k [N, C], k = 0..K-1."""
        xs, out = self.embed(x), []
        for k in range(self.num_exits):
            xs = self.block(k, xs)
            out.append(self.exit_logits(k, self.exit_feature(k, xs)))
        return out

    def static_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The static network: every block, then the last classifier only."""
        xs = self.embed(x)
        for k in range(self.num_exits):
            xs = self.block(k, xs)
        return self.exit_logits(self.num_exits - 1, self.exit_feature(self.num_exits - 1, xs))


# ---- MACs ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MSDNetExitMacs:
    """Per-image MACs by part (fvcore: convolutions and linear layers; BN, ReLU and pooling free)."""

    stem: int
    blocks: tuple[int, ...]  # every scale of each block
    classifier_features: tuple[int, ...]  # each classifier's convs
    classifier_linear: tuple[int, ...]  # each classifier's linear layer

    def exit_costs(self) -> np.ndarray:
        """Cumulative MACs [K] of leaving at exit k with every classifier on the way evaluated: MSDNet's own
        convention (all scales of block k computed before exit k)."""
        per = np.asarray(self.blocks) + np.asarray(self.classifier_features) + np.asarray(self.classifier_linear)
        return self.stem + np.cumsum(per)


def msdnet_macs(model: MSDNet, count=fvcore_macs) -> MSDNetExitMacs:
    """Count each part with ``count`` (fvcore by default, or ``torch_macs``) on a batch of one at the model's input
    size; every scale map is returned from the traced functions, so none is dropped as unused."""

    cfg = model.cfg
    x = torch.zeros(1, model.stem.convs[0][0].in_channels, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        xs = model.embed(x)
        stem = count(model.embed, x)
        blocks, feats, linears = [], [], []
        for k in range(model.num_exits):
            blocks.append(count(_BlockCall(model, k), tuple(xs)))
            xs = model.block(k, xs)
            feats.append(count(model.classifiers[k].features, xs[-1]))
            lin = model.classifiers[k].linear
            linears.append(lin.in_features * lin.out_features)
    return MSDNetExitMacs(stem, tuple(blocks), tuple(feats), tuple(linears))


class _BlockCall(nn.Module):
    def __init__(self, model: MSDNet, k: int):
        super().__init__()
        self.block = model.blocks[k]

    def forward(self, *xs):
        return self.block(list(xs))


# ---- training -----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_exit_logits(model: MSDNet, x_uint8: np.ndarray, cfg: MSDNetConfig, device: str = "cpu"
                        ) -> torch.Tensor:
    """Every exit's own logits [K, N, C]."""
    model.eval()
    out = []
    for batch in iter_batches(x_uint8, cfg.eval_batch_size):  # slices of an array; streamed images decoded
        xb = to_tensor(batch, cfg.img_size, device)
        out.append(torch.stack(model(xb)).float().cpu())
    return torch.cat(out, dim=1)


@register_backbone("msdnet")
class MSDNetBackbone(Backbone):
    """MSDNet trained end to end with the plain sum of its exits' cross-entropies. Subclasses change the loss
    (``exit_outputs``) and the prediction validated (``prediction``): BoostedNet's network (methods/boostednet)."""

    Config = MSDNetConfig
    defaults = MSDNET_DEFAULTS

    @classmethod
    def validate(cls, cfg: MSDNetConfig) -> None:
        cfg.validate()
        cls.create(cfg, in_chans=1, num_classes=2, load_weights=False)

    @classmethod
    def create(cls, cfg: MSDNetConfig, in_chans: int, num_classes: int, load_weights: bool = True) -> MSDNet:
        return MSDNet(cfg, in_chans, num_classes)

    @classmethod
    def exit_outputs(cls, cfg, model: MSDNet, xb: torch.Tensor) -> list[torch.Tensor]:
        """The per-exit logits whose cross-entropies are summed in training."""
        return model(xb)

    @classmethod
    def prediction(cls, cfg, exit_logits: torch.Tensor) -> torch.Tensor:
        """The network's prediction [N, C] from its exits' own logits [K, N, C] (validation picks on it)."""
        return exit_logits[-1]

    @classmethod
    def train(cls, cfg: MSDNetConfig, train_x, train_y, val_x, val_y, num_classes, seed, device="cpu",
              desc="msdnet"):
        """SGD with lr / 10 at the milestones (or warm-up and cosine decay per step); keep the epoch with the best
        validation accuracy of ``prediction`` (the last exit)."""
        torch.manual_seed(seed)
        model = cls.create(cfg, train_x.shape[-1], num_classes).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              **fused_optimizer(device))
        after_epoch = before_step = None
        if cfg.schedule == "cosine":
            before_step = warmup_cosine_schedule(opt, cfg, len(train_x))
        else:
            milestones = sorted({max(1, round(f * cfg.epochs)) for f in cfg.lr_milestones})
            after_epoch = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1).step

        def batch_loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return sum(F.cross_entropy(o, yb) for o in cls.exit_outputs(cfg, model, xb))

        def validate() -> tuple[float, dict]:
            logits = predict_exit_logits(model, val_x, cfg, device)
            return float((cls.prediction(cfg, logits).argmax(1).numpy() == val_y).mean()), {
                "val_exit_accuracy": [float(a) for a in (logits.argmax(2).numpy() == val_y).mean(1)]}

        return fit_epochs(model, opt, cfg, train_x, train_y, seed, device, desc, batch_loss, validate,
                          before_step=before_step, after_epoch=after_epoch, channels_last=True)

    @classmethod
    def stages(cls, model: MSDNet) -> MSDNet:
        return model  # MSDNet implements the staged forward itself

    @classmethod
    def macs(cls, model: MSDNet) -> ExitMacs:
        """fvcore on every part (``msdnet_macs``); each classifier's convs are its exit's feature cost. Where fvcore
        is not installed (a lent GPU machine), torch's counter on the same parts (``torch_macs``: convolutions and
        linear layers, FLOPs / 2; equal to fvcore's count, tested). ``macs_counter`` says which."""
        if fvcore_available():
            m, counter = msdnet_macs(model), FVCORE
        else:
            m, counter = msdnet_macs(model, torch_macs), TORCH
        return ExitMacs(embed=m.stem, blocks=m.blocks, head=m.classifier_features[-1] + m.classifier_linear[-1],
                        exit_features=m.classifier_features[:-1], macs_counter=counter)

    @classmethod
    def heads(cls, model: MSDNet) -> Heads:
        lins = [c.linear for c in model.classifiers]
        return Heads(lins[-1].weight.detach().cpu().float(), lins[-1].bias.detach().cpu().float(),
                     (torch.stack([lin.weight.detach().cpu().float().T for lin in lins]),
                      torch.stack([lin.bias.detach().cpu().float() for lin in lins])))

    @classmethod
    def label(cls, cfg: MSDNetConfig) -> str:
        return f"{cls.name}-b{cfg.n_blocks}-c{cfg.channels}-g{cfg.growth_rate}-{cfg.img_size}px"
