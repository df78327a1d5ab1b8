"""The hypervisor seam implemented over libvirt-python.

Every blocking libvirt call runs in a worker thread with a timeout, so a hung
QEMU monitor delays only the domain it belongs to. ``libvirtError`` is
translated here, once, into the exceptions of ``balloonctl.errors``.
"""

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
import libvirtaio
import structlog

from balloonctl.batching import BatchingExecutor, Call
from balloonctl.errors import (
    CallStillRunning,
    CallTimedOut,
    Disconnected,
    DomainGone,
    DomainNotRunning,
    HypervisorError,
    Unsupported,
)
from balloonctl.hypervisor import (
    BalloonChanged,
    ConnectionLost,
    DomainInfo,
    DomainRef,
    DomainState,
    EventSink,
    HostMemory,
    HypervisorEvent,
    LifecycleEvent,
    LifecycleKind,
    MemoryStats,
    MetadataChanged,
)

T = TypeVar("T")

_log = logging.getLogger(__name__)

# How long close() waits for calls still running in worker threads. A call
# that takes longer is left behind as stuck.
CLOSE_WAIT_S = 0.5

_LIFECYCLE_KINDS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: LifecycleKind.DEFINED,
    libvirt.VIR_DOMAIN_EVENT_STARTED: LifecycleKind.STARTED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: LifecycleKind.RESUMED,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: LifecycleKind.SUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: LifecycleKind.SUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: LifecycleKind.STOPPED,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: LifecycleKind.STOPPED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: LifecycleKind.STOPPED,
}

_DOMAIN_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PAUSED,
}

_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
}


class EventLoopImpl(libvirtaio.virEventAsyncIOImpl):  # type: ignore[misc]
    """libvirtaio's event implementation, safe to call from libvirt's threads.

    libvirt adds, updates and removes its handles and timers from whichever
    thread runs a libvirt call, so these methods also run in the worker
    threads. libvirtaio then schedules loop work with calls that do not wake
    a loop waiting in select(), and a queued event could wait for the next
    timer of some other task. Each call from another thread now wakes the
    loop. Calls after the loop closed (at exit, when the last reference to a
    connection goes away) are ignored; libvirtaio raised RuntimeError, which
    libvirt-python printed as a traceback on stderr.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._loop_thread = threading.get_ident()

    def _relay(self, method: Callable[..., T], closed_result: T, *args: Any) -> T:
        if self.loop.is_closed():
            return closed_result
        result = method(*args)
        if threading.get_ident() != self._loop_thread:
            self.loop.call_soon_threadsafe(_do_nothing)
        return result

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        return self._relay(super()._add_handle, -1, fd, event, cb, opaque)

    def _update_handle(self, watch: int, event: int) -> None:
        self._relay(super()._update_handle, None, watch, event)

    def _remove_handle(self, watch: int) -> int:
        return self._relay(super()._remove_handle, -1, watch)

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        return self._relay(super()._add_timeout, -1, timeout, cb, opaque)

    def _update_timeout(self, timer: int, timeout: int) -> None:
        self._relay(super()._update_timeout, None, timer, timeout)

    def _remove_timeout(self, timer: int) -> int:
        return self._relay(super()._remove_timeout, -1, timer)


def _do_nothing() -> None:
    pass


_event_impl: EventLoopImpl | None = None


def register_event_loop() -> None:
    """Bind libvirt's event loop to the running asyncio loop.

    This must run inside the loop that will dispatch events and before any
    connection is opened. An implementation bound to another loop would
    dispatch nothing, and libvirt allows only one per process, so that case
    is an error rather than a silent loss of events.
    """
    global _event_impl
    loop = asyncio.get_running_loop()
    current = _event_impl or libvirtaio.getCurrentImpl()
    if current is None:
        _event_impl = EventLoopImpl(loop)
        _event_impl.register()
        return
    if current.loop is not loop:
        raise RuntimeError(
            "libvirt's event loop is already bound to another asyncio loop; "
            "libvirt allows one per process, so run balloonctl in that loop"
        )


def silence_libvirt_stderr() -> None:
    """Stop libvirt from printing its error reports to stderr.

    By default libvirt prints every error to stderr, even those this module
    catches and handles. Each error still reaches its caller as an
    exception, which logs it with the host and domain it concerns; the
    report here carries neither, so it is dropped rather than logged twice.
    """

    def handler(_context: object, _error: tuple[Any, ...]) -> None:
        return None

    libvirt.registerErrorHandler(handler, None)


def translate(exc: libvirt.libvirtError, what: str) -> HypervisorError:
    """Map a libvirtError onto the seam's exceptions."""
    code = exc.get_error_code()
    message = f"{what} failed: {exc.get_error_message() or exc}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainGone(message, code)
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in message:
        return DomainNotRunning(message, code)
    if code in (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_AGENT_UNRESPONSIVE):
        return CallTimedOut(message, code)
    if code in _CONNECTION_ERRORS or exc.get_error_domain() == libvirt.VIR_FROM_RPC:
        return Disconnected(message, code)
    if code == libvirt.VIR_ERR_NO_SUPPORT:
        return Unsupported(message, code)
    return HypervisorError(message, code)


def _optional_kib(stats: dict[str, int], key: str) -> int | None:
    value = stats.get(key)
    return int(value) if value is not None else None


class LibvirtHypervisor:
    """One libvirt connection behind the ``Hypervisor`` interface."""

    def __init__(
        self,
        uri: str,
        *,
        call_timeout: float = 10.0,
        read_only: bool = False,
        max_workers: int = 8,
    ) -> None:
        self._uri = uri
        self._call_timeout = call_timeout
        self._read_only = read_only
        self._executor = BatchingExecutor(
            max_workers, thread_name_prefix="libvirt-call"
        )
        self._conn: Any = None
        self._domains: dict[str, Any] = {}
        self._in_flight: dict[str, Call[Any]] = {}
        self._callback_ids: list[int] = []
        self._close_callback_set = False
        self._driver_type = ""
        # Whether libvirt accepted keepalive on the current connection.
        self.keepalive = False

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def read_only(self) -> bool:
        """Whether the connection is opened with virConnectOpenReadOnly."""
        return self._read_only

    def busy_calls(self) -> int:
        """Return how many calls are still running in worker threads."""
        return self._executor.busy()

    async def _call(
        self,
        what: str,
        func: Callable[[], T],
        key: str = "",
        limit_s: float | None = None,
    ) -> T:
        """Run ``func`` in a worker thread, bounded by the call timeout.

        Calls with the same ``key`` (a domain uuid) never overlap: while an
        earlier call for that domain is still stuck in its thread, a new one
        raises CallStillRunning at once instead of taking another thread.
        """
        previous = self._in_flight.get(key) if key else None
        if previous is not None and not previous.finished:
            raise CallStillRunning(f"{what} skipped: an earlier call is still running")

        limit = self._call_timeout if limit_s is None else limit_s
        # NOTE: libvirt updates its event handles from the thread that makes
        # a call, so EventLoopImpl's methods also run in these threads. They
        # change libvirtaio's tables under the GIL only; libvirtaio
        # (libvirt-python 12.8) does not document thread safety.
        call = self._executor.submit(func)
        if key:
            self._in_flight[key] = call
        try:
            # In Python 3.11, wait_for returns the result of a call that
            # completes as the task is cancelled, and the cancellation is
            # lost; asyncio.timeout re-raises it. A timeout cancels only the
            # wait: the call still finishes in its thread, and its outcome
            # is then dropped.
            async with asyncio.timeout(limit):
                result: T = await call.future
                return result
        except TimeoutError:
            raise CallTimedOut(f"{what} timed out after {limit:g} s") from None
        except libvirt.libvirtError as exc:
            # A call that makes several libvirt calls names the one that failed.
            raise translate(exc, getattr(exc, "balloonctl_call", what)) from exc

    async def connect(self, on_event: EventSink | None) -> None:
        register_event_loop()
        silence_libvirt_stderr()
        self._domains.clear()
        self._in_flight.clear()
        opener = libvirt.openReadOnly if self._read_only else libvirt.open
        self._conn = await self._call("connect", lambda: opener(self._uri))
        self._driver_type = await self._call("getType", self._conn.getType)
        await self._enable_keepalive()
        if on_event is not None:
            await self._register_events(on_event)

    async def _enable_keepalive(self) -> None:
        # Keepalive lets a remote or local daemon connection notice a dead
        # peer; in-process drivers such as test:/// do not support it.
        self.keepalive = False
        with contextlib.suppress(Unsupported):
            await self._call("setKeepAlive", lambda: self._conn.setKeepAlive(5, 3))
            self.keepalive = True

    async def _register_events(self, sink: EventSink) -> None:
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def on_event(item: HypervisorEvent) -> None:
            # libvirt runs the close callback in the thread whose call found
            # the connection closed; the sink must run on the loop.
            if threading.get_ident() == loop_thread:
                sink(item)
            else:
                loop.call_soon_threadsafe(sink, item)

        def lifecycle(
            _conn: Any, dom: Any, event: int, detail: int, _opaque: Any
        ) -> None:
            ref = self._remember(dom)
            kind = _LIFECYCLE_KINDS.get(event, LifecycleKind.OTHER)
            on_event(LifecycleEvent(ref, kind, event, detail))

        def balloon(_conn: Any, dom: Any, actual: int, _opaque: Any) -> None:
            on_event(BalloonChanged(self._remember(dom), int(actual)))

        def metadata(_conn: Any, dom: Any, _kind: int, _uri: Any, _opaque: Any) -> None:
            on_event(MetadataChanged(self._remember(dom)))

        def closed(_conn: Any, reason: int, _opaque: Any) -> None:
            on_event(ConnectionLost(reason=_close_reason(reason)))

        await self._register_domain_event(
            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle
        )
        # Drivers without these events (the test driver emits no balloon
        # events) still work: changes are then seen when sampling.
        with contextlib.suppress(Unsupported):
            await self._register_domain_event(
                libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, balloon
            )
        with contextlib.suppress(Unsupported):
            await self._register_domain_event(
                libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, metadata
            )
        await self._call(
            "registerCloseCallback",
            lambda: self._conn.registerCloseCallback(closed, None),
        )
        self._close_callback_set = True

    async def _register_domain_event(self, event_id: int, callback: Any) -> None:
        callback_id = await self._call(
            "domainEventRegisterAny",
            lambda: self._conn.domainEventRegisterAny(None, event_id, callback, None),
        )
        self._callback_ids.append(callback_id)

    def _remember(self, dom: Any) -> DomainRef:
        ref = DomainRef(uuid=dom.UUIDString(), name=dom.name())
        self._domains[ref.uuid] = dom
        return ref

    async def close(self) -> None:
        await self._let_running_calls_finish(CLOSE_WAIT_S)
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for callback_id in self._callback_ids:
            await self._quietly(
                "domainEventDeregisterAny",
                functools.partial(conn.domainEventDeregisterAny, callback_id),
            )
        self._callback_ids.clear()
        if self._close_callback_set:
            await self._quietly("unregisterCloseCallback", conn.unregisterCloseCallback)
            self._close_callback_set = False
        await self._quietly("close", conn.close)
        self._domains.clear()

    async def _let_running_calls_finish(self, limit_s: float) -> None:
        """Wait up to ``limit_s`` seconds for calls still in worker threads.

        The tasks that made them may be cancelled already, but a call that
        was a few milliseconds from returning would otherwise count as stuck
        at exit (``exit_with_calls_in_flight``).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        # Polled: a worker thread signals nothing when a call finishes whose
        # caller was cancelled.
        while self.busy_calls() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def _quietly(self, what: str, func: Callable[[], object]) -> None:
        # Closing must not hold up a shutdown, even with libvirtd hung.
        try:
            await self._call(what, func, limit_s=min(self._call_timeout, 1.0))
        except HypervisorError as exc:
            structlog.stdlib.get_logger("balloonctl").debug(
                "close_call_failed", uri=self._uri, call=what, error=str(exc)
            )

    def shutdown_threads(self) -> None:
        """Stop accepting calls; threads stuck in libvirt are not waited for."""
        self._executor.shutdown()

    def _require_conn(self) -> Any:
        if self._conn is None:
            raise Disconnected(f"not connected to {self._uri}")
        return self._conn

    async def list_active_domains(self) -> list[DomainRef]:
        conn = self._require_conn()
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
        domains = await self._call("listAllDomains", lambda: conn.listAllDomains(flags))
        refs = []
        for dom in domains:
            ref = DomainRef(uuid=dom.UUIDString(), name=dom.name())
            self._domains[ref.uuid] = dom
            refs.append(ref)
        return refs

    async def _domain(self, ref: DomainRef) -> Any:
        dom = self._domains.get(ref.uuid)
        if dom is not None:
            return dom
        conn = self._require_conn()
        dom = await self._call(
            "lookupByUUIDString", lambda: conn.lookupByUUIDString(ref.uuid), ref.uuid
        )
        self._domains[ref.uuid] = dom
        return dom

    def forget(self, ref: DomainRef) -> None:
        """Drop cached handles for a domain that has gone away."""
        self._domains.pop(ref.uuid, None)
        self._in_flight.pop(ref.uuid, None)

    async def domain_info(self, domain: DomainRef) -> DomainInfo:
        dom = await self._domain(domain)
        info = await self._call("info", dom.info, domain.uuid)
        return _domain_info_from(info)

    async def set_stats_period(self, domain: DomainRef, seconds: int) -> None:
        dom = await self._domain(domain)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        await self._call(
            "setMemoryStatsPeriod",
            lambda: dom.setMemoryStatsPeriod(seconds, flags),
            domain.uuid,
        )

    async def memory_stats(self, domain: DomainRef) -> MemoryStats:
        dom = await self._domain(domain)
        stats: dict[str, int] = await self._call(
            "memoryStats", dom.memoryStats, domain.uuid
        )
        return self._memory_stats_from(stats)

    async def sample(self, domain: DomainRef) -> tuple[DomainInfo, MemoryStats | None]:
        dom = await self._domain(domain)

        def read() -> tuple[list[int], dict[str, int] | None]:
            info = dom.info()
            if _DOMAIN_STATES.get(info[0]) is not DomainState.RUNNING:
                return info, None
            try:
                return info, dom.memoryStats()
            except libvirt.libvirtError as exc:
                exc.balloonctl_call = "memoryStats"
                raise

        info, stats = await self._call("info", read, domain.uuid)
        memory = self._memory_stats_from(stats) if stats is not None else None
        return _domain_info_from(info), memory

    def _memory_stats_from(self, stats: dict[str, int]) -> MemoryStats:
        last_update = stats.get("last_update")
        if self._driver_type == "TEST":
            # libvirt's test driver reports a constant last_update, so its
            # reports cannot be ordered by time; treat it as not reported.
            last_update = None
        return MemoryStats(
            actual=_optional_kib(stats, "actual"),
            unused=_optional_kib(stats, "unused"),
            available=_optional_kib(stats, "available"),
            usable=_optional_kib(stats, "usable"),
            last_update=int(last_update) if last_update is not None else None,
            swap_in=_optional_kib(stats, "swap_in"),
            major_fault=_optional_kib(stats, "major_fault"),
        )

    async def domain_xml(self, domain: DomainRef, *, inactive: bool = False) -> str:
        dom = await self._domain(domain)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        xml: str = await self._call("XMLDesc", lambda: dom.XMLDesc(flags), domain.uuid)
        return xml

    async def set_target(self, domain: DomainRef, kib: int) -> None:
        dom = await self._domain(domain)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        await self._call(
            "setMemoryFlags", lambda: dom.setMemoryFlags(kib, flags), domain.uuid
        )

    async def host_memory(self) -> HostMemory:
        conn = self._require_conn()
        try:
            stats = await self._call(
                "getMemoryStats",
                lambda: conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS),
            )
        except Unsupported:
            stats = {}

        if "free" not in stats:
            # virNodeGetFreeMemory returns bytes, unlike everything else here.
            free_bytes = await self._call("getFreeMemory", conn.getFreeMemory)
            return HostMemory(int(free_bytes) // 1024, "node_free_memory")

        # virNodeGetMemoryStats reports KiB; on Linux it reads /proc/meminfo.
        # A missing buffers or cached figure counts as 0, which can only make
        # the host look lower on memory than it is.
        available = sum(int(stats.get(key, 0)) for key in ("free", "buffers", "cached"))
        return HostMemory(available, "node_memory_stats")


def _domain_info_from(info: list[int]) -> DomainInfo:
    # virDomainGetInfo returns [state, maxMem KiB, memory KiB, vcpus, cpuTime].
    state = _DOMAIN_STATES.get(info[0], DomainState.OTHER)
    return DomainInfo(state=state, maximum_kib=int(info[1]))


def _close_reason(reason: int) -> str:
    names = {
        libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
        libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
        libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
        libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
    }
    return names.get(reason, f"unknown ({reason})")
