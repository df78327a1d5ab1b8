"""libvirt errors through the adapter: each class maps onto the seam's errors.

Where the test driver can raise the error for real (a missing or stopped
domain, a closed connection, an unsupported call), the test triggers it.
The rest (a timeout, a broken RPC socket) cannot be produced on demand, so
those tests build a real ``libvirt.libvirtError`` and set its ``err`` tuple
as libvirt-python does from ``virGetLastError``.
"""

import asyncio
import time
import uuid
from typing import Any

import libvirt
import pytest

from balloonctl.errors import (
    CallTimedOut,
    Disconnected,
    DomainGone,
    DomainNotRunning,
    HypervisorError,
    Unsupported,
)
from balloonctl.hypervisor import DomainRef
from balloonctl.libvirt_adapter import LibvirtHypervisor, translate
from tests.integration.conftest import TEST_URI, domain_xml

pytestmark = pytest.mark.asyncio


def libvirt_error(code: int, domain: int, message: str) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    # The layout of virErrorPtr as libvirt-python exposes it: code, domain,
    # message, level, str1, str2, str3, int1, int2.
    exc.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return exc


@pytest.mark.parametrize(
    ("code", "domain", "message", "expected"),
    [
        (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "no domain", DomainGone),
        (
            libvirt.VIR_ERR_OPERATION_INVALID,
            libvirt.VIR_FROM_QEMU,
            "Requested operation is not valid: domain is not running",
            DomainNotRunning,
        ),
        (
            libvirt.VIR_ERR_OPERATION_TIMEOUT,
            libvirt.VIR_FROM_QEMU,
            "Timed out during operation: cannot acquire state change lock",
            CallTimedOut,
        ),
        (
            libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
            libvirt.VIR_FROM_QEMU,
            "Guest agent is not responding",
            CallTimedOut,
        ),
        (
            libvirt.VIR_ERR_SYSTEM_ERROR,
            libvirt.VIR_FROM_RPC,
            "Cannot write data: Broken pipe",
            Disconnected,
        ),
        (
            libvirt.VIR_ERR_INTERNAL_ERROR,
            libvirt.VIR_FROM_RPC,
            "internal error: client socket is closed",
            Disconnected,
        ),
        (libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_FROM_NONE, "closed", Disconnected),
        (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_NONE, "no conn", Disconnected),
        (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_FROM_NONE, "unsupported", Unsupported),
        (
            libvirt.VIR_ERR_INTERNAL_ERROR,
            libvirt.VIR_FROM_QEMU,
            "internal error: unable to execute QEMU command 'balloon'",
            HypervisorError,
        ),
        (
            libvirt.VIR_ERR_OPERATION_INVALID,
            libvirt.VIR_FROM_QEMU,
            "Requested operation is not valid: domain has no balloon",
            HypervisorError,
        ),
    ],
)
async def test_error_class_translated(
    code: int, domain: int, message: str, expected: type[HypervisorError]
) -> None:
    translated = translate(libvirt_error(code, domain, message), "memoryStats")

    assert type(translated) is expected
    assert translated.code == code
    assert message in str(translated)
    assert str(translated).startswith("memoryStats failed")


@pytest.fixture
def adapter() -> Any:
    hypervisor = LibvirtHypervisor(TEST_URI, call_timeout=5.0)
    yield hypervisor
    hypervisor.shutdown_threads()


async def test_missing_domain_is_gone(adapter: LibvirtHypervisor) -> None:
    await adapter.connect(None)
    try:
        ref = DomainRef(uuid=str(uuid.uuid4()), name="bctl-missing")

        with pytest.raises(DomainGone) as info:
            await adapter.domain_info(ref)
    finally:
        await adapter.close()

    assert info.value.code == libvirt.VIR_ERR_NO_DOMAIN


async def test_stopped_domain_is_not_running(
    adapter: LibvirtHypervisor, test_conn: Any
) -> None:
    dom = await asyncio.to_thread(test_conn.defineXML, domain_xml("bctl-inactive", 256))
    await adapter.connect(None)
    ref = DomainRef(uuid=dom.UUIDString(), name="bctl-inactive")
    try:
        for call in (
            adapter.memory_stats(ref),
            adapter.set_target(ref, 200 * 1024),
            adapter.set_stats_period(ref, 1),
        ):
            with pytest.raises(DomainNotRunning) as info:
                await call

            assert info.value.code == libvirt.VIR_ERR_OPERATION_INVALID
    finally:
        await adapter.close()
        await asyncio.to_thread(dom.undefine)


async def test_closed_connection_is_disconnected(adapter: LibvirtHypervisor) -> None:
    await adapter.connect(None)
    # The connection closes under the adapter, as when libvirtd goes away.
    await asyncio.to_thread(adapter._conn.close)
    try:
        with pytest.raises(Disconnected) as info:
            await adapter.list_active_domains()
    finally:
        adapter._conn = None

    assert info.value.code == libvirt.VIR_ERR_INVALID_CONN


async def test_unsupported_call_is_unsupported(adapter: LibvirtHypervisor) -> None:
    await adapter.connect(None)
    try:
        conn = adapter._conn
        with pytest.raises(Unsupported):
            await adapter._call(
                "getMemoryStats",
                lambda: conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS),
            )
        # host_memory falls back to virNodeGetFreeMemory instead.
        memory = await adapter.host_memory()
    finally:
        await adapter.close()

    assert memory.source == "node_free_memory"


async def test_slow_call_times_out_and_blocks_its_domain(
    adapter: LibvirtHypervisor,
) -> None:
    await adapter.connect(None)
    try:
        with pytest.raises(CallTimedOut):
            await adapter._call("slow", lambda: time.sleep(0.5), "k", limit_s=0.05)
        # The call is still in its thread, so the next one for the same
        # domain fails at once rather than taking a second thread.
        with pytest.raises(CallTimedOut) as info:
            await adapter._call("next", lambda: None, "k")
        other = await adapter._call("other", lambda: 42, "j")
    finally:
        await asyncio.sleep(0.5)
        await adapter.close()

    assert "still running" in str(info.value)
    assert other == 42


async def test_real_internal_error_is_generic(test_conn: Any) -> None:
    # The test driver answers a DTD in metadata with VIR_ERR_INTERNAL_ERROR.
    dom = test_conn.lookupByName("test")
    with pytest.raises(libvirt.libvirtError) as info:
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            "<!DOCTYPE p []><p/>",
            "x",
            "urn:example",
            libvirt.VIR_DOMAIN_AFFECT_LIVE,
        )

    translated = translate(info.value, "setMetadata")

    assert type(translated) is HypervisorError
    assert translated.code == libvirt.VIR_ERR_INTERNAL_ERROR
