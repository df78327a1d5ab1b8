"""Figures that compare policies on a trace, computed from a recorded run.

Times are guest-seconds: a step in which two guests swap counts twice.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence

from balloonctl.simulator.engine import GuestSeries, Run, simulate
from balloonctl.simulator.policies import ORACLE, balloonctl_params
from balloonctl.simulator.trace import Trace
from balloonctl.units import MIB

# A guest has converged once its allocation stays within this distance of
# what it needs (overhead, demand and the buffer) for CONVERGE_HOLD_S.
CONVERGE_BAND = 128 * MIB
CONVERGE_HOLD_S = 60.0


@dataclasses.dataclass(frozen=True)
class Result:
    """One policy's figures on one trace. Sizes are KiB, times seconds."""

    trace: str
    policy: str
    duration_s: float
    released_kib: float  # maximum minus allocation, mean over time, summed
    oracle_fraction: float | None  # released_kib over the oracle's
    under_buffer_s: float  # free memory under the buffer
    swap_kib_s: float  # swapped KiB times seconds
    swap_s: float  # time with anything swapped
    oom_events: int
    oom_s: float  # time out of memory
    target_changes: int
    converged_s: float | None  # None: some guest never converged
    host_overcommit_s: float  # allocations above the host's memory


def summarize(run: Run, buffer: int, oracle_released: float | None) -> Result:
    """Compute a run's figures against ``buffer``, the free memory to keep."""
    period = run.period
    steps = len(run.times)
    released = sum(
        guest.maximum - actual for guest in run.guests for actual in guest.actual
    )
    released_kib = released / steps
    fraction = None
    if oracle_released is not None and oracle_released > 0:
        fraction = released_kib / oracle_released
    return Result(
        trace=run.trace,
        policy=run.policy,
        duration_s=steps * period,
        released_kib=released_kib,
        oracle_fraction=fraction,
        under_buffer_s=period * _count(run, lambda g, k: g.free[k] < buffer),
        swap_kib_s=period * sum(sum(guest.swapped) for guest in run.guests),
        swap_s=period * _count(run, lambda g, k: g.swapped[k] > 0),
        oom_events=sum(guest.oom_events for guest in run.guests),
        oom_s=period * _count(run, lambda g, k: g.in_oom[k]),
        target_changes=sum(guest.target_changes for guest in run.guests),
        converged_s=_converged(run, buffer),
        host_overcommit_s=period * sum(1 for value in run.host_available if value < 0),
    )


def _count(run: Run, condition: Callable[[GuestSeries, int], bool]) -> int:
    return sum(
        1 for guest in run.guests for k in range(len(run.times)) if condition(guest, k)
    )


def _converged(run: Run, buffer: int) -> float | None:
    """Return when the last guest converged, or None if one never did."""
    hold = max(1, math.ceil(CONVERGE_HOLD_S / run.period))
    latest = 0.0
    for guest in run.guests:
        need = [
            min(guest.maximum, run.model.overhead + demand + buffer)
            for demand in guest.demand
        ]
        in_band = [
            abs(actual - needed) <= CONVERGE_BAND
            for actual, needed in zip(guest.actual, need, strict=True)
        ]
        step = _first_stretch(in_band, hold)
        if step is None:
            return None
        latest = max(latest, run.times[step])
    return latest


def _first_stretch(flags: list[bool], length: int) -> int | None:
    """Return the first index that starts ``length`` consecutive true flags."""
    streak = 0
    for index, flag in enumerate(flags):
        streak = streak + 1 if flag else 0
        if streak == length:
            return index - length + 1
    return None


def evaluate(
    trace: Trace,
    policies: Sequence[str],
    period: int,
    host_memory: int | None = None,
) -> tuple[list[Result], list[Run]]:
    """Run each policy on ``trace`` and return their figures and recorded runs.

    The oracle always runs, because every fraction compares with it.
    """
    buffer = balloonctl_params(period).min_unused
    oracle = simulate(trace, ORACLE, period, host_memory)
    oracle_released = summarize(oracle, buffer, None).released_kib
    runs = [
        oracle if name == ORACLE else simulate(trace, name, period, host_memory)
        for name in policies
    ]
    return [summarize(run, buffer, oracle_released) for run in runs], runs
