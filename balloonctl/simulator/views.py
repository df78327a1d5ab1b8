"""The policy interface and the host and guest state passed to it each step."""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

from balloonctl.simulator.model import GuestStats, ModelParams


@dataclasses.dataclass(frozen=True)
class GuestView:
    """One guest's configured memory, standing target and latest report."""

    name: str
    maximum: int
    target: int
    stats: GuestStats


@dataclasses.dataclass(frozen=True)
class HostView:
    """The host and every guest at the start of one step.

    ``available`` is the host's total memory minus the guests' allocations,
    and never below 0, as MemAvailable is never below 0.
    """

    step: int
    time: float
    total: int
    available: int
    guests: tuple[GuestView, ...]


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Facts about a run that a policy gets before the run starts.

    Only the oracle reads ``demand``, each guest's demand per step.
    """

    period: int
    model: ModelParams
    demand: Mapping[str, Sequence[int]]
    maxima: Mapping[str, int]


class Policy(Protocol):
    """A balloon policy, called once per step with the host's state."""

    def targets(self, view: HostView) -> dict[str, int]:
        """Return the balloon target to request for each guest it changes."""
        ...
