"""The one exit interface every method implements, and the method registry.

Contract (DESIGN.md):
- ``fit(task)`` learns from the train split, may use val for model selection; never test labels. Returns self.
- ``exit_logits(split, point=None)`` -> [K, N, C]: the prediction available at each exit (a method whose heads
  depend on the operating point, like JEI-DNN's per-lambda heads, reads ``point``).
- ``costs_`` (after fit) -> [K] cumulative MACs per image of leaving at each exit, heads and decisions included.
- ``calibrate(task, budgets)`` -> one ``OperatingPoint`` (or None: infeasible) per budget, chosen on val.
- ``native_points(task)`` -> the method's own operating points (e.g. one per lambda), reported with no budget.
- ``decide(logits, point, targets=None)`` -> exit index [N]; row k of any score uses exits 0..k only. Only a
  bound (``bound = True``, the oracle) may read ``targets``.
- ``stream_head(k, features_k, point, state)`` -> (logits [N_k, C], state): what the real runner evaluates at
  exit k (every k, the last included) on the survivors' features; by default ``exit_head`` and the state
  unchanged. A method whose exit-k prediction uses earlier exits (BoostedNet's ensemble) keeps them in state.
- ``exit_now(k, logits_k, point, state)`` -> (mask [N_k], state): the streaming form used by the real runner:
  called at exit k < K-1 with the logits of the N_k samples still running; ``state`` is None at k = 0, else
  the dict of per-sample arrays returned at k-1 with the leavers' rows removed. Must equal ``decide``.

Methods are dataclasses: hyper-parameters are fields stored as given (``--set METHOD.FIELD=VALUE`` sets
them), fitted state ends in ``_`` (scikit-learn's convention).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from bench.measure.calibration import calibrate_thresholds, first_exit
from bench.base.errors import UserError
from bench.base.registry import Registry
from bench.core.task import SplitData, Task

METHODS: Registry[type["ExitMethod"]] = Registry("method")


def register_method(name: str):
    def deco(cls):
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


@dataclass(frozen=True)
class OperatingPoint:
    params: dict[str, Any]  # JSON-able: what the rule needs (e.g. {"threshold": 0.93})
    val_macs_rel: float  # mean validation cost / static backbone MACs


class NotFittedError(UserError):
    pass


@dataclass
class ExitMethod:
    name: ClassVar[str] = ""
    bound: ClassVar[bool] = False  # an upper bound (reads labels), not a deployable method
    # conformance checks this method fails by nature: {check name: the reason}
    expected_failures: ClassVar[dict[str, str]] = {}
    # exit_logits(split, point) may differ between operating points (JEI-DNN trains heads per lambda), so the
    # harness recomputes them per point unless a method declares its heads shared by every point
    logits_depend_on_point: ClassVar[bool] = True

    @classmethod
    def backbone_for(cls, run_backbone: str) -> str:
        """The network this method's jobs run on, given the run's (``vit`` or ``msdnet``; bench.pipeline.run.BACKBONE_KINDS).
        Most methods take the run's; a method that brings its own network (``msdnet``) names it."""
        return run_backbone

    def fit(self, task: Task) -> "ExitMethod":
        raise NotImplementedError

    def exit_logits(self, split: SplitData, point: OperatingPoint | None = None) -> torch.Tensor:
        raise NotImplementedError

    def calibrate(self, task: Task, budgets: Sequence[float]) -> list[OperatingPoint | None]:
        raise NotImplementedError

    def native_points(self, task: Task) -> list[OperatingPoint]:
        return []

    def exit_head(self, k: int, features_k: torch.Tensor, point: OperatingPoint | None = None) -> torch.Tensor:
        """Logits [N, C] of exit k from that exit's features [N, D] alone: what the real runner evaluates.
        This generic form places the features in slot k of an otherwise empty [K, N, D] tensor; methods with
        cheaper direct heads override it (it must equal ``exit_logits(...)[k]``)."""
        k_exits = len(self.costs_)
        feats = features_k.new_zeros((k_exits, *features_k.shape))
        feats[k] = features_k
        n = features_k.shape[0]
        return self.exit_logits(SplitData(feats, None, np.arange(n)), point)[k]

    def stream_head(self, k: int, features_k: torch.Tensor, point: OperatingPoint | None, state: dict | None
                    ) -> tuple[torch.Tensor, dict | None]:
        """Exit k's logits [N_k, C] on the runner's path; must equal ``exit_logits(...)[k]`` on those rows."""
        return self.exit_head(k, features_k, point), state

    def decide(self, logits: torch.Tensor, point: OperatingPoint, targets: np.ndarray | None = None
               ) -> np.ndarray:
        raise NotImplementedError

    def exit_now(self, k: int, logits_k: torch.Tensor, point: OperatingPoint, state: dict | None
                 ) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------------------
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

    @staticmethod
    def check_exit_logits(logits_k: torch.Tensor, who: str = "exit_now") -> None:
        """One exit's logits must be a tensor [N_k, C]."""
        if not isinstance(logits_k, torch.Tensor) or logits_k.ndim != 2:
            raise ValueError(f"{who}: expected one exit's logits of shape [N_k, C], got "
                             f"{tuple(getattr(logits_k, 'shape', ())) or type(logits_k).__name__}.")

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, overrides: dict[str, Any]) -> "ExitMethod":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise UserError(f"--set {cls.name}.{unknown[0]}: {cls.name} has no field {unknown[0]!r}. "
                            f"Fields: {', '.join(sorted(names)) or '(none)'}.")
        return cls(**overrides)


def create_method(name: str, overrides: dict[str, Any] | None = None) -> ExitMethod:
    return METHODS.get(name).from_params(overrides or {})


@dataclass
class ScoreExitMethod(ExitMethod):
    """A rule "leave at the first exit whose score reaches its exit's threshold", with the harness's budget
    calibration (``scheme``: ``shared``, one threshold for every exit, or ``geometric``, MSDNet's per-exit
    thresholds from target exit shares proportional to r^k; bench.measure.calibration). Subclasses define ``score``
    (higher = more confident) and how the per-exit logits are made."""

    scheme: str = "shared"

    def __post_init__(self):
        from bench.measure.calibration import SCHEMES

        if self.scheme not in SCHEMES:
            raise UserError(f"--set {self.name}.scheme={self.scheme}: the calibration scheme must be one of "
                            f"{', '.join(SCHEMES)}.")

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-exit scores [..., ] from logits [..., C]; must depend on that exit's logits only."""
        raise NotImplementedError

    def decision_macs(self, num_classes: int) -> int:
        """Operations to evaluate the exit decision once, counted like MACs in the cost."""
        raise NotImplementedError

    def scores(self, logits: torch.Tensor) -> np.ndarray:
        """Scores [K, N] (or [N] for one exit's logits), memoised for the last few logits tensors seen (by
        identity), since the harness decides many operating points on the same outputs of a few splits."""
        memo = self.__dict__.setdefault("_scores_memo", [])
        for seen, scores in memo:
            if seen is logits:
                return scores
        scores = self.score(logits.double()).numpy()
        memo[:] = [*memo[-3:], (logits, scores)]
        return scores

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_scores_memo"}

    def calibrate(self, task: Task, budgets: Sequence[float]) -> list[OperatingPoint | None]:
        self.check_fitted()
        val = self.scores(self.exit_logits(task.splits["val"]))
        costs_rel = self.costs_ / task.macs.static
        return [None if r is None else OperatingPoint(r[0], r[1])
                for r in calibrate_thresholds(self.scheme, val, costs_rel, budgets)]

    @staticmethod
    def _threshold(point: OperatingPoint, k: int | None = None):
        t = point.params["threshold"]
        return t if k is None or np.ndim(t) == 0 else t[k]

    def decide(self, logits: torch.Tensor, point: OperatingPoint, targets: np.ndarray | None = None
               ) -> np.ndarray:
        self.check_logits(logits)
        return first_exit(self.scores(logits), self._threshold(point))

    def exit_now(self, k: int, logits_k: torch.Tensor, point: OperatingPoint, state: dict | None
                 ) -> tuple[np.ndarray, dict]:
        self.check_exit_logits(logits_k, f"{self.name}.exit_now")
        return self.scores(logits_k) >= self._threshold(point, k), dict(state or {})


def stream_decide(method: ExitMethod, logits: torch.Tensor, point: OperatingPoint) -> np.ndarray:
    """Exit indices [N] obtained the way the real runner obtains them: exit by exit, asking ``exit_now`` about
    the samples still running only, and compacting the survivors (and their state) after every exit."""
    k_exits, n = logits.shape[:2]
    exits = np.full(n, k_exits - 1, dtype=np.int64)
    alive = np.arange(n)
    state: dict | None = None
    for k in range(k_exits - 1):
        if len(alive) == 0:
            break
        mask, state = method.exit_now(k, logits[k, torch.from_numpy(alive)], point, state)
        mask = np.asarray(mask, dtype=bool)
        assert mask.shape == (len(alive),), (mask.shape, len(alive))
        exits[alive[mask]] = k
        alive = alive[~mask]
        state = {key: np.asarray(v)[~mask] for key, v in (state or {}).items()}
    return exits
