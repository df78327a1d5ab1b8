from balloonctl.config import Settings
from balloonctl.domain import (
    DomainMemory,
    DomainWorker,
    HostView,
    next_tick,
    without_pause,
)
from balloonctl.domain_policy import DomainPolicy, global_params
from balloonctl.errors import HypervisorError
from balloonctl.policy import (
    Action,
    History,
    Request,
    Sample,
    decide,
    is_foreign_change,
)
from balloonctl.units import MIB
from tests.fakes import FakeHypervisor


def test_backoff_stays_capped_after_many_failures() -> None:
    fake = FakeHypervisor()
    domain = fake.add("alpha")
    worker = DomainWorker(
        fake,
        domain.ref,
        Settings(stats_period=5),
        DomainMemory(),
        host=HostView(),
        on_gone=lambda ref, why: None,
        on_disconnected=lambda why: None,
    )
    worker._failures = 5000
    worker._backoff_steps = 5000

    delay = worker._record_failure(HypervisorError("still failing"), 5.0)

    assert delay == 60.0


def test_domain_without_statistics_is_not_reported_managed() -> None:
    fake = FakeHypervisor()
    domain = fake.add("alpha")
    memory = DomainMemory(missing=("actual", "unused"))
    worker = DomainWorker(
        fake,
        domain.ref,
        Settings(),
        memory,
        host=HostView(),
        on_gone=lambda ref, why: None,
        on_disconnected=lambda why: None,
    )
    worker._policy = DomainPolicy("managed", global_params(Settings()))

    status, reason = worker.status(0.0)

    assert status == "no_stats"
    assert "actual, unused" in reason


def test_move_toward_pending_target_is_ours() -> None:
    history = History(request=Request(400 * MIB, 0.0, None), last_actual=500 * MIB)

    assert not is_foreign_change(history, 450 * MIB)


def test_move_while_nothing_pending_is_foreign() -> None:
    assert is_foreign_change(History(last_actual=200 * MIB), 450 * MIB)


def test_move_away_from_target_is_foreign() -> None:
    history = History(request=Request(400 * MIB, 0.0, None), last_actual=500 * MIB)

    assert is_foreign_change(history, 520 * MIB)


def test_overshooting_target_is_foreign() -> None:
    history = History(request=Request(400 * MIB, 0.0, None), last_actual=500 * MIB)

    assert is_foreign_change(history, 350 * MIB)


def test_jitter_within_tolerance_is_ignored() -> None:
    assert not is_foreign_change(History(last_actual=200 * MIB), 200 * MIB + 100)


def test_next_tick_is_a_multiple_of_the_period() -> None:
    cases = [
        # (now, period, expected tick)
        (100.0, 5.0, 105.0),
        (101.0, 5.0, 105.0),
        (103.0, 5.0, 110.0),
        (104.9, 5.0, 110.0),
        (10.25, 1.0, 11.0),
        (10.75, 1.0, 12.0),
    ]
    for now, period, expected in cases:
        tick = next_tick(now, period)
        assert abs(tick - expected) < 1e-9, (now, period, tick)
        assert period / 2 <= tick - now <= 1.5 * period, (now, period, tick)


def test_next_tick_keeps_cadence_after_late_step() -> None:
    assert next_tick(10.7, 1.0, previous=10.0) == 11.0
    assert next_tick(10.1, 1.0, previous=10.0) == 11.0


def test_next_tick_resyncs_after_long_wait() -> None:
    assert next_tick(15.2, 1.0, previous=10.0) == 16.0
    assert next_tick(15.8, 1.0, previous=10.0) == 17.0


def test_paused_time_does_not_make_a_balloon_stuck() -> None:
    # A release of 50 MiB was requested at t=100, then the guest was paused
    # for 8 s; at t=110 the balloon has not moved yet. With a 2 s period
    # and 3 stuck periods, 10 s without progress would be a stuck balloon.
    params = global_params(Settings(stats_period=2))
    history = History(
        request=Request(450 * MIB, 100.0, 1000),
        last_actual=500 * MIB,
        report_time=1000,
        report_seen_at=100.0,
    )
    after_resume = Sample(
        actual=500 * MIB,
        unused=400 * MIB,
        maximum=512 * MIB,
        last_update=1010,
        taken_at=110.0,
    )

    counted, _ = decide(after_resume, history, params)
    discounted, _ = decide(after_resume, without_pause(history, 8.0), params)

    assert counted.action is Action.RESET
    assert discounted.action is not Action.RESET
