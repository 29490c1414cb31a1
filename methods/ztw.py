"""``ztw`` — Zero Time Waste (Wołczyk et al., NeurIPS 2021): cascading heads, a learned geometric ensemble.

Method card
- Paper: "Zero Time Waste: Recycling Predictions in Early Exit Neural Networks", NeurIPS 2021; reference code
  gmum/Zero-Time-Waste at 8341f3a, ``ztw_cv/architectures/early_exits/ztw.py`` (``ZTWCascading``,
  ``ZTWEnsembling`` with ``GeometricWeightedEnsemble``), ``heads.py`` (``vit_cascading_head_class(1)``, the head
  of its ViT-B/16 runs) and ``methods/early_exit.py`` (training).
- What the authors' code does (checked against it: tests/test_ztw.py, tests/data/ztw_official.md):
  - Heads on the frozen backbone (``with_backbone=False``). Head 0 is ``Linear(D, C)`` on the exit's CLS token;
    head k >= 1 is ``Linear(D + C, C)`` on ``cat(x_k, LayerNorm_C(stopgrad(z_{k-1})))``, z_{k-1} the previous
    head's logits (``detach=True``, ``layer_norm=True``, a LayerNorm with its own affine per head). The backbone's
    own head is the last exit and takes no cascading input.
  - Stage 1 trains all heads at once with the mean over the K outputs (the K-1 heads and the frozen backbone's
    output) of the batch-mean cross-entropy; AdamW (lr 5e-3, wd 1e-4 on every parameter), cosine schedule per
    step, PyTorch's default init; the final weights are kept.
  - Stage 2 freezes the heads and trains one ``GeometricWeightedEnsemble`` per head k on the heads' log-softmax
    outputs 0..k: ``e_k = mean_i(exp(w_{k,i}) * log_softmax(z_i)) + b_k`` (w_{k,i} ~ N(0, 0.01), b_k = 0 [C]), so
    ``softmax(e_k)`` is the normalised product of ``p_i ** (exp(w_{k,i}) / (k + 1))`` times ``exp(b_k)``. The
    loss is again the mean CE over the K outputs (the backbone's output passes through un-ensembled); AdamW lr
    1e-3, wd 0, cosine.
  - Exit: the first exit whose ``max softmax(e_k)`` exceeds a threshold (their eval.py sweeps 0..1).
- What we do differently, and why:
  - Features: the harness's cached per-exit features (CLS token after the final norm) replace ``x[:, 0]`` of
    the running network; on MSDNet, its classifiers' pooled features, with linear cascading heads (the authors
    used conv heads on CNNs).
  - Model selection: like the shared heads, validation picks the heads' epoch, for the cascade as a whole (the
    epoch with the best mean validation accuracy over the heads), because head k was trained on the outputs of
    head k-1 at the same epoch. The ensembles (k + 1 + C parameters each) keep their last epoch, as the
    authors': on digits (144 validation images) selecting them on validation CE or accuracy kept near-initial
    weights and lost 1-4 points of test accuracy at exits 1-3 (seeds 0 and 1) against the last epoch.
  - Schedule: the shared heads' (50 epochs, batch 256, lr 1e-2: on digits seeds 0-2 it beat the authors' 5e-3
    by 0.9-1.0 points of mean head accuracy) on these small cached sets instead of the authors' 15 + 2 ImageNet
    epochs at batch 64; the ensemble stage gets lr 1e-2 for 100 epochs (the authors' 1e-3 over 2 ImageNet epochs
    is ~40k steps; ours are a few hundred). Fields change all of these.
  - Thresholds: the harness's shared calibration per budget, exit when the score is >= the threshold (the
    authors' eval uses >); ``--set ztw.scheme=geometric`` gives MSDNet's per-exit thresholds.
- Streaming: ``stream`` carries, per running sample, the previous head's logits (``prev``) and the stacked
  log-probabilities of heads 0..k-1 (``logp`` [N, k, C]): each ensemble has its own weights on every earlier
  head, so a single running sum cannot serve exit k (that would be a fixed geometric mean, not ZTW's ensemble).
- Cost per intermediate exit k (MACs, one multiply-add = 1): the head's ``D*C``; for k >= 1 the cascading input
  ``C*C`` plus its LayerNorm ``5C`` (fvcore's count for an affine norm); the log-softmax ``2C``; the ensemble
  ``(k + 1) * C + C`` (weighted sum, bias; exp(w) / (k + 1) folded in once); the decision ``2C`` (softmax
  normaliser and max). The last exit is the backbone's head, its cost counted by the harness.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.base.fields import bounded
from bench.core.interface import OperatingPoint, ScoreExitMethod, register_method
from bench.core.task import SplitData, Task
from bench.measure.flops import linear_macs

LN_EPS = 1e-5  # nn.LayerNorm's default, as the authors' heads


# ---- the pieces, the authors' arithmetic ----------------------------------------------------------------------
def cascading_head(x: torch.Tensor, prev: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   ln_weight: torch.Tensor | None = None, ln_bias: torch.Tensor | None = None,
                   detach: bool = True) -> torch.Tensor:
    """One ZTW head's logits [N, C] from its exit's features x [N, D] and the previous head's logits prev [N, C]
    (None for head 0): ``Linear(cat(x, LayerNorm(stopgrad(prev))))`` (``ViTCascadingHead.forward``). ``weight``
    is [C, D] or [C, D + C] (nn.Linear's layout); ``ln_weight`` None: no LayerNorm (``layer_norm=False``)."""
    if prev is not None:
        if detach:
            prev = prev.detach()
        if ln_weight is not None:
            prev = F.layer_norm(prev, prev.shape[-1:], ln_weight, ln_bias, LN_EPS)
        x = torch.cat((x, prev), dim=-1)
    return F.linear(x, weight, bias)


def geometric_ensemble(logp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``GeometricWeightedEnsemble.forward``: logits [N, C] from the log-probabilities of heads 0..k, logp
    [N, k+1, C], raw weights [k+1] (used as exp(w)) and bias [C]: mean_i(exp(w_i) logp_i) + b."""
    return torch.mean(logp * weight.exp()[None, :, None], dim=1) + bias


def ztw_loss(outputs: list[torch.Tensor], final: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The authors' loss in both stages (``methods/early_exit.py``): the mean over the K outputs (the K-1 heads
    or ensembles, then the backbone's logits ``final``) of each output's batch-mean cross-entropy."""
    losses = [F.cross_entropy(o, targets) for o in [*outputs, final]]
    return sum(losses) / len(losses)


# ---- training ---------------------------------------------------------------------------------------------------
@dataclass
class Cascade:
    """The K-1 cascading heads: weights [C, D] (head 0) and [C, D + C], biases [K-1, C], LayerNorm affine
    [K-1, C] (row 0 unused, as the authors' head 0 holds an unused norm) or None without LayerNorm."""
    weight: list[torch.Tensor]
    bias: torch.Tensor
    ln_weight: torch.Tensor | None
    ln_bias: torch.Tensor | None
    detach: bool = True

    def head(self, k: int, x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        ln_w = None if self.ln_weight is None else self.ln_weight[k]
        ln_b = None if self.ln_bias is None else self.ln_bias[k]
        return cascading_head(x, prev if k else None, self.weight[k], self.bias[k], ln_w, ln_b, self.detach)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head, [N, C] each, from features [>= K-1, N, D]."""
        out: list[torch.Tensor] = []
        for k in range(len(self.weight)):
            out.append(self.head(k, features[k], out[-1] if out else None))
        return out

    def parameters(self) -> list[torch.Tensor]:
        return [*self.weight, self.bias, *([] if self.ln_weight is None else [self.ln_weight, self.ln_bias])]

    def snapshot(self) -> "Cascade":
        d = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        return Cascade([d(w) for w in self.weight], d(self.bias), d(self.ln_weight), d(self.ln_bias), self.detach)


def init_cascade(k_heads: int, d: int, c: int, gen: torch.Generator, layer_norm: bool = True,
                 detach: bool = True) -> Cascade:
    """nn.Linear's default init per head (fan-in D, or D + C with the cascading input), LayerNorm ones/zeros."""
    ws, bs = [], []
    for k in range(k_heads):
        fan_in = d + (c if k else 0)
        w = torch.empty(c, fan_in)
        torch.nn.init.kaiming_uniform_(w, a=5 ** 0.5, generator=gen)
        ws.append(w)
        bs.append((torch.rand(c, generator=gen) * 2 - 1) / fan_in ** 0.5)
    bias = torch.stack(bs) if bs else torch.zeros(0, c)
    ln_w, ln_b = (torch.ones(k_heads, c), torch.zeros(k_heads, c)) if layer_norm else (None, None)
    return Cascade(ws, bias, ln_w, ln_b, detach)


def _batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def train_cascade(train: SplitData, val: SplitData, final: torch.Tensor, num_classes: int, seed: int,
                  epochs: int, lr: float, weight_decay: float, batch_size: int, layer_norm: bool = True,
                  detach: bool = True) -> tuple[Cascade, np.ndarray, int, list[float]]:
    """Stage 1: every head at once with ``ztw_loss`` (``final`` [N, C]: the backbone's train logits), AdamW and
    a cosine schedule per step; keeps the epoch with the best mean validation accuracy over the heads. Returns
    (the cascade, its per-head validation accuracy [K-1], the epoch kept (1-based), mean train loss per epoch)."""
    k_all, n, d = train.features.shape
    gen = torch.Generator().manual_seed(seed)
    cas = init_cascade(k_all - 1, d, num_classes, gen, layer_norm, detach)
    if k_all == 1:  # the backbone's head alone: nothing to train
        return cas, np.zeros(0), 0, []
    for p in cas.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(cas.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * -(-n // batch_size)))
    y, yv = torch.from_numpy(train.labels), torch.from_numpy(val.labels)
    best, best_acc, best_epoch, history = cas.snapshot(), np.full(k_all - 1, np.nan), 0, []
    best_mean = -1.0
    for epoch in tqdm(range(epochs), desc="train ztw heads", unit="epoch", leave=False, dynamic_ncols=True):
        total = 0.0
        for idx in _batches(n, batch_size, gen):
            total += _step(opt, sched, ztw_loss(cas.forward(train.features[:, idx]), final[idx], y[idx])) * len(idx)
        history.append(total / n)
        with torch.no_grad():
            acc = np.array([(z.argmax(1) == yv).float().mean().item() for z in cas.forward(val.features)])
        if acc.mean() > best_mean:
            best, best_acc, best_epoch, best_mean = cas.snapshot(), acc, epoch + 1, float(acc.mean())
    return best, best_acc, best_epoch, history


def _step(opt: torch.optim.Optimizer, sched, loss: torch.Tensor) -> float:
    """One optimiser and schedule step on ``loss``; returns its value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def log_probs(cas: Cascade, features: torch.Tensor) -> torch.Tensor:
    """Stacked log-softmax of every head, [N, K-1, C], without gradients."""
    with torch.no_grad():
        zs = [torch.log_softmax(z, dim=-1) for z in cas.forward(features)]
        return torch.stack(zs, dim=1) if zs else features.new_zeros(features.shape[1], 0, cas.bias.shape[1])


def train_ensembles(logp: torch.Tensor, y: np.ndarray, logp_val: torch.Tensor, yv: np.ndarray,
                    final: torch.Tensor, seed: int, epochs: int, lr: float, weight_decay: float, batch_size: int
                    ) -> tuple[list[torch.Tensor], torch.Tensor, np.ndarray, list[float]]:
    """Stage 2, heads frozen: the K-1 geometric ensembles at once on the heads' log-probabilities logp [N, K-1,
    C] with ``ztw_loss``, AdamW and a cosine schedule per step; the last epoch is kept, as the authors do (see
    the method card). Returns (raw weights [k+1] per ensemble, biases [K-1, C], validation CE [K-1] of the kept
    ensembles, mean train loss per epoch)."""
    n, k_heads, c = logp.shape
    if k_heads == 0:
        return [], torch.zeros(0, c), np.zeros(0), []
    gen = torch.Generator().manual_seed(seed + 1)
    ws = [(torch.randn(k + 1, generator=gen) * 0.01).requires_grad_(True) for k in range(k_heads)]
    b = torch.zeros(k_heads, c, requires_grad=True)
    opt = torch.optim.AdamW([*ws, b], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * -(-n // batch_size)))
    y, yv = torch.from_numpy(y), torch.from_numpy(yv)
    history = []
    for _ in tqdm(range(epochs), desc="train ztw ensembles", unit="epoch", leave=False, dynamic_ncols=True):
        total = 0.0
        for idx in _batches(n, batch_size, gen):
            outs = [geometric_ensemble(logp[idx, :k + 1], ws[k], b[k]) for k in range(k_heads)]
            total += _step(opt, sched, ztw_loss(outs, final[idx], y[idx])) * len(idx)
        history.append(total / n)
    with torch.no_grad():
        ws, b = [w.detach() for w in ws], b.detach()
        val_ce = np.array([F.cross_entropy(geometric_ensemble(logp_val[:, :k + 1], ws[k], b[k]), yv).item()
                           for k in range(k_heads)])
    return ws, b, val_ce, history


# ---- the method -------------------------------------------------------------------------------------------------
@register_method("ztw")
@dataclass
class ZeroTimeWaste(ScoreExitMethod):
    epochs: int = bounded(50, min=1)  # stage 1, the cascading heads
    lr: float = bounded(1e-2, min=0.0)  # the shared heads' (the authors' ViT-B/16 runs: 5e-3)
    weight_decay: float = bounded(1e-4, min=0.0)
    batch_size: int = bounded(256, min=1)
    ensemble_epochs: int = bounded(100, min=1)  # stage 2, the geometric ensembles
    ensemble_lr: float = bounded(1e-2, min=0.0)
    ensemble_weight_decay: float = bounded(0.0, min=0.0)
    ensemble_batch_size: int = bounded(256, min=1)
    layer_norm: bool = True  # LayerNorm on the cascading input (the authors' default)
    detach: bool = True  # stop the gradient of head k's loss at head k-1's output (the authors' default)

    def fit(self, task: Task) -> "ZeroTimeWaste":
        train, val = task.splits["train"], task.splits["val"]
        final = task.final_logits(train).detach()  # the frozen backbone output in the authors' loss
        self.cascade_, self.head_val_accuracy_, self.head_epoch_, head_hist = train_cascade(
            train, val, final, task.num_classes, task.seed, self.epochs, self.lr, self.weight_decay,
            self.batch_size, self.layer_norm, self.detach)
        self.ens_weight_, self.ens_bias_, self.ens_val_ce_, ens_hist = train_ensembles(
            log_probs(self.cascade_, train.features), train.labels, log_probs(self.cascade_, val.features),
            val.labels, final, task.seed, self.ensemble_epochs, self.ensemble_lr, self.ensemble_weight_decay,
            self.ensemble_batch_size)
        self.loss_history_ = {"heads": np.array(head_hist), "ensembles": np.array(ens_hist)}
        self.head_weight_, self.head_bias_ = task.head_weight, task.head_bias
        self.costs_ = task.exit_costs(self.extra_macs(task.dim, task.num_classes, task.num_exits))
        return self

    def extra_macs(self, dim: int, num_classes: int, num_exits: int) -> np.ndarray:
        """MACs [K-1] each intermediate exit adds: head, cascading input and its norm, log-softmax, ensemble,
        decision (the method card's accounting)."""
        c = num_classes
        out = []
        for k in range(num_exits - 1):
            head = linear_macs(dim, c) + (linear_macs(c, c) + (5 * c if self.layer_norm else 0) if k else 0)
            out.append(head + 2 * c + (k + 2) * c + self.decision_macs(c))
        return np.array(out, dtype=np.int64)

    # -- outputs -----------------------------------------------------------------------------------------------
    def _exit(self, k: int, features_k: torch.Tensor, prev: torch.Tensor | None, logp: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Intermediate exit k: (ensemble logits [N, C], head logits [N, C], log-probs of heads 0..k [N, k+1, C])
        from its features [N, D], head k-1's logits and the log-probs of heads 0..k-1 (None at k = 0)."""
        z = self.cascade_.head(k, features_k, prev)
        lp = torch.log_softmax(z, dim=-1)[:, None]
        logp = lp if logp is None else torch.cat((logp, lp), dim=1)
        return geometric_ensemble(logp, self.ens_weight_[k], self.ens_bias_[k]), z, logp

    def exit_logits(self, split: SplitData, point=None) -> torch.Tensor:
        """Per-exit logits [K, N, C]: the geometric ensembles of the cascading heads, then the backbone's head."""
        self.check_fitted()
        with torch.no_grad():
            out, prev, logp = [], None, None
            for k in range(len(self.costs_) - 1):
                e, prev, logp = self._exit(k, split.features[k], prev, logp)
                out.append(e)
            out.append(split.features[len(self.costs_) - 1] @ self.head_weight_.T + self.head_bias_)
            return torch.stack(out)

    def exit_head(self, k: int, features_k: torch.Tensor, point=None) -> torch.Tensor:
        if k == len(self.costs_) - 1:
            with torch.no_grad():
                return features_k @ self.head_weight_.T + self.head_bias_
        raise ValueError("ztw: exit k's prediction depends on the earlier exits (cascading heads, ensemble); "
                         "use exit_logits or stream.")

    def stream(self, k: int, features_k: torch.Tensor, point: OperatingPoint, state: dict | None):
        """Exit k on the running samples, on the features' device; state = {"prev": head k-1's logits [N, C],
        "logp": log-probs of heads 0..k-1 [N, k, C]}. The float64 score and comparison are ``decide``'s."""
        with torch.no_grad():
            if k == len(self.costs_) - 1:
                logits, new_state = self.exit_head(k, features_k), dict(state or {})
            else:
                prev, logp = (None, None) if state is None else (state["prev"], state["logp"])
                logits, z, logp = self._exit(k, features_k, prev, logp)
                new_state = {"prev": z, "logp": logp}
        return logits, self.score(logits.double()) >= float(self._threshold(point, k)), new_state

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1).amax(dim=-1)

    def decision_macs(self, num_classes: int) -> int:
        return 2 * num_classes
