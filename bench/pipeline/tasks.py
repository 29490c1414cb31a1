"""Task loading: for one seed and one network, the split, the trained backbone (from the checkpoint cache or
trained and saved), its cached exit features and the ``Task`` methods see. ``load_task`` is the public entry
point (the run, the investigation scripts and the perf tests use it) so nobody assembles a task by hand. The
features arrive one file per split, memory-mapped (``bench.pipeline.features``): building a Task reads none of
them into memory.

Checkpoints hold tensors and plain numbers only and are read with ``torch.load(weights_only=True)``: nothing a
cache holds can run code.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.backbones.base import BACKBONES, Backbone, TrainedBackbone, arithmetic, compiled_training
from bench.base.hashing import atomic_write, config_hash
from bench.base.locks import exclusive
from bench.core.task import SplitData, Task
from bench.pipeline.config import RunConfig, default_cache_dir, resolve_device
from bench.pipeline.features import load_or_compute_features
from bench.pipeline.splits import Splits, load_or_make_splits
from datasets import ImageDataset, load_dataset

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
    path = Path(cache_dir) / "backbones" / f"{dataset.name}-{plugin.name}-{key}.pt"
    cached = _load_checkpoint(path, plugin, cfg, key, dataset, device)
    if cached is not None:
        return cached
    with exclusive(Path(cache_dir) / "locks" / f"{path.stem}.lock", f"backbone {plugin.label(cfg)} ({dataset.name}, seed {splits.seed})"):
        cached = _load_checkpoint(path, plugin, cfg, key, dataset, device)  # trained by the process we waited for
        if cached is not None:
            return cached
        tr, va = splits.train, splits.val
        with compiled_training(compiled):
            model, val_acc, best_epoch, history = plugin.train(
                cfg, dataset.train_x[tr], dataset.train_y[tr], dataset.train_x[va], dataset.train_y[va],
                dataset.num_classes, splits.seed, device,
                desc=f"train backbone {plugin.label(cfg)} ({dataset.name}, seed {splits.seed})")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: torch.save({"key": key, "state_dict": state, "val_accuracy": float(val_acc),
                                                   "best_epoch": int(best_epoch), "history": history,
                                                   "config": dataclasses.asdict(cfg)}, tmp))
    return TrainedBackbone(plugin, model, cfg, key, val_acc, best_epoch, history)


def _load_checkpoint(path: Path, plugin: type[Backbone], cfg, key: str, dataset: ImageDataset, device: str
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


def build_task(dataset: ImageDataset, splits: Splits, backbone: TrainedBackbone, feats: dict[str, torch.Tensor]
               ) -> Task:
    """The Task from in-memory features of the dataset's whole arrays ({"train": [K, N_train, D], "test":
    [K, N_test, D]}, e.g. ``compute_features``'), each split's rows indexed out (copies)."""
    per_split = {name: feats["train"][:, torch.from_numpy(splits[name])] for name in ("train", "val", "cal")}
    whole = np.array_equal(splits.test, np.arange(feats["test"].shape[1]))  # the usual case: no copy
    per_split["test"] = feats["test"] if whole else feats["test"][:, torch.from_numpy(splits.test)]
    return task_from_split_features(dataset, splits, backbone, per_split)


def task_from_split_features(dataset: ImageDataset, splits: Splits, backbone: TrainedBackbone,
                             feats: dict[str, torch.Tensor]) -> Task:
    """The Task from each split's features ({"train", "val", "cal", "test"}: [K, n, D], rows in ``splits``'
    order), used as given: the cache's memory-mapped tensors stay on disk until a method touches them."""
    parts = {}
    for name in ("train", "val", "cal"):
        idx = splits[name]
        parts[name] = SplitData(feats[name], dataset.train_y[idx], idx)
    parts["test"] = SplitData(feats["test"], dataset.test_y[splits.test], splits.test)
    heads = backbone.plugin.heads(backbone.model)
    return Task(dataset.name, splits.seed, dataset.num_classes, parts, heads.weight, heads.bias,
                backbone.plugin.macs(backbone.model.cpu()), key=backbone.key, split_sha256=splits.sha256,
                backbone=backbone.label, network=backbone.plugin.name, exit_heads=heads.exits)


@dataclass
class LoadedTask:
    dataset: ImageDataset
    splits: Splits
    backbone: TrainedBackbone
    task: Task


def cache_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def load_task(cfg: RunConfig, seed: int, network: str | None = None, dataset: ImageDataset | None = None
              ) -> LoadedTask:
    """Split, backbone (``network``, default the run's) and features of one seed, built once and then served
    from ``cfg``'s cache, and the Task methods fit on."""
    if dataset is None:
        dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                               cache_dir=cfg.cache_dir)
    network = network or cfg.run_backbone
    cache = cache_dir_of(cfg)
    torch.manual_seed(seed)
    splits = load_or_make_splits(cache, dataset.name, dataset.train_y, len(dataset.test_y), seed)
    device = resolve_device(cfg.device)
    backbone = load_or_train_backbone(cache, BACKBONES.get(network), cfg.backbone_config(network), dataset, splits,
                                      device, cfg.compile)
    feats = load_or_compute_features(cache, backbone, dataset, splits, device)  # memory-mapped, per split
    return LoadedTask(dataset, splits, backbone, task_from_split_features(dataset, splits, backbone, feats))
