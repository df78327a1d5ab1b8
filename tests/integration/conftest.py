"""Run the real controller in this process against libvirt's test driver.

``test:///default`` is libvirt's built-in test hypervisor. All connections a
process opens to it share one state, so a test creates domains through its
own connection while the controller, in the same event loop, receives their
lifecycle events. The state is discarded when the last connection closes.
"""

import asyncio
import dataclasses
import tempfile
import uuid
from collections.abc import AsyncIterator
from typing import Any

import libvirt
import pytest
import pytest_asyncio

from balloonctl.config import Settings
from balloonctl.controller import Controller
from balloonctl.libvirt_adapter import LibvirtHypervisor, register_event_loop
from balloonctl.metrics import NO_METRICS, HostMetrics
from balloonctl.units import MIB
from tests.logcapture import LogCapture

TEST_URI = "test:///default"


def domain_xml(name: str, memory_mib: int, *, balloon: bool = True) -> str:
    device = "<memballoon model='virtio'/>" if balloon else "<memballoon model='none'/>"
    return f"""
<domain type='test'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <currentMemory unit='MiB'>{memory_mib}</currentMemory>
  <os><type>hvm</type></os>
  <devices>{device}</devices>
</domain>"""


@dataclasses.dataclass
class RunningController:
    controller: Controller
    hypervisor: LibvirtHypervisor
    conn: Any
    logs: LogCapture

    async def create(self, name: str, memory_mib: int = 512, **kwargs: Any) -> Any:
        xml = domain_xml(name, memory_mib, **kwargs)
        return await asyncio.to_thread(self.conn.createXML, xml, 0)


@pytest_asyncio.fixture
async def test_conn() -> AsyncIterator[Any]:
    """The test's own connection to the shared test driver."""
    register_event_loop()
    conn = await asyncio.to_thread(libvirt.open, TEST_URI)
    yield conn
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        if dom.name() != "test":
            dom.destroy()
    conn.close()


async def start_controller(
    conn: Any, logs: LogCapture, metrics: HostMetrics = NO_METRICS, **overrides: Any
) -> AsyncIterator[RunningController]:
    base = Settings(
        uri=TEST_URI,
        stats_period=1,
        call_timeout=5.0,
        state_dir=tempfile.mkdtemp(prefix="bctl-state-"),
    )
    settings = dataclasses.replace(base, **overrides)
    hypervisor = LibvirtHypervisor(settings.uri, call_timeout=settings.call_timeout)
    controller = Controller(hypervisor, settings, metrics=metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    await logs.wait_event("controller_started")
    try:
        yield RunningController(controller, hypervisor, conn, logs)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        hypervisor.shutdown_threads()


@pytest_asyncio.fixture
async def running(test_conn: Any, logs: LogCapture) -> AsyncIterator[RunningController]:
    async for running in start_controller(test_conn, logs):
        yield running


# The built-in domain's maximum is 8 GiB, so the default floor (10 % of the
# maximum) would stop it at 819 MiB; tests of the buffer rule lower the floor.
LOW_FLOOR = {"floor_min": 64 * MIB, "floor_percent": 0.0}


@pytest.fixture
def small_builtin(test_conn: Any) -> Any:
    """The built-in domain, lowered to 400 MiB so that it converges quickly."""
    dom = test_conn.lookupByName("test")
    dom.setMemoryFlags(400 * MIB, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return dom
