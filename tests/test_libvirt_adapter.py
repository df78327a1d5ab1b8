"""The libvirt adapter's call wrapper: timeouts and calls stuck in a thread."""

import threading

import pytest

from balloonctl.errors import CallStillRunning, CallTimedOut
from balloonctl.libvirt_adapter import LibvirtHypervisor

pytestmark = pytest.mark.asyncio


async def test_call_behind_stuck_call_is_skipped() -> None:
    hypervisor = LibvirtHypervisor("test:///default", call_timeout=0.05)
    release = threading.Event()
    try:
        with pytest.raises(CallTimedOut) as first:
            await hypervisor._call("memoryStats", release.wait, key="uuid-1")
        with pytest.raises(CallStillRunning):
            await hypervisor._call("info", lambda: 1, key="uuid-1")
        other = await hypervisor._call("info", lambda: 2, key="uuid-2")
    finally:
        release.set()
        hypervisor.shutdown_threads()

    assert not isinstance(first.value, CallStillRunning)
    assert other == 2
