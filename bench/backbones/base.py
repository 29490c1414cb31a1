"""Backbone plugins: the networks the harness trains (or fine-tunes), freezes, caches exit features from and
runs block by block for real early exit.

A backbone is a class registered with ``@register_backbone("name")`` (the way timm registers models). It
provides, as class methods, everything the harness needs, so no code outside this package looks at a
network's type or name:

- ``Config`` (a dataclass: every field that determines the trained weights, typed and range-checked through
  ``bench.base.fields``; it must have ``img_size`` and ``eval_batch_size``) and ``defaults`` (per dataset);
- ``create(cfg, in_chans, num_classes, load_weights)`` and ``train(cfg, train_x, train_y, val_x, val_y,
  num_classes, seed, device, desc)``;
- ``stages(model)``: the staged forward both the feature cache and the real runner use — ``num_exits``,
  ``embed(x) -> h``, ``block(k, h) -> h``, ``exit_feature(k, h) -> [N, D]``, ``select(h, keep) -> h`` (the
  survivors' rows) and ``static_forward(x) -> [N, C]`` (the static network, the timing denominator);
- ``macs(model)``: per-part MACs (``ExitMacs``), ``heads(model)``: the network's own classifier on the last
  exit feature and, for a multi-exit network, its per-exit classifiers;
- ``label(cfg)``: a name that describes the network that produced a result row.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.backbones import resume
from bench.base.errors import UserError
from bench.base.fields import check_fields
from bench.base.registry import Registry
from bench.measure.flops import ExitMacs
from datasets import iter_batches


class Stages(Protocol):
    num_exits: int

    def embed(self, x: torch.Tensor) -> Any: ...

    def block(self, k: int, h: Any) -> Any: ...

    def exit_feature(self, k: int, h: Any) -> torch.Tensor: ...

    def select(self, h: Any, keep: torch.Tensor) -> Any: ...

    def static_forward(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Heads:
    """A network's own classifiers on its exit features."""

    weight: torch.Tensor  # [C, D] the last exit's head (the static network's prediction)
    bias: torch.Tensor  # [C]
    # a multi-exit network's own per-exit classifiers, weight [K, D, C] and bias [K, C]; None for a single-head
    # network, whose intermediate heads the methods train themselves
    exits: tuple[torch.Tensor, torch.Tensor] | None = None


class Backbone:
    """Base of every backbone plugin (class methods only: a plugin holds no state; the config does)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    defaults: ClassVar[dict[str, Any]] = {}  # dataset name -> Config
    static_rows: ClassVar[bool] = True  # write the static network's rows (False: its static form is another's)

    # -- configuration ----------------------------------------------------------------------------------------
    @classmethod
    def default_config(cls, dataset: str):
        return copy.deepcopy(cls.defaults.get(dataset, cls.Config()))

    @classmethod
    def configure(cls, dataset: str, changes: dict[str, Any], owner: str = "backbone"):
        """The dataset's default config with ``changes`` (from ``--set backbone.FIELD=VALUE``) typed, range-checked
        and validated as a whole; a UserError names the field, the value and what is allowed."""
        cfg = dataclasses.replace(cls.default_config(dataset), **check_fields(cls.Config, owner, changes))
        cls.validate(cfg)
        return cfg

    @classmethod
    def validate(cls, cfg) -> None:
        """Refuse inconsistent settings (UserError) before any data is read: by default, build the network."""
        cls.create(cfg, in_chans=1, num_classes=2, load_weights=False)

    @classmethod
    def from_name(cls, name: str) -> dict[str, Any] | None:
        """Config changes if this plugin builds the network ``--backbone name`` names (e.g. a timm model name),
        else None."""
        return None

    # -- the network ------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg, in_chans: int, num_classes: int, load_weights: bool = True) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def train(cls, cfg, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
              num_classes: int, seed: int, device: str = "cpu", desc: str = "backbone"
              ) -> tuple[torch.nn.Module, float, int, list[dict]]:
        """Train from scratch or fine-tune; keep the epoch with the best *validation* accuracy. Returns (model in
        eval mode and frozen, val_accuracy, best_epoch, history)."""
        raise NotImplementedError

    @classmethod
    def stages(cls, model: torch.nn.Module) -> Stages:
        raise NotImplementedError

    @classmethod
    def macs(cls, model: torch.nn.Module) -> ExitMacs:
        raise NotImplementedError

    @classmethod
    def heads(cls, model: torch.nn.Module) -> Heads:
        raise NotImplementedError

    @classmethod
    def label(cls, cfg) -> str:
        raise NotImplementedError


BACKBONES: Registry[type[Backbone]] = Registry("backbone")


def register_backbone(name: str):
    def deco(cls):
        cls.name = name
        return BACKBONES.register(name)(cls)

    return deco


def resolve_backbone(name: str) -> tuple[str, dict[str, Any]]:
    """``--backbone NAME`` -> (registered backbone, config changes): a registered name as is, else the plugin
    that claims it (the ViT plugin claims timm ViT-family model names)."""
    if name in BACKBONES:
        return name, {}
    for plugin_name in BACKBONES.names():
        changes = BACKBONES.get(plugin_name).from_name(name)
        if changes is not None:
            return plugin_name, changes
    BACKBONES.get(name)  # raises the "unknown backbone, did you mean" error
    raise AssertionError


@dataclass
class TrainedBackbone:
    plugin: type[Backbone]
    model: torch.nn.Module  # eval mode, frozen
    config: Any  # plugin.Config
    key: str  # cache key: hash of everything that produced the weights
    val_accuracy: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)

    def stages(self) -> Stages:
        return self.plugin.stages(self.model)

    @property
    def label(self) -> str:
        return self.plugin.label(self.config)


# ---- shared pieces: input conversion, augmentation, the training loop -----------------------------------------
def to_tensor(x_uint8: np.ndarray | torch.Tensor, img_size: int, device: str | torch.device | None = None
              ) -> torch.Tensor:
    """uint8 images [N, H, W, C] (array or tensor) -> float [N, C, img_size, img_size] in [-1, 1] (resized if
    needed). With ``device`` the uint8 images move there first and are converted and resized there (a quarter of
    the bytes of a float copy; the resize of a 32 px photo to a pretrained ViT's 224 px runs on the GPU)."""
    x = x_uint8 if isinstance(x_uint8, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x_uint8))
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x


AUGMENTATIONS = ("none", "crop", "crop_flip")


def augment_draws(n: int, side: int, mode: str, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The random draws of ``augment_batch`` for ``n`` images of ``side`` pixels, on the CPU generator (so a seed
    gives the same crops on every device): (dy [n], dx [n], flip [n] bool); empty tuple for ``none``."""
    if mode == "none":
        return ()
    if mode not in AUGMENTATIONS:
        raise UserError(f"Unknown augmentation {mode!r}; use none, crop or crop_flip.")
    pad = max(1, side // 8)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5 if mode == "crop_flip" else torch.zeros(n, dtype=torch.bool)
    return dy, dx, flip


def apply_augmentation(x: torch.Tensor, draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Random crop after padding by 1/8 of the side, and a horizontal flip where ``flip`` is set, batched, from
    draws (``augment_draws``) already on x's device: no host synchronisation."""
    if not draws:
        return x
    dy, dx, flip = draws
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="constant", value=-1.0)
    # every crop at once (no per-image Python loop): the windows are a view [N, C, 2p+1, 2p+1, H, W], indexed
    # per image; the same draws give the same crops as slicing image by image
    windows = xp.unfold(2, h, 1).unfold(3, w, 1)
    out = windows[torch.arange(n, device=x.device), :, dy, dx]
    return torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)  # no boolean-mask indexing (a host sync)


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random crop after padding by 1/8 of the side (and a horizontal flip for ``crop_flip``), batched; the draws
    from the CPU generator ``gen``."""
    draws = augment_draws(x.shape[0], x.shape[-2], mode, gen)
    return apply_augmentation(x, tuple(d.to(x.device) for d in draws))


def epoch_draws(n: int, batch_size: int, side: int, mode: str, gen: torch.Generator, device
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One epoch's random draws, made on the CPU generator in the order the loop once made them step by step (the
    permutation, then per mini-batch dy, dx and flip), so a seed gives bit-identical CPU weights as before, and
    moved to ``device`` once: (perm [n], draws as ``augment_draws`` gives them, for all n positions)."""
    perm = torch.randperm(n, generator=gen)
    parts = [augment_draws(min(batch_size, n - i), side, mode, gen) for i in range(0, n, batch_size)]
    draws = tuple(torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))) if parts and parts[0] else ()
    return perm.to(device), tuple(d.to(device) for d in draws)


@torch.no_grad()
def block_features(st: Stages, x: torch.Tensor) -> torch.Tensor:
    """Per-exit features [K, N, D] for images [N, C, H, W], through the staged forward."""
    h = st.embed(x)
    feats = []
    for k in range(st.num_exits):
        h = st.block(k, h)
        feats.append(st.exit_feature(k, h))
    return torch.stack(feats)


def use_fast_cuda(device: str | torch.device) -> bool:
    """On CUDA: TF32 matmuls and convolutions and cuDNN autotuning (process-wide; fp32 tensors and master weights
    stay fp32). Returns whether ``device`` is CUDA. CPU runs are untouched."""
    if not str(device).startswith("cuda"):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return True


def arithmetic(device: str | torch.device, training: bool, compiled: bool = False) -> dict[str, str]:
    """The device type and precision a network is trained or its features computed in (both join the cache
    keys: a bf16 GPU checkpoint or TF32 GPU features are never silently reused by a CPU run, nor the reverse).
    On CUDA training runs under bf16 autocast with TF32 matmuls and features in fp32 with TF32
    (``use_fast_cuda``); on CPU both are plain fp32. A training step compiled by ``torch.compile`` (``--compile``)
    fuses operations and so rounds differently: it is named too (and only then, so other keys stay as they were)."""
    kind = torch.device(device).type
    extra = {"compile": "inductor"} if compiled and training else {}
    if kind != "cuda":
        return {"device_type": kind, "precision": "fp32", **extra}
    return {"device_type": kind, "precision": "bf16-autocast+tf32" if training else "fp32+tf32", **extra}


_COMPILE_TRAINING = False


@contextlib.contextmanager
def compiled_training(enabled: bool = True):
    """Within this block :func:`fit_epochs` compiles each network's training loss (forward and loss, so backward
    too) with ``torch.compile`` (``bench run --compile``). Off by default: measured on this project's 2-core CPU
    box, compiling the photo ViT's step took minutes and the compiled step was no faster; on a GPU the device
    check measures it (``bench.gpu_check``'s compile section)."""
    global _COMPILE_TRAINING
    before, _COMPILE_TRAINING = _COMPILE_TRAINING, bool(enabled)
    try:
        yield
    finally:
        _COMPILE_TRAINING = before


def fused_optimizer(device: str | torch.device) -> dict[str, bool]:
    """Keyword arguments of SGD / AdamW: the fused (one kernel per step) implementation on CUDA; the default
    elsewhere (the CPU arithmetic stays as it was)."""
    return {"fused": True} if str(device).startswith("cuda") else {}


# a CPU training whose estimated time exceeds this many seconds prints the estimate and how to shrink it
ESTIMATE_ABOVE_S = 300.0
_ESTIMATE_AFTER_STEPS = 4  # measured steps (after the first, which pays one-off costs) behind the estimate


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def warmup_cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """The learning rate at optimiser step ``step`` of ``total``: linear warm-up over ``warmup`` steps to
    ``base``, then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def warmup_cosine_schedule(opt: torch.optim.Optimizer, cfg, n_train: int):
    """The ``before_step`` hook of :func:`fit_epochs` that sets every parameter group's rate to
    :func:`warmup_cosine_lr` of ``cfg.lr`` over ``cfg.epochs`` epochs of ``n_train`` images at ``cfg.batch_size``,
    warming up over ``cfg.warmup_epochs``."""
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)

    def set_lr(step: int) -> None:
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, total, warmup, cfg.lr)
    return set_lr


def fit_epochs(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg, train_x: np.ndarray, train_y: np.ndarray,
               seed: int, device: str, desc: str, batch_loss, validate, before_step=None, after_epoch=None,
               channels_last: bool = False) -> tuple[torch.nn.Module, float, int, list[dict]]:
    """The training loop every backbone shares. Each epoch: shuffle (a generator seeded with ``seed``), then per
    mini-batch of ``cfg.batch_size`` images (augmented with ``cfg.augment``) ``before_step(step)``, the loss
    ``batch_loss(xb, yb)``, gradient clipping at ``cfg.clip_grad`` (if the config has it and it is > 0) and an
    optimiser step; then ``after_epoch()`` and ``validate() -> (val_accuracy, extra history fields)``. The epoch
    with the best validation accuracy is kept (never test). Returns (model with those weights, eval mode, frozen;
    val_accuracy; best_epoch; history).

    Inside ``bench.backbones.resume.resumable_training`` the state after each epoch is saved and a training that
    was interrupted goes on from its last finished epoch (``after_epoch`` is replayed once per finished epoch,
    so it must only advance a schedule); the resumed epochs' history entries say ``resumed_from``.

    Streamed images (``datasets.lazy``) are decoded a batch at a time in DataLoader workers, in the epoch's
    order; the draws are the same as for the array. On CUDA: in-memory uint8 training images live on the device
    for the whole run (converted, resized and augmented there, batched), the loss runs under bf16 autocast with
    TF32 matmuls (fp32 master weights), convolutional backbones pass ``channels_last``, and nothing waits for the
    GPU within an epoch (the loss is summed on the device and read once per epoch). On CPU the arithmetic is the
    same as it always was."""
    cuda = use_fast_cuda(device)
    if _COMPILE_TRAINING:
        batch_loss = torch.compile(batch_loss)
    gen = torch.Generator().manual_seed(seed)
    # streamed images (datasets.lazy: a set too big for memory) are decoded batch by batch in DataLoader workers,
    # in the epoch's shuffled order; an in-memory array is indexed directly (on CUDA: from the device)
    streamed = not isinstance(train_x, np.ndarray)
    x_all = None if streamed else torch.from_numpy(np.ascontiguousarray(train_x))
    y_all = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    if cuda:
        y_all = y_all.to(device)
        x_all = None if streamed else x_all.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
    clip = float(getattr(cfg, "clip_grad", 0.0) or 0.0)
    steps_per_epoch = -(-len(train_x) // cfg.batch_size)
    best: tuple[float, int, dict | None] = (-1.0, -1, None)
    history: list[dict] = []
    t0 = time.perf_counter()
    step = start = 0
    saved = resume.claim()
    state = saved.load(cfg.epochs) if saved is not None else None
    if state is not None:
        start, step, history = int(state["finished_epochs"]), int(state["step"]), list(state["history"])
        with warnings.catch_warnings():  # replayed before any optimiser step: torch warns about the order
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start if after_epoch is not None else 0):
                after_epoch()
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])  # after the replay: the saved rates win
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        best = (float(state["best_accuracy"]), int(state["best_epoch"]), state["best_model"])
        t0 -= float(state["seconds"])
        tqdm.write(f"{desc}: resuming after epoch {start} of {cfg.epochs} ({saved.path})")
    bar = tqdm(range(start, cfg.epochs), desc=desc, unit="epoch", dynamic_ncols=True, initial=start,
               total=cfg.epochs)
    for epoch in bar:
        model.train()
        perm, draws = epoch_draws(len(train_x), cfg.batch_size, cfg.img_size, cfg.augment, gen,
                                  "cpu" if streamed else x_all.device)
        if streamed:  # the order stays on the host (the decoders read it), the draws go where the images go
            decoded = iter_batches(train_x, cfg.batch_size, perm.numpy())
            perm, draws = perm.to(y_all.device), tuple(d.to(device) for d in draws)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(perm), cfg.batch_size):
            idx_dev = perm[i:i + cfg.batch_size]
            raw = torch.from_numpy(next(decoded)) if streamed else x_all[idx_dev]
            xb = apply_augmentation(to_tensor(raw, cfg.img_size, device if streamed else None),
                                    tuple(d[i:i + cfg.batch_size] for d in draws))
            if cuda and channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            if before_step is not None:
                before_step(step)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = batch_loss(xb, y_all[idx_dev])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            loss_sum += loss.detach().double() * len(idx_dev)
            step += 1
            if step == 1:
                t_first = time.perf_counter()
            elif step == 1 + _ESTIMATE_AFTER_STEPS and not cuda:
                _print_estimate(desc, device, cfg, cfg.epochs - start, steps_per_epoch,
                                (time.perf_counter() - t_first) / _ESTIMATE_AFTER_STEPS, saved is not None)
        if after_epoch is not None:
            after_epoch()
        train_loss = loss_sum.item() / len(perm)
        val_acc, extra = validate()
        history.append({"epoch": epoch, "train_loss": train_loss, "val_accuracy": val_acc, **extra,
                        "seconds": round(time.perf_counter() - t0, 3), **({"resumed_from": start} if start else {})})
        if val_acc > best[0]:
            best = (val_acc, epoch, copy.deepcopy(model.state_dict()))
        if saved is not None and epoch + 1 < cfg.epochs:
            saved.save({"epochs": cfg.epochs, "finished_epochs": epoch + 1, "step": step, "history": history,
                        "model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                        "torch_rng": torch.get_rng_state(), "best_accuracy": best[0], "best_epoch": best[1],
                        "best_model": best[2], "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_acc:.3f}", best=f"{best[0]:.3f}")
    model.load_state_dict(best[2])
    if cuda and channels_last:
        model.to(memory_format=torch.contiguous_format)  # the staged forward and the feature cache expect NCHW
    model.eval().requires_grad_(False)
    return model, best[0], best[1], history


# the fields that size a network, in the order the estimate names them (each backbone has some of them)
SIZE_FIELDS = ("depth", "embed_dim", "n_blocks", "channels", "growth_rate")


def _print_estimate(desc: str, device: str, cfg, epochs: int, steps_per_epoch: int, step_s: float,
                    resumable: bool = False) -> None:
    """Say, before a long CPU training gets far, how long its ``epochs`` (those left) will take, how to shrink it
    (naming the size fields this backbone's config has) and, if it saves its state, that a rerun resumes it."""
    total = step_s * epochs * steps_per_epoch
    if total < ESTIMATE_ABOVE_S:
        return
    size = " / ".join(f"backbone.{f}=N" for f in SIZE_FIELDS if hasattr(cfg, f))
    smaller = f"--set {size}, or --backbone" if size else "--backbone"
    tqdm.write(f"{desc}: about {_duration(total)} on {device} ({epochs} epochs x {steps_per_epoch} steps at "
               f"{step_s * 1000:.0f} ms per step, validation not included). To shrink it: fewer epochs "
               f"(--set backbone.epochs=N), a smaller network ({smaller}), or a GPU (--device cuda)."
               + (" If it is interrupted, the same command resumes it after its last finished epoch." if resumable
                  else ""))
