"""The base of every recipe modifier: SparseML's epoch window, Composer's match/apply."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from ..errors import RecipeError
from ..events import Event, State

MODIFIERS: dict[str, type["Modifier"]] = {}


def register(cls):
    """Make a modifier class available to recipes under its class name (the YAML tag)."""
    MODIFIERS[cls.__name__] = cls
    return cls


@dataclass(kw_only=True)
class Modifier:
    """One recipe entry. Epochs are floats; -1 means "from the start" / "never ends".

    Schedules are pure functions of the global optimizer step, so a resumed run lands on the same
    values as an uninterrupted one without replaying anything.
    """

    start_epoch: float = -1.0
    end_epoch: float = -1.0

    def __post_init__(self):
        self.where = self.__class__.__name__  # replaced by the loader with "file:line Name"

    # -- schedule -----------------------------------------------------------------------------
    def start_step(self, steps_per_epoch: int) -> int:
        return 0 if self.start_epoch < 0 else round(self.start_epoch * steps_per_epoch)

    def end_step(self, steps_per_epoch: int) -> int | None:
        return None if self.end_epoch < 0 else round(self.end_epoch * steps_per_epoch)

    def started(self, state: State) -> bool:
        return state.step >= self.start_step(state.steps_per_epoch)

    def ended(self, state: State) -> bool:
        end = self.end_step(state.steps_per_epoch)
        return end is not None and state.step >= end

    def active(self, state: State) -> bool:
        return self.started(state) and not self.ended(state)

    # -- events -------------------------------------------------------------------------------
    def match(self, event: Event, state: State) -> bool:
        return False

    def apply(self, event: Event, state: State) -> None:
        pass

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def expand(self) -> list["Modifier"]:
        """The modifiers this recipe entry stands for (one, unless a key lists several targets)."""
        return [self]

    # -- recipe check -------------------------------------------------------------------------
    def timeline(self, steps_per_epoch: int) -> list[tuple[int, str]]:
        """(step, what happens) pairs for ``distsparse recipe check``."""
        points = [(self.start_step(steps_per_epoch), f"{self.__class__.__name__} starts")]
        end = self.end_step(steps_per_epoch)
        if end is not None:
            points.append((end, f"{self.__class__.__name__} ends"))
        return points

    def validate(self) -> None:
        """Raise RecipeError for values out of range; called by the recipe loader."""
        if self.start_epoch >= 0 and self.end_epoch >= 0 and self.end_epoch < self.start_epoch:
            self.fail("end_epoch", f"{self.end_epoch} is before start_epoch {self.start_epoch}")

    def ignored(self, key: str, default, reason: str) -> None:
        """One warning when a SparseML key we accept but do not act on is set to something else."""
        if getattr(self, key) != default:
            warnings.warn(f"{self.where}: {key} {getattr(self, key)!r} is ignored: {reason}", stacklevel=3)

    def fail(self, key: str, reason: str):
        raise RecipeError(f"{self.where}: {key}: {reason}")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
