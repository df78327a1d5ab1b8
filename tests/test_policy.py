import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from balloonctl.policy import (
    SETTLE_PERIODS,
    STALE_PERIODS,
    Action,
    History,
    Metric,
    Params,
    Reason,
    Request,
    Sample,
    decide,
    note_manual_change,
)
from balloonctl.units import GIB, MIB

PARAMS = Params(
    min_unused=100 * MIB,
    max_release=50 * MIB,
    min_release=1 * MIB,
    grow_margin=64 * MIB,
    floor_min=128 * MIB,
    floor_percent=10,
    host_reserve=200 * MIB,
    stats_period=5,
)


def sample(
    actual: int | None = 2 * GIB,
    unused: int | None = 1 * GIB,
    maximum: int = 4 * GIB,
    last_update: int | None = 1000,
    taken_at: float = 100.0,
    **fields: int | None,
) -> Sample:
    return Sample(
        actual=actual,
        unused=unused,
        maximum=maximum,
        last_update=last_update,
        taken_at=taken_at,
        **fields,  # type: ignore[arg-type]
    )


def requested(target: int, at: float = 90.0, last_update: int = 1000) -> History:
    return History(
        request=Request(target=target, requested_at=at, last_update=last_update),
        last_actual=target,
        report_time=last_update,
        report_seen_at=at,
    )


# Release: the base algorithm.


def test_release_is_capped_at_max_release() -> None:
    decision, history = decide(sample(), History(), PARAMS)

    assert decision.action is Action.RELEASE
    assert decision.change == 50 * MIB
    assert decision.target == 2 * GIB - 50 * MIB
    assert history.request is not None
    assert history.request.target == decision.target


def test_release_keeps_the_buffer() -> None:
    decision, _ = decide(sample(unused=130 * MIB), History(), PARAMS)

    assert decision.action is Action.RELEASE
    assert decision.change == 30 * MIB


def test_unused_at_buffer_keeps_memory() -> None:
    decision, _ = decide(sample(unused=100 * MIB), History(), PARAMS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.WITHIN_BUFFER


def test_release_below_min_release_is_skipped() -> None:
    decision, _ = decide(sample(unused=100 * MIB + 512), History(), PARAMS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.RELEASE_TOO_SMALL


def test_release_stops_at_floor() -> None:
    # floor = max(128 MiB, 10 % of 4 GiB) = 409.6 MiB
    floor = int(4 * GIB * 0.10)

    decision, _ = decide(
        sample(actual=floor + 20 * MIB, unused=300 * MIB), History(), PARAMS
    )

    assert decision.action is Action.RELEASE
    assert decision.target == floor
    assert decision.floor == floor


def test_domain_at_floor_keeps_memory() -> None:
    floor = int(4 * GIB * 0.10)

    decision, _ = decide(sample(actual=floor, unused=300 * MIB), History(), PARAMS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.AT_FLOOR


def test_usable_metric_counts_cache_as_free() -> None:
    params = dataclasses.replace(PARAMS, metric=Metric.USABLE)

    decision, _ = decide(sample(unused=90 * MIB, usable=400 * MIB), History(), params)

    assert decision.action is Action.RELEASE
    assert decision.free == 400 * MIB


# Figures.


def test_missing_unused_is_unknown_not_zero() -> None:
    decision, _ = decide(sample(unused=None), History(), PARAMS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.STATS_UNAVAILABLE
    assert decision.missing == ("unused",)


def test_missing_usable_named_for_usable_metric() -> None:
    params = dataclasses.replace(PARAMS, metric=Metric.USABLE)

    decision, _ = decide(sample(usable=None), History(), params)

    assert decision.missing == ("usable",)


def test_contradictions_are_named() -> None:
    cases = [
        (sample(actual=1 * GIB, unused=2 * GIB), "unused"),
        (sample(actual=5 * GIB, maximum=4 * GIB), "above maximum"),
        (sample(usable=900 * MIB, available=800 * MIB), "usable"),
        (sample(unused=-5), "negative"),
    ]
    for bad, fragment in cases:
        decision, history = decide(bad, History(), PARAMS)

        assert decision.action is Action.KEEP
        assert decision.reason is Reason.STATS_INVALID
        assert any(fragment in text for text in decision.invalid), decision.invalid
        assert history == History()


# Reports and requests.


def test_same_report_is_not_acted_on_twice() -> None:
    decision, _ = decide(sample(last_update=1000), requested(2 * GIB), PARAMS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.NO_NEW_REPORT


def test_new_report_after_target_reached_is_acted_on() -> None:
    decision, _ = decide(sample(last_update=1005), requested(2 * GIB), PARAMS)

    assert decision.action is Action.RELEASE


def test_waits_until_target_reached() -> None:
    history = requested(2 * GIB - 50 * MIB, at=95.0)

    decision, _ = decide(sample(last_update=1005), history, PARAMS)

    assert decision.reason is Reason.TARGET_NOT_REACHED


def test_acts_after_settle_periods_while_balloon_moves() -> None:
    at = 100.0 - SETTLE_PERIODS * PARAMS.stats_period
    history = dataclasses.replace(
        requested(2 * GIB - 50 * MIB, at=at), last_actual=2 * GIB + 20 * MIB
    )

    decision, _ = decide(sample(last_update=1005), history, PARAMS)

    assert decision.action is Action.RELEASE


def test_driver_without_timestamps_acts_once_target_reached() -> None:
    history = History(request=Request(2 * GIB, 99.0, None), last_actual=2 * GIB)

    decision, _ = decide(sample(last_update=None), history, PARAMS)

    assert decision.action is Action.RELEASE


# Grow-back.


def test_short_guest_gets_buffer_plus_margin_at_once() -> None:
    decision, history = decide(sample(unused=40 * MIB), History(), PARAMS)

    assert decision.action is Action.GRANT
    assert decision.reason is Reason.GRANT
    assert decision.change == 100 * MIB + 64 * MIB - 40 * MIB
    assert decision.target == 2 * GIB + decision.change
    assert history.last_grant_at == 100.0


def test_drift_just_under_buffer_is_not_granted() -> None:
    decision, _ = decide(sample(unused=100 * MIB - 116), History(), PARAMS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.WITHIN_BUFFER


def test_page_cache_is_not_a_shortage() -> None:
    decision, _ = decide(sample(unused=20 * MIB, usable=900 * MIB), History(), PARAMS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.WITHIN_BUFFER


def test_low_usable_is_a_shortage_with_unused_metric() -> None:
    decision, _ = decide(sample(unused=60 * MIB, usable=40 * MIB), History(), PARAMS)

    assert decision.action is Action.GRANT
    assert decision.change == 100 * MIB + 64 * MIB - 40 * MIB


def test_swapping_guest_gets_what_it_swapped_in() -> None:
    history = History(swap_in=0, major_fault=0, report_time=995)

    decision, _ = decide(
        sample(unused=0, swap_in=300 * MIB, major_fault=0), history, PARAMS
    )

    assert decision.reason is Reason.DISTRESS
    assert decision.change == 300 * MIB


def test_short_guest_skips_stuck_backoff() -> None:
    history = History(stuck_count=2, retry_at=200.0)

    decision, _ = decide(sample(unused=10 * MIB), history, PARAMS)

    assert decision.action is Action.GRANT


def test_release_keeps_memavailable_above_buffer() -> None:
    decision, _ = decide(sample(unused=300 * MIB, usable=120 * MIB), History(), PARAMS)

    assert decision.action is Action.RELEASE
    assert decision.change == 20 * MIB


def test_no_release_when_memavailable_at_buffer() -> None:
    decision, _ = decide(sample(unused=300 * MIB, usable=100 * MIB), History(), PARAMS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.WITHIN_BUFFER


def test_grant_raises_guest_below_floor_to_floor() -> None:
    floor = int(4 * GIB * 0.10)

    decision, _ = decide(sample(actual=200 * MIB, unused=10 * MIB), History(), PARAMS)

    assert decision.action is Action.GRANT
    assert decision.target == floor


def test_grant_capped_at_maximum() -> None:
    decision, _ = decide(
        sample(actual=4 * GIB - 10 * MIB, unused=50 * MIB), History(), PARAMS
    )

    assert decision.action is Action.GRANT
    assert decision.target == 4 * GIB


def test_guest_at_maximum_cannot_grow() -> None:
    decision, _ = decide(sample(actual=4 * GIB, unused=50 * MIB), History(), PARAMS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.AT_MAXIMUM


def test_grant_limited_by_host_reserve() -> None:
    decision, _ = decide(sample(unused=80 * MIB), History(), PARAMS, 250 * MIB)

    assert decision.action is Action.GRANT
    assert decision.change == 50 * MIB
    assert decision.emergency is False


def test_no_grant_without_host_headroom() -> None:
    decision, _ = decide(sample(unused=80 * MIB), History(), PARAMS, 150 * MIB)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.NO_HOST_HEADROOM


def test_emergency_grant_ignores_host_reserve() -> None:
    decision, _ = decide(sample(unused=20 * MIB), History(), PARAMS, 150 * MIB)

    assert decision.action is Action.GRANT
    assert decision.emergency is True
    assert decision.change == 144 * MIB


def test_swap_in_triggers_grant_when_unused_looks_fine() -> None:
    history = History(swap_in=100, major_fault=10, report_time=995)

    decision, _ = decide(
        sample(unused=300 * MIB, swap_in=400, major_fault=10), history, PARAMS
    )

    assert decision.action is Action.GRANT
    assert decision.reason is Reason.DISTRESS
    assert decision.change == PARAMS.grow_margin


def test_major_fault_burst_triggers_grant() -> None:
    history = History(swap_in=0, major_fault=10, report_time=995)

    decision, _ = decide(
        sample(unused=300 * MIB, swap_in=0, major_fault=500), history, PARAMS
    )

    assert decision.reason is Reason.DISTRESS


def test_counter_reset_is_not_distress() -> None:
    history = History(swap_in=5000, major_fault=9000, report_time=995)

    decision, updated = decide(
        sample(unused=300 * MIB, swap_in=0, major_fault=3), history, PARAMS
    )

    assert decision.action is Action.RELEASE
    assert updated.swap_in == 0
    assert updated.major_fault == 3


def test_stale_counters_are_not_compared() -> None:
    history = History(swap_in=100, major_fault=10, report_time=1000, report_seen_at=99)

    decision, _ = decide(sample(unused=300 * MIB, swap_in=400), history, PARAMS)

    assert decision.reason is not Reason.DISTRESS


def test_new_grant_not_capped_by_smaller_pending_grant() -> None:
    pending = Request(
        target=2 * GIB + 10 * MIB, requested_at=99.0, last_update=999, grant=True
    )
    history = History(request=pending, last_actual=2 * GIB, report_time=999)

    decision, _ = decide(sample(unused=10 * MIB, last_update=1000), history, PARAMS)

    assert decision.action is Action.GRANT
    assert decision.target == 2 * GIB + 154 * MIB


def test_grant_ignores_pending_release() -> None:
    pending = Request(target=2 * GIB - 50 * MIB, requested_at=99.0, last_update=999)
    history = History(request=pending, last_actual=2 * GIB, report_time=999)

    decision, _ = decide(sample(unused=30 * MIB, last_update=1000), history, PARAMS)

    assert decision.action is Action.GRANT


# No flapping.


def test_no_release_during_cooldown_after_grant() -> None:
    cooldown = PARAMS.release_cooldown_periods * PARAMS.stats_period
    history = History(last_grant_at=100.0 - cooldown + 1)

    decision, _ = decide(sample(), history, PARAMS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.COOLDOWN


def test_release_resumes_after_cooldown() -> None:
    cooldown = PARAMS.release_cooldown_periods * PARAMS.stats_period
    history = History(last_grant_at=100.0 - cooldown)

    decision, _ = decide(sample(), history, PARAMS)

    assert decision.action is Action.RELEASE


# Stale statistics.


def test_stale_stats_allow_no_release() -> None:
    seen = 100.0 - STALE_PERIODS * PARAMS.stats_period - 1
    history = History(report_time=1000, report_seen_at=seen)

    decision, _ = decide(sample(last_update=1000), history, PARAMS)

    assert decision.stale is True
    assert decision.action is Action.KEEP
    assert decision.reason is Reason.STATS_STALE


def test_stale_stats_still_allow_grants() -> None:
    seen = 100.0 - STALE_PERIODS * PARAMS.stats_period - 1
    history = History(report_time=1000, report_seen_at=seen)

    decision, _ = decide(sample(unused=10 * MIB, last_update=1000), history, PARAMS)

    assert decision.stale is True
    assert decision.action is Action.GRANT


def test_advancing_report_is_not_stale() -> None:
    history = History(report_time=990, report_seen_at=10.0)

    decision, _ = decide(sample(last_update=1000), history, PARAMS)

    assert decision.stale is False


# Stuck balloons.


def stuck_history() -> History:
    at = 100.0 - PARAMS.stuck_periods * PARAMS.stats_period
    pending = Request(target=1 * GIB, requested_at=at, last_update=990)
    return History(
        request=pending, last_actual=2 * GIB, progress_at=at, report_time=995
    )


def test_stuck_balloon_pulled_back_to_actual() -> None:
    decision, history = decide(sample(last_update=1000), stuck_history(), PARAMS)

    assert decision.action is Action.RESET
    assert decision.reason is Reason.STUCK
    assert decision.target == 2 * GIB
    assert history.request is None
    assert history.stuck_count == 1
    assert history.retry_at == 100.0 + PARAMS.stats_period * 2


def test_stuck_balloon_backs_off_exponentially() -> None:
    _, history = decide(sample(last_update=1000), stuck_history(), PARAMS)
    waiting, _ = decide(sample(taken_at=105.0, last_update=1005), history, PARAMS)
    history = dataclasses.replace(stuck_history(), stuck_count=history.stuck_count)
    _, again = decide(sample(last_update=1000), history, PARAMS)

    assert waiting.reason is Reason.STUCK_BACKOFF
    assert again.stuck_count == 2
    assert again.retry_at == 100.0 + PARAMS.stats_period * 4


def test_moving_balloon_recovers() -> None:
    history = dataclasses.replace(stuck_history(), stuck_count=2, last_actual=2 * GIB)

    _, updated = decide(sample(actual=1536 * MIB, last_update=1000), history, PARAMS)

    assert updated.stuck_count == 0


# Manual changes.


def test_manual_change_pauses_releases_for_grace() -> None:
    history = note_manual_change(History(), 90.0, PARAMS)

    decision, _ = decide(sample(), history, PARAMS)

    assert decision.action is Action.KEEP
    assert decision.reason is Reason.MANUAL_GRACE


def test_manual_change_still_allows_grants() -> None:
    history = note_manual_change(History(), 90.0, PARAMS)

    decision, _ = decide(sample(unused=10 * MIB), history, PARAMS)

    assert decision.action is Action.GRANT


def test_releases_resume_after_grace() -> None:
    history = note_manual_change(History(), 100.0 - PARAMS.manual_grace_s, PARAMS)

    decision, _ = decide(sample(), history, PARAMS)

    assert decision.action is Action.RELEASE


# Properties over arbitrary, untrusted figures.

kib = st.integers(min_value=-GIB, max_value=64 * GIB)
optional_kib = st.none() | kib
params_strategy = st.builds(
    Params,
    min_unused=st.integers(min_value=1, max_value=4 * GIB),
    max_release=st.integers(min_value=1, max_value=4 * GIB),
    min_release=st.integers(min_value=0, max_value=64 * MIB),
    grow_margin=st.integers(min_value=0, max_value=GIB),
    floor_min=st.integers(min_value=0, max_value=4 * GIB),
    floor_percent=st.floats(min_value=0, max_value=90),
    host_reserve=st.integers(min_value=0, max_value=4 * GIB),
    stats_period=st.integers(min_value=1, max_value=60),
    metric=st.sampled_from(Metric),
)
samples = st.builds(
    Sample,
    actual=optional_kib,
    unused=optional_kib,
    maximum=st.integers(min_value=1, max_value=64 * GIB),
    last_update=st.none() | st.integers(min_value=0, max_value=10**9),
    taken_at=st.floats(min_value=0, max_value=10**6),
    usable=optional_kib,
    available=optional_kib,
    swap_in=st.none() | st.integers(min_value=0, max_value=10**12),
    major_fault=st.none() | st.integers(min_value=0, max_value=10**12),
)
histories = st.builds(
    History,
    request=st.none()
    | st.builds(
        Request,
        target=kib,
        requested_at=st.floats(min_value=0, max_value=10**6),
        last_update=st.none() | st.integers(min_value=0, max_value=10**9),
        grant=st.booleans(),
    ),
    last_actual=optional_kib,
    last_grant_at=st.none() | st.floats(min_value=0, max_value=10**6),
    report_time=st.none() | st.integers(min_value=0, max_value=10**9),
    report_seen_at=st.none() | st.floats(min_value=0, max_value=10**6),
    swap_in=st.none() | st.integers(min_value=0, max_value=10**12),
    major_fault=st.none() | st.integers(min_value=0, max_value=10**12),
    stuck_count=st.integers(min_value=0, max_value=20),
)
hosts = st.none() | st.integers(min_value=0, max_value=64 * GIB)


@given(samples, histories, params_strategy, hosts)
def test_release_never_exceeds_max_release(
    s: Sample, h: History, p: Params, host: int | None
) -> None:
    decision, _ = decide(s, h, p, host)

    if decision.action is Action.RELEASE:
        assert decision.change <= p.max_release
        assert s.actual is not None and decision.target is not None
        assert s.actual - decision.target == decision.change


@given(samples, histories, params_strategy, hosts)
def test_release_never_leaves_free_below_min_unused(
    s: Sample, h: History, p: Params, host: int | None
) -> None:
    decision, _ = decide(s, h, p, host)

    if decision.action is Action.RELEASE:
        assert decision.free is not None
        assert decision.free - decision.change >= p.min_unused


@given(samples, histories, params_strategy, hosts)
def test_target_within_floor_and_maximum(
    s: Sample, h: History, p: Params, host: int | None
) -> None:
    decision, _ = decide(s, h, p, host)

    if decision.action in (Action.RELEASE, Action.GRANT):
        assert decision.target is not None
        assert decision.target <= s.maximum
        assert decision.target >= min(p.floor(s.maximum), s.actual or 0)
    if decision.action is Action.RELEASE:
        assert decision.target is not None
        assert decision.target >= p.floor(s.maximum)


@given(samples, histories, params_strategy, hosts)
def test_missing_or_invalid_figures_never_act(
    s: Sample, h: History, p: Params, host: int | None
) -> None:
    decision, updated = decide(s, h, p, host)

    if decision.reason in (Reason.STATS_UNAVAILABLE, Reason.STATS_INVALID):
        assert decision.action is Action.KEEP
        assert updated == h
    if s.actual is None or (s.unused is None and p.metric is Metric.UNUSED):
        assert decision.action is Action.KEEP


@given(samples, histories, params_strategy, hosts)
def test_grant_never_takes_host_under_reserve_unless_emergency(
    s: Sample, h: History, p: Params, host: int | None
) -> None:
    decision, _ = decide(s, h, p, host)

    if decision.action is Action.GRANT and host is not None and not decision.emergency:
        assert host - decision.change >= p.host_reserve


def test_manual_change_records_seen_actual() -> None:
    history = note_manual_change(History(last_actual=1 * GIB), 90.0, PARAMS, 2 * GIB)

    assert history.last_actual == 2 * GIB
    assert history.request is None
    assert history.manual_until == 90.0 + PARAMS.manual_grace_s
