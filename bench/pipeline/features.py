"""The frozen-backbone feature cache: per-block exit features [K, N, D] for the whole training array and the
whole test array, computed once per trained backbone and reused by every method and later run.

A cache file carries a sidecar JSON with its key and sha256; a file that is missing its sidecar, truncated,
corrupt or built for another key is detected, reported and rebuilt — never silently used.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.backbones.base import Stages, TrainedBackbone, arithmetic, block_features, to_tensor, use_fast_cuda
from bench.base.hashing import atomic_write, atomic_write_text, config_hash, file_sha256
from bench.base.locks import exclusive

log = logging.getLogger(__name__)


def compute_features(st: Stages, x_uint8: np.ndarray, img_size: int, batch_size: int = 512, device: str = "cpu",
                     desc: str = "features") -> torch.Tensor:
    """Exit features [K, N, D] (float32, CPU) for uint8 images [N, H, W, C], through the staged forward. On CUDA
    in fp32 with TF32 matmuls, as the real early-exit runner computes them (not bf16: the simulation from these
    features and the real runner must agree)."""
    use_fast_cuda(device)
    chunks = []
    for i in tqdm(range(0, len(x_uint8), batch_size), desc=desc, unit="batch", dynamic_ncols=True,
                  leave=False):
        xb = to_tensor(x_uint8[i:i + batch_size], img_size, device)
        chunks.append(block_features(st, xb).float().cpu())
    return torch.cat(chunks, dim=1)


def feature_paths(cache_dir: Path, dataset: str, key: str) -> tuple[Path, Path]:
    path = Path(cache_dir) / "features" / f"{dataset}-{key}.pt"
    return path, path.with_suffix(".json")


def load_cached(path: Path, meta_path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors if the file is intact and was built for ``key``; None (with a warning) otherwise."""
    if not path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            raise ValueError(f"built for key {meta.get('key')}, need {key}")
        if file_sha256(path) != meta["sha256"]:
            raise ValueError("sha256 mismatch (truncated or modified file)")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if set(data) != {"train", "test"}:
            raise ValueError(f"unexpected contents {sorted(data)}")
        return data
    except Exception as e:
        log.warning("feature cache %s is unusable (%s: %s); rebuilding", path, type(e).__name__, e)
        return None


def feature_key(backbone: TrainedBackbone, device: str = "cpu") -> str:
    """The features are a function of the trained weights, the data and the arithmetic they were computed in
    (device type and precision: TF32 GPU features are not a CPU run's)."""
    return config_hash({"backbone": backbone.key, **arithmetic(device, training=False)})


def load_or_compute_features(cache_dir: Path, backbone: TrainedBackbone, dataset, device: str = "cpu"
                             ) -> dict[str, torch.Tensor]:
    """{"train": [K, N_train, D], "test": [K, N_test, D]} for the dataset's full train and test arrays."""
    key = feature_key(backbone, device)
    path, meta_path = feature_paths(cache_dir, dataset.name, key)
    data = load_cached(path, meta_path, key)
    if data is not None:
        return data
    with exclusive(Path(cache_dir) / "locks" / f"features-{path.stem}.lock", f"the features of {backbone.label}"):
        data = load_cached(path, meta_path, key)  # written by the process we waited for
        return data if data is not None else _compute_and_save(path, meta_path, key, backbone, dataset, device)


def _compute_and_save(path: Path, meta_path: Path, key: str, backbone: TrainedBackbone, dataset, device: str
                      ) -> dict[str, torch.Tensor]:
    img = backbone.config.img_size
    bs = backbone.config.eval_batch_size
    backbone.model.eval()
    st = backbone.stages()
    data = {"train": compute_features(st, dataset.train_x, img, bs, device, "features (train)"),
            "test": compute_features(st, dataset.test_x, img, bs, device, "features (test)")}
    atomic_write(path, lambda tmp: torch.save(data, tmp))
    atomic_write_text(meta_path, json.dumps({"key": key, "sha256": file_sha256(path),
                                             "shape_train": list(data["train"].shape),
                                             "shape_test": list(data["test"].shape)}))
    return data
