"""The backbone checkpoint cache: one trained backbone per (network config, dataset, split, seed, data,
arithmetic), trained once under a lock (``exclusive``) and saved atomically as
``<cache>/backbones/<dataset>-<network>-<key>.pt`` (``.pt.partial`` holds an unfinished training's state after
each epoch: an interrupted training resumes from it). The driver trains it (``load_or_train_backbone``); Dask
workers that extract features load it (``load_checkpoint``, ``bench.pipeline.feature_ranges``).

Checkpoints hold tensors and plain numbers only and are read with ``torch.load(weights_only=True)``: nothing a
cache holds can run code.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from bench.backbones.base import Backbone, TrainedBackbone, arithmetic, compiled_training
from bench.backbones.resume import resumable_training
from bench.base.hashing import atomic_write, config_hash
from bench.base.locks import exclusive
from bench.pipeline.splits import Splits
from datasets import ImageDataset, take

log = logging.getLogger(__name__)


def backbone_key(plugin: type[Backbone], cfg, dataset: str, split_sha: str, seed: int, data_source: str,
                 device: str | torch.device = "cpu", compiled: bool = False) -> str:
    return config_hash({"backbone": dataclasses.asdict(cfg), "plugin": plugin.name, "dataset": dataset,
                        "split": split_sha, "seed": seed, "data": data_source,
                        "torch": torch.__version__.split("+")[0], **arithmetic(device, True, compiled), "v": 2})


def load_or_train_backbone(cache_dir: Path, plugin: type[Backbone], cfg, dataset: ImageDataset, splits: Splits,
                           device: str = "cpu", compiled: bool = False) -> TrainedBackbone:
    """The backbone for (dataset, split, seed, config): from the checkpoint cache when a valid one exists,
    otherwise trained and saved. A checkpoint that fails to load safely or was made by another config is
    rebuilt, with a warning."""
    key = backbone_key(plugin, cfg, dataset.name, splits.sha256, splits.seed, dataset.source, device, compiled)
    path = checkpoint_path(cache_dir, plugin, dataset.name, key)
    cached = load_checkpoint(path, plugin, cfg, key, dataset, device)
    if cached is not None:
        return cached
    what = f"backbone {plugin.label(cfg)} ({dataset.name}, seed {splits.seed})"
    with exclusive(Path(cache_dir) / "locks" / f"{path.stem}.lock", what):
        cached = load_checkpoint(path, plugin, cfg, key, dataset, device)  # trained by the process we waited for
        if cached is not None:
            return cached
        tr, va = splits.train, splits.val
        # take: streamed images stay a view (x[idx] would decode them all here); an interrupted training resumes
        # from the state its last finished epoch left next to the checkpoint (bench.backbones.resume)
        with compiled_training(compiled), resumable_training(partial_path(path), key) as saved:
            model, val_acc, best_epoch, history = plugin.train(
                cfg, take(dataset.train_x, tr), dataset.train_y[tr], take(dataset.train_x, va), dataset.train_y[va],
                dataset.num_classes, splits.seed, device,
                desc=f"train backbone {plugin.label(cfg)} ({dataset.name}, seed {splits.seed})")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: torch.save({"key": key, "state_dict": state, "val_accuracy": float(val_acc),
                                                   "best_epoch": int(best_epoch), "history": history,
                                                   "config": dataclasses.asdict(cfg)}, tmp))
        saved.remove()
    return TrainedBackbone(plugin, model, cfg, key, val_acc, best_epoch, history)


def checkpoint_path(cache_dir: str | Path, plugin: type[Backbone], dataset: str, key: str) -> Path:
    """Where the checkpoint of backbone ``key`` lives (workers get this path to load it)."""
    return Path(cache_dir) / "backbones" / f"{dataset}-{plugin.name}-{key}.pt"


def partial_path(path: Path) -> Path:
    """Where the training of checkpoint ``path`` keeps its state between epochs until the checkpoint is written."""
    return path.with_name(path.name + ".partial")


def load_checkpoint(path: Path, plugin: type[Backbone], cfg, key: str, dataset: ImageDataset, device: str
                    ) -> TrainedBackbone | None:
    """The cached backbone, or None when there is none or it is unusable (truncated, corrupt, unsafe to load,
    made by another configuration: reported, then rebuilt)."""
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("key") != key:
            raise ValueError("checkpoint was made by another configuration")
        model = plugin.create(cfg, dataset.train_x.shape[-1], dataset.num_classes, load_weights=False)
        model.load_state_dict(ckpt["state_dict"])
        model.eval().requires_grad_(False)
        return TrainedBackbone(plugin, model.to(device), cfg, key, ckpt["val_accuracy"], ckpt["best_epoch"],
                               ckpt["history"])
    except Exception as e:  # truncated, corrupt, unsafe or foreign file: never use it, rebuild
        log.warning("backbone checkpoint %s is unusable (%s: %s); retraining", path, type(e).__name__, e)
        return None
