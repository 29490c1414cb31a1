"""The one exit interface every method implements, the method registry, and the harness's operating points.

The contract, five methods (DESIGN.md):
- ``fit(task)`` learns from the train split, may use val for model selection; never test labels. Returns self.
  Afterwards ``costs_`` [K] holds the cumulative MACs per image of leaving at each exit, heads and decisions
  included.
- ``operating_points(task, budgets)`` -> the method's points (``OperatingPoint``): a point without a budget is
  one of the method's own (a lambda, a patience); a point with a budget is a rule calibrated to that budget
  (score rules get this from the harness's shared calibration, ``ScoreExitMethod``). The harness alone turns
  them into one point per budget (``resolve_points``: it measures every point's validation cost and picks, per
  budget, the method's own point with the largest validation cost within it).
- ``exit_logits(split, point=None)`` -> [K, N, C]: the prediction available at each exit (a method whose heads
  depend on the operating point, like JEI-DNN's per-lambda heads, reads ``point``).
- ``decide(logits, point, targets=None)`` -> exit index [N]; row k of any score uses exits 0..k only. Only a
  bound (``bound = True``, the oracle) may read ``targets``.
- ``stream(k, features_k, point, state)`` -> (logits [N_k, C], leave [N_k] bool, state): the real runner's
  form, called at every exit k with the exit-k features [N_k, D] of the N_k samples still running. Everything is
  a torch tensor on the features' device (the model's: a GPU in a timed run): the logits, the ``leave`` mask and
  ``state``, a dict of per-sample tensors whose first dimension is N_k (JEI-DNN's accumulated gate mass,
  patience's counter and previous argmax, BoostedNet's running ensemble), None at k = 0. The runner keeps the
  survivors' rows of every state tensor by the same index as the block state, so exit k+1 sees them aligned.
  ``stream`` must not synchronise with the host (no ``.item()``, ``.cpu()``, ``.numpy()``, ``bool(tensor)``,
  boolean-mask indexing): the runner's one read per block, the survivors' count, is the only one, so early exit
  pays on a GPU. Its logits must equal ``exit_logits(...)[k]`` on those rows and its exits ``decide``'s (use
  float64 where ``decide`` does; ``leave`` is ignored at the last exit, which takes everyone left).

Methods are dataclasses: hyper-parameters are fields stored as given (``--set METHOD.FIELD=VALUE`` sets them,
typed and range-checked by ``bench.base.fields``), fitted state ends in ``_`` (scikit-learn's convention).
``networks`` maps the run's backbone to the backbone the method's jobs run on when it brings its own network
(``{"*": "msdnet"}``); most methods run on the run's backbone.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from bench.base.errors import UserError
from bench.base.fields import check_fields, check_instance, choice
from bench.base.registry import Registry
from bench.core.task import SplitData, Task
from bench.measure.calibration import SCHEMES, calibrate_thresholds, first_exit, select_budget

METHODS: Registry[type["ExitMethod"]] = Registry("method")


def register_method(name: str):
    def deco(cls):
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


@dataclass(frozen=True)
class OperatingPoint:
    params: dict[str, Any]  # JSON-able: what the rule needs (e.g. {"threshold": 0.93})
    budget: float | None = None  # the budget this point serves; None: one of the method's own points
    val_macs_rel: float = math.nan  # mean validation cost / static backbone MACs, measured by the harness
    infeasible: bool = False  # no point of the method fits this budget


class NotFittedError(UserError):
    pass


@dataclass
class ExitMethod:
    name: ClassVar[str] = ""
    bound: ClassVar[bool] = False  # an upper bound (reads labels), not a deployable method
    # conformance checks this method fails by nature: {check name: the reason}
    expected_failures: ClassVar[dict[str, str]] = {}
    # the run's backbone -> the backbone this method's jobs run on ("*": any); empty: the run's backbone
    networks: ClassVar[dict[str, str]] = {}

    # -- the contract ----------------------------------------------------------------------------------------
    def fit(self, task: Task) -> "ExitMethod":
        raise NotImplementedError

    def operating_points(self, task: Task, budgets: Sequence[float]) -> list[OperatingPoint]:
        raise NotImplementedError

    def exit_logits(self, split: SplitData, point: OperatingPoint | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, logits: torch.Tensor, point: OperatingPoint, targets: np.ndarray | None = None
               ) -> np.ndarray:
        raise NotImplementedError

    def stream(self, k: int, features_k: torch.Tensor, point: OperatingPoint, state: dict | None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{self.name} has no streaming form")

    # -- helpers ---------------------------------------------------------------------------------------------
    @classmethod
    def backbone_for(cls, run_backbone: str) -> str:
        """The backbone this method's jobs run on, given the run's."""
        return cls.networks.get(run_backbone, cls.networks.get("*", run_backbone))

    def exit_head(self, k: int, features_k: torch.Tensor, point: OperatingPoint | None = None) -> torch.Tensor:
        """Logits [N, C] of exit k from that exit's features [N, D] alone. This generic form places the features
        in slot k of an otherwise empty [K, N, D] tensor; methods with direct heads override it (it must equal
        ``exit_logits(...)[k]``)."""
        k_exits = len(self.costs_)
        feats = features_k.new_zeros((k_exits, *features_k.shape))
        feats[k] = features_k
        n = features_k.shape[0]
        return self.exit_logits(SplitData(feats, None, np.arange(n)), point)[k]

    def check_fitted(self) -> None:
        if not hasattr(self, "costs_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(task) first.")

    def check_logits(self, logits: torch.Tensor, who: str = "decide") -> None:
        """Per-exit logits must be a tensor [K, N, C] with K = this method's number of exits."""
        self.check_fitted()
        k = len(self.costs_)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[0] != k:
            shape = tuple(logits.shape) if hasattr(logits, "shape") else type(logits).__name__
            raise ValueError(f"{self.name}.{who}: expected per-exit logits of shape [K={k}, N, C], got {shape}.")

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, overrides: dict[str, Any]) -> "ExitMethod":
        """A method from ``--set`` values: each field typed and range-checked (UserError naming it)."""
        method = cls(**check_fields(cls, cls.name, overrides))
        check_instance(method, cls.name)
        return method


def create_method(name: str, overrides: dict[str, Any] | None = None) -> ExitMethod:
    return METHODS.get(name).from_params(overrides or {})


def validation_cost(method: ExitMethod, task: Task, point: OperatingPoint) -> float:
    """Mean validation cost of a point's decisions, relative to the static backbone."""
    val = task.splits["val"]
    exits = method.decide(method.exit_logits(val, point), point, val.labels if method.bound else None)
    return float((np.asarray(method.costs_)[np.asarray(exits)] / task.macs.static).mean())


def resolve_points(method: ExitMethod, task: Task, budgets: Sequence[float]) -> list[OperatingPoint]:
    """The harness's operating points of a fitted method: one per budget, in order (``infeasible`` where nothing
    fits), then the method's own points (``budget`` None). Every point's validation cost is measured here; a
    budget takes the method's point calibrated to it if there is one, else, among the method's own points, the
    one with the largest validation cost within the budget (the first on ties)."""
    method.check_fitted()
    candidates = method.operating_points(task, budgets)
    measured = [dataclasses.replace(p, val_macs_rel=validation_cost(method, task, p)) for p in candidates]
    own = [p for p in measured if p.budget is None]
    out = []
    for b in budgets:
        calibrated = [p for p in measured if p.budget is not None and p.budget == b]
        if calibrated:
            out.append(calibrated[0])
            continue
        i = select_budget([p.val_macs_rel for p in own], [b])[0]
        out.append(OperatingPoint({}, b, infeasible=True) if i is None else dataclasses.replace(own[i], budget=b))
    return out + own


@dataclass
class ScoreExitMethod(ExitMethod):
    """A rule "leave at the first exit whose score reaches its exit's threshold", with the harness's budget
    calibration (``scheme``: ``shared``, one threshold for every exit, or ``geometric``, MSDNet's per-exit
    thresholds from target exit shares proportional to r^k; bench.measure.calibration). Subclasses define
    ``score`` (higher = more confident), ``decision_macs`` and how the per-exit logits are made."""

    scheme: str = choice("shared", SCHEMES)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-exit scores [..., ] from logits [..., C]; must depend on that exit's logits only."""
        raise NotImplementedError

    def decision_macs(self, num_classes: int) -> int:
        """Operations to evaluate the exit decision once, counted like MACs in the cost."""
        raise NotImplementedError

    def scores(self, logits: torch.Tensor) -> np.ndarray:
        """Scores [K, N] (or [N] for one exit's logits), float64, memoised for the last few logits tensors seen
        (by identity): the harness decides many operating points on the same outputs of a few splits."""
        memo = self.__dict__.setdefault("_scores_memo", [])
        for seen, scores in memo:
            if seen is logits:
                return scores
        scores = self.score(logits.double()).numpy()
        memo[:] = [*memo[-3:], (logits, scores)]
        return scores

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_scores_memo"}

    def operating_points(self, task: Task, budgets: Sequence[float]) -> list[OperatingPoint]:
        """One point per feasible budget from the harness's shared calibration on validation."""
        self.check_fitted()
        val = self.scores(self.exit_logits(task.splits["val"]))
        costs_rel = self.costs_ / task.macs.static
        return [OperatingPoint(r[0], b) for b, r in zip(budgets, calibrate_thresholds(self.scheme, val, costs_rel,
                                                                                       budgets)) if r is not None]

    @staticmethod
    def _threshold(point: OperatingPoint, k: int | None = None):
        t = point.params["threshold"]
        return t if k is None or np.ndim(t) == 0 else t[k]

    def decide(self, logits: torch.Tensor, point: OperatingPoint, targets: np.ndarray | None = None
               ) -> np.ndarray:
        self.check_logits(logits)
        return first_exit(self.scores(logits), self._threshold(point))

    def stream(self, k: int, features_k: torch.Tensor, point: OperatingPoint, state: dict | None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Exit k's head, its float64 score and the comparison with exit k's threshold, on the features'
        device: ``decide``'s arithmetic (``scores``) without leaving the device."""
        logits = self.exit_head(k, features_k, point)
        return logits, self.score(logits.double()) >= float(self._threshold(point, k)), {}


def check_stream_output(method: ExitMethod, k: int, n: int, logits, leave, state) -> None:
    """What ``stream(k, ...)`` returned on n running samples must be tensors of the contract's shapes: a clear
    error naming the method otherwise (a plugin written for numpy masks, say)."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{method.name}.stream({k}) returned {what}; the streaming contract (bench.core.interface) "
                          "wants torch tensors on the features' device: logits [N_k, C], leave [N_k] bool, state "
                          "{name: tensor [N_k, ...]}.")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n:
        raise bad(f"logits of shape {tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
    if not isinstance(leave, torch.Tensor) or leave.dtype != torch.bool or tuple(leave.shape) != (n,):
        raise bad(f"a leave mask {type(leave).__name__} {tuple(getattr(leave, 'shape', ()))} "
                  f"{getattr(leave, 'dtype', '')}, expected ({n},) torch.bool")
    for key, v in (state or {}).items():
        if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != n:
            raise bad(f"state[{key!r}] = {type(v).__name__} {tuple(getattr(v, 'shape', ()))}")


def stream_exits(method: ExitMethod, features: torch.Tensor, point: OperatingPoint
                 ) -> tuple[np.ndarray, torch.Tensor]:
    """The real runner's path on cached features [K, N, D]: exit by exit, ``stream`` on the samples still
    running only, the leavers' rows (and state rows) removed after every exit by the same index. Returns
    (exits [N], the logits [N, C] each sample left with)."""
    k_exits, n = features.shape[:2]
    exits = torch.full((n,), k_exits - 1, dtype=torch.int64)
    out: torch.Tensor | None = None
    alive = torch.arange(n)
    state: dict | None = None
    for k in range(k_exits):
        if len(alive) == 0:
            break
        logits, leave, state = method.stream(k, features[k, alive], point, state)
        check_stream_output(method, k, len(alive), logits, leave, state)
        if k == k_exits - 1:
            leave = torch.ones(len(alive), dtype=torch.bool)
        if out is None:
            out = torch.zeros(n, logits.shape[1], dtype=torch.float32)
        out[alive[leave]] = logits[leave].float()
        exits[alive[leave]] = k
        keep = torch.nonzero(~leave).squeeze(1)
        alive = alive[keep]
        state = {key: v[keep] for key, v in (state or {}).items()}
    return exits.numpy(), out
