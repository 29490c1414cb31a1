"""JEI-DNN's pieces as pure functions: gate features, exit probabilities, inference rules, oracle exits, gate
targets, positive weights, the losses of both phases and the official schedule. ``methods/jeidnn.py`` (the
official method) and ``methods/jeidnn_consistent.py`` (the paper's intent, made consistent) are built from them;
tests/test_jeidnn.py checks them by hand and tests/test_jeidnn_official.py against the authors' code.

Shapes: ``K`` exits (the last is the backbone's own head), ``G = K - 1`` gates (one per intermediate exit),
``N`` samples, ``C`` classes; leading dims (e.g. one row per lambda) broadcast where stated.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from bench.base.errors import UserError


class JEIDNNConfigError(UserError, ValueError):
    """A bad hyper-parameter value (a UserError for the CLI, a ValueError for Python callers)."""


IM_LOSSES = ("official", "detached", "probability")


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
    return torch.stack(_feature_columns(logp.detach()), dim=-1)


def _feature_columns(logp: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four gate features of log-probabilities [..., C] as separate tensors [...]."""
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    # softmax(2z) = p^2 / S with S = sum p^2, so H(softmax(2z)) = log S - 2 sum(p^2 log p) / S: no second softmax
    p_sq = p * p
    s = p_sq.sum(-1)
    ent2 = s.log() - 2 * (p_sq * logp).sum(-1) / s
    # top-2 without topk (slow on CPU): the max, then the max of the others (a tied maximum gives margin 0)
    p1, i1 = p.max(-1)
    p2 = p.scatter(-1, i1.unsqueeze(-1), -1.0).amax(-1)
    return p1, ent, p1 - p2, ent2


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
    official code). ``cumulative=True`` replaces n_l by the running sum of the floored counts up to l, i.e. the
    number of gate l's positives (oracle <= l): the weight that balances gate l's own classes."""
    as_numpy = isinstance(oracle, np.ndarray)
    o = torch.as_tensor(oracle)
    counts = F.one_hot(o.long(), num_exits)[..., :-1].sum(-2)  # [..., K-1]
    w = positive_weights_from_counts(counts, o.shape[-1], cap, cumulative)
    return w.numpy() if as_numpy else w


def positive_weights_from_counts(counts, n: int, cap: float = 5.0, cumulative: bool = False) -> torch.Tensor:
    """``positive_weights`` from per-gate counts [..., K-1] of samples whose oracle is exactly l, out of n:
    float64 ``min((n - c_l) / c_l, cap)``, c_l = max(count_l, 0.1) (cumulative: c_l = sum_{k<=l} max(count_k,
    0.1)). The official gate helper starts from counts of 1 per gate, i.e. weight ``min(n - 1, cap)`` = the cap
    for any n > cap + 1 (this reproduces its first-epoch loss, ``out_gate_loss_pos_weight_1`` in the cases)."""
    c = torch.as_tensor(counts).double().clamp(min=0.1)
    if cumulative:
        c = c.cumsum(-1)
    return ((n - c) / c).clamp(max=cap)


def gate_loss(z: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """The official gate-phase loss: BCE with logits of gate logits z [..., K-1, N] against 0/1 targets of the
    same shape, positives weighted by pos_weight [..., K-1], averaged over gates *and* samples; summed over
    leading dims (independent models, e.g. one per lambda)."""
    bce = F.binary_cross_entropy_with_logits(z, targets, pos_weight=pos_weight[..., None], reduction="none")
    return bce.mean((-2, -1)).sum()


def weighted_im_loss(ce: torch.Tensor, p: torch.Tensor, mode: str = "detached", reduction: str = "sum"
                     ) -> torch.Tensor:
    """The IM-phase loss from per-IM cross-entropies ce [..., K-1, N] and exit probabilities p [..., K-1, N]
    (the trainable IMs only; p carries no gradient). Per sample:
    - ``"official"``: ``sum_l P_l CE_l r`` with ``r = sum_l CE_l / sum_l P_l CE_l`` attached, which makes it
      plain ``sum_l CE_l`` in value and gradient (the official code);
    - ``"detached"``: the same with r detached: the value of plain CE, but the weights ``P_l r`` shape the
      gradient;
    - ``"probability"``: ``(K-1) sum_l P_l CE_l``: each IM's CE weighted by the probability that the sample
      exits there (the paper's weighting), scaled so that weights 1/(K-1) each would give plain CE's scale;
      unlike r, the weights never exceed K-1 whatever the CEs.
    Then the mean over samples (``reduction="sum"``) or over samples *and* exits (``"mean"``, the official
    code's ``torch.mean`` over [N, K-1]), summed over leading dims. In modes "official" and "detached" a sample
    with ``sum_l P_l CE_l == 0`` uses weight 1 on every exit (plain CE) instead of the official 0/0 = NaN."""
    if mode not in IM_LOSSES:
        raise JEIDNNConfigError(f"im_loss must be one of {', '.join(IM_LOSSES)}, not {mode!r}.")
    if reduction not in ("sum", "mean"):
        raise JEIDNNConfigError(f"reduction must be 'sum' or 'mean', not {reduction!r}.")
    p = p.detach()
    if mode == "probability":
        per_sample = ce.shape[-2] * (p * ce).sum(-2)
    else:
        total = ce.sum(-2)  # [..., N]
        den = (p * ce).sum(-2)
        ok = den > 0
        safe = torch.where(ok, den, torch.ones_like(den))
        if mode == "detached":
            w = torch.where(ok[..., None, :], p * (total / safe).detach()[..., None, :], torch.ones_like(p))
            per_sample = (w * ce).sum(-2)
        else:  # official: r stays in the graph, the weights cancel exactly
            per_sample = torch.where(ok, den * total / safe, total)
    loss = per_sample.mean(-1)
    return (loss / ce.shape[-2] if reduction == "mean" else loss).sum()


# -- the official schedule (numbers worked out by hand in tests/test_jeidnn_official.py) ---------------------

def official_gate_phase(batch_index: int, alternate_every: int) -> bool:
    """Whether mini-batch ``batch_index`` (0-based, counted *within* its epoch) is in the gate phase: the
    official code switches every ``alternate_every`` batches on the per-epoch index, gate phase first in every
    epoch, so an epoch of at most ``alternate_every`` batches trains only the gates."""
    return (int(batch_index) // int(alternate_every)) % 2 == 0


def official_joint_epochs(num_epoch: int, warmup_epochs_run: int) -> int:
    """Joint (alternating) epochs: the official ``num_epoch`` includes the warm-up."""
    return max(0, int(num_epoch) - int(warmup_epochs_run))


def official_joint_lr(joint_epoch: int, lr: float, lr_min: float, num_epoch: int) -> float:
    """Learning rate of joint epoch ``joint_epoch`` (0-based): one SGD with cosine annealing, T_max =
    ``num_epoch`` (warm-up included), stepped once per joint epoch; the warm-up runs at the constant ``lr``.
    ``lr_min + (lr - lr_min) * (1 + cos(pi * e / T_max)) / 2``."""
    t = max(1, int(num_epoch))
    return float(lr_min + (lr - lr_min) * (1 + math.cos(math.pi * int(joint_epoch) / t)) / 2)


# -- the consistent variant's reading of the gate output ----------------------------------------------------

def conditional_exit_probabilities(g):
    """P [..., K, N] when g_l [..., K-1, N] is "exit at l given still running":
    ``P_l = g_l prod_{k<l} (1 - g_k)``, the rest ``prod_l (1 - g_l)`` at the last exit."""
    g = torch.as_tensor(g)
    alive = torch.cumprod(torch.cat([torch.ones_like(g[..., :1, :]), 1 - g], dim=-2), dim=-2)  # [..., K, N]
    return torch.cat([g * alive[..., :-1, :], alive[..., -1:, :]], dim=-2)


def cumulative_exit_probabilities(g):
    """P [..., K, N] when g_l [..., K-1, N] is "exit at or before l": with the running maximum F_l (a gate
    trained as a CDF need not be monotone), ``P_l = F_l - F_{l-1}``, the rest ``1 - F_{K-2}`` at the last exit."""
    f = torch.cummax(torch.as_tensor(g), dim=-2).values
    f = torch.cat([torch.zeros_like(f[..., :1, :]), f, torch.ones_like(f[..., :1, :])], dim=-2)
    return f[..., 1:, :] - f[..., :-1, :]


def first_at_least(g, threshold: float = 0.5) -> np.ndarray:
    """Exit index [N] (int64) from gate outputs g [K-1, N]: the first l with g_l >= threshold, else K-1 (the
    rule of both consistent readings: a conditional or cumulative exit probability of at least one half)."""
    g = np.asarray(g, dtype=np.float64)
    hit = g >= threshold
    return np.where(hit.any(0), hit.argmax(0), g.shape[0]).astype(np.int64)


def conditional_targets(oracle, num_exits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and mask [..., K-1, N] (float) for "exit at l given still running": gate l's target is 1 where
    the oracle exit is l, 0 where it is later; samples whose oracle is earlier have left (mask 0)."""
    o = torch.as_tensor(oracle)
    levels = torch.arange(num_exits - 1).view(-1, 1)
    o = o.unsqueeze(-2)
    dtype = torch.get_default_dtype()
    return (levels == o).to(dtype), (levels <= o).to(dtype)


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


def gate_probs(logits_k: torch.Tensor, w, b) -> torch.Tensor:
    """g [N] float64 of one gate on its IM's logits [N, C], computed on the logits' device with no host
    synchronisation (the real runner's form, and the simulation's through ``_gate_probs``: the same arithmetic).
    The weights w [4] and bias b are host values (the fitted gate: numbers, numpy or CPU tensors), applied as
    float64 scalars. An explicit weighted sum of the four features (no BLAS, no stacking), so a sample's g does
    not depend on which other samples share the batch; few, small operations, since at batch 1 every operation's
    dispatch is what the gate costs."""
    w0, w1, w2, w3 = (float(v) for v in (w.tolist() if hasattr(w, "tolist") else w))
    logp = torch.log_softmax(logits_k.detach().double(), dim=-1)
    p1, ent, margin, ent2 = _feature_columns(logp)
    return torch.sigmoid(float(b) + w0 * p1 + w1 * ent + w2 * margin + w3 * ent2)


def _gate_probs(logits_k: torch.Tensor, w, b) -> np.ndarray:
    """``gate_probs`` as a numpy array."""
    return gate_probs(torch.as_tensor(logits_k), w, b).numpy()
