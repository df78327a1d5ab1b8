"""The balloon decision: a pure function of one sample and a domain's history.

``decide`` takes what was just read from a domain, what the policy remembers
about that domain, the domain's parameters and the host's available memory,
and returns a decision together with the updated history. Nothing here
performs I/O or reads a clock; the caller passes the time in. All sizes are
KiB and all times are seconds.

The rules, in order of precedence:

1. Figures that are missing or contradict each other: do nothing.
2. A balloon that made no progress toward the requested target for
   ``stuck_periods`` periods: pull the target back to ``actual`` and back
   off exponentially.
3. Available memory (``usable`` where reported, else the free figure) under
   ``min_unused`` by more than ``grant_slack``, or swap-ins or a burst of
   major faults
   since the previous report: grant memory at once to restore the buffer
   plus ``grow_margin`` (fast rise).
4. Free memory above ``min_unused``: release at most ``max_release`` a step,
   never below the floor, and not during the cooldown after a grant, during
   the grace period after a manual change or while statistics are stale
   (slow fall).

A change is only decided on a report that the guest made after the previous
request, and once that request has been carried out or ``SETTLE_PERIODS``
periods have passed.
"""

import dataclasses
import enum

# A balloon settles in whole guest pages, so ``actual`` can stop a few KiB
# short of the requested target. Within this distance the target counts as
# reached.
TARGET_TOLERANCE_KIB = 1024

# After a request, decide again at the latest after this many periods, even
# if the balloon has not reached the target.
SETTLE_PERIODS = 3

# Statistics whose last_update has not advanced for more than this many
# periods are stale.
STALE_PERIODS = 3

# A stuck balloon is retried after period * 2**n, with n capped here
# (64 periods, about 5 minutes at the default 5 s period).
MAX_BACKOFF_EXPONENT = 6


class Metric(enum.Enum):
    """The guest figure that counts as free memory."""

    UNUSED = "unused"  # MemFree: memory the guest does not use at all
    USABLE = "usable"  # MemAvailable: also counts reclaimable page cache


class Action(enum.Enum):
    RELEASE = "release"
    GRANT = "grant"
    RESET = "reset"  # pull a stuck target back to the balloon's actual size
    KEEP = "keep"


class Reason(enum.Enum):
    """The cause of a decision; the values appear in logs."""

    RELEASE = "free_above_buffer"
    GRANT = "free_below_buffer"
    DISTRESS = "guest_distress"
    WITHIN_BUFFER = "free_within_buffer"
    RELEASE_TOO_SMALL = "release_below_min_release"
    AT_FLOOR = "at_floor"
    AT_MAXIMUM = "at_maximum"
    NO_HOST_HEADROOM = "no_host_headroom"
    COOLDOWN = "release_cooldown"
    MANUAL_GRACE = "manual_change_grace"
    STATS_UNAVAILABLE = "stats_unavailable"
    STATS_INVALID = "stats_invalid"
    STATS_STALE = "stats_stale"
    TARGET_NOT_REACHED = "target_not_reached"
    NO_NEW_REPORT = "no_new_report"
    STUCK = "balloon_stuck"
    STUCK_BACKOFF = "stuck_backoff"


@dataclasses.dataclass(frozen=True)
class Params:
    """One domain's effective policy parameters."""

    min_unused: int
    max_release: int
    min_release: int
    grow_margin: int
    floor_min: int
    floor_percent: float
    host_reserve: int
    stats_period: float
    release_cooldown_periods: int = 6
    stuck_periods: int = 3
    manual_grace_s: float = 600.0
    distress_major_faults: int = 100
    metric: Metric = Metric.UNUSED
    # A guest released down to the buffer drifts a little below it as its
    # kernel allocates. Grants start only this far below the buffer, so the
    # drift does not start a grant-and-release cycle.
    grant_slack: int = 4 * 1024

    def floor(self, maximum: int) -> int:
        """Return the lowest target allowed for a domain of ``maximum`` KiB."""
        return max(self.floor_min, int(maximum * self.floor_percent / 100))


@dataclasses.dataclass(frozen=True)
class Sample:
    """One reading of a running domain's memory.

    A figure that libvirt did not report is None, which means unknown, never
    zero. ``last_update`` is the guest's own timestamp of its statistics, or
    None where the driver provides no usable one.
    """

    actual: int | None
    unused: int | None
    maximum: int
    last_update: int | None
    taken_at: float
    usable: int | None = None
    available: int | None = None
    swap_in: int | None = None
    major_fault: int | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """A target that was requested, and the report it was based on."""

    target: int
    requested_at: float
    last_update: int | None
    grant: bool = False


@dataclasses.dataclass(frozen=True)
class History:
    """The policy's memory of one domain between samples."""

    request: Request | None = None
    last_actual: int | None = None
    progress_at: float | None = None
    last_grant_at: float | None = None
    report_time: int | None = None
    report_seen_at: float | None = None
    swap_in: int | None = None
    major_fault: int | None = None
    manual_until: float | None = None
    stuck_count: int = 0
    retry_at: float | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: Reason
    target: int | None = None
    change: int = 0
    free: int | None = None
    floor: int | None = None
    missing: tuple[str, ...] = ()
    invalid: tuple[str, ...] = ()
    stale: bool = False
    emergency: bool = False


def note_manual_change(
    history: History, now: float, params: Params, actual: int | None = None
) -> History:
    """Start the grace period after a balloon change balloonctl did not make.

    ``actual`` is the balloon size the change was seen at; recording it keeps
    the same change from being detected again at the next sample.
    """
    last_actual = history.last_actual if actual is None else actual
    return dataclasses.replace(
        history,
        request=None,
        manual_until=now + params.manual_grace_s,
        last_actual=last_actual,
    )


def is_foreign_change(history: History, actual: int) -> bool:
    """Tell whether a new ``actual`` is a balloon move balloonctl did not ask for.

    A move toward the pending target that does not overshoot it is ours. Any
    other move by more than the tolerance, including one while no request is
    pending, is not.
    """
    last = history.last_actual
    if last is None or abs(actual - last) <= TARGET_TOLERANCE_KIB:
        return False
    request = history.request
    if request is None:
        return True
    if abs(actual - request.target) > abs(last - request.target):
        return True
    overshoot = (actual - request.target) * (last - request.target) < 0
    return overshoot and abs(actual - request.target) > TARGET_TOLERANCE_KIB


def missing_fields(sample: Sample, metric: Metric) -> tuple[str, ...]:
    """Return the names of the figures a decision needs but the sample lacks."""
    needed = {"actual": sample.actual, metric.value: _free(sample, metric)}
    return tuple(name for name, value in needed.items() if value is None)


def invalid_figures(sample: Sample) -> tuple[str, ...]:
    """Return each contradiction between the sample's figures, as text."""
    problems = []
    if sample.actual is not None and sample.actual <= 0:
        problems.append(f"actual {sample.actual} KiB is not positive")
    if sample.actual is not None and sample.actual > sample.maximum:
        problems.append(
            f"actual {sample.actual} KiB above maximum {sample.maximum} KiB"
        )
    for name in ("unused", "usable"):
        value = getattr(sample, name)
        if value is not None and value < 0:
            problems.append(f"{name} {value} KiB is negative")
        if value is not None and sample.actual is not None and value > sample.actual:
            problems.append(f"{name} {value} KiB above actual {sample.actual} KiB")
    if (
        sample.usable is not None
        and sample.available is not None
        and sample.usable > sample.available
    ):
        problems.append(
            f"usable {sample.usable} KiB above available {sample.available} KiB"
        )
    return tuple(problems)


def _free(sample: Sample, metric: Metric) -> int | None:
    return sample.unused if metric is Metric.UNUSED else sample.usable


def decide(
    sample: Sample,
    history: History,
    params: Params,
    host_available: int | None = None,
) -> tuple[Decision, History]:
    """Decide what to do with one domain's balloon now.

    ``host_available`` is the host's available memory in KiB, or None when it
    is unknown, in which case grants are not limited by host headroom.
    """
    missing = missing_fields(sample, params.metric)
    if missing:
        return Decision(Action.KEEP, Reason.STATS_UNAVAILABLE, missing=missing), history
    invalid = invalid_figures(sample)
    if invalid:
        return Decision(Action.KEEP, Reason.STATS_INVALID, invalid=invalid), history

    history, fresh, stale = _observe(sample, history, params)
    return _choose(sample, history, params, host_available, fresh, stale)


def _observe(
    sample: Sample, history: History, params: Params
) -> tuple[History, bool, bool]:
    """Update the history with this sample; return it, freshness and staleness."""
    assert sample.actual is not None
    now = sample.taken_at
    fresh = (
        sample.last_update is None
        or history.report_time is None
        or sample.last_update > history.report_time
    )
    seen_at = now if fresh or history.report_seen_at is None else history.report_seen_at
    stale = (
        sample.last_update is not None
        and now - seen_at > STALE_PERIODS * params.stats_period
    )

    progress_at = history.progress_at
    request = history.request
    if request is not None and history.last_actual is not None:
        before = abs(history.last_actual - request.target)
        if abs(sample.actual - request.target) < before - TARGET_TOLERANCE_KIB:
            progress_at = now

    updated = dataclasses.replace(
        history,
        last_actual=sample.actual,
        progress_at=progress_at,
        report_time=sample.last_update,
        report_seen_at=seen_at,
    )
    return updated, fresh, stale


@dataclasses.dataclass(frozen=True)
class _Context:
    """Figures every decision on one sample reports."""

    free: int
    floor: int
    stale: bool
    # The smaller of free and MemAvailable: a release must not take either
    # under the buffer, or the next sample would read it as a shortage.
    spare: int = 0

    def decision(self, action: Action, reason: Reason, **fields: object) -> Decision:
        return Decision(
            action,
            reason,
            free=self.free,
            floor=self.floor,
            stale=self.stale,
            **fields,  # type: ignore[arg-type]
        )

    def keep(self, reason: Reason, **fields: object) -> Decision:
        return self.decision(Action.KEEP, reason, **fields)


def _choose(
    sample: Sample,
    history: History,
    params: Params,
    host_available: int | None,
    fresh: bool,
    stale: bool,
) -> tuple[Decision, History]:
    assert sample.actual is not None
    now = sample.taken_at
    free = _free(sample, params.metric)
    assert free is not None
    context = _Context(
        free=free,
        floor=params.floor(sample.maximum),
        stale=stale,
        spare=free if sample.usable is None else min(free, sample.usable),
    )
    swapped_in, history = _distress(sample, history, params, fresh)
    distress = swapped_in is not None
    # Running short is judged by MemAvailable where the guest reports it:
    # page cache fills MemFree on any guest that reads files, and the kernel
    # gives that cache up before the guest runs out of memory.
    available = sample.usable if sample.usable is not None else free
    short = available < params.min_unused - params.grant_slack or distress
    request = history.request
    if request is not None:
        reached = abs(sample.actual - request.target) <= TARGET_TOLERANCE_KIB
        moved = history.progress_at == now
        if history.stuck_count and (reached or moved):
            history = dataclasses.replace(history, stuck_count=0, retry_at=None)
        waited = now - request.requested_at
        settling = not reached and waited < SETTLE_PERIODS * params.stats_period
        if not reached and not settling and _is_stuck(sample, history, params):
            return _reset(sample, history, params, context)
        # The guest's figures must postdate the request, or the same free
        # memory would be released (or the same shortage granted) twice.
        new_report = (
            request.last_update is None
            or sample.last_update is None
            or sample.last_update > request.last_update
        )
        if not new_report:
            return context.keep(Reason.NO_NEW_REPORT), history
        # Fast rise: a guest that runs short does not wait for an earlier
        # request to settle.
        if settling and not short:
            return context.keep(Reason.TARGET_NOT_REACHED), history

    # A guest that runs short is not kept waiting by a stuck inflation:
    # deflating the balloon is what it needs, and that still works.
    if history.retry_at is not None and now < history.retry_at and not short:
        return context.keep(Reason.STUCK_BACKOFF), history

    if short:
        return _grant(
            sample, history, params, host_available, available, swapped_in, context
        )
    return _release(sample, history, params, context)


def _distress(
    sample: Sample, history: History, params: Params, fresh: bool
) -> tuple[int | None, History]:
    """Compare swap-in and major-fault counters with the previous fresh report.

    Returns the KiB swapped in since then when the guest is in distress
    (it swapped in, or took ``distress_major_faults`` major faults), else
    None. A counter that went down means the guest rebooted, which is a
    reset and no sign of pressure.
    """
    if not fresh:
        return None, history
    swapped = 0
    distress = False
    if sample.swap_in is not None and history.swap_in is not None:
        swapped = max(sample.swap_in - history.swap_in, 0)
        distress = swapped > 0
    if sample.major_fault is not None and history.major_fault is not None:
        faults = sample.major_fault - history.major_fault
        distress = distress or faults >= params.distress_major_faults
    updated = dataclasses.replace(
        history, swap_in=sample.swap_in, major_fault=sample.major_fault
    )
    return (swapped if distress else None), updated


def _is_stuck(sample: Sample, history: History, params: Params) -> bool:
    assert history.request is not None
    since = history.progress_at or history.request.requested_at
    return sample.taken_at - since >= params.stuck_periods * params.stats_period


def _reset(
    sample: Sample, history: History, params: Params, context: _Context
) -> tuple[Decision, History]:
    assert sample.actual is not None
    count = history.stuck_count + 1
    exponent = min(count, MAX_BACKOFF_EXPONENT)
    updated = dataclasses.replace(
        history,
        request=None,
        stuck_count=count,
        retry_at=sample.taken_at + params.stats_period * 2**exponent,
    )
    target = max(sample.actual, _lowest_target(sample, context))
    return context.decision(Action.RESET, Reason.STUCK, target=target), updated


def _lowest_target(sample: Sample, context: _Context) -> int:
    """Return the lowest target any decision may request: the floor.

    ``actual`` comes from the guest's balloon driver, so a guest can report
    any value up to its maximum. A target computed from a low ``actual``
    must still not ask the balloon to take the guest below its floor.
    """
    return min(context.floor, sample.maximum)


def _grant(
    sample: Sample,
    history: History,
    params: Params,
    host_available: int | None,
    available: int,
    swapped_in: int | None,
    context: _Context,
) -> tuple[Decision, History]:
    assert sample.actual is not None
    distress = swapped_in is not None
    need = max(params.min_unused + params.grow_margin - available, 0)
    if swapped_in is not None:
        # A guest that swaps needs at least what it swapped back in.
        need = max(need, params.grow_margin, swapped_in)
    # A guest below its floor (an operator set it there) is raised to it.
    need = max(need, context.floor - sample.actual)
    reason = Reason.DISTRESS if distress else Reason.GRANT

    # Swapping, or available memory under half the buffer, cannot wait for
    # the host: such a grant ignores host_reserve.
    emergency = distress or available < params.min_unused // 2
    grant = min(need, sample.maximum - sample.actual)
    if grant <= 0:
        return context.keep(Reason.AT_MAXIMUM), history
    if host_available is not None and not emergency:
        grant = min(grant, host_available - params.host_reserve)
        if grant <= 0:
            return context.keep(Reason.NO_HOST_HEADROOM), history

    # A grant limited by host headroom still raises a guest below its floor
    # to the floor: a lower target would shrink it if ``actual`` was false.
    target = max(sample.actual + grant, _lowest_target(sample, context))
    grant = target - sample.actual

    # A pending grant that is at least as generous is kept. A smaller one,
    # or a pending release, is replaced by what the guest needs now.
    pending = history.request
    if pending is not None and pending.grant and pending.target >= target:
        return context.keep(Reason.TARGET_NOT_REACHED), history

    updated = _requested(history, target, sample, grant=True)
    decision = context.decision(
        Action.GRANT, reason, target=target, change=grant, emergency=emergency
    )
    return decision, updated


def _release_blocker(
    sample: Sample, history: History, params: Params, context: _Context
) -> Reason | None:
    assert sample.actual is not None
    now = sample.taken_at
    cooldown = params.release_cooldown_periods * params.stats_period
    if context.spare <= params.min_unused:
        return Reason.WITHIN_BUFFER
    if context.stale:
        return Reason.STATS_STALE
    if history.manual_until is not None and now < history.manual_until:
        return Reason.MANUAL_GRACE
    if history.last_grant_at is not None and now - history.last_grant_at < cooldown:
        return Reason.COOLDOWN
    if sample.actual <= context.floor:
        return Reason.AT_FLOOR
    return None


def _release(
    sample: Sample, history: History, params: Params, context: _Context
) -> tuple[Decision, History]:
    assert sample.actual is not None
    blocker = _release_blocker(sample, history, params, context)
    if blocker is not None:
        return context.keep(blocker), history

    above_floor = sample.actual - context.floor
    release = min(context.spare - params.min_unused, params.max_release, above_floor)
    if release < params.min_release:
        reason = Reason.AT_FLOOR if release == above_floor else Reason.RELEASE_TOO_SMALL
        return context.keep(reason, change=release), history

    target = sample.actual - release
    updated = _requested(history, target, sample, grant=False)
    decision = context.decision(
        Action.RELEASE, Reason.RELEASE, target=target, change=release
    )
    return decision, updated


def _requested(
    history: History, target: int, sample: Sample, *, grant: bool
) -> History:
    request = Request(
        target=target,
        requested_at=sample.taken_at,
        last_update=sample.last_update,
        grant=grant,
    )
    return dataclasses.replace(
        history,
        request=request,
        progress_at=sample.taken_at,
        last_grant_at=sample.taken_at if grant else history.last_grant_at,
    )
