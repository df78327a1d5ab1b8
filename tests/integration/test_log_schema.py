"""Pin the log schema: docs/logging.md, the code and the emitted lines agree."""

import asyncio
import datetime
import re
from pathlib import Path
from typing import Any

import pytest

from balloonctl.config import Settings
from balloonctl.controller import Controller
from balloonctl.units import MIB
from tests.fakes import FakeHypervisor
from tests.integration.conftest import start_controller
from tests.logcapture import Line, LogCapture

ROOT = Path(__file__).resolve().parents[2]
LOG_CALL = re.compile(
    r"\.(?:debug|info|warning|error|log)\(\s*(?:[\w.]+,\s*)?\"([a-z]+(?:_[a-z]+)+)\"",
    re.DOTALL,
)
# Events the service must emit, with the fields every consumer relies on.
REQUIRED = {
    "controller_started": {"uri"},
    "controller_stopped": {"uri"},
    "domain_added": {"domain", "uuid"},
    "domain_removed": {"domain", "uuid"},
    "stats_period_set": {"domain", "uuid"},
    "stats_unavailable": {"domain", "uuid", "missing"},
    "memory_released": {
        "domain",
        "uuid",
        "actual_kib",
        "target_kib",
        "unused_kib",
        "released_kib",
        "dry_run",
    },
    "host_memory_low": {"available_kib", "host_warn_kib", "source"},
    "host_memory_recovered": {"available_kib", "host_warn_kib", "source"},
    "libvirt_disconnected": {"uri"},
    "libvirt_reconnected": {"uri"},
}


def documented_events() -> dict[str, set[str]]:
    """Parse the events table of docs/logging.md into name -> fields."""
    text = (ROOT / "docs" / "logging.md").read_text()
    section = text.split("## Events", 1)[1].split("\n## ", 1)[0]
    events = {}
    for row in section.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            events[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", cells[2]))
    return events


def emitted_in_code() -> set[str]:
    names = set()
    for path in (ROOT / "balloonctl").glob("*.py"):
        names.update(LOG_CALL.findall(path.read_text()))
    return names


def test_every_emitted_event_is_documented() -> None:
    assert emitted_in_code() - set(documented_events()) == set()


def test_every_documented_event_is_emitted() -> None:
    assert set(documented_events()) - emitted_in_code() == set()


def test_required_events_documented_with_their_fields() -> None:
    documented = documented_events()

    for event, fields in REQUIRED.items():
        assert event in documented
        assert fields <= documented[event], event


async def collect_lines(test_conn: Any, logs: LogCapture) -> list[Line]:
    async for running in start_controller(test_conn, logs):
        await running.create("bctl-schema")
        await running.create("bctl-schema-noballoon", balloon=False)
        await logs.wait_event("memory_released", domain="bctl-schema")
        await logs.wait_event("domain_excluded", domain="bctl-schema-noballoon")
        await logs.wait_event("host_memory_low")
        dom = test_conn.lookupByName("bctl-schema")
        await asyncio.to_thread(dom.destroy)
        await logs.wait_event("domain_removed", domain="bctl-schema")

    fake = FakeHypervisor()
    fake.add("bctl-fake")
    fake.add("bctl-fake-nodriver", reports_unused=False)
    fake.host_available = 100 * MIB
    controller = Controller(fake, Settings(uri=fake.uri, stats_period=1))
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    await logs.wait_event("host_memory_low", source="fake")
    await logs.wait_event("stats_unavailable", domain="bctl-fake-nodriver")
    fake.host_available = 4096 * MIB
    await logs.wait_event("host_memory_recovered", timeout=3)
    fake.drop_connection()
    await logs.wait_event("libvirt_reconnected", timeout=3)
    stop.set()
    await asyncio.wait_for(task, 3)
    return logs.lines


@pytest.mark.asyncio
async def test_emitted_lines_follow_schema(test_conn: Any, logs: LogCapture) -> None:
    lines = await collect_lines(test_conn, logs)
    documented = documented_events()
    seen = {line["event"] for line in lines if line.get("logger") == "balloonctl"}

    assert set(REQUIRED) <= seen
    for line in lines:
        stamp = datetime.datetime.fromisoformat(line["timestamp"])
        assert stamp.utcoffset() == datetime.timedelta(0), line
        assert line["timestamp"].endswith("Z"), line
        assert line["level"] in {"debug", "info", "warning", "error"}, line
        assert isinstance(line["event"], str), line
        if line.get("logger") != "balloonctl":
            continue
        assert line["event"] in documented, line
        assert "uri" in line, line
        assert documented[line["event"]] <= set(line), line
        if "domain" in line:
            assert "uuid" in line, line
        for key, value in line.items():
            if key.endswith("_kib") and value is not None:
                assert isinstance(value, int), line
