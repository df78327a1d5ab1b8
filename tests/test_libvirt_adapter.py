"""The libvirt adapter's call wrapper and its event-loop implementation."""

import asyncio
import threading
import time

import pytest

from balloonctl.errors import CallStillRunning, CallTimedOut
from balloonctl.libvirt_adapter import EventLoopImpl, LibvirtHypervisor


@pytest.mark.asyncio
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


def test_event_impl_ignores_calls_after_loop_closed() -> None:
    # Not registered with libvirt, which takes one implementation per process.
    loop = asyncio.new_event_loop()
    impl = EventLoopImpl(loop)
    timer = loop.run_until_complete(_add_timer(impl))
    loop.close()

    impl._update_timeout(timer, 0)
    assert impl._remove_timeout(timer) == -1
    assert impl._add_timeout(0, _ignore_timer, None) == -1


def test_event_impl_wakes_loop_for_other_thread() -> None:
    loop = asyncio.new_event_loop()
    impl = EventLoopImpl(loop)
    fired = asyncio.Event()

    def on_timer(_timer: int, _opaque: object) -> None:
        fired.set()

    timers: list[int] = []

    def add_once_loop_waits() -> None:
        time.sleep(0.5)
        timers.append(impl._add_timeout(0, on_timer, None))

    async def add_from_thread_and_wait() -> None:
        # Nothing else wakes this loop: without the wake-up the timer task,
        # scheduled from the thread, would run only when wait_for gives up.
        thread = threading.Thread(target=add_once_loop_waits)
        thread.start()
        await asyncio.wait_for(fired.wait(), 30)
        thread.join()
        # Stop the repeating timer so that no task is pending at close.
        impl._update_timeout(timers[0], -1)
        await asyncio.sleep(0)

    try:
        loop.run_until_complete(add_from_thread_and_wait())
    finally:
        loop.close()

    assert fired.is_set()


async def _add_timer(impl: EventLoopImpl) -> int:
    timer: int = impl._add_timeout(-1, _ignore_timer, None)
    return timer


def _ignore_timer(_timer: int, _opaque: object) -> None:
    pass


@pytest.mark.asyncio
async def test_close_waits_for_nearly_finished_call() -> None:
    hypervisor = LibvirtHypervisor("test:///default", call_timeout=0.05)
    try:
        with pytest.raises(CallTimedOut):
            await hypervisor._call("memoryStats", lambda: time.sleep(0.2), key="u")
        assert hypervisor.busy_calls() == 1
        await hypervisor.close()
        busy_after_close = hypervisor.busy_calls()
    finally:
        hypervisor.shutdown_threads()

    assert busy_after_close == 0
