"""``jeidnn`` — JEI-DNN as its authors' code runs it (Regol, Chataoui, Coates, "Jointly-Learned Exit and
Inference for a Dynamic Neural Network", ICLR 2024, arXiv 2310.09163; official code github.com/networkslab/dynn,
HEAD 8dd598d). ``jeidnn_consistent`` (methods/jeidnn_consistent.py) is the paper's intent made consistent.

Method card
- Trains, on the frozen backbone's cached exit features:
  * IMs: one ``Linear(D, C)`` per intermediate exit 0..K-2; the backbone's own head is the last exit (frozen).
  * Gates: per IM, logistic regression ``Linear(4, 1)`` + sigmoid on four *detached* statistics of that IM's
    softmax p: p_max, entropy H(p), margin p(1) - p(2), and H(softmax(2z)) (``gate_features``).
- Exit probabilities (Eq. 8 as coded): ``P_l = max(0, min(g_l, 1 - sum_{k<l} g_k))`` for l < K-1, the rest of
  the mass to the last exit. Inference is deterministic: leave at the first l with
  ``g_l >= 0.5 * (1 - sum_{k<l} g_k)``, else at the last exit (``inference_exits``; ``stream`` carries each
  surviving sample's running sum of g). There is no threshold at test time: one model per lambda.
- Training, vectorised over exits and over the lambda grid (each lambda an independent model sharing the
  mini-batch order), with the official schedule:
  1. Warm-up (shared by every lambda): IMs only, loss ``CE_final + sum_l (K - l) CE_l`` (0-based l; the frozen
     final head's term is a constant and is left out), SGD at the constant ``lr``; per-IM early stopping on
     validation accuracy, patience ``warmup_patience`` = 2, the best accuracy starting at 0 (so the first epoch
     always counts as an improvement); each IM keeps its best epoch; at most ``warmup_epochs`` epochs, fewer when
     every IM has stopped.
  2. ``epochs`` is the official ``num_epoch``, warm-up included: ``epochs - warm-up epochs run`` joint epochs
     (``official_joint_epochs``). One SGD (lr, momentum 0.9, weight decay 5e-4) over IMs and gates for the
     whole fit, so the IMs' momentum carries over from the warm-up; in joint epoch e (0-based) the learning rate
     is ``lr_min + (lr - lr_min)(1 + cos(pi e / epochs)) / 2`` (cosine annealing with T_max = ``epochs``,
     stepped once per epoch; ``official_joint_lr``).
  3. Phases switch on the mini-batch index *within* the epoch, gate phase first in every epoch
     (``official_gate_phase``): batches 0..199 gates, 200..399 IMs, ... An epoch of at most 200 mini-batches
     never trains the IMs after the warm-up.
     * Gate phase (IMs fixed): per sample ``e_l = CE_l + lambda c_l`` over all K exits, ``c_l`` = measured
       cumulative cost of exit l / static backbone MACs for the IMs and exactly 1 for the last exit (as the
       official code); oracle ``l* = argmin_l e_l`` (first on ties); targets ``t_l = 1[l >= l*]``; BCE with
       logits averaged over gates and samples, positives of gate l weighted by ``min((N - n_l) / n_l, 5)``,
       n_l = #validation samples whose oracle is *exactly* l (floored at 0.1). The official helper starts from
       counts of 1 (weight 5, the cap: this is what reproduces its first-epoch loss on the shared cases) and
       refreshes the counts on validation after every epoch.
     * IM phase (gates frozen, inputs detached): ``mean over samples and exits of P_l CE_l r``,
       ``r = sum_l CE_l / sum_l P_l CE_l`` attached (``im_loss="official"``): the weights cancel and the loss
       is plain CE averaged over the exits, in value and gradient. ``im_loss="detached"`` detaches r (the
       paper's intent; off by default here, the default of ``jeidnn_consistent``).
  4. Model selection: the last epoch (the official selection never fires).
  ``share_heads=True`` is the ablation without IM specialisation (IM phases skipped).
- Cost: each intermediate exit adds its IM (D*C MACs) and its gate, counted as 9C + 6 operations.
- Operating points: one per lambda (default grid 0.01 ... 5), ``params = {"lambda": lam}``; the harness gives a
  budget the lambda with the largest validation ``macs_rel`` <= budget, infeasible if none fits.
- Why its curve stops near half the backbone's cost on digits and fashion-mnist (official behaviour): exact-exit
  counts pull every gate towards a prior, and the inference rule reads those "exit here or later" outputs as
  exit mass, so almost everyone leaves early whatever lambda.
- Deviations from the official code, and why:
  * Features are cached from the frozen backbone in eval mode: no augmentation or DropPath while the heads
    train (the price of training heads in seconds instead of hours).
  * A sample with ``sum_l P_l CE_l = 0`` uses plain CE in the IM phase; the official code divides 0 by 0 (NaN).
  * Costs are measured MACs including IMs and gates (the official counter undercounts the ViT's blocks).
  * Validation, cal and test are the harness's shared splits; no test-set checkpoint or running averages.
  * The official code has no ``account_subsequent`` option (an earlier docstring here claimed it had).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.base.fields import bounded, choice
from bench.core.interface import ExitMethod, OperatingPoint, register_method
from bench.core.task import SplitData, Task
from methods._jeidnn_parts import (JEIDNNConfigError, _ce, _features_from_logp, _gate_probs, _im_logits, gate_probs,
                                   _linear_init, _nll, exit_probabilities, gate_loss, gate_macs, gate_targets,
                                   inference_exits, official_gate_phase, official_joint_epochs, official_joint_lr,
                                   oracle_exits, positive_weights_from_counts, weighted_im_loss)

DEFAULT_LAMBDAS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 2.0, 5.0)
STATE_KEY = "cum_g"  # stream's per-sample running sum of g

__all__ = ["JEIDNN", "JEIDNNBase", "DEFAULT_LAMBDAS", "JEIDNNConfigError"]


@dataclass
class JEIDNNBase(ExitMethod):
    """What both JEI-DNN variants share: IMs + gates per lambda on cached features, the warm-up, one operating
    point per lambda, and inference from the gates (``exits_from_gates``, streamed by ``stream``).
    Fitted state: ``warm_w_``/``warm_b_`` [K-1, D, C]/[K-1, C], per lambda ``im_w_``/``im_b_``
    [L, K-1, D, C]/[L, K-1, C] and ``gate_w_``/``gate_b_`` [L, K-1, 4]/[L, K-1], ``costs_`` [K] MACs."""

    official_warmup: ClassVar[bool] = True

    lambdas: list[float] = bounded(default_factory=lambda: list(DEFAULT_LAMBDAS), min=0.0, nonempty=True)
    warmup_epochs: int = bounded(6, min=0)
    lr: float = bounded(0.01, min=0.0)
    momentum: float = bounded(0.9, min=0.0)
    weight_decay: float = bounded(5e-4, min=0.0)
    lr_min: float = bounded(2e-4, min=0.0)
    batch_size: int = bounded(64, min=1)
    warmup_patience: int = bounded(2, min=0)
    share_heads: bool = False

    def __post_init__(self):
        self._validate()  # refused when the method is created from --set, before any data is read

    def _validate(self) -> tuple[float, ...]:
        lams = tuple(float(v) for v in (self.lambdas if isinstance(self.lambdas, (list, tuple)) else [self.lambdas]))
        if not lams or any(not math.isfinite(v) or v < 0 for v in lams) or len(set(lams)) != len(lams):
            raise JEIDNNConfigError(f"{self.name}.lambdas must be distinct finite values >= 0, got {self.lambdas!r}.")
        for name, low in (("epochs", 0), ("warmup_epochs", 0), ("batch_size", 1)):
            if int(getattr(self, name)) < low:
                raise JEIDNNConfigError(f"{self.name}.{name} must be an integer >= {low}, got {getattr(self, name)!r}.")
        return lams

    # -- fit -------------------------------------------------------------------------------------------------
    def fit(self, task: Task) -> "JEIDNNBase":
        lams = self._validate()
        if task.num_exits < 2:
            raise JEIDNNConfigError("JEI-DNN needs at least 2 exits.")
        k, c = task.num_exits, task.num_classes
        costs = task.exit_costs(np.full(k - 1, task.im_head_macs() + gate_macs(c)))
        self.lambdas_ = lams
        self.head_weight_, self.head_bias_ = task.head_weight, task.head_bias
        gen = torch.Generator().manual_seed(int(task.seed))
        train, val = task.splits["train"], task.splits["val"]
        data = _Data(train.features[:k - 1], torch.from_numpy(train.labels), val.features[:k - 1],
                     torch.from_numpy(val.labels))
        with torch.no_grad():
            data.ce_last = _ce(task.final_logits(train), data.y)  # [N] the frozen last exit
            data.ce_last_v = _ce(task.final_logits(val), data.yv)
        # on a multi-exit backbone (MSDNet) the IMs start from the network's own classifiers
        init = None if task.exit_heads is None else (task.exit_heads[0][:k - 1], task.exit_heads[1][:k - 1])
        (self.warm_w_, self.warm_b_, self.warmup_val_accuracy_, self.warmup_best_epoch_, self.warmup_epochs_run_,
         warm_opt) = self._warmup(data, c, gen, init)
        self._joint(data, torch.tensor(costs / task.macs.static, dtype=torch.float64), gen, warm_opt)
        self.costs_ = costs  # last: its presence marks the method as fitted
        return self

    def _warmup(self, data: "_Data", c: int, gen: torch.Generator, init=None):
        """IMs only, loss sum_l (K - l) CE_l; per-IM early stopping on validation accuracy (``warmup_patience``
        epochs without improvement); each IM keeps its best-validation-accuracy epoch. The official form
        (``official_warmup``) runs at the constant ``lr`` and starts the best accuracy at 0; the consistent one
        anneals the lr per mini-batch and counts the initial heads as epoch 0. Returns the kept IMs, their
        validation accuracy and epoch, the number of epochs run, and (optimiser, w, b): the trained parameters and
        their momentum."""
        x, y, xv, yv = data.x, data.y, data.xv, data.yv
        km1, n, d = x.shape
        w, b = _linear_init(gen, 1, km1, d, c)
        w, b = (w[0], b[0]) if init is None else (init[0].clone(), init[1].clone())
        w, b = w.requires_grad_(True), b.requires_grad_(True)
        weights = torch.arange(km1 + 1, 1, -1, dtype=torch.float32)  # K, K-1, ..., 2
        opt = torch.optim.SGD([w, b], lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        steps_per_epoch = -(-n // self.batch_size)
        sched = None if self.official_warmup else torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, self.warmup_epochs * steps_per_epoch), eta_min=self.lr_min)
        best_epoch = np.zeros(km1, dtype=np.int64)
        best_w, best_b = w.detach().clone(), b.detach().clone()
        with torch.no_grad():
            best_acc = (torch.zeros(km1) if self.official_warmup
                        else (_im_logits(xv, w, b).argmax(-1) == yv).float().mean(-1))
        wait = np.zeros(km1, dtype=np.int64)
        run, lrs = 0, []
        for epoch in tqdm(range(1, int(self.warmup_epochs) + 1), desc=f"{self.name} warm-up", unit="epoch",
                          leave=False, dynamic_ncols=True):
            if (wait >= self.warmup_patience).all():
                break
            run = epoch
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, self.batch_size):
                idx = perm[i:i + self.batch_size]
                ce = _ce(_im_logits(x[:, idx], w, b), y[idx])  # [K-1, B]
                loss = (weights * ce.mean(-1)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
                if sched is not None:
                    sched.step()
            with torch.no_grad():
                acc = (_im_logits(xv, w, b).argmax(-1) == yv).float().mean(-1)
                better = (acc > best_acc) & torch.from_numpy(wait < self.warmup_patience)
                best_acc = torch.where(better, acc, best_acc)
                best_w[better], best_b[better] = w.detach()[better], b.detach()[better]
                bn = better.numpy()
                best_epoch[bn] = epoch
                wait = np.where(bn, 0, wait + 1)
        self.warmup_lrs_ = np.array(lrs)  # the learning rate of every warm-up step
        return best_w, best_b, best_acc.numpy(), best_epoch, run, (opt, w, b)

    def _joint(self, data: "_Data", costs_rel: torch.Tensor, gen: torch.Generator, warm_opt) -> None:
        raise NotImplementedError

    def _per_lambda(self, t: torch.Tensor) -> torch.Tensor:
        return t.expand(len(self.lambdas_), *t.shape).clone()

    @staticmethod
    def _val_ce(data: "_Data", w_j: torch.Tensor, b_j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One model's validation IM logits [K-1, Nv, C] and per-exit CE [K, Nv] (float64, the last exit's
        included), from its IMs w_j [K-1, D, C], b_j [K-1, C]."""
        with torch.no_grad():
            logits_v = _im_logits(data.xv, w_j, b_j)
            return logits_v, torch.cat([_ce(logits_v, data.yv), data.ce_last_v[None]]).double()

    def _val_objective(self, costs_rel: torch.Tensor, j: int, logits_v: torch.Tensor, ce_v: torch.Tensor, gw, gb
                       ) -> float:
        """Validation objective of lambda j's model (``_val_ce``'s outputs; gates gw [L, K-1, 4], gb [L, K-1]):
        ``mean_n e_{exit(n)}`` with ``e_l = CE_l + lambda c_l``, exit(n) by this variant's inference rule: the
        quantity the gates trade off."""
        with torch.no_grad():
            g = np.stack([_gate_probs(logits_v[kk], gw[j, kk], gb[j, kk])
                          for kk in range(logits_v.shape[0])])
            ex = torch.from_numpy(self.exits_from_gates(g))
            e = ce_v + self.lambdas_[j] * costs_rel[:, None]
            return float(e.gather(0, ex[None]).mean())

    # -- inference -------------------------------------------------------------------------------------------
    def exits_from_gates(self, g: np.ndarray) -> np.ndarray:
        """Exit index [N] from gate outputs g [K-1, N] (float64): this variant's inference rule."""
        raise NotImplementedError

    def _lambda_index(self, point: OperatingPoint) -> int:
        if point is None or "lambda" not in point.params:
            raise JEIDNNConfigError(f"{self.name} operating points carry {{'lambda': value}}; got "
                                    f"{None if point is None else point.params!r}.")
        lam = float(point.params["lambda"])
        hits = [i for i, v in enumerate(self.lambdas_) if v == lam or math.isclose(v, lam, rel_tol=1e-12)]
        if not hits:
            raise JEIDNNConfigError(f"lambda={lam} is not in the fitted grid {list(self.lambdas_)}.")
        return hits[0]

    def exit_logits(self, split: SplitData, point: OperatingPoint | None = None) -> torch.Tensor:
        """Per-exit logits [K, N, C]: that lambda's IMs (the warm-up IMs for ``point=None``), then the backbone's
        own head on the last feature."""
        self.check_fitted()
        return torch.stack([self.exit_head(kk, split.features[kk], point) for kk in range(len(self.costs_))])

    def exit_head(self, k: int, features_k: torch.Tensor, point: OperatingPoint | None = None) -> torch.Tensor:
        """Logits [N, C] of exit k from its features [N, D] alone (the real runner's call)."""
        self.check_fitted()
        with torch.no_grad():
            if k == len(self.costs_) - 1:
                return features_k @ self.head_weight_.T + self.head_bias_
            j = None if point is None else self._lambda_index(point)
            w, b = (self.warm_w_, self.warm_b_) if j is None else (self.im_w_[j], self.im_b_[j])
            return features_k @ w[k] + b[k]

    def set_gates(self, gate_w: torch.Tensor, gate_b: torch.Tensor) -> None:
        """The fitted gates [L, K-1, 4] / [L, K-1], and their host copy as float64 numbers: ``stream`` applies
        them as scalars, so on a device (where ``gate_w_`` is moved) reading them never waits for it."""
        self.gate_w_, self.gate_b_ = gate_w, gate_b
        self.gate_host_ = (gate_w.double().tolist(), gate_b.double().tolist())

    def host_gate(self, j: int, k: int) -> tuple[list[float], float]:
        """Gate k of lambda j as host numbers (weights [4], bias)."""
        return self.gate_host_[0][j][k], self.gate_host_[1][j][k]

    def gate_outputs(self, logits: torch.Tensor, point: OperatingPoint) -> np.ndarray:
        """g [K-1, N] float64 of the point's gates on per-exit logits [K, N, C] (only rows 0..K-2 are read)."""
        self.check_logits(logits)
        j = self._lambda_index(point)
        return np.stack([_gate_probs(logits[kk], *self.host_gate(j, kk))
                         for kk in range(logits.shape[0] - 1)]).reshape(logits.shape[0] - 1, logits.shape[1])

    def exit_scores(self, logits: torch.Tensor, point: OperatingPoint) -> np.ndarray:
        """The score the exit rule reads at each intermediate exit [K-1, N]: the gate outputs (the harness
        reports how well they rank each IM's correctness, ``exit_score_auroc``, next to max-softmax's)."""
        return self.gate_outputs(logits, point)

    def decide(self, logits: torch.Tensor, point: OperatingPoint, targets: np.ndarray | None = None
               ) -> np.ndarray:
        return self.exits_from_gates(self.gate_outputs(logits, point))

    def operating_points(self, task: Task, budgets) -> list[OperatingPoint]:
        """One point per lambda; the harness measures each one's validation cost and picks per budget."""
        self.check_fitted()
        return [OperatingPoint({"lambda": lam}) for lam in self.lambdas_]


@dataclass
class _Data:
    """The cached features and labels one fit trains on: x [K-1, N, D], y [N] (train), xv, yv (val), and the
    frozen last exit's per-sample CE on both."""
    x: torch.Tensor
    y: torch.Tensor
    xv: torch.Tensor
    yv: torch.Tensor
    ce_last: torch.Tensor | None = None
    ce_last_v: torch.Tensor | None = None


@register_method("jeidnn")
@dataclass
class JEIDNN(JEIDNNBase):
    epochs: int = bounded(20, min=0)  # the official num_epoch: warm-up included
    alternate_every: int = bounded(200, min=1)
    im_loss: str = choice("official", ("official", "detached"))
    pos_weight_cap: float = bounded(5.0, min=0.0)

    def _joint(self, data: _Data, costs_rel: torch.Tensor, gen: torch.Generator, warm_opt) -> None:
        """Per lambda (batched over the grid): the official alternation, schedule and positive weights; the last
        epoch is kept."""
        x, y = data.x, data.y
        km1, n, _ = x.shape
        n_lam = len(self.lambdas_)
        c = self.oracle_costs(costs_rel)
        self.gate_costs_ = c.numpy()
        lam = torch.tensor(self.lambdas_, dtype=torch.float32)
        c32 = c.float()
        w, b = self._per_lambda(self.warm_w_), self._per_lambda(self.warm_b_)
        gw0, gb0 = _linear_init(gen, 1, km1, 4, 1)
        gw, gb = self._per_lambda(gw0[0, :, :, 0]), self._per_lambda(gb0[0, :, 0])  # [L, K-1, 4], [L, K-1]
        params = [gw, gb] + ([] if self.share_heads else [w, b])
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if not self.share_heads:  # one optimiser for the whole fit: the IMs keep their warm-up momentum
            opt_w, *old_params = warm_opt
            for new, old in zip((w, b), old_params):
                buf = opt_w.state.get(old, {}).get("momentum_buffer")
                if buf is not None:
                    opt.state[new]["momentum_buffer"] = self._per_lambda(buf)
        n_val = len(data.yv)
        pos_w = self.positive_weights(torch.ones(n_lam, km1), n_val)  # the official helper's start
        pos_history = [pos_w.clone()]
        schedule = []
        n_joint = official_joint_epochs(self.epochs, self.warmup_epochs_run_)
        history = np.full((n_joint, n_lam), np.nan)
        for je in tqdm(range(n_joint), desc=f"jeidnn ({n_lam} lambdas)", unit="epoch", leave=False,
                       dynamic_ncols=True):
            lr = official_joint_lr(je, self.lr, self.lr_min, self.epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            perm = torch.randperm(n, generator=gen)
            for bi, i in enumerate(range(0, n, self.batch_size)):
                gate_phase = self.is_gate_phase(bi)
                schedule.append((je + 1, bi, int(gate_phase), lr))
                if not gate_phase and self.share_heads:
                    continue
                idx = perm[i:i + self.batch_size]
                xb, yb = x[:, idx], y[idx]
                opt.zero_grad(set_to_none=True)
                if gate_phase:
                    with torch.no_grad():
                        logp = torch.log_softmax(_im_logits(xb, w, b), dim=-1)  # [L, K-1, B, C]
                        ce = torch.cat([_nll(logp, yb), data.ce_last[idx].expand(n_lam, 1, -1)], dim=1)  # [L, K, B]
                        target = gate_targets(oracle_exits(ce, c32, lam[:, None, None]), km1 + 1)
                        feats = _features_from_logp(logp)  # [L, K-1, B, 4]
                    z = (feats * gw[:, :, None, :]).sum(-1) + gb[:, :, None]
                    loss = self.gate_phase_loss(z, target, pos_w)
                else:
                    logp = torch.log_softmax(_im_logits(xb, w, b), dim=-1)
                    with torch.no_grad():
                        z = (_features_from_logp(logp) * gw[:, :, None, :]).sum(-1) + gb[:, :, None]
                        p = exit_probabilities(torch.sigmoid(z))[:, :km1]  # [L, K-1, B]
                    loss = self.im_phase_loss(_nll(logp, yb), p)
                loss.backward()
                opt.step()
            with torch.no_grad():  # epoch end: validation objective (reported) and the positive weights' refresh
                for j in range(n_lam):
                    logits_v, ce_v = self._val_ce(data, w[j], b[j])
                    history[je, j] = self._val_objective(c, j, logits_v, ce_v, gw, gb)
                    counts = torch.bincount(oracle_exits(ce_v, c, self.lambdas_[j]), minlength=km1 + 1)[:km1]
                    pos_w[j] = self.positive_weights(counts, n_val)
                pos_history.append(pos_w.clone())
        self.im_w_, self.im_b_ = w.detach().clone(), b.detach().clone()
        self.set_gates(gw.detach().clone(), gb.detach().clone())
        self.joint_epochs_run_ = n_joint
        # one row per mini-batch of the joint phase: (joint epoch 1.., batch index in epoch, 1 gate / 0 IM, lr)
        self.schedule_ = np.array(schedule, dtype=np.float64).reshape(-1, 4)
        self.pos_weight_history_ = torch.stack(pos_history).numpy()  # [epochs + 1, L, K-1]: before each epoch
        self.best_epoch_ = np.full(n_lam, n_joint, dtype=np.int64)  # the last epoch, always
        self.val_objective_history_ = history
        self.val_objective_ = history[-1] if n_joint else np.array(
            [self._val_objective(c, j, *self._val_ce(data, w[j], b[j]), gw, gb) for j in range(n_lam)])

    # -- the official rules, one method each (tests/test_jeidnn_official.py runs them on the authors' cases) --
    def exits_from_gates(self, g: np.ndarray) -> np.ndarray:
        return inference_exits(g)

    @staticmethod
    def oracle_costs(costs_rel: torch.Tensor) -> torch.Tensor:
        """c [K] of the gate phase's oracle: the measured relative costs of the IMs, exactly 1 for the last exit."""
        c = torch.as_tensor(costs_rel, dtype=torch.float64).clone()
        c[-1] = 1.0
        return c

    def positive_weights(self, counts: torch.Tensor, n: int) -> torch.Tensor:
        """Positive weights [..., K-1] from counts of samples whose oracle is *exactly* each IM, out of n."""
        return positive_weights_from_counts(counts, n, self.pos_weight_cap).float()

    def is_gate_phase(self, batch_in_epoch: int) -> bool:
        return official_gate_phase(batch_in_epoch, self.alternate_every)

    @staticmethod
    def gate_phase_loss(z: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
        return gate_loss(z, targets, pos_weight)

    def im_phase_loss(self, ce: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Mean over samples *and* exits, as the official code (``torch.mean`` over [N, K-1])."""
        return weighted_im_loss(ce, p, self.im_loss, reduction="mean")

    def stream(self, k: int, features_k: torch.Tensor, point: OperatingPoint, state: dict | None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Exit k's IM, its gate g_k and the official rule ``g_k >= 0.5 (1 - sum_{l<k} g_l)`` on the features'
        device, in float64 as ``inference_exits``; the running sum of g travels in ``state``."""
        self.check_fitted()
        j = self._lambda_index(point)
        logits = self.exit_head(k, features_k, point)
        if k == len(self.costs_) - 1:  # the last exit has no gate: everyone left leaves
            return logits, torch.ones(len(logits), dtype=torch.bool, device=logits.device), dict(state or {})
        g = gate_probs(logits, *self.host_gate(j, k))
        cum = torch.zeros_like(g) if state is None else state[STATE_KEY]
        return logits, g >= 0.5 * (1 - cum), {STATE_KEY: cum + g}
