"""``jeidnn`` — Jointly-Learned Exit and Inference for a Dynamic Neural Network (JEI-DNN).

Method card
- Paper: Regol, Chataoui, Coates, "Jointly-Learned Exit and Inference for a Dynamic Neural Network", ICLR 2024
  (arXiv 2310.09163); official code github.com/networkslab/dynn.
- Trains, on the frozen backbone's cached exit features:
  * IMs: one ``Linear(D, C)`` per intermediate exit 0..K-2; the backbone's own head is the last exit (frozen).
  * Gates: per IM, logistic regression ``Linear(4, 1)`` + sigmoid on four *detached* statistics of that IM's
    softmax p: p_max, entropy H(p), margin p(1) - p(2), and H(softmax(2z)) (``gate_features``).
- Exit probabilities (Eq. 8 as coded): ``P_l = max(0, min(g_l, 1 - sum_{k<l} g_k))`` for l < K-1, the rest of
  the mass to the last exit (``exit_probabilities``). Inference is deterministic: leave at the first l with
  ``g_l >= 0.5 * (1 - sum_{k<l} g_k)``, else at the last exit (``inference_exits``; streamed by ``stream``,
  whose state carries each surviving sample's running sum of g under ``"cum_g"``). Gates are evaluated in
  float64 as an explicit weighted sum, so batched ``decide`` and per-exit streaming agree bit for bit.
- Training, all on cached features and vectorised over exits *and* over the lambda grid (each lambda is an
  independent model; they share the mini-batch order, which makes one batched run identical to separate runs):
  1. Warm-up (shared by all lambdas; on MSDNet, ``--backbone msdnet``, the IMs start from the network's own
     exit classifiers, so JEI-DNN's gates run on MSDNet's exits): IMs only, loss ``sum_l (K - l) * CE_l`` for 0-based l (the reference's
     ``(L+1-l)`` with 1-based l: earlier IMs weigh more), per-IM early stopping on validation accuracy
     (patience ``warmup_patience`` = 2, at most ``warmup_epochs``): each IM keeps its best-validation-accuracy
     epoch (the initialisation counts as epoch 0).
  2. Per lambda, from the warm-up IMs and one shared gate initialisation (nn.Linear's), ``epochs`` epochs that
     alternate every ``alternate_every`` mini-batches between a gate phase and an IM phase, gate phase first
     (the phase is a function of the global mini-batch index, so on a task with fewer mini-batches than
     ``alternate_every`` in total only gates are trained after the warm-up).
     * Gate phase (IMs fixed): per sample ``e_l = CE_l + lambda * c_l`` over all K exits, with
       ``c_l = costs_[l] / static backbone MACs`` (measured cumulative cost incl. heads and gates, DESIGN.md; the
       last exit costs slightly more than 1); oracle exit ``l* = argmin_l e_l`` (first on ties); gate targets
       ``t_l = 1[l >= l*]``; BCE-with-logits with positive weight of gate l ``min((N - n_l) / n_l, 5)``, n_l the
       number of validation samples whose oracle exit is exactly l (floored at 0.1), 1 before the first refresh
       and refreshed at each epoch end (cap ``pos_weight_cap``; ``pos_weight_counts="cumulative"`` is the
       official code's off-by-default ``account_subsequent`` variant, n_l = #samples with l* <= l).
       Note, as in the official code: g_l is trained as "exit here or later" but read as a direct exit
       probability in P_l; and the positive weight of gate l counts the samples whose oracle is exactly l, not
       the positives of gate l (those with l* <= l). If every validation sample's oracle is exit l, gate l's
       positives get weight 0 (the formula's edge case, kept as specified).
     * IM phase (gates frozen, their inputs detached, so P carries no gradient): ``mean_n sum_l P_l CE_l *
       stopgrad(r)`` with ``r = sum_l CE_l / sum_l P_l CE_l`` per sample (``im_loss="detached"``, default):
       the same value as plain ``mean_n sum_l CE_l``, but the exit probabilities shape the gradient.
       ``im_loss="official"`` keeps r attached, as the official code does, which makes the loss exactly plain
       CE in value and gradient. The sums run over the trainable IMs (exits 0..K-2) only, as in the official
       code (the frozen last exit has neither a gate nor trainable weights). A sample whose
       ``sum_l P_l CE_l`` is 0 (e.g. all its mass on the last exit) falls back to plain CE weights (1 per
       exit) instead of the official code's 0/0 = NaN. The official code averages over exits
       too (``torch.mean`` over [N, K-1]); here the exits are summed, the same scale as the warm-up loss.
  SGD (lr 0.01, momentum 0.9, weight decay 5e-4, cosine to 2e-4 per mini-batch), batch 64, for the warm-up and
  for the joint phase (each with its own optimiser and schedule); the inactive phase's parameters get no
  gradient, so SGD leaves them (and their momentum) untouched.
  Model selection: per lambda, the epoch (IMs + gates together) with the lowest validation objective
  ``mean_n e_{exit(n)}``, exit(n) by the deterministic inference rule — the quantity the gates are trained to
  trade off.
  ``share_heads=True`` is the ablation without IM specialisation: every lambda keeps the warm-up IMs, the IM
  phases are skipped (same schedule, so the gates get the same number of updates), only gates are trained.
- Cost: each intermediate exit adds its IM (D*C MACs) and its gate, counted as 9C + 6 operations (the softmax of
  z and of 2z with their entropies, the top-2 margin and max, then Linear(4, 1) and the sigmoid).
- Operating points: one per lambda (default grid 0.01 ... 5), ``params = {"lambda": lam}``; the harness gives a
  budget the lambda with the largest validation ``macs_rel`` <= budget (``bench.core.interface.resolve_points``),
  infeasible if none fits. There is no threshold at test time. ``exit_logits(split, point)`` uses that lambda's IMs; with
  ``point=None`` the warm-up IMs (the per-head accuracy rows).
- Behaviour worth knowing: with class-balanced gate targets and the 0.5 rule, a gate whose four statistics say
  little about the oracle sits near g = 0.5 (or above, for later gates, whose positives are under-counted) and
  sends almost everyone out early, whatever lambda; and the oracle is computed on the training split, where
  the IMs can be over-confident. On the small synthetic task every lambda ends up at exit 0.
- Deviations from the paper and the official code (README, "Where the papers' code goes wrong"): the IM loss's
  ratio is detached by default; costs are measured MACs incl. IMs and gates (not depth fractions); the model is
  selected on validation. Backbone: whatever the harness provides (the paper uses T2T-ViT-7/14), frozen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bench.base.errors import UserError
from bench.base.fields import bounded, choice
from bench.core.interface import ExitMethod, OperatingPoint, register_method
from bench.core.task import SplitData, Task

DEFAULT_LAMBDAS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 2.0, 5.0)
STATE_KEY = "cum_g"  # stream's per-sample running sum of g


class JEIDNNConfigError(UserError, ValueError):
    """A bad hyper-parameter value (a UserError for the CLI, a ValueError for Python callers)."""


# --------------------------------------------------------------------------------------------------------
# The pieces of the method, as pure functions (tested by hand in tests/test_jeidnn.py)
# --------------------------------------------------------------------------------------------------------

def gate_macs(num_classes: int) -> int:
    """Operations to evaluate one gate from its IM's logits: 9C + 6 (two softmaxes with entropies, max and
    top-2 margin, Linear(4, 1) and the sigmoid), counted like MACs."""
    return 9 * int(num_classes) + 6


def gate_features(logits: torch.Tensor) -> torch.Tensor:
    """The gate's four detached inputs [..., 4] from logits [..., C] (C >= 2), in the input's dtype:
    ``[p_max, H(p), p(1) - p(2), H(softmax(2 z))]`` with p = softmax(z) and natural-log entropies."""
    logits = torch.as_tensor(logits).detach()
    if logits.shape[-1] < 2:
        raise JEIDNNConfigError("JEI-DNN's gate needs at least 2 classes (the margin uses the top two).")
    return _features_from_logp(torch.log_softmax(logits, dim=-1))


def _features_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """``gate_features`` from log-probabilities [..., C] (lets training reuse the CE's log_softmax)."""
    logp = logp.detach()
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    # softmax(2z) = p^2 / S with S = sum p^2, so H(softmax(2z)) = log S - 2 sum(p^2 log p) / S: no second softmax
    p_sq = p * p
    s = p_sq.sum(-1)
    ent2 = s.log() - 2 * (p_sq * logp).sum(-1) / s
    # top-2 without topk (slow on CPU): the max, then the max of the others (a tied maximum gives margin 0)
    p1, i1 = p.max(-1)
    p2 = p.scatter(-1, i1[..., None], -1.0).amax(-1)
    return torch.stack([p1, ent, p1 - p2, ent2], dim=-1)


def exit_probabilities(g):
    """P [..., K, N] from gate outputs g [..., K-1, N] in [0, 1] (torch or numpy, returned alike):
    ``P_l = max(0, min(g_l, 1 - sum_{k<l} g_k))`` for l < K-1 and ``P_{K-1} = 1 - sum_{l<K-1} P_l``."""
    as_numpy = isinstance(g, np.ndarray)
    g = torch.as_tensor(g)
    before = torch.cat([torch.zeros_like(g[..., :1, :]), torch.cumsum(g, dim=-2)[..., :-1, :]], dim=-2)
    p = torch.clamp(torch.minimum(g, 1 - before), min=0)
    p = torch.cat([p, (1 - p.sum(-2, keepdim=True)).clamp(min=0)], dim=-2)
    return p.numpy() if as_numpy else p


def inference_exits(g) -> np.ndarray:
    """Exit index [N] (int64) from gate outputs g [K-1, N]: the first l with ``g_l >= 0.5 * (1 - sum_{k<l} g_k)``,
    else K-1. Computed exit by exit in float64, exactly as ``JEIDNN.stream`` streams it."""
    g = np.asarray(g, dtype=np.float64)
    n = g.shape[1]
    exits = np.full(n, g.shape[0], dtype=np.int64)
    cum = np.zeros(n)
    for k in range(g.shape[0]):
        leave = (g[k] >= 0.5 * (1 - cum)) & (exits == g.shape[0])
        exits[leave] = k
        cum = cum + g[k]
    return exits


def oracle_exits(ce, costs_rel, lam):
    """The gate phase's oracle exit ``argmin_l CE_l + lam * c_l`` (the first on ties), per sample.

    ce [..., K, N] per-exit cross-entropy (all exits, the last included); costs_rel [K] cumulative cost of each
    exit / static backbone MACs; lam a scalar (or a tensor broadcasting against ce, e.g. [L, 1, 1]).
    Returns [..., N] int64, numpy if ce is numpy."""
    as_numpy = isinstance(ce, np.ndarray)
    ce_t = torch.as_tensor(ce)
    c = torch.as_tensor(np.asarray(costs_rel, dtype=np.float64)).to(ce_t.dtype)
    e = ce_t + torch.as_tensor(lam, dtype=ce_t.dtype) * c[:, None]
    out = torch.argmin(e, dim=-2)
    return out.numpy() if as_numpy else out


def gate_targets(oracle, num_exits: int):
    """Gate targets [..., K-1, N] (float, 0/1) from oracle exits [..., N]: ``t_l = 1[l >= l*]`` ("exit here or
    later"); a sample whose oracle is the last exit has all-zero targets."""
    as_numpy = isinstance(oracle, np.ndarray)
    o = torch.as_tensor(oracle)
    t = (torch.arange(num_exits - 1).view(-1, 1) >= o.unsqueeze(-2)).to(torch.get_default_dtype())
    return t.numpy() if as_numpy else t


def positive_weights(oracle, num_exits: int, cap: float = 5.0, cumulative: bool = False):
    """Positive-class weight of each gate [..., K-1] from oracle exits [..., N]:
    ``min((N - n_l) / n_l, cap)`` with n_l = #samples whose oracle exit is exactly l, floored at 0.1 (the
    reference). ``cumulative=True`` is the official code's ``account_subsequent`` variant: n_l is replaced by
    the running sum of the floored counts up to l, i.e. the number of gate l's positives (oracle <= l)."""
    as_numpy = isinstance(oracle, np.ndarray)
    o = torch.as_tensor(oracle)
    n = o.shape[-1]
    counts = F.one_hot(o.long(), num_exits)[..., :-1].sum(-2).double().clamp(min=0.1)  # [..., K-1]
    if cumulative:
        counts = counts.cumsum(-1)
    w = ((n - counts) / counts).clamp(max=cap)
    return w.numpy() if as_numpy else w


def weighted_im_loss(ce: torch.Tensor, p: torch.Tensor, mode: str = "detached") -> torch.Tensor:
    """The IM-phase loss from per-IM cross-entropies ce [..., K-1, N] and exit probabilities p [..., K-1, N]
    (the trainable IMs only): ``sum over leading dims of mean_n sum_l P_l CE_l r`` with
    ``r = sum_l CE_l / sum_l P_l CE_l``; r is detached in mode "detached" and attached in mode "official"
    (then the loss equals ``mean_n sum_l CE_l`` in value and gradient). p carries no gradient. Samples with
    ``sum_l P_l CE_l == 0`` use weight 1 on every exit (plain CE) instead of dividing by 0."""
    if mode not in ("detached", "official"):
        raise JEIDNNConfigError(f"im_loss must be 'detached' or 'official', not {mode!r}.")
    p = p.detach()
    total = ce.sum(-2)  # [..., N]
    den = (p * ce).sum(-2)
    ok = den > 0
    safe = torch.where(ok, den, torch.ones_like(den))
    if mode == "detached":
        w = torch.where(ok[..., None, :], p * (total / safe).detach()[..., None, :], torch.ones_like(p))
        per_sample = (w * ce).sum(-2)
    else:  # official: r stays in the graph, the weights cancel exactly
        per_sample = torch.where(ok, den * total / safe, total)
    return per_sample.mean(-1).sum()


# --------------------------------------------------------------------------------------------------------
# Internal helpers
# --------------------------------------------------------------------------------------------------------

def _linear_init(gen: torch.Generator, n: int, k: int, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default init for n x k independent Linear(d_in, d_out): weight [n, k, d_in, d_out], bias."""
    bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on [d_out, d_in] == U(-1/sqrt(d_in), 1/sqrt(d_in))
    w = (torch.rand(n, k, d_in, d_out, generator=gen) * 2 - 1) * bound
    b = (torch.rand(n, k, d_out, generator=gen) * 2 - 1) * bound
    return w, b


def _im_logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [K-1, N, D], w [..., K-1, D, C], b [..., K-1, C] -> logits [..., K-1, N, C]."""
    return torch.einsum("knd,...kdc->...knc", x, w) + b[..., None, :]


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy [..., N] of logits [..., N, C] against labels y [N]."""
    return _nll(torch.log_softmax(logits, dim=-1), y)


def _nll(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, y.expand(*logp.shape[:-1])[..., None]).squeeze(-1)


def _gate_probs(logits_k: torch.Tensor, w: np.ndarray, b: float) -> np.ndarray:
    """g [N] float64 of one gate (weights w [4], bias b) on its IM's logits [N, C]. An explicit weighted sum
    (no BLAS), so a sample's g does not depend on which other samples share the batch."""
    f = gate_features(torch.as_tensor(logits_k).double()).numpy()
    z = b + f[:, 0] * w[0] + f[:, 1] * w[1] + f[:, 2] * w[2] + f[:, 3] * w[3]
    return 1.0 / (1.0 + np.exp(-z))


def _cosine(opt: torch.optim.Optimizer, steps: int, lr_min: float):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=lr_min)


# --------------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------------

@register_method("jeidnn")
@dataclass
class JEIDNN(ExitMethod):
    lambdas: list[float] = bounded(default_factory=lambda: list(DEFAULT_LAMBDAS), min=0.0, nonempty=True)
    epochs: int = bounded(15, min=0)
    warmup_epochs: int = bounded(6, min=0)
    alternate_every: int = bounded(200, min=1)
    lr: float = bounded(0.01, min=0.0)
    momentum: float = bounded(0.9, min=0.0)
    weight_decay: float = bounded(5e-4, min=0.0)
    lr_min: float = bounded(2e-4, min=0.0)
    batch_size: int = bounded(64, min=1)
    im_loss: str = choice("detached", ("detached", "official"))
    share_heads: bool = False
    warmup_patience: int = bounded(2, min=0)
    pos_weight_cap: float = bounded(5.0, min=0.0)
    # "exact" (reference) or "cumulative" (official account_subsequent)
    pos_weight_counts: str = choice("exact", ("exact", "cumulative"))

    def __post_init__(self):
        self._validate()  # refused when the method is created from --set, before any data is read

    # -- fit -------------------------------------------------------------------------------------------------
    def _validate(self) -> tuple[float, ...]:
        lams = tuple(float(v) for v in (self.lambdas if isinstance(self.lambdas, (list, tuple)) else [self.lambdas]))
        if not lams or any(not math.isfinite(v) or v < 0 for v in lams) or len(set(lams)) != len(lams):
            raise JEIDNNConfigError(f"jeidnn.lambdas must be distinct finite values >= 0, got {self.lambdas!r}.")
        if self.pos_weight_counts not in ("exact", "cumulative"):
            raise JEIDNNConfigError("jeidnn.pos_weight_counts must be 'exact' or 'cumulative', not "
                                    f"{self.pos_weight_counts!r}.")
        if self.im_loss not in ("detached", "official"):
            raise JEIDNNConfigError(f"jeidnn.im_loss must be 'detached' or 'official', not {self.im_loss!r}.")
        for name, low in (("epochs", 0), ("warmup_epochs", 0), ("alternate_every", 1), ("batch_size", 1)):
            if int(getattr(self, name)) < low:
                raise JEIDNNConfigError(f"jeidnn.{name} must be an integer >= {low}, got {getattr(self, name)!r}.")
        return lams

    def fit(self, task: Task) -> "JEIDNN":
        lams = self._validate()
        if task.num_exits < 2:
            raise JEIDNNConfigError("JEI-DNN needs at least 2 exits.")
        k, c = task.num_exits, task.num_classes
        costs = task.exit_costs(np.full(k - 1, task.im_head_macs() + gate_macs(c)))
        self.lambdas_ = lams
        self.head_weight_, self.head_bias_ = task.head_weight, task.head_bias
        costs_rel = torch.tensor(costs / task.macs.static, dtype=torch.float64)  # c_l, float64
        gen = torch.Generator().manual_seed(int(task.seed))
        train, val = task.splits["train"], task.splits["val"]
        y, yv = torch.from_numpy(train.labels), torch.from_numpy(val.labels)
        x, xv = train.features[:k - 1], val.features[:k - 1]
        with torch.no_grad():
            ce_last = _ce(task.final_logits(train), y)  # [N] the frozen last exit
            ce_last_v = _ce(task.final_logits(val), yv)

        # on a multi-exit backbone (MSDNet) the IMs start from the network's own classifiers
        init = None if task.exit_heads is None else (task.exit_heads[0][:k - 1], task.exit_heads[1][:k - 1])
        self.warm_w_, self.warm_b_, self.warmup_val_accuracy_, self.warmup_best_epoch_ = self._warmup(
            x, y, xv, yv, c, gen, init)
        self._joint(x, y, ce_last, xv, yv, ce_last_v, costs_rel, gen)
        self.costs_ = costs  # last: its presence marks the method as fitted
        return self

    def _warmup(self, x, y, xv, yv, c, gen, init=None):
        """IMs only, loss sum_l (K - l) CE_l; each IM keeps its best-validation-accuracy epoch and stops after
        ``warmup_patience`` epochs without improvement (IMs are independent, so training on the stopped ones
        changes nothing for the others: their best snapshot is what is kept)."""
        km1, n, d = x.shape
        w, b = _linear_init(gen, 1, km1, d, c)
        w, b = (w[0], b[0]) if init is None else (init[0].clone(), init[1].clone())
        w, b = w.requires_grad_(True), b.requires_grad_(True)
        weights = torch.arange(km1 + 1, 1, -1, dtype=torch.float32)  # K, K-1, ..., 2
        opt = torch.optim.SGD([w, b], lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        steps_per_epoch = -(-n // self.batch_size)
        sched = _cosine(opt, self.warmup_epochs * steps_per_epoch, self.lr_min)
        best_epoch = np.zeros(km1, dtype=np.int64)
        best_w, best_b = w.detach().clone(), b.detach().clone()
        with torch.no_grad():
            best_acc = (_im_logits(xv, w, b).argmax(-1) == yv).float().mean(-1)  # epoch 0: the initialisation
        wait = np.zeros(km1, dtype=np.int64)
        for epoch in tqdm(range(1, int(self.warmup_epochs) + 1), desc="jeidnn warm-up", unit="epoch", leave=False,
                          dynamic_ncols=True):
            if (wait >= self.warmup_patience).all():
                break
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, self.batch_size):
                idx = perm[i:i + self.batch_size]
                ce = _ce(_im_logits(x[:, idx], w, b), y[idx])  # [K-1, B]
                loss = (weights * ce.mean(-1)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                acc = (_im_logits(xv, w, b).argmax(-1) == yv).float().mean(-1)
                better = (acc > best_acc) & torch.from_numpy(wait < self.warmup_patience)
                best_acc = torch.where(better, acc, best_acc)
                best_w[better], best_b[better] = w.detach()[better], b.detach()[better]
                bn = better.numpy()
                best_epoch[bn] = epoch
                wait = np.where(bn, 0, wait + 1)
        return best_w, best_b, best_acc.numpy(), best_epoch

    def _joint(self, x, y, ce_last, xv, yv, ce_last_v, costs_rel, gen):
        """Per lambda (batched over the grid): alternate gate and IM phases; keep the best validation epoch."""
        km1, n, d = x.shape
        n_lam = len(self.lambdas_)
        lam = torch.tensor(self.lambdas_, dtype=torch.float32)
        c32 = costs_rel.float()
        w = self.warm_w_.expand(n_lam, -1, -1, -1).clone()
        b = self.warm_b_.expand(n_lam, -1, -1).clone()
        gw0, gb0 = _linear_init(gen, 1, km1, 4, 1)
        gw = gw0[0, :, :, 0].expand(n_lam, -1, -1).clone()  # [L, K-1, 4]
        gb = gb0[0, :, 0].expand(n_lam, -1).clone()  # [L, K-1]
        params = [gw, gb] + ([] if self.share_heads else [w, b])
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        steps_per_epoch = -(-n // self.batch_size)
        sched = _cosine(opt, self.epochs * steps_per_epoch, self.lr_min)
        pos_w = torch.ones(n_lam, km1)
        best = torch.full((n_lam,), math.inf, dtype=torch.float64)
        best_epoch = np.zeros(n_lam, dtype=np.int64)
        best_state = [t.detach().clone() for t in (w, b, gw, gb)]
        step = 0
        history = np.full((int(self.epochs), n_lam), np.nan)
        for epoch in tqdm(range(1, int(self.epochs) + 1), desc=f"jeidnn ({len(self.lambdas)} lambdas)",
                          unit="epoch", leave=False, dynamic_ncols=True):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, self.batch_size):
                idx = perm[i:i + self.batch_size]
                gate_phase = (step // self.alternate_every) % 2 == 0
                step += 1
                if not gate_phase and self.share_heads:
                    sched.step()  # the IM phase is skipped in the ablation; the schedule still advances
                    continue
                xb, yb = x[:, idx], y[idx]
                opt.zero_grad(set_to_none=True)
                if gate_phase:
                    with torch.no_grad():
                        logp = torch.log_softmax(_im_logits(xb, w, b), dim=-1)  # [L, K-1, B, C]
                        ce = torch.cat([_nll(logp, yb), ce_last[idx].expand(n_lam, 1, -1)], dim=1)  # [L, K, B]
                        target = gate_targets(oracle_exits(ce, c32, lam[:, None, None]), km1 + 1)
                        feats = _features_from_logp(logp)  # [L, K-1, B, 4]
                    z = (feats * gw[:, :, None, :]).sum(-1) + gb[:, :, None]
                    bce = F.binary_cross_entropy_with_logits(z, target, pos_weight=pos_w[:, :, None],
                                                             reduction="none")
                    loss = bce.mean((1, 2)).sum()
                else:
                    logp = torch.log_softmax(_im_logits(xb, w, b), dim=-1)
                    with torch.no_grad():
                        z = (_features_from_logp(logp) * gw[:, :, None, :]).sum(-1) + gb[:, :, None]
                        p = exit_probabilities(torch.sigmoid(z))[:, :km1]  # [L, K-1, B]
                    loss = weighted_im_loss(_nll(logp, yb), p, self.im_loss)
                loss.backward()
                opt.step()
                sched.step()
            # epoch end: validation objective (model selection) and the positive weights' refresh
            with torch.no_grad():
                for j in range(n_lam):
                    logits_v = _im_logits(xv, w[j], b[j])  # [K-1, Nv, C]
                    ce_v = torch.cat([_ce(logits_v, yv), ce_last_v[None]]).double()  # [K, Nv]
                    g = np.stack([_gate_probs(logits_v[kk], gw[j, kk].double().numpy(), float(gb[j, kk]))
                                  for kk in range(km1)])
                    ex = torch.from_numpy(inference_exits(g))
                    e = ce_v + self.lambdas_[j] * costs_rel[:, None]
                    obj = e.gather(0, ex[None]).mean()
                    history[epoch - 1, j] = obj
                    if obj < best[j]:
                        best[j], best_epoch[j] = obj, epoch
                        for s, t in zip(best_state, (w, b, gw, gb)):
                            s[j] = t.detach()[j]
                    pos_w[j] = positive_weights(oracle_exits(ce_v, costs_rel, self.lambdas_[j]),
                                                km1 + 1, self.pos_weight_cap,
                                                self.pos_weight_counts == "cumulative").float()
        # with epochs = 0 the snapshot is the warm-up IMs with the initial gates (best_epoch 0)
        self.im_w_, self.im_b_, self.gate_w_, self.gate_b_ = best_state
        self.best_epoch_, self.val_objective_, self.val_objective_history_ = best_epoch, best.numpy(), history

    # -- inference -------------------------------------------------------------------------------------------
    def _lambda_index(self, point: OperatingPoint) -> int:
        if point is None or "lambda" not in point.params:
            raise JEIDNNConfigError("JEI-DNN operating points carry {'lambda': value}; got "
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
        if point is None:
            w, b = self.warm_w_, self.warm_b_
        else:
            j = self._lambda_index(point)
            w, b = self.im_w_[j], self.im_b_[j]
        with torch.no_grad():
            last = split.features[-1] @ self.head_weight_.T + self.head_bias_
            return torch.stack([split.features[kk] @ w[kk] + b[kk] for kk in range(w.shape[0])] + [last])

    def exit_head(self, k: int, features_k: torch.Tensor, point: OperatingPoint | None = None) -> torch.Tensor:
        """Logits [N, C] of exit k from its features [N, D] alone (the real runner's call); the same expression
        as ``exit_logits(...)[k]``."""
        self.check_fitted()
        with torch.no_grad():
            if k == len(self.costs_) - 1:
                return features_k @ self.head_weight_.T + self.head_bias_
            j = None if point is None else self._lambda_index(point)
            w, b = (self.warm_w_, self.warm_b_) if j is None else (self.im_w_[j], self.im_b_[j])
            return features_k @ w[k] + b[k]

    def gate_outputs(self, logits: torch.Tensor, point: OperatingPoint) -> np.ndarray:
        """g [K-1, N] float64 of the point's gates on per-exit logits [K, N, C] (only rows 0..K-2 are read)."""
        self.check_fitted()
        k = len(self.costs_)
        if logits.ndim != 3 or logits.shape[0] != k:
            raise JEIDNNConfigError(f"decide expects per-exit logits [K={k}, N, C], got shape {tuple(logits.shape)}.")
        j = self._lambda_index(point)
        return np.stack([_gate_probs(logits[kk], self.gate_w_[j, kk].double().numpy(), float(self.gate_b_[j, kk]))
                         for kk in range(logits.shape[0] - 1)]).reshape(logits.shape[0] - 1, logits.shape[1])

    def decide(self, logits: torch.Tensor, point: OperatingPoint, targets: np.ndarray | None = None
               ) -> np.ndarray:
        return inference_exits(self.gate_outputs(logits, point))

    def stream(self, k: int, features_k: torch.Tensor, point: OperatingPoint, state: dict | None
               ) -> tuple[torch.Tensor, np.ndarray, dict]:
        self.check_fitted()
        j = self._lambda_index(point)
        logits = self.exit_head(k, features_k, point)
        if k == len(self.costs_) - 1:  # the last exit has no gate: everyone left leaves
            return logits, np.ones(len(logits), dtype=bool), dict(state or {})
        g = _gate_probs(logits, self.gate_w_[j, k].double().numpy(), float(self.gate_b_[j, k]))
        cum = np.zeros(len(g)) if state is None else np.asarray(state[STATE_KEY], dtype=np.float64)
        return logits, g >= 0.5 * (1 - cum), {STATE_KEY: cum + g}

    # -- operating points ------------------------------------------------------------------------------------
    def operating_points(self, task: Task, budgets) -> list[OperatingPoint]:
        """One point per lambda; the harness measures each one's validation cost and picks per budget."""
        self.check_fitted()
        return [OperatingPoint({"lambda": lam}) for lam in self.lambdas_]
