"""``anytime`` — Product Anytime (Jazbec et al., NeurIPS 2023): a product of the exits' clipped logits.

Method card
- Paper: Jazbec, Allingham, Zhang, Nalisnick, "Towards Anytime Classification in Early-Exit Architectures by
  Enforcing Conditional Monotonicity", NeurIPS 2023: a post-hoc Product-of-Experts over the exits. The prediction at exit k is
  p_k(y) ∝ prod_{l<=k} max(z_l(y), 0) ** w_l, z_l the logits of exit l: a class that any exit gives a
  non-positive logit is ruled out for good, so predictions become gradually confident and the true class's
  probability falls far less often from one exit to the next (conditional monotonicity, measured for every
  method as ``monotonicity_violation``: bench.measure.metrics.monotonicity_violation).
- Authors' code (metodj/AnytimeClassification, ``anytime_predictors.py``, ``anytime_product`` at e134ae7):
  clamp the logits at ``thres_min`` = 0, raise exit l to ``weights[l]``, ``torch.cumprod`` over exits,
  renormalise; with ``fall_back=True``, where every entry of the product is 0 (the product collapsed), the
  prediction is the softmax of *that exit's own* logits (the product stays 0 afterwards, so every later exit
  falls back too). The paper's figures (``paper_plots.ipynb``) use ``weights = l / L`` (l = 1..L).
- Trains: nothing of its own; the heads are the shared cross-entropy heads of ``threshold`` (identical weights
  for the same seed and hyper-parameters), the backbone's head is the last exit.
- Here: ``weighting=linear`` (default) is the paper's w_l = (l+1)/K for 0-based exit l; ``weighting=none`` is the
  plain product (w = 1). The fallback is always on (the issue asks for it; without it a collapsed product is
  0/0 = NaN). Exit rule: the max probability of the product distribution >= t, t set per budget by the harness's
  shared calibration on validation (the paper studies anytime prediction and sets no exit rule).
- ``exit_logits`` [K, N, C] are logits whose softmax is that distribution: log p where p > 0, ``ZERO_LOGIT``
  (-1000, whose softmax weight underflows to exactly 0 in float64) where p = 0, and, on a collapsed row, the
  exit's own logits (so the softmax is the fallback exactly). Everything stays finite (the harness's NLL clips
  a true-class probability of 0 at 1e-12). Stored in float32 like every method's logits, so the distribution
  the harness sees equals the authors' to float32 rounding (tests/test_anytime.py).
- Numerics: the running product is renormalised after every exit (mathematically the same distribution; it
  cannot overflow or underflow over many exits the way the authors' raw ``cumprod`` can, where theirs would
  read 0/0 or inf/inf). A product is "collapsed" when every entry is exactly 0, as in the authors' code.
- Streaming: ``stream`` carries the renormalised running product [N_k, C] in float64 (``state["product"]``;
  all zeros once collapsed) on the device, with ``exit_logits``' arithmetic row by row; it equals ``decide``.
- Cost per exit (counted like MACs, C = classes): the head (D*C), ReLU (C), the power w_l (C, not when w_l = 1),
  the product with the running product (C, not at exit 0), the normalisation (sum and divide: 2C), the max (C)
  and the fallback softmax's normaliser (C: counted on every sample, though only collapsed rows need it). The last
  exit's prediction is the product too, so its ReLU, product, normalisation and fallback (5C at w = 1) are added
  to the last exit's cost, besides the backbone's head.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.base.fields import choice
from bench.core.interface import OperatingPoint, register_method
from bench.core.task import SplitData, Task
from methods._heads import CrossEntropyHeadsMethod

WEIGHTINGS = ("linear", "none")
ZERO_LOGIT = -1000.0  # the logit of a class with product probability 0: exp(-1000 - max) is 0 in float64


def exit_weights(num_exits: int, weighting: str) -> np.ndarray:
    """The exponents w [K] of each exit's clipped logits: ``linear`` (the paper's l/L, l = 1..K) or ``none``."""
    if weighting == "linear":
        return np.arange(1, num_exits + 1, dtype=np.float64) / num_exits
    if weighting == "none":
        return np.ones(num_exits, dtype=np.float64)
    raise ValueError(f"anytime: weighting must be one of {WEIGHTINGS}, got {weighting!r}.")


def product_step(prev: torch.Tensor | None, logits_k: torch.Tensor, weight: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One exit of the product anytime rule, row by row (rows independent, so the runner's survivors give the
    simulation's numbers). ``prev``: the renormalised running product [N, C] float64 of exits < k (zeros where
    collapsed; None at exit 0); ``logits_k`` [N, C]; ``weight`` w_k. Returns (the distribution p_k [N, C] float64,
    the running product to carry [N, C] float64, collapsed [N] bool)."""
    z = logits_k.double()
    factor = z.clamp(min=0.0)
    if weight != 1.0:
        factor = factor.pow(weight)
    prod = factor if prev is None else prev * factor
    total = prod.sum(-1, keepdim=True)
    collapsed = total == 0
    running = torch.where(collapsed, torch.zeros_like(prod), prod / torch.where(collapsed, 1.0, total))
    dist = torch.where(collapsed, torch.softmax(z, dim=-1), running)
    return dist, running, collapsed.squeeze(-1)


def product_logits(dist: torch.Tensor, collapsed: torch.Tensor, logits_k: torch.Tensor) -> torch.Tensor:
    """Logits [N, C] float32 whose softmax is ``dist``: log p (``ZERO_LOGIT`` where p = 0), and on collapsed rows
    the exit's own logits, whose softmax is the fallback itself."""
    logp = torch.where(dist > 0, dist.clamp(min=1e-300).log(), ZERO_LOGIT)
    return torch.where(collapsed[:, None], logits_k.double(), logp).float()


def anytime_product_probs(logits: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
    """The product anytime distribution [K, N, C] float64 of per-exit logits [K, N, C] (the authors'
    ``anytime_product(logits, weights=w, fall_back=True)``, renormalised at every exit)."""
    out, prev = [], None
    for k in range(logits.shape[0]):
        dist, prev, _ = product_step(prev, logits[k], float(weights[k]))
        out.append(dist)
    return torch.stack(out)


@register_method("anytime")
@dataclass
class ProductAnytime(CrossEntropyHeadsMethod):
    weighting: str = choice("linear", WEIGHTINGS)

    def fit(self, task: Task) -> "ProductAnytime":
        super().fit(task)  # the shared heads (and provisional costs, replaced below)
        k_exits, c = task.num_exits, task.num_classes
        self.weights_ = exit_weights(k_exits, self.weighting)
        ops = np.array([self._exit_ops(k, c) for k in range(k_exits)], dtype=np.int64)
        costs = task.exit_costs(task.im_head_macs() + ops[:-1])
        costs[-1] += ops[-1] - c  # the last exit's product, normalisation and fallback (no exit decision: no max)
        self.costs_ = costs
        return self

    def _exit_ops(self, k: int, c: int) -> int:
        """Operations of exit k's product and decision: ReLU, power, product, sum + divide, max, fallback."""
        return c * (1 + int(self.weights_[k] != 1.0) + int(k > 0) + 2 + 1 + 1)

    def decision_macs(self, num_classes: int) -> int:
        """The largest per-exit count (an intermediate exit k > 0 with w_k != 1); ``fit`` sets the exact per-exit
        costs (``_exit_ops``)."""
        return 7 * num_classes

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Max probability of the product distribution that ``logits`` encode."""
        return torch.softmax(logits, dim=-1).amax(dim=-1)

    def exit_logits(self, split: SplitData, point: OperatingPoint | None = None) -> torch.Tensor:
        """Logits [K, N, C] whose softmax at exit k is the product anytime distribution of exits 0..k."""
        raw = super().exit_logits(split, point)
        out, prev = [], None
        for k in range(raw.shape[0]):
            dist, prev, collapsed = product_step(prev, raw[k], float(self.weights_[k]))
            out.append(product_logits(dist, collapsed, raw[k]))
        return torch.stack(out)

    def stream(self, k: int, features_k: torch.Tensor, point: OperatingPoint, state: dict | None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Exit k's product logits and leave mask on the running samples; ``state["product"]`` [N_k, C] float64
        is the renormalised running product of exits < k (on the features' device, no host read)."""
        raw = self.exit_head(k, features_k, point)
        prev = None if state is None else state["product"]
        dist, running, collapsed = product_step(prev, raw, float(self.weights_[k]))
        logits = product_logits(dist, collapsed, raw)
        leave = self.score(logits.double()) >= float(self._threshold(point, k))
        return logits, leave, {"product": running}
