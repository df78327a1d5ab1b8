"""Each class of hypervisor error, raised for one domain, handled as documented.

docs/design.md: a domain gone or not running is forgotten (domain_removed);
a timeout or any other failure is domain_call_failed with backoff while
the domain keeps its task; a broken connection hands over to the
controller's reconnection. The fake raises them because the test driver
cannot make one domain's calls time out or break the connection on demand
(tests/integration/test_adapter_errors.py maps real libvirt errors onto
these classes).
"""

import pytest

from balloonctl import controller as controller_module
from balloonctl.errors import (
    CallTimedOut,
    Disconnected,
    DomainGone,
    DomainNotRunning,
    HypervisorError,
)
from tests.fakes import FakeHypervisor
from tests.logcapture import LogCapture
from tests.test_controller import run_controller

pytestmark = pytest.mark.asyncio


def two_domains() -> FakeHypervisor:
    fake = FakeHypervisor()
    fake.add("failing")
    fake.add("healthy")
    return fake


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (DomainGone("no domain with matching uuid", code=42), "domain gone"),
        (DomainNotRunning("domain is not running", code=55), "domain not running"),
    ],
)
async def test_gone_or_stopped_domain_is_removed(
    logs: LogCapture, error: HypervisorError, reason: str
) -> None:
    fake = two_domains()
    failing = next(iter(fake.domains.values()))
    failing.fail_with = error

    async for controller in run_controller(fake, logs):
        removed = await logs.wait_event("domain_removed", domain="failing")
        await logs.wait_event("memory_released", domain="healthy")
        names = {ref.name for ref in controller.domains}

    assert removed["reason"] == reason
    assert removed["level"] == "info"
    assert names == {"healthy"}
    assert not logs.events("domain_call_failed")
    assert not [line for line in logs.lines if line["level"] == "error"]


@pytest.mark.parametrize(
    ("error", "timed_out"),
    [
        (CallTimedOut("memoryStats timed out after 10 s"), True),
        (HypervisorError("internal error: monitor broke", code=1), False),
    ],
)
async def test_failing_call_is_retried_with_backoff(
    logs: LogCapture, error: HypervisorError, timed_out: bool
) -> None:
    fake = two_domains()
    failing = next(iter(fake.domains.values()))
    failing.fail_with = error

    async for controller in run_controller(fake, logs):
        failed = await logs.wait_event("domain_call_failed", domain="failing")
        await logs.wait_event("memory_released", domain="healthy")
        names = {ref.name for ref in controller.domains}
        failing.fail_with = None
        await logs.wait_event("domain_call_recovered", domain="failing", timeout=5)

    assert failed["level"] == "warning"
    assert failed["timed_out"] is timed_out
    assert failed["error_code"] == error.code
    assert failed["retry_in_s"] == 1.0
    assert names == {"failing", "healthy"}
    assert not logs.events("domain_removed")
    assert not [line for line in logs.lines if line["level"] == "error"]


async def test_broken_connection_reconnects(
    logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller_module, "RECONNECT_INITIAL_S", 0.05)
    fake = two_domains()
    failing, _healthy = fake.domains.values()
    failing.fail_with = Disconnected("memoryStats failed: Cannot write data", code=38)

    async for controller in run_controller(fake, logs):
        lost = await logs.wait_event("libvirt_disconnected")
        failing.fail_with = None
        back = await logs.wait_event("libvirt_reconnected", timeout=5)
        await logs.wait_event("memory_released", domain="failing", timeout=5)
        names = {ref.name for ref in controller.domains}

    assert "Cannot write data" in lost["reason"]
    assert back["domains"] == 2
    assert names == {"failing", "healthy"}
    assert not logs.events("domain_call_failed")
    assert not [line for line in logs.lines if line["level"] == "error"]
