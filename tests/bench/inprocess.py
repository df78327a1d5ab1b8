"""The real controller and libvirt adapter in this process, on ``test:///default``.

All connections one process opens to ``test:///default`` share one state,
so the benchmark creates domains through its own connection while the
controller, in the same event loop, receives their lifecycle events. Log
lines are balloonctl's real structlog JSON output, parsed as they are
written; their ``timestamp`` field has microseconds.
"""

import asyncio
import contextlib
import dataclasses
import datetime
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import libvirt

from balloonctl.config import Settings
from balloonctl.controller import Controller
from balloonctl.libvirt_adapter import LibvirtHypervisor, register_event_loop
from tests.bench.testdriver import domain_xml
from tests.logcapture import LogCapture, capture_logs

TEST_URI = "test:///default"


def log_time(line: dict[str, Any]) -> float:
    """Return a log line's timestamp as seconds since the epoch."""
    return datetime.datetime.fromisoformat(line["timestamp"]).timestamp()


@dataclasses.dataclass
class Running:
    controller: Controller
    hypervisor: LibvirtHypervisor
    conn: Any
    logs: LogCapture


@contextlib.asynccontextmanager
async def connection() -> AsyncIterator[Any]:
    """The benchmark's own connection; destroys what it created on exit."""
    register_event_loop()
    conn = await asyncio.to_thread(libvirt.open, TEST_URI)
    try:
        yield conn
    finally:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            if dom.name() != "test":
                dom.destroy()
        conn.close()


async def create_domains(
    conn: Any, prefix: str, count: int, **memory: int
) -> list[Any]:
    domains = []
    for index in range(count):
        xml = domain_xml(f"{prefix}-{index:05d}", **memory)
        domains.append(await asyncio.to_thread(conn.createXML, xml, 0))
    return domains


@contextlib.asynccontextmanager
async def controller(
    conn: Any,
    expected_domains: int,
    *,
    period: int = 1,
    hypervisor: LibvirtHypervisor | None = None,
    level: str = "info",
) -> AsyncIterator[Running]:
    """Run the controller until every existing domain had its first decision."""
    logs = capture_logs(level)
    settings = Settings(
        uri=TEST_URI,
        stats_period=period,
        state_dir=tempfile.mkdtemp(prefix="bench-state-"),
    )
    hv = hypervisor or LibvirtHypervisor(TEST_URI, call_timeout=settings.call_timeout)
    ctl = Controller(hv, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(ctl.run(stop))
    try:
        await logs.wait_event("controller_started", timeout=120)
        # The built-in domain "test" is managed too.
        await wait_decisions(logs, expected_domains + 1, timeout=120)
        yield Running(ctl, hv, conn, logs)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        hv.shutdown_threads()


DECISIONS = {"memory_kept", "memory_released", "memory_granted", "stats_invalid"}


async def wait_decisions(logs: LogCapture, count: int, timeout: float) -> None:
    """Wait until ``count`` different domains have had a decision logged."""
    decided: set[str] = set()

    def enough(line: dict[str, Any]) -> bool:
        if line["event"] in DECISIONS:
            decided.add(line["uuid"])
        return len(decided) >= count

    await logs.wait_for(enough, timeout)
