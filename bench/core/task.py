"""What a method sees: cached per-exit features for each split, labels, the backbone's own head (the last
exit) and the per-block MAC counts. Methods never see the backbone or the images."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from bench.measure.flops import ExitMacs, linear_macs


@dataclass
class SplitData:
    features: torch.Tensor  # [K, N, D] float32, exit features (CLS token after the final norm)
    labels: np.ndarray | None  # [N] int64; None where labels are hidden
    sample_ids: np.ndarray  # [N] indices into the dataset's official train (train/val/cal) or test array

    def __len__(self) -> int:
        return self.features.shape[1]

    def subset(self, idx: np.ndarray) -> "SplitData":
        idx = np.asarray(idx)
        return SplitData(self.features[:, torch.from_numpy(idx)],
                         None if self.labels is None else self.labels[idx], self.sample_ids[idx])

    def without_labels(self) -> "SplitData":
        return replace(self, labels=None)


@dataclass
class Task:
    dataset: str
    seed: int  # the replication seed: split, backbone and method randomness
    num_classes: int
    splits: dict[str, SplitData]  # train, val, cal, test
    head_weight: torch.Tensor  # [C, D] the backbone's classifier (the last exit)
    head_bias: torch.Tensor  # [C]
    macs: ExitMacs  # per-image MACs of the static backbone, per block
    key: str  # identifies the frozen backbone + split: methods may cache on it
    split_sha256: str = ""
    backbone: str = "vit"  # the label of the network that produced the features (its plugin's ``label``)
    network: str = "vit"  # the registered backbone plugin (bench.backbones) that produced them
    # a multi-exit backbone's own trained exit classifiers (MSDNet): weight [K, D, C], bias [K, C]; None for a
    # single-exit backbone, whose intermediate heads the methods train themselves
    exit_heads: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_exits(self) -> int:
        return self.splits["train"].features.shape[0]

    @property
    def dim(self) -> int:
        return self.splits["train"].features.shape[2]

    def final_logits(self, split: SplitData) -> torch.Tensor:
        """The backbone's own prediction [N, C] from the last exit feature."""
        return split.features[-1] @ self.head_weight.T + self.head_bias

    def exit_costs(self, extra_per_exit: np.ndarray) -> np.ndarray:
        """Cumulative per-image MACs [K] of leaving at each exit: backbone blocks run, plus
        ``extra_per_exit`` [K-1] (head + decision of each intermediate exit evaluated on the way) and the cost of
        each intermediate exit's feature (``macs.exit_features``; zero for the ViT), plus the backbone's head at
        the last exit. So the last exit costs the static backbone plus all overheads."""
        k = self.num_exits
        extra = np.asarray(extra_per_exit, dtype=np.int64)
        assert extra.shape == (k - 1,), (extra.shape, k)
        if self.macs.exit_features:
            assert len(self.macs.exit_features) == k - 1, (self.macs.exit_features, k)
            extra = extra + np.asarray(self.macs.exit_features, dtype=np.int64)
        cost = self.macs.cumulative_blocks().astype(np.int64).copy()
        cost[:-1] += np.cumsum(extra)
        cost[-1] += extra.sum() + self.macs.head
        return cost

    def im_head_macs(self) -> int:
        return linear_macs(self.dim, self.num_classes)


def synthetic_task(num_exits: int = 4, n: int = 400, dim: int = 16, num_classes: int = 5, seed: int = 0,
                   noise: float = 1.5) -> Task:
    """A small task whose exits get better with depth: class means plus noise that shrinks with k. Used by
    the tests and by ``bench check`` so every method is exercised in seconds."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim)) * 1.5
    splits = {}
    sizes = {"train": n, "val": n // 2, "cal": n // 2, "test": n // 2}
    for name, m in sizes.items():
        y = rng.integers(0, num_classes, size=m)
        hard = rng.uniform(0.3, 1.7, size=m)  # per-sample difficulty, shared across exits
        feats = np.stack([means[y] + rng.normal(size=(m, dim)) * noise * hard[:, None] * (1 - k / (num_exits + 1))
                          for k in range(num_exits)])
        splits[name] = SplitData(torch.tensor(feats, dtype=torch.float32), y.astype(np.int64),
                                 np.arange(m, dtype=np.int64))
    # the backbone head: least-squares class means are a decent linear classifier on the last exit
    w = torch.tensor(means, dtype=torch.float32) / noise
    b = -0.5 * (w * torch.tensor(means, dtype=torch.float32)).sum(1) / noise
    per_block = 1000 * dim
    macs = ExitMacs(embed=100 * dim, blocks=tuple([per_block] * num_exits), head=dim * num_classes)
    key = f"synthetic-{seed}-{n}-{num_exits}-{dim}-{num_classes}-{noise}"
    return Task("synthetic", seed, num_classes, splits, w, b, macs, key=key, split_sha256="synthetic")
