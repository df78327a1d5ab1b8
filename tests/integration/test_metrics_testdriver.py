"""Metrics of the real controller against libvirt's test driver, over HTTP."""

import asyncio
import dataclasses
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import libvirt
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from balloonctl.config import ListenAddress
from balloonctl.domain_policy import NAMESPACE
from balloonctl.metrics_server import MetricsExporter
from tests.integration.conftest import TEST_URI, RunningController, start_controller
from tests.logcapture import LogCapture

pytestmark = pytest.mark.asyncio


@dataclasses.dataclass(frozen=True)
class Series:
    name: str
    labels: dict[str, str]
    value: float


@dataclasses.dataclass
class Scraped:
    series: list[Series]

    def of_domain(self, uuid: str) -> dict[tuple[str, str], float]:
        """Return ``(name, status label)`` -> value for one domain's series."""
        return {
            (s.name, s.labels.get("status", "")): s.value
            for s in self.series
            if s.labels.get("uuid") == uuid
        }

    def value(self, name: str, **labels: str) -> float | None:
        for s in self.series:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return None


def fetch_metrics(port: int) -> Scraped:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return Scraped(
        [
            Series(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]
    )


@dataclasses.dataclass
class Observed:
    running: RunningController
    port: int

    async def scrape(self) -> Scraped:
        return await asyncio.to_thread(fetch_metrics, self.port)


@pytest_asyncio.fixture
async def observed(test_conn: Any, logs: LogCapture) -> AsyncIterator[Observed]:
    exporter = MetricsExporter(ListenAddress("127.0.0.1", 0))
    exporter.start()
    assert exporter.port is not None
    try:
        async for running in start_controller(
            test_conn, logs, metrics=exporter.host(TEST_URI)
        ):
            yield Observed(running, exporter.port)
    finally:
        await exporter.stop()


async def test_destroyed_domain_series_vanish(observed: Observed) -> None:
    running = observed.running
    dom = await running.create("bctl-metrics-gone")
    uuid = dom.UUIDString()
    released = await running.logs.wait_event(
        "memory_released", domain="bctl-metrics-gone"
    )
    before = await observed.scrape()

    await asyncio.to_thread(dom.destroy)
    await running.logs.wait_event("domain_removed", domain="bctl-metrics-gone")
    after = await observed.scrape()

    series = before.of_domain(uuid)
    assert series[("balloonctl_domain_target_bytes", "")] == (
        released["target_kib"] * 1024
    )
    assert series[("balloonctl_domain_status", "managed")] == 1
    assert after.of_domain(uuid) == {}
    builtin = running.conn.lookupByName("test").UUIDString()
    assert ("balloonctl_domain_status", "managed") in after.of_domain(builtin)


async def test_excluded_domain_keeps_only_status(observed: Observed) -> None:
    running = observed.running
    dom = await running.create("bctl-metrics-excluded", memory_mib=1024)
    uuid = dom.UUIDString()
    await running.logs.wait_event("memory_released", domain="bctl-metrics-excluded")
    managed_before = (await observed.scrape()).value(
        "balloonctl_managed_domains", host=TEST_URI
    )

    await asyncio.to_thread(
        dom.setMetadata,
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        '<policy managed="no"/>',
        "bctl",
        NAMESPACE,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    await running.logs.wait_event("domain_excluded", domain="bctl-metrics-excluded")
    scraped = await observed.scrape()

    series = scraped.of_domain(uuid)
    assert {name for name, _ in series} == {"balloonctl_domain_status"}
    assert series[("balloonctl_domain_status", "excluded")] == 1
    assert series[("balloonctl_domain_status", "managed")] == 0
    managed_after = scraped.value("balloonctl_managed_domains", host=TEST_URI)
    assert managed_before is not None
    assert managed_after == managed_before - 1


async def test_domain_without_balloon_has_no_figures(observed: Observed) -> None:
    running = observed.running
    dom = await running.create("bctl-metrics-noballoon", balloon=False)
    await running.logs.wait_event("domain_excluded", domain="bctl-metrics-noballoon")

    series = (await observed.scrape()).of_domain(dom.UUIDString())

    assert {name for name, _ in series} == {"balloonctl_domain_status"}
    assert series[("balloonctl_domain_status", "excluded")] == 1


async def test_stopped_controller_leaves_no_host_series(
    test_conn: Any, logs: LogCapture
) -> None:
    exporter = MetricsExporter(ListenAddress("127.0.0.1", 0))
    exporter.start()
    assert exporter.port is not None
    try:
        async for running in start_controller(
            test_conn, logs, metrics=exporter.host(TEST_URI)
        ):
            await running.logs.wait_event("memory_released", domain="test")
            during = await asyncio.to_thread(fetch_metrics, exporter.port)
        after = await asyncio.to_thread(fetch_metrics, exporter.port)
    finally:
        await exporter.stop()

    assert during.value("balloonctl_libvirt_up", host=TEST_URI) == 1
    assert during.value("balloonctl_last_decision_timestamp_seconds", host=TEST_URI)
    assert [s for s in after.series if "host" in s.labels] == []
    assert after.value("balloonctl_build_info") == 1


async def test_paused_domain_keeps_figures(observed: Observed) -> None:
    running = observed.running
    dom = await running.create("bctl-metrics-paused", memory_mib=1024)
    uuid = dom.UUIDString()
    await running.logs.wait_event("memory_released", domain="bctl-metrics-paused")
    managed_before = (await observed.scrape()).value(
        "balloonctl_managed_domains", host=TEST_URI
    )

    await asyncio.to_thread(dom.suspend)
    await running.logs.wait_event("domain_paused", domain="bctl-metrics-paused")
    paused = await observed.scrape()
    await asyncio.to_thread(dom.resume)
    await running.logs.wait_event("domain_resumed", domain="bctl-metrics-paused")
    # The status changes with the first sample after the resume.
    async with asyncio.timeout(5):
        while True:
            resumed = await observed.scrape()
            if resumed.of_domain(uuid)[("balloonctl_domain_status", "paused")] == 0:
                break
            await asyncio.sleep(0.1)

    series = paused.of_domain(uuid)
    assert series[("balloonctl_domain_status", "paused")] == 1
    assert series[("balloonctl_domain_status", "managed")] == 0
    assert ("balloonctl_domain_actual_bytes", "") in series
    managed_paused = paused.value("balloonctl_managed_domains", host=TEST_URI)
    assert managed_before is not None
    assert managed_paused == managed_before - 1
    assert resumed.of_domain(uuid)[("balloonctl_domain_status", "managed")] == 1
