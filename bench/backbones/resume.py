"""Resumable backbone training: the training state after each finished epoch, so that a training that was
interrupted (Ctrl-C, a killed job, the end of a session or of a cluster allocation) goes on from its last
finished epoch instead of from the first, and ends with the weights an uninterrupted training would have.

``bench.pipeline.backbone_cache`` opens :func:`resumable_training` around a backbone's ``train`` with a path next
to the checkpoint it will write (``<checkpoint>.partial``) and the checkpoint's cache key;
``bench.backbones.base.fit_epochs`` claims it (one training per context: a second ``fit_epochs`` in the same
``train`` is not checkpointed), reads the state a previous process left there, and rewrites the file atomically
after every epoch. The state is what the next epochs depend on: the weights, the optimiser's state, the shuffle
and augmentation generator, torch's global generator, the step counter, the best epoch's weights and the
history. Schedules that advance once per epoch (``after_epoch``) are replayed, not stored, so they must be pure
functions of the number of finished epochs (MultiStepLR, SDN's loss weights). The file holds tensors and plain
values only and is read with ``torch.load(weights_only=True)``; an unreadable one, one made by another
configuration (key) or with another epoch count is reported and the training starts from its first epoch.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from bench.base.hashing import atomic_write

log = logging.getLogger(__name__)
STATE_FORMAT = 1


@dataclass(frozen=True)
class TrainingState:
    """Where one training keeps its state between epochs, and the cache key that state belongs to."""

    path: Path
    key: str

    def load(self, epochs: int) -> dict[str, Any] | None:
        """The state a previous process saved for this key, or None (none, unusable, or another key)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if state.get("format") != STATE_FORMAT or state.get("key") != self.key:
                raise ValueError("it was saved by another configuration or version")
            if state.get("epochs") != epochs or not 0 <= int(state["finished_epochs"]) < epochs:
                raise ValueError(f"it holds {state.get('finished_epochs')} finished epochs of "
                                 f"{state.get('epochs')}, not fewer than {epochs}")
            return state
        except Exception as e:  # truncated, corrupt, unsafe or foreign file: never use it
            log.warning("training state %s is unusable (%s: %s); training from the first epoch", self.path,
                        type(e).__name__, e)
            return None

    def save(self, state: dict[str, Any]) -> None:
        atomic_write(self.path, lambda tmp: torch.save({"format": STATE_FORMAT, "key": self.key, **state}, tmp))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


_ACTIVE: TrainingState | None = None


@contextlib.contextmanager
def resumable_training(path: str | Path, key: str) -> Iterator[TrainingState]:
    """Within the block, the next :func:`fit_epochs <bench.backbones.base.fit_epochs>` saves its state to
    ``path`` after each epoch and resumes from it."""
    global _ACTIVE
    before, _ACTIVE = _ACTIVE, TrainingState(Path(path), key)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = before


def claim() -> TrainingState | None:
    """The open context's state (then no longer open to another training), or None outside one."""
    global _ACTIVE
    state, _ACTIVE = _ACTIVE, None
    return state
