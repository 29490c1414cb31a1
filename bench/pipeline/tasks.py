"""Task loading: for one seed and one network, the split, the trained backbone (from the checkpoint cache or
trained and saved), its cached exit features (with ``--executor dask`` computed by the workers in index ranges:
``bench.pipeline.feature_ranges``) and the ``Task`` methods see. ``load_task`` is the public entry
point (the run, the investigation scripts and the perf tests use it) so nobody assembles a task by hand. The
features arrive one file per split, memory-mapped (``bench.pipeline.features``): building a Task reads none of
them into memory.

The backbones come from ``bench.pipeline.backbone_cache`` (checkpoints read with
``torch.load(weights_only=True)``: nothing a cache holds can run code).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.backbones.base import BACKBONES, TrainedBackbone
from bench.core.task import SplitData, Task
from bench.pipeline.backbone_cache import backbone_key, checkpoint_path, load_or_train_backbone  # noqa: F401
from bench.pipeline.config import RunConfig, default_cache_dir, resolve_device
from bench.pipeline.feature_ranges import dask_extractor, in_dask_worker
from bench.pipeline.features import load_or_compute_features
from bench.pipeline.splits import Splits, load_or_make_splits
from datasets import ImageDataset, load_dataset


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
    extract = None  # features computed here; with --executor dask, in ranges by the workers (not from a worker)
    if cfg.executor == "dask" and not in_dask_worker():
        extract = dask_extractor(cfg, cache, checkpoint_path(cache, backbone.plugin, dataset.name, backbone.key))
    feats = load_or_compute_features(cache, backbone, dataset, splits, device, extract)  # memory-mapped, per split
    return LoadedTask(dataset, splits, backbone, task_from_split_features(dataset, splits, backbone, feats))
