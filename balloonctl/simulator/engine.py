"""The simulation loop: one trace, one policy, one step per stats period.

Each step, in order: every guest takes the step's demand (swap and
out-of-memory are judged against the allocation it has now), reports its
statistics, the policy sets targets, and the balloons move toward them for
one period.
"""

import dataclasses
import math

from balloonctl.simulator.model import DEFAULT_MODEL, Guest, ModelParams
from balloonctl.simulator.policies import POLICIES
from balloonctl.simulator.trace import Trace
from balloonctl.simulator.views import GuestView, HostView, RunContext

# Runs longer than this are rejected: each step keeps a few values per guest
# and policy in memory. At a 5 s period this is about 58 days.
MAX_STEPS = 1_000_000


@dataclasses.dataclass
class GuestSeries:
    """One guest's figures at the start of every step, in KiB.

    ``target`` is the target after the policy's decision at that step.
    """

    name: str
    maximum: int
    actual: list[int] = dataclasses.field(default_factory=list)
    target: list[int] = dataclasses.field(default_factory=list)
    demand: list[int] = dataclasses.field(default_factory=list)
    cache: list[int] = dataclasses.field(default_factory=list)
    free: list[int] = dataclasses.field(default_factory=list)
    swapped: list[int] = dataclasses.field(default_factory=list)
    in_oom: list[bool] = dataclasses.field(default_factory=list)
    oom_events: int = 0
    target_changes: int = 0


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything one policy did on one trace."""

    trace: str
    policy: str
    period: int
    model: ModelParams
    times: list[float]
    guests: tuple[GuestSeries, ...]
    host_total: int
    host_available: list[int]  # total minus allocations; negative if overcommitted


def default_host_memory(trace: Trace) -> int:
    """Return twice the sum of the guests' maxima: a host never short of memory."""
    return 2 * sum(guest.maximum for guest in trace.guests)


def step_count(trace: Trace, period: int) -> int:
    """Return the number of whole steps that cover the trace up to its end."""
    return max(1, math.ceil(trace.end / period))


def simulate(
    trace: Trace,
    policy: str,
    period: int,
    host_memory: int | None = None,
    model: ModelParams = DEFAULT_MODEL,
) -> Run:
    """Replay ``trace`` through the policy named ``policy`` and record each step."""
    steps = step_count(trace, period)
    values = {guest.name: guest.step_values(period, steps) for guest in trace.guests}
    context = RunContext(
        period=period,
        model=model,
        demand={name: demand for name, (demand, _) in values.items()},
        maxima={guest.name: guest.maximum for guest in trace.guests},
    )
    chosen = POLICIES[policy](context)
    total = host_memory or trace.host_memory or default_host_memory(trace)
    guests = {
        guest.name: Guest(guest.name, guest.maximum, model) for guest in trace.guests
    }
    series = {name: GuestSeries(name, guest.maximum) for name, guest in guests.items()}
    times: list[float] = []
    host_available: list[int] = []

    for step in range(steps):
        time = step * period
        times.append(time)
        for name, guest in guests.items():
            demand, cache = values[name]
            if guest.start_step(demand[step], cache[step], period):
                series[name].oom_events += 1
            _record(series[name], guest)
        available = total - sum(guest.actual for guest in guests.values())
        host_available.append(available)

        view = _host_view(step, time, total, available, guests)
        _set_targets(chosen.targets(view), guests, series)
        for name, guest in guests.items():
            series[name].target.append(guest.target)
            guest.move_balloon(period)

    return Run(
        trace=trace.name,
        policy=policy,
        period=period,
        model=model,
        times=times,
        guests=tuple(series.values()),
        host_total=total,
        host_available=host_available,
    )


def _record(series: GuestSeries, guest: Guest) -> None:
    series.actual.append(guest.actual)
    series.demand.append(guest.demand)
    series.cache.append(guest.cache)
    series.free.append(guest.free)
    series.swapped.append(guest.swapped)
    series.in_oom.append(guest.in_oom)


def _host_view(
    step: int, time: float, total: int, available: int, guests: dict[str, Guest]
) -> HostView:
    return HostView(
        step=step,
        time=time,
        total=total,
        available=max(available, 0),
        guests=tuple(
            GuestView(name, guest.maximum, guest.target, guest.stats(time))
            for name, guest in guests.items()
        ),
    )


def _set_targets(
    targets: dict[str, int],
    guests: dict[str, Guest],
    series: dict[str, GuestSeries],
) -> None:
    for name, target in targets.items():
        before = guests[name].target
        guests[name].set_target(target)
        if guests[name].target != before:
            series[name].target_changes += 1
