"""Soak under churn: domains created and destroyed for a bounded time.

The real controller and libvirt adapter run in this process against the
test driver, as in the other integration tests, while this test creates
SOAK_DOMAINS domains over SOAK_SECONDS seconds with at most SOAK_IN_FLIGHT
running at once. The defaults (500 domains, 60 s, 20 in flight) keep the
test in every run; `make soak` raises them.

What must hold afterwards: every created domain was added and every
destroyed one removed (from the parsed log lines), nothing was logged at
error level, the controller has one task per live domain and keeps no
state for the others, the event queue stayed short, and the Python heap
(tracemalloc) stopped growing once the number of live domains was steady.
"""

import asyncio
import gc
import io
import json
import os
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import libvirt
import pytest

from balloonctl.config import Settings
from balloonctl.controller import Controller
from balloonctl.domain import DomainMemory, DomainWorker
from balloonctl.libvirt_adapter import LibvirtHypervisor
from balloonctl.logs import configure_logging
from tests.integration.conftest import TEST_URI, domain_xml

pytestmark = [pytest.mark.asyncio, pytest.mark.soak]

SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
DOMAINS = int(os.environ.get("SOAK_DOMAINS", "500"))
IN_FLIGHT = int(os.environ.get("SOAK_IN_FLIGHT", "20"))
# Over the second half of the churn the number of live domains is steady,
# so the Python heap (tracemalloc) may grow only by what this test keeps
# per domain: four uuid strings in its lists and sets, about 0.5 KiB, and
# 256 KiB for allocator and set-resizing noise. A leaked worker with its
# task, history and bound logger is several KiB and is also caught by
# counting the per-domain objects directly.
BOOKKEEPING_PER_DOMAIN = 1024
HEAP_NOISE = 256 * 1024
# Domains created or destroyed whose events are still in transit.
OBJECTS_IN_TRANSIT = 10
# The queue is drained by the main task as fast as events arrive; a depth
# beyond this means events pile up.
MAX_QUEUE_DEPTH = 200


class CountingSink(io.TextIOBase):
    """Parse each JSON log line and keep only what the soak checks need."""

    def __init__(self) -> None:
        self.added: set[str] = set()
        self.removed: set[str] = set()
        self.error_lines: list[dict[str, Any]] = []
        self.warnings: list[dict[str, Any]] = []
        self.started = asyncio.Event()
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        *complete, self._buffer = self._buffer.split("\n")
        for raw in complete:
            if raw.strip():
                self._take(json.loads(raw))
        return len(text)

    def _take(self, line: dict[str, Any]) -> None:
        event = line["event"]
        if event == "domain_added":
            self.added.add(line["uuid"])
        elif event == "domain_removed":
            self.removed.add(line["uuid"])
        elif event == "controller_started":
            self.started.set()
        if line["level"] == "error" and len(self.error_lines) < 20:
            self.error_lines.append(line)
        if line["level"] == "warning" and len(self.warnings) < 20:
            self.warnings.append(line)

    def isatty(self) -> bool:
        return False


def rss_kib() -> int:
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1])
    return 0


class Samples:
    """Figures sampled while the churn runs."""

    def __init__(self) -> None:
        self.queue_depth: list[int] = []
        self.heap: list[tuple[float, int]] = []
        self.rss: list[int] = []
        self.objects: list[int] = []


def domain_objects() -> int:
    """Count the live objects that balloonctl keeps per domain."""
    kinds = (DomainWorker, DomainMemory, libvirt.virDomain)
    return sum(1 for item in gc.get_objects() if isinstance(item, kinds))


async def sample_forever(
    controller: Controller, samples: Samples, start: float
) -> None:
    # The heap is measured at each tenth of the second half of the churn,
    # when the number of live domains is steady at IN_FLIGHT.
    checkpoints = [SECONDS * (5 + n) / 10 for n in range(6)]
    while True:
        samples.queue_depth.append(controller.queue_depth())
        samples.rss.append(rss_kib())
        elapsed = time.monotonic() - start
        if checkpoints and elapsed >= checkpoints[0]:
            checkpoints.pop(0)
            samples.heap.append((elapsed, tracemalloc.get_traced_memory()[0]))
            samples.objects.append(domain_objects())
        await asyncio.sleep(0.1)


async def churn(conn: Any, created: list[str], destroyed: list[str]) -> None:
    """Create DOMAINS domains at an even rate, keeping IN_FLIGHT running."""
    interval = SECONDS / DOMAINS
    start = time.monotonic()
    live: list[Any] = []
    for index in range(DOMAINS):
        xml = domain_xml(f"bctl-soak-{index}", 256)
        dom = await asyncio.to_thread(conn.createXML, xml, 0)
        created.append(dom.UUIDString())
        live.append(dom)
        if len(live) > IN_FLIGHT:
            oldest = live.pop(0)
            await asyncio.to_thread(oldest.destroy)
            destroyed.append(oldest.UUIDString())
        delay = start + (index + 1) * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    for dom in live:
        await asyncio.to_thread(dom.destroy)
        destroyed.append(dom.UUIDString())


async def test_soak_under_churn(test_conn: Any) -> None:
    sink = CountingSink()
    # Info, not debug: the soak is about the controller, and repeats at
    # debug would make the parsing the larger cost.
    configure_logging("json", "info", sink)
    settings = Settings(
        uri=TEST_URI,
        stats_period=1,
        call_timeout=5.0,
        host_warn=0,
        state_dir=tempfile.mkdtemp(prefix="bctl-soak-"),
    )
    hypervisor = LibvirtHypervisor(TEST_URI, call_timeout=settings.call_timeout)
    controller = Controller(hypervisor, settings)
    stop = asyncio.Event()
    run = asyncio.create_task(controller.run(stop))
    created: list[str] = []
    destroyed: list[str] = []
    samples = Samples()
    tracemalloc.start()
    try:
        async with asyncio.timeout(10):
            await sink.started.wait()
        # Other tests in the same process may still hold workers or
        # handles, so the per-domain objects are counted from this baseline.
        baseline = domain_objects()
        start = time.monotonic()
        sampler = asyncio.create_task(sample_forever(controller, samples, start))
        await churn(test_conn, created, destroyed)
        elapsed = time.monotonic() - start
        sampler.cancel()

        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
        live = {dom.UUIDString() for dom in test_conn.listAllDomains(flags)}
        # The stopped events of the last domains may still be on their way.
        for _ in range(100):
            if not set(destroyed) - sink.removed:
                break
            await asyncio.sleep(0.1)
        tasks = controller.task_count()
        remembered = set(controller._memory)
        handles = set(hypervisor._domains)
    finally:
        tracemalloc.stop()
        stop.set()
        await asyncio.wait_for(run, 10)
        hypervisor.shutdown_threads()

    heap = [size for _at, size in samples.heap]
    growth = max(heap) - heap[0]
    churned = DOMAINS * (samples.heap[-1][0] - samples.heap[0][0]) / SECONDS
    print(
        f"\nsoak: {len(created)} domains created, {len(destroyed)} destroyed in "
        f"{elapsed:.0f} s, {IN_FLIGHT} in flight; max queue depth "
        f"{max(samples.queue_depth)}; heap over the second half "
        f"{' '.join(f'{size // 1024}' for size in heap)} KiB (growth "
        f"{growth // 1024} KiB over {churned:.0f} domains); per-domain objects "
        f"{' '.join(map(str, samples.objects))} (from {baseline}); "
        f"RSS {samples.rss[0] / 1024:.1f} MiB at start, "
        f"{samples.rss[-1] / 1024:.1f} MiB at end"
    )
    assert len(created) == DOMAINS
    assert set(created) - sink.added == set()
    assert set(destroyed) - sink.removed == set()
    assert sink.error_lines == []
    assert sink.warnings == []
    assert tasks == len(live)
    assert remembered <= live
    assert handles <= live
    assert max(samples.queue_depth) <= MAX_QUEUE_DEPTH
    assert len(heap) >= 5
    assert growth <= HEAP_NOISE + churned * BOOKKEEPING_PER_DOMAIN
    # Each live domain has a worker, its memory and two libvirt handles
    # (the test's own and the adapter's), and the count stays flat.
    assert max(samples.objects) <= baseline + 4 * IN_FLIGHT + OBJECTS_IN_TRANSIT
    assert max(samples.objects) - samples.objects[0] <= OBJECTS_IN_TRANSIT
