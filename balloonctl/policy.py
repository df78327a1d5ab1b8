"""The release decision: a pure function of one sample and the last request.

Nothing here performs I/O or reads a clock; the caller passes the time in.
All sizes are KiB.
"""

import dataclasses
import enum

# A balloon settles in whole guest pages, so ``actual`` can stop a few KiB
# short of the requested target. Within this distance the target counts as
# reached.
TARGET_TOLERANCE_KIB = 1024

# After a request, act again at the latest after this many stats periods,
# even if the balloon has not reached the target.
SETTLE_PERIODS = 3


class Action(enum.Enum):
    RELEASE = "release"
    KEEP = "keep"


class Reason(enum.Enum):
    """Why a decision came out the way it did; values appear in logs."""

    RELEASE = "unused_above_buffer"
    WITHIN_BUFFER = "unused_within_buffer"
    RELEASE_TOO_SMALL = "release_below_min_release"
    STATS_UNAVAILABLE = "stats_unavailable"
    STATS_INVALID = "stats_invalid"
    TARGET_NOT_REACHED = "target_not_reached"
    NO_NEW_REPORT = "no_new_report"


@dataclasses.dataclass(frozen=True)
class Thresholds:
    min_unused: int
    max_release: int
    min_release: int
    stats_period: float


@dataclasses.dataclass(frozen=True)
class Sample:
    """One reading of a running domain's memory.

    ``actual`` and ``unused`` are None when libvirt did not report them, which
    means unknown, never zero. ``last_update`` is the guest's own timestamp of
    its statistics (seconds), or None where the driver provides no usable one.
    """

    actual: int | None
    unused: int | None
    maximum: int
    last_update: int | None
    taken_at: float


@dataclasses.dataclass(frozen=True)
class Request:
    """A target that was requested, and the report it was based on."""

    target: int
    requested_at: float
    last_update: int | None


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: Reason
    target: int | None = None
    release: int = 0
    missing: tuple[str, ...] = ()


def missing_fields(sample: Sample) -> tuple[str, ...]:
    """Return the names of the figures a decision needs but the sample lacks."""
    names = []
    if sample.actual is None:
        names.append("actual")
    if sample.unused is None:
        names.append("unused")
    return tuple(names)


def decide(sample: Sample, previous: Request | None, limits: Thresholds) -> Decision:
    """Decide whether to release memory from one domain, and how much.

    The rule: if ``unused`` exceeds ``min_unused``, release
    ``min(unused - min_unused, max_release)`` by lowering the target to
    ``actual - release``. A release is only decided on a report that the
    guest made after the previous request, and once that request has been
    carried out or ``SETTLE_PERIODS`` periods have passed.
    """
    missing = missing_fields(sample)
    if missing:
        return Decision(Action.KEEP, Reason.STATS_UNAVAILABLE, missing=missing)
    assert sample.actual is not None and sample.unused is not None
    actual, unused = sample.actual, sample.unused

    # Figures that contradict each other say nothing reliable about the guest.
    if unused < 0 or actual <= 0 or unused > actual or actual > sample.maximum:
        return Decision(Action.KEEP, Reason.STATS_INVALID)

    if previous is not None:
        waiting = _wait_reason(sample, actual, previous, limits)
        if waiting is not None:
            return Decision(Action.KEEP, waiting)

    if unused <= limits.min_unused:
        return Decision(Action.KEEP, Reason.WITHIN_BUFFER)

    release = min(unused - limits.min_unused, limits.max_release)
    if release < limits.min_release:
        return Decision(Action.KEEP, Reason.RELEASE_TOO_SMALL, release=release)

    target = actual - release
    return Decision(Action.RELEASE, Reason.RELEASE, target=target, release=release)


def _wait_reason(
    sample: Sample, actual: int, previous: Request, limits: Thresholds
) -> Reason | None:
    reached = abs(actual - previous.target) <= TARGET_TOLERANCE_KIB
    settle_time = SETTLE_PERIODS * limits.stats_period
    if not reached and sample.taken_at - previous.requested_at < settle_time:
        return Reason.TARGET_NOT_REACHED

    # The guest's figures must postdate the request, or the same free memory
    # would be released twice.
    if (
        sample.last_update is not None
        and previous.last_update is not None
        and sample.last_update <= previous.last_update
    ):
        return Reason.NO_NEW_REPORT
    return None
