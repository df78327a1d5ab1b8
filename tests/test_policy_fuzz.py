"""The decision over sequences of untrusted figures, carrying its History.

tests/test_policy.py checks single decisions on figures up to 64 GiB. Here
the figures include values above 2**63 (libvirt reports unsigned 64-bit
counters), negatives, zeros, contradictions and counter resets, fed to
decide() one period after another as balloonctl does, so a bad History
built by an earlier absurd sample is exercised too.
"""

import dataclasses

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from balloonctl.policy import (
    Action,
    Decision,
    History,
    Metric,
    Params,
    Sample,
    decide,
    is_foreign_change,
    note_manual_change,
)
from balloonctl.units import GIB, MIB

HUGE = 2**64

# A figure as a guest (or a broken driver) may report it.
absurd = st.one_of(
    st.none(),
    st.just(0),
    st.integers(min_value=-HUGE, max_value=-1),
    st.integers(min_value=2**63 - 2, max_value=2**66),
    st.integers(min_value=0, max_value=16 * GIB),
)
counter = st.one_of(st.none(), st.integers(min_value=0, max_value=2**64), st.just(0))
params_strategy = st.builds(
    Params,
    min_unused=st.integers(min_value=1, max_value=4 * GIB),
    max_release=st.integers(min_value=1, max_value=4 * GIB),
    min_release=st.integers(min_value=0, max_value=64 * MIB),
    grow_margin=st.integers(min_value=0, max_value=GIB),
    floor_min=st.integers(min_value=0, max_value=8 * GIB),
    floor_percent=st.floats(min_value=0, max_value=90),
    host_reserve=st.integers(min_value=0, max_value=4 * GIB),
    stats_period=st.integers(min_value=1, max_value=60),
    metric=st.sampled_from(Metric),
    release_cooldown_periods=st.integers(min_value=0, max_value=10),
    stuck_periods=st.integers(min_value=1, max_value=10),
    manual_grace_s=st.floats(min_value=0, max_value=1000),
    distress_major_faults=st.integers(min_value=1, max_value=1000),
    grant_slack=st.integers(min_value=0, max_value=64 * MIB),
).filter(lambda p: p.min_release <= p.max_release)


def check_decision(decision: Decision, sample: Sample, params: Params) -> None:
    """Check one decision against the limits that hold whatever the input."""
    if decision.action is Action.KEEP:
        assert decision.target is None
        return
    assert decision.target is not None
    assert sample.actual is not None
    floor = params.floor(sample.maximum)
    assert 0 < decision.target <= sample.maximum
    # Even a guest that reports a tiny actual is never asked to go below its
    # floor (or its maximum, where the floor is above it).
    assert decision.target >= min(floor, sample.maximum)
    if decision.action is Action.RELEASE:
        assert 0 < decision.change <= params.max_release
        assert decision.target == sample.actual - decision.change
        assert decision.target >= floor
    elif decision.action is Action.GRANT:
        assert decision.change > 0
        assert decision.target == sample.actual + decision.change
    else:
        assert decision.target == max(sample.actual, min(floor, sample.maximum))


class PolicySequence(RuleBasedStateMachine):
    """One domain's figures over many periods, with the balloon following."""

    @initialize(
        params=params_strategy,
        maximum=st.integers(min_value=256 * MIB, max_value=64 * GIB)
        | st.integers(min_value=1, max_value=2**64),
        start=st.floats(min_value=0, max_value=1e9),
    )
    def start(self, params: Params, maximum: int, start: float) -> None:
        self.params = params
        self.maximum = maximum
        self.now = start
        self.history = History()
        self.actual: int | None = maximum
        self.report = 0
        self.decisions: list[Decision] = []
        self.targets: list[int] = []

    def _decide(self, sample: Sample, host: int | None) -> None:
        decision, self.history = decide(sample, self.history, self.params, host)
        check_decision(decision, sample, self.params)
        self.decisions.append(decision)
        if decision.target is not None:
            self.targets.append(decision.target)

    @rule(
        step=st.floats(min_value=0, max_value=200),
        unused=absurd,
        usable=absurd,
        available=absurd,
        swap_in=counter,
        major_fault=counter,
        report=st.sampled_from(["advance", "same", "reset", "none"]),
        host=st.none() | st.integers(min_value=-HUGE, max_value=HUGE),
    )
    def plausible_actual(
        self,
        step: float,
        unused: int | None,
        usable: int | None,
        available: int | None,
        swap_in: int | None,
        major_fault: int | None,
        report: str,
        host: int | None,
    ) -> None:
        """The balloon's own size is right; the guest's figures are anything."""
        self.now += step
        self.report = {"advance": self.report + 5, "same": self.report, "reset": 0}.get(
            report, self.report
        )
        sample = Sample(
            actual=self.actual,
            unused=unused,
            maximum=self.maximum,
            last_update=None if report == "none" else self.report,
            taken_at=self.now,
            usable=usable,
            available=available,
            swap_in=swap_in,
            major_fault=major_fault,
        )
        self._decide(sample, host)

    @rule(
        step=st.sampled_from([0.0, 1.0, 5.0, 30.0]),
        unused=st.floats(min_value=0, max_value=1),
        usable=st.none() | st.floats(min_value=0, max_value=1),
        swap_in=st.none() | st.integers(min_value=-(2**20), max_value=2**20),
        major_fault=st.none() | st.integers(min_value=-1000, max_value=1000),
        host=st.none() | st.integers(min_value=0, max_value=16 * GIB),
    )
    def consistent_report(
        self,
        step: float,
        unused: float,
        usable: float | None,
        swap_in: int | None,
        major_fault: int | None,
        host: int | None,
    ) -> None:
        """Figures that agree with each other; counters move either way."""
        self.now += step
        self.report += 5
        actual = self.actual if self.actual is not None else self.maximum
        previous = self.history
        sample = Sample(
            actual=actual,
            unused=int(actual * unused),
            maximum=self.maximum,
            last_update=self.report,
            taken_at=self.now,
            usable=None if usable is None else max(int(actual * usable), 0),
            available=actual,
            swap_in=None
            if swap_in is None
            else max((previous.swap_in or 0) + swap_in, 0),
            major_fault=None
            if major_fault is None
            else max((previous.major_fault or 0) + major_fault, 0),
        )
        self._decide(sample, host)

    @rule(
        step=st.floats(min_value=0, max_value=200),
        actual=absurd,
        unused=absurd,
        maximum=st.integers(min_value=1, max_value=2**66),
        host=st.none() | st.integers(min_value=-HUGE, max_value=HUGE),
    )
    def absurd_actual(
        self,
        step: float,
        actual: int | None,
        unused: int | None,
        maximum: int,
        host: int | None,
    ) -> None:
        """Every figure, the balloon size and the maximum included, is anything."""
        self.now += step
        sample = Sample(
            actual=actual,
            unused=unused,
            maximum=maximum,
            last_update=None,
            taken_at=self.now,
        )
        self._decide(sample, host)

    @precondition(lambda self: self.history.request is not None)
    @rule(fraction=st.floats(min_value=0, max_value=1.5))
    def balloon_moves(self, fraction: float) -> None:
        """The balloon moves toward the request, stops short or overshoots."""
        assert self.history.request is not None
        start = self.actual if self.actual is not None else self.maximum
        target = self.history.request.target
        moved = start + int((target - start) * fraction)
        self.actual = max(1, min(moved, self.maximum))

    @rule(actual=st.integers(min_value=1, max_value=2**64))
    def operator_sets_target(self, actual: int) -> None:
        actual = min(actual, self.maximum)
        if is_foreign_change(self.history, actual):
            self.history = note_manual_change(
                self.history, self.now, self.params, actual
            )
        self.actual = actual

    @invariant()
    def stuck_backoff_is_bounded(self) -> None:
        history = self.history
        if history.retry_at is not None:
            assert history.retry_at - self.now <= self.params.stats_period * 2**6

    @invariant()
    def request_within_limits(self) -> None:
        request = self.history.request
        if request is not None:
            assert request.target > 0


TestPolicySequence = PolicySequence.TestCase
TestPolicySequence.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)


def test_huge_figures_are_invalid_not_acted_on() -> None:
    history = History()
    params = Params(
        min_unused=100 * MIB,
        max_release=50 * MIB,
        min_release=MIB,
        grow_margin=64 * MIB,
        floor_min=128 * MIB,
        floor_percent=10,
        host_reserve=200 * MIB,
        stats_period=5,
    )
    for unused in (2**63, 2**64 - 1, 2**64 + 5):
        sample = Sample(
            actual=2 * GIB, unused=unused, maximum=4 * GIB, last_update=1, taken_at=1
        )

        decision, updated = decide(sample, history, params)

        assert decision.action is Action.KEEP
        assert decision.invalid
        assert updated == history


def test_replayed_history_never_releases_twice_per_report() -> None:
    params = Params(
        min_unused=100 * MIB,
        max_release=50 * MIB,
        min_release=MIB,
        grow_margin=64 * MIB,
        floor_min=128 * MIB,
        floor_percent=10,
        host_reserve=200 * MIB,
        stats_period=5,
    )
    sample = Sample(
        actual=2 * GIB, unused=GIB, maximum=4 * GIB, last_update=100, taken_at=10
    )
    first, history = decide(sample, History(), params)
    # The balloon reached the target, but the guest has not reported again.
    again = dataclasses.replace(sample, actual=first.target, taken_at=15)
    second, _ = decide(again, history, params)

    assert first.action is Action.RELEASE
    assert second.action is Action.KEEP


FLOOR_PARAMS = Params(
    min_unused=100 * MIB,
    max_release=50 * MIB,
    min_release=MIB,
    grow_margin=64 * MIB,
    floor_min=128 * MIB,
    floor_percent=10,
    host_reserve=200 * MIB,
    stats_period=5,
)


def test_stuck_reset_never_targets_below_floor() -> None:
    # The guest reports a balloon of 1 KiB (its driver writes that figure),
    # and the grant toward the floor never arrives.
    sample = Sample(actual=1, unused=0, maximum=4 * GIB, last_update=None, taken_at=0)
    first, history = decide(sample, History(), FLOOR_PARAMS)
    later = dataclasses.replace(sample, taken_at=100.0)
    reset, _ = decide(later, history, FLOOR_PARAMS)

    assert first.action is Action.GRANT
    assert reset.action is Action.RESET
    assert reset.target == FLOOR_PARAMS.floor(4 * GIB)


def test_host_limited_grant_still_reaches_floor() -> None:
    # 60 MiB unused is short but no emergency, so host headroom (10 MiB
    # here) would limit the grant to a target far below the floor.
    sample = Sample(
        actual=64 * MIB, unused=60 * MIB, maximum=4 * GIB, last_update=1, taken_at=0
    )

    decision, _ = decide(sample, History(), FLOOR_PARAMS, 210 * MIB)

    assert decision.action is Action.GRANT
    assert decision.target == FLOOR_PARAMS.floor(4 * GIB)
    assert decision.change == decision.target - 64 * MIB
