"""``laplace`` — last-layer Laplace approximation with model-internal ensembling (Meronen et al., WACV 2024).

Method card
- Paper: L. Meronen, M. Trapp, A. Pilzer, L. Yang, A. Solin, "Fixing Overconfidence in Dynamic Neural Networks",
  WACV 2024. Official code: github.com/AaltoML/calibrated-dnn (``laplace.py``, ``adaptive_inference.py``).
- Heads: the shared cross-entropy heads of ``threshold`` (one linear head per intermediate exit on the frozen
  backbone's cached features; the backbone's own head is the last exit; on MSDNet the network's own exit
  classifiers). The authors' heads are MSDNet's classifiers, whose last layer is also a linear map of a pooled
  feature: the Laplace approximation acts on that linear layer in both, with the bias as an extra input 1.
- Hessian (the authors' ``get_hessian_efficient``): a Kronecker-factored (KFAC) GGN of each head's augmented
  weight [C, D+1], from BackPACK's ``KFAC`` on the cross-entropy loss: per mini-batch of the train split (64, in a
  seeded shuffled order), the output factor G = (1/B) sum_n g_n g_n^T with g_n = p_n - onehot(y~_n), y~_n one
  class sampled from the head's own softmax (so the labels are never used), and the input factor
  A = (1/B) sum_n phi_n phi_n^T; both running averages with rho = min(1 - 1/(i+1), 0.95) over batches i (the
  plain mean for the first 20, an exponential average after), then both scaled by sqrt(N_train).
  ``hessian=kflr`` uses BackPACK's exact factor (1/B) sum_n (diag p_n - p_n p_n^T) instead (no sampling).
- Posterior (``estimate_variance_efficient``): U^-1 = (G + sqrt(1/var0) I)^-1 [C, C] and
  V^-1 = (A + sqrt(1/var0) I)^-1 [D+1, D+1]; the weight posterior is matrix normal around the trained weights.
- Predictive (``Tester.calc_la_logit``): f = phi~ M, s = phi~^T V^-1 phi~ (a scalar per sample), and the mean
  over S Monte Carlo draws (``mc_samples``, 50 as in the authors' README) of softmax((f + sqrt(s) L z_i) / T)
  with L = chol(U^-1). The draws z_i ~ N(0, I_C) are made once (here: at fit, from the seed) and shared by every
  sample and exit, as in the authors' code, where one set serves a whole data set.
- MIE (``calc_ensemble_logits``): the prediction at exit k is sum_{i<=k} w_i p_i / sum_{i<=k} w_i, a weighted
  mean of the exits' predictive probabilities with w_i = the cumulative MACs of exit i (blocks + heads, the
  authors' ``flops``) over the last exit's; exit 0 is p_0 itself. ``mie=false`` keeps each exit's own p_k.
- Tuning (``dynamic_evaluate`` with --optimize_temperature --optimize_var0): grid T in {0.3 .. 3.0} (10 values)
  x var0 in {0.5 .. 4.0} (10 values), maximising the validation log-likelihood; with MIE exit by exit in order,
  of the ensemble at that exit with the earlier exits at their tuned values; without MIE each exit alone. The
  first maximum in (T, var0) row-major order wins.
- Exit rule: leave at the first exit whose max predictive probability (after MIE) reaches the threshold; the
  harness's shared calibration sets one threshold per budget (``scheme=geometric`` for the MSDNet r^k scheme,
  which the authors' ``dynamic_find_threshold`` uses). ``exit_logits`` are log-probabilities, so softmax gives
  the predictive back.
- Cost per exit on the way: the head (D*C), the variance (D+1)^2 + (D+1) + 1 (phi~^T V^-1 phi~ and its square
  root), per MC draw 6C (f + sqrt(s) Lz, / T, exp, sum, divide, accumulate) and C for the mean, the ensemble 2C
  (with MIE) and the decision C (the max). The last exit pays all but the decision on top of the static head.
- Differences from the authors' code, and why: (1) the MC noise is drawn once at fit and reused by every grid
  point of the tuning, where the authors draw fresh noise for every call (common random numbers make the grid
  comparison less noisy; their code with the generator re-seeded per call gives our choices, see
  tests/data/laplace_official.md); (2) the Kronecker factors and their inverses are accumulated in float64
  (theirs float32), the predictive runs in float32 as theirs, with s clamped at 0 against rounding, and the
  tuning's softmax is exp((z - max z) / T) / sum for all temperatures from one shifted z; (3) s is the row
  sums of (phi~ V^-1) * phi~, where their code forms the [B, B] matrix phi~ V^-1 phi~^T and takes its diagonal;
  (4) their Hessian pass sees augmented training images, ours the cached (unaugmented) train features;
  (5) features come from the frozen backbone (as for every method of the harness) rather than MSDNet trained
  with its own exits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench.base.fields import bounded, choice
from bench.core.interface import OperatingPoint, register_method
from bench.core.task import SplitData, Task
from methods._heads import CrossEntropyHeadsMethod, HeadConfig

TEMPERATURE_GRID = (0.3, 0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0)
VAR0_GRID = (0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0, 4.0)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Features [N, D] with a column of ones appended (the bias as an input): [N, D+1]."""
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)


def ema_coefficients(num_batches: int) -> np.ndarray:
    """The weight of batch i in the authors' running average U_i = rho_i U_{i-1} + (1 - rho_i) G_i with
    rho_i = min(1 - 1/(i+1), 0.95): (1 - rho_i) prod_{j>i} rho_j, [num_batches] (summing to 1)."""
    rho = np.minimum(1 - 1 / (np.arange(num_batches) + 1), 0.95)
    later = np.concatenate([np.cumprod(rho[::-1])[::-1][1:], [1.0]])  # prod_{j>i} rho_j
    return (1 - rho) * later


def kron_factors(features: torch.Tensor, weight: torch.Tensor, batch_size: int = 64, hessian: str = "kfac",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' Kronecker factors of each exit's last-layer GGN (``get_hessian_efficient``).

    features [K, N, D] float32 in the order the batches are taken; weight [K, C, D+1] float32, each head's
    weight with its bias as the last column. Per batch of ``batch_size`` (in order) and exit, G = (1/B) sum g g^T
    and A = (1/B) sum phi~ phi~^T, averaged over batches with ``ema_coefficients`` (the running average in
    closed form: one weighted product per factor). For ``kfac`` one class per sample is drawn from the head's
    softmax, batches outer and exits inner, one ``multinomial`` per (batch, exit): the order in which the official
    code, through BackPACK's ``KFAC``, draws them, so a generator in the global one's state gives the same draws.
    Returns (U [K, C, C], V [K, D+1, D+1]) float64, scaled by sqrt(N)."""
    if hessian not in ("kfac", "kflr"):
        raise ValueError(f"laplace: hessian must be 'kfac' or 'kflr', got {hessian!r}.")
    k_exits, n, _ = features.shape
    c = weight.shape[1]
    starts = list(range(0, n, batch_size))
    sizes = np.diff([*starts, n])
    row_w = torch.from_numpy(np.repeat(ema_coefficients(len(starts)) / sizes, sizes))  # [N] float64
    u = torch.empty(k_exits, c, c, dtype=torch.float64)
    v = torch.empty(k_exits, weight.shape[2], weight.shape[2], dtype=torch.float64)
    probs = [torch.softmax(F.linear(augment(features[j]), weight[j]), dim=1) for j in range(k_exits)]
    if hessian == "kfac":
        drawn = torch.empty(k_exits, n, dtype=torch.int64)
        for start in starts:
            for j in range(k_exits):
                rows = slice(start, start + batch_size)
                drawn[j, rows] = torch.multinomial(probs[j][rows], 1, replacement=True, generator=generator)[:, 0]
    for j in range(k_exits):
        p = probs[j].double()
        if hessian == "kfac":
            g = p - F.one_hot(drawn[j], c).double()
            u[j] = (g * row_w[:, None]).T @ g
        else:  # exact: sum_n w_n (diag p_n - p_n p_n^T)
            u[j] = torch.diag(row_w @ p) - (p * row_w[:, None]).T @ p
        phi = augment(features[j])
        v[j] = ((phi * row_w[:, None].float()).T @ phi).double()
    return math.sqrt(n) * u, math.sqrt(n) * v


def posterior(u: torch.Tensor, v: torch.Tensor, var0) -> tuple[torch.Tensor, torch.Tensor]:
    """``estimate_variance_efficient``: (U + sqrt(1/var0) I)^-1 and (V + sqrt(1/var0) I)^-1 per exit, with
    var0 [K] prior variances. u [K, C, C], v [K, D', D'] -> the same shapes, float64."""
    prec = torch.sqrt(1 / torch.as_tensor(var0, dtype=torch.float64))[:, None, None]
    eye_u = torch.eye(u.shape[-1], dtype=torch.float64)
    eye_v = torch.eye(v.shape[-1], dtype=torch.float64)
    return torch.linalg.inv(u + prec * eye_u), torch.linalg.inv(v + prec * eye_v)


def mc_predictive(f: torch.Tensor, s: torch.Tensor, lz: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over draws i of softmax((f + sqrt(s) lz_i) / T) (``calc_la_logit``): f [N, C], s [N], lz [S, C] ->
    [N, C] in f's dtype. All draws at once ([S, N, C]): one kernel per step on a GPU, whatever S is."""
    z = f[None] + torch.sqrt(s)[None, :, None] * lz[:, None, :]
    return torch.softmax(z / temperature, dim=-1).sum(0) / lz.shape[0]


def _row_chunks(n: int, per_row: int, limit: int = 1 << 24) -> list[slice]:
    """Row slices keeping [S, rows, C]-sized temporaries (per_row = S*C elements a row) under ``limit``."""
    step = max(1, limit // max(1, per_row))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def laplace_probs(features: torch.Tensor, mean: torch.Tensor, v_inv: torch.Tensor, lz: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """One exit's Laplace predictive [N, C] from features [N, D], the posterior mean [D+1, C] (weight and bias),
    V^-1 [D+1, D+1] and the draws L z [S, C], in the dtype of ``mean`` (float32 in the method, as the authors')."""
    phi = augment(features.to(mean.dtype))
    s = ((phi @ v_inv) * phi).sum(-1).clamp_min(0)
    return mc_predictive(phi @ mean, s, lz, temperature)


def mie_combine(probs: torch.Tensor, weights) -> torch.Tensor:
    """``calc_ensemble_logits``: out[0] = p_0, out[k] = sum_{i<=k} w_i p_i / sum_{i<=k} w_i. [K, N, C]."""
    out = torch.empty_like(probs)
    out[0] = probs[0]
    total, acc = float(weights[0]), float(weights[0]) * probs[0]
    for k in range(1, probs.shape[0]):
        acc = acc + float(weights[k]) * probs[k]
        total += float(weights[k])
        out[k] = acc / total
    return out


def tune(features: torch.Tensor, labels: np.ndarray, mean: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
         noise: torch.Tensor, weights, mie: bool, temps=TEMPERATURE_GRID, var0s=VAR0_GRID
         ) -> tuple[list[float], list[float]]:
    """The authors' validation grid search (``dynamic_evaluate``): per exit the (T, var0) of the grids with the
    lowest validation NLL, of the MIE ensemble at that exit (earlier exits at their tuned values) or of the exit
    alone; the first minimum in (T, var0) row-major order. features [K, N, D]; noise [S, C] the fixed draws z;
    weights [K] the MIE weights. Returns (temperatures [K], var0s [K]). V's eigendecomposition gives s for every
    var0 at O(N D) each; rows go in chunks, so memory stays at one [S, chunk, C] block."""
    y = torch.as_tensor(labels)
    k_exits, n = features.shape[:2]
    c = mean.shape[-1]
    chunks = _row_chunks(n, noise.shape[0] * c)
    best_t, best_v = [], []
    acc, total = None, 0.0

    for k in range(k_exits):
        phi = augment(features[k].double())
        fk = phi @ mean[k]  # [N, C]
        lam, q = torch.linalg.eigh(v[k])
        proj2 = (phi @ q) ** 2  # s = proj2 @ 1 / (lam + sqrt(1/var0)) for any var0

        def draws(var0: float) -> tuple[torch.Tensor, torch.Tensor]:
            """(s [N], L z [S, C]) of exit k under prior variance var0."""
            prec = math.sqrt(1 / var0)
            u_inv = torch.linalg.inv(u[k] + prec * torch.eye(c, dtype=torch.float64))
            return proj2 @ (1 / (lam + prec)), noise.double() @ torch.linalg.cholesky(u_inv).T

        w = float(weights[k])
        scores = {}
        for var0 in var0s:
            s, lz = draws(var0)
            logp = {t: torch.empty(n, dtype=torch.float64) for t in temps}
            for rows in chunks:
                z = (fk[None, rows] + torch.sqrt(s[rows])[None, :, None] * lz[:, None, :]).float()
                z = z - z.amax(-1, keepdim=True)  # softmax(z / T) = exp((z - max z) / T) / sum, for T > 0
                for t in temps:
                    e = torch.exp(z * (1 / t))
                    p = (e / e.sum(-1, keepdim=True)).sum(0).double() / lz.shape[0]
                    if mie and k > 0:
                        p = (acc[rows] + w * p) / (total + w)
                    logp[t][rows] = torch.log(p[torch.arange(p.shape[0]), y[rows]])
            for t in temps:
                nll = float(-logp[t].mean())
                scores[(t, var0)] = nll if math.isfinite(nll) else math.inf
        key = min(((t, vv) for t in temps for vv in var0s), key=lambda kv: scores[kv])
        best_t.append(key[0])
        best_v.append(key[1])
        s, lz = draws(key[1])
        p = torch.cat([mc_predictive(fk[rows].float(), s[rows].float(), lz.float(), key[0])
                       for rows in chunks]).double()
        acc = w * p if acc is None else acc + w * p
        total += w
    return best_t, best_v


@register_method("laplace")
@dataclass
class LaplaceMIE(CrossEntropyHeadsMethod):
    mc_samples: int = bounded(50, min=1)
    mie: bool = True
    optimize_temperature: bool = True
    optimize_var0: bool = True
    temperature: float = bounded(1.0, min=1e-6)  # used where the temperature is not tuned
    var0: float = bounded(2.0, min=1e-12)  # prior variance, used where it is not tuned
    hessian: str = choice("kfac", ("kfac", "kflr"))
    hessian_batch_size: int = bounded(64, min=1)

    def decision_macs(self, num_classes: int) -> int:
        return num_classes  # the max of the (already normalised) predictive

    def laplace_macs(self, dim: int, num_classes: int) -> int:
        """Operations of one exit's predictive beyond its head, MIE included (see the card)."""
        d1, c = dim + 1, num_classes
        return d1 * d1 + d1 + 1 + self.mc_samples * 6 * c + c + (2 * c if self.mie else 0)

    def fit(self, task: Task) -> "LaplaceMIE":
        self._fit_heads(task, HeadConfig(self.epochs, self.lr, self.weight_decay, self.batch_size))
        k, c, d = task.num_exits, task.num_classes, task.dim
        extra = self.laplace_macs(d, c)
        costs = task.exit_costs(np.full(k - 1, task.im_head_macs() + extra + self.decision_macs(c)))
        costs[-1] += extra
        # MIE weights: the network's cumulative MACs per exit (blocks + heads), as the authors' flops
        network = task.exit_costs(np.full(k - 1, task.im_head_macs())).astype(np.float64)
        self.mie_weights_ = [float(x) for x in network / network[-1]]
        weight = torch.cat([self.heads_.weight.transpose(1, 2), self.head_weight_[None]])  # [K, C, D]
        bias = torch.cat([self.heads_.bias, self.head_bias_[None]])  # [K, C]
        w_aug = torch.cat([weight, bias[..., None]], dim=2).float()  # [K, C, D+1]
        gen = torch.Generator().manual_seed(task.seed)
        train = task.splits["train"]
        order = torch.randperm(len(train), generator=gen)
        u, v = kron_factors(train.features[:, order], w_aug, self.hessian_batch_size, self.hessian, gen)
        noise = torch.stack([torch.randn(c, generator=gen, dtype=torch.float32)
                             for _ in range(self.mc_samples)]).double()
        mean = w_aug.double().transpose(1, 2)  # [K, D+1, C]
        val = task.splits["val"]
        temps = TEMPERATURE_GRID if self.optimize_temperature else (self.temperature,)
        var0s = VAR0_GRID if self.optimize_var0 else (self.var0,)
        if len(temps) * len(var0s) > 1:
            t, v0 = tune(val.features, val.labels, mean, u, v, noise, self.mie_weights_, self.mie, temps, var0s)
        else:
            t, v0 = [self.temperature] * k, [self.var0] * k
        self.temperatures_, self.var0s_ = [float(x) for x in t], [float(x) for x in v0]
        u_inv, v_inv = posterior(u, v, self.var0s_)
        # float32 from here on, the authors' precision: [K, S, C] L_k z_i, [K, D+1, D+1], [K, D+1, C]
        self.lz_ = (noise @ torch.linalg.cholesky(u_inv).transpose(1, 2)).float()
        self.v_inv_, self.mean_ = v_inv.float(), mean.float()
        self.costs_ = costs
        return self

    # -- predictions ---------------------------------------------------------------------------------------------
    def exit_probs(self, k: int, features_k: torch.Tensor) -> torch.Tensor:
        """Exit k's own Laplace predictive [N, C] float32 from its features [N, D]."""
        with torch.no_grad():
            lz = self.lz_[k]
            return torch.cat([laplace_probs(features_k[rows], self.mean_[k], self.v_inv_[k], lz, self.temperatures_[k])
                              for rows in _row_chunks(features_k.shape[0], lz.numel())])

    @staticmethod
    def _logits(probs: torch.Tensor) -> torch.Tensor:
        return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))  # finite: softmax gives probs back

    def exit_head(self, k: int, features_k: torch.Tensor, point=None) -> torch.Tensor:
        """Log of exit k's own predictive [N, C] (without MIE, which needs the earlier exits: see ``stream``)."""
        return self._logits(self.exit_probs(k, features_k))

    def exit_logits(self, split: SplitData, point=None) -> torch.Tensor:
        """Per-exit log predictive probabilities [K, N, C] (after MIE when ``mie``)."""
        self.check_fitted()
        feats = split.features
        if feats.ndim != 3 or feats.shape[2] != self.mean_.shape[1] - 1:
            raise ValueError(f"laplace: features must be [K, N, D={self.mean_.shape[1] - 1}], "
                             f"got {tuple(feats.shape)}.")
        probs = torch.stack([self.exit_probs(k, feats[k]) for k in range(len(self.costs_))])
        if self.mie:
            probs = mie_combine(probs, self.mie_weights_)
        return self._logits(probs)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1).amax(dim=-1)

    def stream(self, k: int, features_k: torch.Tensor, point: OperatingPoint, state: dict | None):
        """Exit k's predictive on the running samples; with MIE the weighted sum of the earlier exits'
        probabilities travels in ``state["mie_sum"]`` [N_k, C] (``mie_combine``'s arithmetic)."""
        p = self.exit_probs(k, features_k)
        new_state = {}
        if self.mie:
            w = self.mie_weights_[k]
            if k == 0:
                acc, ens = w * p, p
            else:
                acc = state["mie_sum"] + w * p
                ens = acc / sum(self.mie_weights_[:k + 1])
            p, new_state = ens, {"mie_sum": acc}
        logits = self._logits(p)
        return logits, self.score(logits.double()) >= float(self._threshold(point, k)), new_state
