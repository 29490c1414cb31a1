"""Shared cross-entropy inference heads (IMs) on cached features.

One ``Linear(D, C)`` per intermediate exit (exits 0..K-2), trained with plain cross-entropy; the backbone's
own head is the last exit. On a multi-exit backbone (MSDNet) the heads are the network's own classifiers,
trained with it: "threshold on MSDNet" is then MSDNet's exits under the threshold rule. All heads train at once as one batched einsum (their losses are independent), and
each head keeps the epoch with its best validation accuracy. ``threshold``, ``entropy`` (and any method that
asks for the same hyper-parameters) get identical heads: results are memoised per (task, hyper-parameters).
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.base.fields import bounded
from bench.core.interface import ScoreExitMethod
from bench.core.task import SplitData, Task


@dataclass(frozen=True)
class HeadConfig:
    # lr 1e-2 matters: at 1e-3 the heads underfit on digits (exit-0 test accuracy 0.49 vs 0.60, ECE 0.18-0.41
    # vs 0.03-0.07), which would make every early exit look worse than it is.
    epochs: int = 50
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 256


@dataclass
class LinearHeads:
    weight: torch.Tensor  # [K-1, D, C]
    bias: torch.Tensor  # [K-1, C]
    val_accuracy: np.ndarray  # [K-1] best validation accuracy per head

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Intermediate-exit logits [K-1, N, C] from features [>= K-1, N, D]."""
        k = self.weight.shape[0]
        return torch.einsum("knd,kdc->knc", features[:k], self.weight) + self.bias[:, None, :]


_MEMO: dict[tuple, LinearHeads] = {}


def shared_heads(task: Task, cfg: HeadConfig) -> LinearHeads:
    """The heads on this task's intermediate exits: a multi-exit backbone's own trained classifiers (MSDNet's),
    else linear heads trained here with ``cfg``."""
    if task.exit_heads is not None:
        w, b = task.exit_heads
        return LinearHeads(w[:-1], b[:-1], np.full(len(w) - 1, np.nan))
    key = (task.key, task.seed, cfg)
    if key not in _MEMO:
        _MEMO.clear()  # one task at a time is enough, and keeps memory flat over a sweep
        _MEMO[key] = train_heads(task.splits["train"], task.splits["val"], task.num_classes, task.seed, cfg)
    return _MEMO[key]


def train_heads(train: SplitData, val: SplitData, num_classes: int, seed: int, cfg: HeadConfig) -> LinearHeads:
    k, n, d = train.features.shape
    k -= 1
    gen = torch.Generator().manual_seed(seed)
    w = torch.empty(k, d, num_classes)
    for i in range(k):  # nn.Linear's default init, per head
        torch.nn.init.kaiming_uniform_(w[i].T, a=5 ** 0.5, generator=gen)
    b = (torch.rand(k, num_classes, generator=gen) * 2 - 1) / d ** 0.5
    w.requires_grad_(True), b.requires_grad_(True)
    opt = torch.optim.AdamW([w, b], lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = train.features[:k], torch.from_numpy(train.labels)
    xv, yv = val.features[:k], torch.from_numpy(val.labels)
    best_acc = torch.full((k,), -1.0)
    best_w, best_b = w.detach().clone(), b.detach().clone()
    steps = cfg.epochs * -(-n // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    for _ in tqdm(range(cfg.epochs), desc="train exit heads", unit="epoch", leave=False, dynamic_ncols=True):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            logits = torch.einsum("knd,kdc->knc", x[:, idx], w) + b[:, None, :]
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y[idx].repeat(k), reduction="sum") / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            acc = ((torch.einsum("knd,kdc->knc", xv, w) + b[:, None, :]).argmax(-1) == yv).float().mean(1)
            better = acc > best_acc
            best_acc = torch.where(better, acc, best_acc)
            best_w[better], best_b[better] = w.detach()[better], b.detach()[better]
    return LinearHeads(best_w, best_b, best_acc.numpy())


class OnSharedHeads:
    """Mixin: per-exit logits from the shared heads (``shared_heads``) and the backbone's own last head.
    ``_fit_heads`` sets ``heads_`` and the costs: each intermediate exit adds its head (D*C MACs), the
    decision (``decision_macs``) and, on MSDNet, its classifier's convs (``Task.exit_costs``)."""

    def _fit_heads(self, task: Task, cfg: HeadConfig) -> None:
        self.heads_ = shared_heads(task, cfg)
        self.head_weight_, self.head_bias_ = task.head_weight, task.head_bias
        per_exit = task.im_head_macs() + self.decision_macs(task.num_classes)
        self.costs_ = task.exit_costs(np.full(task.num_exits - 1, per_exit))

    def exit_head(self, k: int, features_k: torch.Tensor, point=None) -> torch.Tensor:
        with torch.no_grad():
            if k == len(self.costs_) - 1:
                return features_k @ self.head_weight_.T + self.head_bias_
            return features_k @ self.heads_.weight[k] + self.heads_.bias[k]

    def exit_logits(self, split: SplitData, point=None) -> torch.Tensor:
        """Per-exit logits [K, N, C]: the IMs, then the backbone's own head on the last feature."""
        self.check_fitted()
        with torch.no_grad():
            last = split.features[-1] @ self.head_weight_.T + self.head_bias_
            return torch.cat([self.heads_.logits(split.features), last[None]])


@dataclass
class CrossEntropyHeadsMethod(OnSharedHeads, ScoreExitMethod):
    """Base of the score-based methods on the shared cross-entropy heads (threshold, entropy, ...)."""

    epochs: int = bounded(HeadConfig.epochs, min=1)
    lr: float = bounded(HeadConfig.lr, min=0.0)
    weight_decay: float = bounded(HeadConfig.weight_decay, min=0.0)
    batch_size: int = bounded(HeadConfig.batch_size, min=1)

    def fit(self, task: Task) -> "CrossEntropyHeadsMethod":
        self._fit_heads(task, HeadConfig(self.epochs, self.lr, self.weight_decay, self.batch_size))
        return self
