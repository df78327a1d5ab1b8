"""The controller against libvirt's test driver: events, registry, releases."""

import asyncio
import datetime
import json
from pathlib import Path
from typing import Any

import libvirt
import pytest

from balloonctl.domain_policy import NAMESPACE
from balloonctl.units import MIB
from tests.integration.conftest import (
    LOW_FLOOR,
    TEST_URI,
    RunningController,
    domain_xml,
    start_controller,
)
from tests.logcapture import LogCapture

pytestmark = pytest.mark.asyncio


def log_time(line: dict[str, Any]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(line["timestamp"])


async def test_started_domain_added_within_100ms(running: RunningController) -> None:
    before = datetime.datetime.now(datetime.UTC)
    dom = await running.create("bctl-started")

    added = await running.logs.wait_event("domain_added", domain="bctl-started")
    period = await running.logs.wait_event("stats_period_set", domain="bctl-started")

    assert added["uuid"] == dom.UUIDString()
    assert (log_time(added) - before).total_seconds() < 0.1
    assert period["period_s"] == 1
    assert dom.UUIDString() in {ref.uuid for ref in running.controller.domains}


async def test_destroyed_domain_removed_and_task_ends(
    running: RunningController,
) -> None:
    dom = await running.create("bctl-destroyed")
    await running.logs.wait_event("stats_period_set", domain="bctl-destroyed")
    tasks_before = running.controller.task_count()

    await asyncio.to_thread(dom.destroy)
    removed = await running.logs.wait_event("domain_removed", domain="bctl-destroyed")
    await asyncio.sleep(0.05)

    assert removed["uuid"] == dom.UUIDString()
    assert dom.UUIDString() not in {ref.uuid for ref in running.controller.domains}
    assert running.controller.task_count() == tasks_before - 1
    assert not running.logs.events("domain_call_failed")


async def test_builtin_domain_shrinks_in_steps_to_buffer(
    small_builtin: Any, test_conn: Any, logs: LogCapture
) -> None:
    async for _running in start_controller(test_conn, logs, **LOW_FLOOR):
        kept = await logs.wait_event(
            "memory_kept", domain="test", timeout=30, reason="release_below_min_release"
        )

    releases = logs.events("memory_released", domain="test")
    assert len(releases) >= 5
    for line in releases:
        assert 0 < line["released_kib"] <= 50 * MIB
        assert line["actual_kib"] - line["target_kib"] == line["released_kib"]
        assert line["unused_kib"] - line["released_kib"] >= 100 * MIB
    assert [line["target_kib"] for line in releases] == sorted(
        (line["target_kib"] for line in releases), reverse=True
    )
    actual = small_builtin.memoryStats()["actual"]
    unused = small_builtin.memoryStats()["unused"]
    assert actual == releases[-1]["target_kib"]
    assert 100 * MIB <= unused < 101 * MIB
    assert kept["unused_kib"] == unused


async def test_dry_run_changes_nothing(
    small_builtin: Any, test_conn: Any, logs: LogCapture
) -> None:
    async for _running in start_controller(test_conn, logs, dry_run=True, **LOW_FLOOR):
        release = await logs.wait_event("memory_released", domain="test")
        # Long enough for a real request to count as stuck (three periods to
        # settle, three more without progress).
        await asyncio.sleep(7)

    assert release["dry_run"] is True
    assert not logs.events("balloon_stuck")
    assert len(logs.events("memory_released", domain="test")) >= 5
    assert small_builtin.memoryStats()["actual"] == 400 * MIB
    assert logs.events("stats_period_unchanged", domain="test")
    assert not logs.events("stats_period_set")


async def test_domain_without_balloon_is_excluded(
    running: RunningController,
) -> None:
    dom = await running.create("bctl-noballoon", balloon=False)

    excluded = await running.logs.wait_event("domain_excluded", domain="bctl-noballoon")
    await asyncio.sleep(2.5)

    assert excluded["reason"] == "memballoon model is none"
    assert len(running.logs.events("domain_excluded", domain="bctl-noballoon")) == 1
    assert not running.logs.events("memory_released", domain="bctl-noballoon")
    assert not running.logs.events("stats_period_set", domain="bctl-noballoon")
    assert dom.info()[2] == 512 * 1024


async def test_paused_domain_left_alone_until_resumed(
    running: RunningController,
) -> None:
    dom = await running.create("bctl-paused", memory_mib=1024)
    await running.logs.wait_event("memory_released", domain="bctl-paused")
    await asyncio.to_thread(dom.suspend)
    await running.logs.wait_event("domain_paused", domain="bctl-paused")
    actual_paused = dom.memoryStats()["actual"]

    await asyncio.sleep(2.5)
    assert dom.memoryStats()["actual"] == actual_paused

    await asyncio.to_thread(dom.resume)
    await running.logs.wait_event("domain_resumed", domain="bctl-paused")
    await running.logs.wait_for(
        lambda line: (
            line["event"] == "memory_released"
            and line["domain"] == "bctl-paused"
            and line["actual_kib"] == actual_paused
        )
    )


async def test_domains_active_at_start_are_managed(
    test_conn: Any, logs: LogCapture
) -> None:
    dom = await asyncio.to_thread(
        test_conn.createXML,
        "<domain type='test'><name>bctl-early</name><memory unit='MiB'>256</memory>"
        "<os><type>hvm</type></os><devices><memballoon model='virtio'/></devices>"
        "</domain>",
        0,
    )

    async for running in start_controller(test_conn, logs):
        started = logs.events("controller_started")[0]
        assert dom.UUIDString() in {ref.uuid for ref in running.controller.domains}
        assert started["domains"] == 2

    assert logs.events("domain_added", domain="bctl-early")
    assert logs.events("controller_stopped")


async def test_unreachable_uri_raises_connect_failed(logs: LogCapture) -> None:
    from balloonctl.config import Settings
    from balloonctl.controller import ConnectFailed, Controller
    from balloonctl.libvirt_adapter import LibvirtHypervisor

    hypervisor = LibvirtHypervisor("test:///nonexistent/file.xml")
    controller = Controller(hypervisor, Settings(uri=hypervisor.uri))

    with pytest.raises(ConnectFailed) as info:
        await controller.run(asyncio.Event())
    hypervisor.shutdown_threads()

    assert "nonexistent" in str(info.value)
    assert libvirt.VIR_ERR_NO_DOMAIN  # the module is usable after a failure


async def test_stop_is_never_lost_while_calls_complete(
    test_conn: Any, logs: LogCapture
) -> None:
    # Python 3.11's wait_for could drop a cancellation that arrived just as
    # the awaited call finished, which left the shutdown waiting forever. The
    # test driver returns at once, so stopping right after the first call
    # hits that window often.
    for _ in range(20):
        logs.lines.clear()
        async for _running in start_controller(test_conn, logs):
            await logs.wait_event("stats_period_set", domain="test")
        assert logs.events("controller_stopped")


async def test_metadata_change_is_applied_live(running: RunningController) -> None:
    dom = await running.create("bctl-metadata", memory_mib=1024)
    await running.logs.wait_event("memory_released", domain="bctl-metadata")

    await asyncio.to_thread(
        dom.setMetadata,
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        '<policy managed="no"/>',
        "bctl",
        NAMESPACE,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    excluded = await running.logs.wait_event("domain_excluded", domain="bctl-metadata")
    actual = dom.memoryStats()["actual"]
    await asyncio.sleep(2.5)
    unchanged = dom.memoryStats()["actual"]

    await asyncio.to_thread(
        dom.setMetadata,
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        "<policy><min_unused>300 MiB</min_unused></policy>",
        "bctl",
        NAMESPACE,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    applied = await running.logs.wait_for(
        lambda line: (
            line["event"] == "policy_applied"
            and line.get("domain") == "bctl-metadata"
            and line["min_unused_kib"] == 300 * MIB
        )
    )

    assert "metadata" in excluded["reason"]
    assert unchanged == actual
    assert applied["sources"] == ["metadata"]


async def test_invalid_metadata_leaves_only_that_domain_unmanaged(
    running: RunningController,
) -> None:
    bad = await running.create("bctl-bad-policy")
    await asyncio.to_thread(
        bad.setMetadata,
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        "<policy><max_release>fast</max_release></policy>",
        "bctl",
        NAMESPACE,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    invalid = await running.logs.wait_event("policy_invalid", domain="bctl-bad-policy")
    good = await running.create("bctl-good-policy")
    await running.logs.wait_event("memory_released", domain="bctl-good-policy")

    assert invalid["field"] == "max_release"
    assert invalid["value"] == "fast"
    assert not [line for line in running.logs.lines if line["level"] == "error"]
    assert good.UUIDString() in {ref.uuid for ref in running.controller.domains}


async def test_redefined_domain_policy_is_read_again(
    running: RunningController,
) -> None:
    xml = domain_xml("bctl-redefined", 1024)
    dom = await asyncio.to_thread(running.conn.defineXML, xml)
    try:
        await asyncio.to_thread(dom.create)
        await running.logs.wait_event("memory_released", domain="bctl-redefined")

        policy = f"<b:policy xmlns:b='{NAMESPACE}' managed='no'/>"
        redefined = xml.replace("<devices>", f"<metadata>{policy}</metadata><devices>")
        await asyncio.to_thread(running.conn.defineXML, redefined)
        excluded = await running.logs.wait_event(
            "domain_excluded", domain="bctl-redefined"
        )
    finally:
        await asyncio.to_thread(dom.destroy)
        await asyncio.to_thread(dom.undefine)

    assert "metadata" in excluded["reason"]


async def test_state_file_reports_grace_to_plan(
    test_conn: Any, logs: LogCapture, tmp_path: Path
) -> None:
    from balloonctl.config import Settings
    from balloonctl.plan import make_plan
    from balloonctl.state import state_path

    dom = test_conn.lookupByName("test")
    async for running in start_controller(test_conn, logs, state_dir=str(tmp_path)):
        await logs.wait_event("memory_released", domain="test")
        await asyncio.sleep(1.2)
        # A change balloonctl did not request, as an operator's setmem.
        await asyncio.to_thread(
            dom.setMemoryFlags, 1536 * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE
        )
        await logs.wait_event("manual_change_detected", domain="test")
        await asyncio.sleep(1.5)
        document = json.loads(state_path(str(tmp_path), TEST_URI).read_text())

        settings = Settings(uri=TEST_URI, state_dir=str(tmp_path))
        rows, _host = await make_plan(running.hypervisor, settings)

    (row,) = [row for row in rows if row.domain.name == "test"]
    assert document["domains"][dom.UUIDString()]["status"] == "grace"
    assert row.status == "grace"
    assert row.action == "keep"
    assert "reported by balloonctl run" in row.reason
    assert not state_path(str(tmp_path), TEST_URI).exists()
