"""Controller behaviour under faults, with the in-memory hypervisor."""

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from balloonctl import controller as controller_module
from balloonctl.config import Settings
from balloonctl.controller import Controller
from balloonctl.errors import CallStillRunning, HypervisorError
from balloonctl.hypervisor import LifecycleKind
from balloonctl.units import MIB
from tests.fakes import FakeHypervisor
from tests.logcapture import LogCapture

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def fake(logs: LogCapture) -> AsyncIterator[FakeHypervisor]:
    hypervisor = FakeHypervisor()
    hypervisor.add("alpha")
    hypervisor.add("beta")
    yield hypervisor


async def run_controller(
    hypervisor: FakeHypervisor, logs: LogCapture
) -> AsyncIterator[Controller]:
    controller = Controller(hypervisor, Settings(uri=hypervisor.uri, stats_period=1))
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    await logs.wait_event("controller_started")
    try:
        yield controller
    finally:
        stop.set()
        await asyncio.wait_for(task, 3)


async def test_lost_connection_reconnects_and_reconciles(
    fake: FakeHypervisor, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller_module, "RECONNECT_INITIAL_S", 0.05)
    async for controller in run_controller(fake, logs):
        await logs.wait_event("memory_released", domain="beta")
        fake.refuse_connects = 2
        gone = fake.domains.pop(next(iter(fake.domains)))
        fake.add("gamma")

        fake.drop_connection()
        lost = await logs.wait_event("libvirt_disconnected")
        back = await logs.wait_event("libvirt_reconnected")
        await logs.wait_event("memory_released", domain="gamma")

        names = {ref.name for ref in controller.domains}
        assert lost["level"] == "warning"
        assert lost["reason"] == "eof"
        assert back["attempts"] == 3
        assert names == {"beta", "gamma"}
        assert gone.ref.name == "alpha"
        assert controller.task_count() == 2
    assert fake.connects == 4


async def test_failing_domain_does_not_disturb_others(
    fake: FakeHypervisor, logs: LogCapture
) -> None:
    alpha, beta = fake.domains.values()
    alpha.fail_with = HypervisorError("internal error: monitor broke", code=1)

    async for _controller in run_controller(fake, logs):
        for _ in range(3):
            await logs.wait_event(
                "memory_released", domain="beta", actual_kib=beta.actual
            )
        failures = logs.events("domain_call_failed", domain="alpha")
        alpha.fail_with = None
        await logs.wait_event("domain_call_recovered", domain="alpha", timeout=8)

    assert failures[0]["level"] == "warning"
    assert failures[0]["error_code"] == 1
    assert all(line["level"] == "debug" for line in failures[1:])
    # How many failures fit into beta's three releases depends on the
    # machine's load; each retry waits twice as long as the one before.
    assert [line["retry_in_s"] for line in failures] == [
        2.0**n for n in range(len(failures))
    ]
    assert len(beta.targets) >= 3


async def test_skipped_call_retried_every_period(
    fake: FakeHypervisor, logs: LogCapture
) -> None:
    # The adapter skips a call while an earlier one for the domain is stuck
    # in its thread; the fake raises that error directly.
    alpha, _ = fake.domains.values()
    alpha.fail_with = CallStillRunning("memoryStats skipped: an earlier call runs")

    async for _controller in run_controller(fake, logs):
        for failures in (1, 2, 3):
            await logs.wait_event(
                "domain_call_failed", domain="alpha", failures=failures, timeout=3
            )
        alpha.fail_with = None
        await logs.wait_event("domain_call_recovered", domain="alpha", timeout=3)

    failed = logs.events("domain_call_failed", domain="alpha")
    assert [line["retry_in_s"] for line in failed] == [1.0] * len(failed)
    assert all(line["timed_out"] for line in failed)


async def test_pause_does_not_make_stats_stale(
    fake: FakeHypervisor, logs: LogCapture
) -> None:
    alpha, _ = fake.domains.values()
    alpha.last_update = 1000

    async for _controller in run_controller(fake, logs):
        await logs.wait_event("memory_released", domain="alpha")
        fake.emit(alpha, LifecycleKind.SUSPENDED)
        await logs.wait_event("domain_paused", domain="alpha")
        # Longer than the three periods after which a silent guest is stale.
        await asyncio.sleep(4)
        fake.emit(alpha, LifecycleKind.RESUMED)
        resumed = await logs.wait_event("domain_resumed", domain="alpha")
        resumed_at = resumed["timestamp"]
        sampled = await logs.wait_for(
            lambda line, since=resumed_at: (
                line["event"] == "memory_kept"
                and line.get("domain") == "alpha"
                and line["timestamp"] > since
            ),
            timeout=3,
        )

    # The guest has not reported since before the pause, so nothing is
    # released, and the pause does not count toward staleness.
    assert sampled["reason"] == "no_new_report"
    assert logs.events("stats_stale", domain="alpha") == []


async def test_hung_domain_does_not_delay_others(
    fake: FakeHypervisor, logs: LogCapture
) -> None:
    alpha, beta = fake.domains.values()
    alpha.hang = True

    async for _controller in run_controller(fake, logs):
        for _ in range(3):
            await logs.wait_event(
                "memory_released", domain="beta", actual_kib=beta.actual, timeout=2
            )

    assert alpha.targets == []
    assert len(beta.targets) >= 3


async def test_lifecycle_events_drive_registry(
    fake: FakeHypervisor, logs: LogCapture
) -> None:
    async for controller in run_controller(fake, logs):
        delta = fake.add("delta")
        fake.emit(delta, LifecycleKind.STARTED)
        await logs.wait_event("domain_added", domain="delta")

        fake.emit(delta, LifecycleKind.SUSPENDED)
        await logs.wait_event("domain_paused", domain="delta")
        fake.emit(delta, LifecycleKind.RESUMED)
        await logs.wait_event("domain_resumed", domain="delta")

        fake.emit(delta, LifecycleKind.STOPPED)
        removed = await logs.wait_event("domain_removed", domain="delta")
        assert removed["reason"].startswith("stopped")
        assert "delta" not in {ref.name for ref in controller.domains}


async def test_vanished_domain_is_forgotten_once(
    fake: FakeHypervisor, logs: LogCapture
) -> None:
    async for controller in run_controller(fake, logs):
        alpha = next(iter(fake.domains.values()))
        del fake.domains[alpha.ref.uuid]
        removed = await logs.wait_event("domain_removed", domain="alpha")
        await asyncio.sleep(1.2)

        assert removed["level"] == "info"
        assert removed["reason"] == "domain gone"
        assert len(logs.events("domain_removed", domain="alpha")) == 1
        assert "alpha" not in {ref.name for ref in controller.domains}
    assert not logs.events("domain_call_failed")


async def test_crashed_task_is_logged_and_replaced(
    fake: FakeHypervisor, logs: LogCapture
) -> None:
    alpha = next(iter(fake.domains.values()))
    alpha.fail_with = RuntimeError("bug in a worker")

    async for controller in run_controller(fake, logs):
        crashed = await logs.wait_event("task_crashed", task="domain alpha")
        alpha.fail_with = None
        await logs.wait_for(
            lambda line: (
                line["event"] == "memory_released" and line.get("domain") == "alpha"
            ),
            timeout=5,
        )
        assert controller.task_count() == 2

    assert crashed["level"] == "error"
    assert "bug in a worker" in crashed["exception"]
    assert len(logs.events("domain_added", domain="alpha")) == 2


async def test_report_from_old_task_keeps_new_task(
    fake: FakeHypervisor, logs: LogCapture
) -> None:
    async for controller in run_controller(fake, logs):
        alpha = next(iter(fake.domains.values()))
        fake.emit(alpha, LifecycleKind.STOPPED)
        await logs.wait_event("domain_removed", domain="alpha")
        fake.emit(alpha, LifecycleKind.STARTED)
        await logs.wait_event("stats_period_set", domain="alpha", timeout=3)
        old_worker = object()
        controller._enqueue(
            controller_module._DomainGone(alpha.ref, "domain gone", old_worker)  # type: ignore[arg-type]
        )
        await asyncio.sleep(0.1)

        assert "alpha" in {ref.name for ref in controller.domains}


async def test_target_rejected_as_too_large_is_not_retried(
    logs: LogCapture,
) -> None:
    fake = FakeHypervisor()
    # The guest runs short, so it is granted memory, but libvirt rejects
    # every target above 1100 MiB.
    domain = fake.add(
        "short", actual=1024 * MIB, used=1000 * MIB, reject_above=1100 * MIB
    )

    async for _controller in run_controller(fake, logs):
        await logs.wait_event("domain_call_failed", domain="short")
        await logs.wait_event("target_skipped", domain="short", timeout=8)

    rejected = [kib for kib in domain.targets if kib > 1100 * MIB]
    assert len(set(rejected)) == len(rejected)


async def test_grants_share_the_host_reserve(logs: LogCapture) -> None:
    fake = FakeHypervisor()
    # 300 MiB available and a 200 MiB reserve leave 100 MiB for all grants,
    # while each of the four short guests would take 104 MiB.
    fake.host_available = 300 * MIB
    guests = [
        fake.add(f"short{n}", actual=1024 * MIB, used=964 * MIB) for n in range(4)
    ]

    async for _controller in run_controller(fake, logs):
        await logs.wait_event("memory_granted")
        await asyncio.sleep(0.5)

    granted = sum(line["granted_kib"] for line in logs.events("memory_granted"))
    assert granted <= 100 * MIB
    assert all(line["emergency"] is False for line in logs.events("memory_granted"))
    assert sum(len(guest.targets) for guest in guests) >= 1
