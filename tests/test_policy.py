from hypothesis import given
from hypothesis import strategies as st

from balloonctl.policy import (
    SETTLE_PERIODS,
    Action,
    Reason,
    Request,
    Sample,
    Thresholds,
    decide,
)
from balloonctl.units import GIB, MIB

LIMITS = Thresholds(
    min_unused=100 * MIB, max_release=50 * MIB, min_release=1 * MIB, stats_period=5
)


def sample(
    actual: int | None = 2 * GIB,
    unused: int | None = 1 * GIB,
    maximum: int = 4 * GIB,
    last_update: int | None = 1000,
    taken_at: float = 100.0,
) -> Sample:
    return Sample(
        actual=actual,
        unused=unused,
        maximum=maximum,
        last_update=last_update,
        taken_at=taken_at,
    )


def test_release_is_capped_at_max_release() -> None:
    decision = decide(sample(), None, LIMITS)

    assert decision.action is Action.RELEASE
    assert decision.release == 50 * MIB
    assert decision.target == 2 * GIB - 50 * MIB


def test_release_keeps_the_buffer() -> None:
    decision = decide(sample(unused=130 * MIB), None, LIMITS)

    assert decision.action is Action.RELEASE
    assert decision.release == 30 * MIB
    assert decision.target == 2 * GIB - 30 * MIB


def test_unused_at_buffer_keeps_memory() -> None:
    decision = decide(sample(unused=100 * MIB), None, LIMITS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.WITHIN_BUFFER
    assert decision.target is None


def test_release_below_min_release_is_skipped() -> None:
    decision = decide(sample(unused=100 * MIB + 512), None, LIMITS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.RELEASE_TOO_SMALL


def test_missing_unused_is_unknown_not_zero() -> None:
    decision = decide(sample(unused=None), None, LIMITS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.STATS_UNAVAILABLE
    assert decision.missing == ("unused",)


def test_missing_actual_and_unused_are_both_named() -> None:
    decision = decide(sample(actual=None, unused=None), None, LIMITS)

    assert decision.missing == ("actual", "unused")


def test_unused_above_actual_is_invalid() -> None:
    decision = decide(sample(actual=1 * GIB, unused=2 * GIB), None, LIMITS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.STATS_INVALID


def test_actual_above_maximum_is_invalid() -> None:
    decision = decide(sample(actual=4 * GIB, maximum=3 * GIB), None, LIMITS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.STATS_INVALID


def test_same_report_is_not_acted_on_twice() -> None:
    previous = Request(target=2 * GIB, requested_at=90.0, last_update=1000)

    decision = decide(sample(last_update=1000), previous, LIMITS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.NO_NEW_REPORT


def test_new_report_after_target_reached_is_acted_on() -> None:
    previous = Request(target=2 * GIB, requested_at=90.0, last_update=1000)

    decision = decide(sample(last_update=1005), previous, LIMITS)

    assert decision.action is Action.RELEASE


def test_waits_until_target_reached() -> None:
    previous = Request(target=2 * GIB - 50 * MIB, requested_at=95.0, last_update=1000)

    decision = decide(sample(last_update=1005, taken_at=100.0), previous, LIMITS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.TARGET_NOT_REACHED


def test_acts_again_after_settle_periods_without_reaching_target() -> None:
    requested_at = 100.0 - SETTLE_PERIODS * LIMITS.stats_period
    previous = Request(
        target=2 * GIB - 50 * MIB, requested_at=requested_at, last_update=1000
    )

    decision = decide(sample(last_update=1005, taken_at=100.0), previous, LIMITS)

    assert decision.action is Action.RELEASE


def test_target_within_tolerance_counts_as_reached() -> None:
    previous = Request(target=2 * GIB - 4, requested_at=99.0, last_update=1000)

    decision = decide(sample(last_update=1005), previous, LIMITS)

    assert decision.action is Action.RELEASE


def test_driver_without_timestamps_acts_once_target_reached() -> None:
    previous = Request(target=2 * GIB, requested_at=99.0, last_update=None)

    decision = decide(sample(last_update=None), previous, LIMITS)

    assert decision.action is Action.RELEASE


kib = st.integers(min_value=0, max_value=64 * GIB)
optional_kib = st.none() | kib
thresholds = st.builds(
    Thresholds,
    min_unused=st.integers(min_value=1, max_value=4 * GIB),
    max_release=st.integers(min_value=1, max_value=4 * GIB),
    min_release=st.integers(min_value=0, max_value=64 * MIB),
    stats_period=st.integers(min_value=1, max_value=60),
)
samples = st.builds(
    Sample,
    actual=optional_kib,
    unused=optional_kib,
    maximum=st.integers(min_value=1, max_value=64 * GIB),
    last_update=st.none() | st.integers(min_value=0, max_value=10**9),
    taken_at=st.floats(min_value=0, max_value=10**6),
)
requests = st.none() | st.builds(
    Request,
    target=kib,
    requested_at=st.floats(min_value=0, max_value=10**6),
    last_update=st.none() | st.integers(min_value=0, max_value=10**9),
)


@given(samples, requests, thresholds)
def test_release_never_exceeds_max_release(
    s: Sample, previous: Request | None, limits: Thresholds
) -> None:
    decision = decide(s, previous, limits)

    assert decision.release <= limits.max_release
    if decision.action is Action.RELEASE:
        assert decision.target is not None and s.actual is not None
        assert s.actual - decision.target <= limits.max_release


@given(samples, requests, thresholds)
def test_release_never_leaves_unused_below_min_unused(
    s: Sample, previous: Request | None, limits: Thresholds
) -> None:
    decision = decide(s, previous, limits)

    if decision.action is Action.RELEASE:
        assert s.unused is not None
        assert s.unused - decision.release >= limits.min_unused


@given(samples, requests, thresholds)
def test_target_never_exceeds_maximum_or_actual(
    s: Sample, previous: Request | None, limits: Thresholds
) -> None:
    decision = decide(s, previous, limits)

    if decision.target is not None:
        assert s.actual is not None
        assert decision.target <= s.maximum
        assert decision.target < s.actual
        assert decision.target > 0


@given(samples, requests, thresholds)
def test_missing_figures_never_release(
    s: Sample, previous: Request | None, limits: Thresholds
) -> None:
    decision = decide(s, previous, limits)

    if s.actual is None or s.unused is None:
        assert decision.action is Action.KEEP
        assert decision.reason is Reason.STATS_UNAVAILABLE
