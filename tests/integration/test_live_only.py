"""Only live values are changed: every write the adapter makes is AFFECT_LIVE.

A persistent domain on the test driver keeps its own inactive XML, so a
write without VIR_DOMAIN_AFFECT_LIVE (or with AFFECT_CONFIG) would show in
its currentMemory there. The test also records the flags of every write
call on libvirt's virDomain class and fails on any other mutator.
"""

import asyncio
import re
from typing import Any

import libvirt
import pytest

from tests.integration.conftest import domain_xml, start_controller
from tests.logcapture import LogCapture

pytestmark = pytest.mark.asyncio

# virDomain methods that change a domain; the adapter may call only the
# first two, and only with AFFECT_LIVE.
ALLOWED_WRITES = ("setMemoryFlags", "setMemoryStatsPeriod")
FORBIDDEN_WRITES = (
    "setMemory",
    "setMaxMemory",
    "setMemoryParameters",
    "setMetadata",
    "setVcpus",
    "setVcpusFlags",
    "setAutostart",
    "undefine",
    "undefineFlags",
    "destroy",
    "shutdown",
    "suspend",
    "resume",
)


def current_memory_kib(xml: str) -> int:
    match = re.search(r"<currentMemory unit='KiB'>(\d+)</currentMemory>", xml)
    assert match is not None, xml
    return int(match.group(1))


async def test_writes_are_live_only(
    test_conn: Any, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []

    def recording(name: str) -> Any:
        original = getattr(libvirt.virDomain, name)

        def wrapper(self: Any, value: int, flags: int = 0) -> Any:
            calls.append((name, flags))
            return original(self, value, flags)

        return wrapper

    def forbidden(name: str) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append((name, -1))
            raise AssertionError(f"balloonctl called virDomain.{name}")

        return wrapper

    dom = await asyncio.to_thread(test_conn.defineXML, domain_xml("bctl-live", 1024))
    await asyncio.to_thread(dom.create)
    try:
        for name in ALLOWED_WRITES:
            monkeypatch.setattr(libvirt.virDomain, name, recording(name))
        for name in FORBIDDEN_WRITES:
            monkeypatch.setattr(libvirt.virDomain, name, forbidden(name))
        async for _running in start_controller(test_conn, logs):
            for _ in range(3):
                await logs.wait_event(
                    "memory_released",
                    domain="bctl-live",
                    actual_kib=current_memory_kib(dom.XMLDesc(0)),
                )
        monkeypatch.undo()
        inactive = await asyncio.to_thread(dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE)
        live = await asyncio.to_thread(dom.XMLDesc, 0)
    finally:
        monkeypatch.undo()
        await asyncio.to_thread(dom.destroy)
        await asyncio.to_thread(dom.undefine)

    writes = {name for name, _flags in calls}
    assert "setMemoryFlags" in writes
    assert "setMemoryStatsPeriod" in writes
    assert all(flags == libvirt.VIR_DOMAIN_AFFECT_LIVE for _name, flags in calls)
    assert current_memory_kib(inactive) == 1024 * 1024
    assert current_memory_kib(live) <= 1024 * 1024 - 3 * 50 * 1024
