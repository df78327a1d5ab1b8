"""The controller: a live registry of domains driven by lifecycle events.

libvirt callbacks only put events on a queue. The controller's main loop
takes them off, starts a task for each running domain, pauses and resumes
those tasks, and drops stopped domains. When the connection is lost it
cancels the tasks, reconnects with backoff and reconciles the registry with
the list of active domains.
"""

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import structlog

from balloonctl.config import Settings
from balloonctl.domain import DomainMemory, DomainWorker, HostView
from balloonctl.errors import Disconnected, HypervisorError
from balloonctl.hostwatch import HostWatch
from balloonctl.hypervisor import (
    BalloonChanged,
    ConnectionLost,
    DomainRef,
    Hypervisor,
    HypervisorEvent,
    LifecycleEvent,
    LifecycleKind,
    MetadataChanged,
)
from balloonctl.metrics import NO_METRICS, HostMetrics
from balloonctl.state import remove_state, state_path, write_state

RECONNECT_INITIAL_S = 1.0
# DomainWorker.status values of a domain whose balloon balloonctl moves.
MANAGED_STATUSES = frozenset({"managed", "stuck", "grace", "stale"})
RECONNECT_MAX_S = 30.0


class ConnectFailed(Exception):
    """The first connection to the hypervisor could not be opened."""


@dataclasses.dataclass
class _Entry:
    worker: DomainWorker
    task: asyncio.Task[None]


@dataclasses.dataclass(frozen=True)
class _DomainGone:
    """A task found its domain gone; ``worker`` is the task that reported it."""

    domain: DomainRef
    reason: str
    worker: DomainWorker | None = None


@dataclasses.dataclass(frozen=True)
class _Restart:
    """Replace a crashed task, or the host watch when ``domain`` is None."""

    domain: DomainRef | None


_QueueItem = HypervisorEvent | _DomainGone | _Restart


class Controller:
    """Keep one task per running domain of one hypervisor."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: HostMetrics = NO_METRICS,
    ) -> None:
        self._hv = hypervisor
        self._metrics = metrics
        self._settings = settings
        self._clock = clock
        self._queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self._entries: dict[str, _Entry] = {}
        self._memory: dict[str, DomainMemory] = {}
        self._host_task: asyncio.Task[None] | None = None
        self._watch: HostWatch | None = None
        self._state_task: asyncio.Task[None] | None = None
        self._host = HostView()
        self._connected = False
        # Set once the first connection attempt has either led to a first
        # reconciliation or failed; ``connected`` tells which.
        self.settled = asyncio.Event()
        # Why the first attempt failed, when it did and was retried.
        self.first_error: str | None = None
        self._log = structlog.stdlib.get_logger("balloonctl").bind(uri=hypervisor.uri)

    @property
    def uri(self) -> str:
        return self._hv.uri

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def settings(self) -> Settings:
        return self._settings

    def update_settings(self, settings: Settings) -> None:
        """Apply reloaded settings: each domain uses them from its next period."""
        self._settings = settings
        for entry in self._entries.values():
            entry.worker.update_settings(settings)
        if self._watch is not None:
            self._watch.update(settings.host_warn, settings.stats_period)

    @property
    def domains(self) -> list[DomainRef]:
        """The domains that currently have a task."""
        return [entry.worker.domain for entry in self._entries.values()]

    def task_count(self) -> int:
        return sum(1 for entry in self._entries.values() if not entry.task.done())

    def queue_depth(self) -> int:
        """Return how many events wait in the queue for the main task."""
        return self._queue.qsize()

    def managed_count(self) -> int:
        """Return how many domains are managed, not excluded or invalid."""
        now = self._clock()
        return sum(
            1
            for entry in self._entries.values()
            if entry.worker.status(now)[0] in MANAGED_STATUSES
        )

    async def run(self, stop: asyncio.Event, *, retry_first: bool = False) -> None:
        """Manage domains until ``stop`` is set.

        Raises ConnectFailed if the first connection cannot be opened, unless
        ``retry_first`` is set: the first attempt's failure is then logged
        and retried with backoff like a lost connection. Later losses of the
        connection are retried for as long as it takes.
        """
        try:
            if not await self._connect_unless_stopped(stop):
                self.settled.set()
                self._log.info("controller_stopped", domains=0)
                return
        except HypervisorError as exc:
            await self._hv.close()
            if not retry_first:
                self.settled.set()
                raise ConnectFailed(str(exc)) from exc
            self._log.warning(
                "libvirt_connect_failed", error=str(exc), retry_in_s=RECONNECT_INITIAL_S
            )
            self.first_error = str(exc)
            self.settled.set()
            if await self._connect_with_backoff(stop, failed_once=True) is None:
                self._log.info("controller_stopped", domains=0)
                return

        try:
            self._start_host_watch()
            if not self._settings.dry_run:
                # A dry run beside the managing process must not replace
                # that process's state file.
                self._state_task = asyncio.create_task(
                    self._write_state_forever(), name="state writer"
                )
            self._log_started()
            self.settled.set()
            await self._dispatch_until(stop)
        finally:
            await self._shutdown()

    async def _connect_and_reconcile(self) -> None:
        await self._hv.connect(self._enqueue)
        await self._read_host_once()
        await self._reconcile()
        # Marked here, in the same step as the reconciliation, so the domain
        # tasks it started never run while the host still looks down.
        self._connected = True
        self._metrics.connection(True)

    async def _connect_unless_stopped(self, stop: asyncio.Event) -> bool:
        """Connect and reconcile; return False if ``stop`` is set first.

        A connection attempt to a host that accepts and never replies lasts
        up to ``call_timeout`` (up to 600 s); SIGTERM must not wait for it.
        The thread stuck in libvirt is abandoned, and the process exits
        without waiting for it. Raises HypervisorError if the attempt fails.
        """
        attempt = asyncio.ensure_future(self._connect_and_reconcile())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            attempt.cancel()
            raise
        finally:
            stopping.cancel()
        if attempt.done():
            attempt.result()
            return True
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError, HypervisorError):
            await attempt
        await self._hv.close()
        return False

    def _log_started(self) -> None:
        settings = self._settings
        self._log.info(
            "controller_started",
            domains=len(self._entries),
            stats_period_s=settings.stats_period,
            min_unused_kib=settings.min_unused,
            max_release_kib=settings.max_release,
            min_release_kib=settings.min_release,
            host_warn_kib=settings.host_warn,
            dry_run=settings.dry_run,
            # Only the libvirt adapter reports it; None for other seams.
            keepalive=getattr(self._hv, "keepalive", None),
        )

    def _enqueue(self, item: _QueueItem) -> None:
        self._queue.put_nowait(item)

    async def _dispatch_until(self, stop: asyncio.Event) -> None:
        stop_wait = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                get = asyncio.ensure_future(self._queue.get())
                await asyncio.wait(
                    {get, stop_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                if not get.done():
                    get.cancel()
                    break
                await self._handle(get.result(), stop)
        finally:
            stop_wait.cancel()

    async def _handle(self, item: _QueueItem, stop: asyncio.Event) -> None:
        if isinstance(item, ConnectionLost):
            await self._reconnect(item.reason, stop)
        elif isinstance(item, _DomainGone):
            entry = self._entries.get(item.domain.uuid)
            # A report from an older task must not remove a newer one for
            # a domain that was restarted with the same uuid.
            if entry is not None and item.worker in (None, entry.worker):
                self._remove(item.domain, item.reason)
        elif isinstance(item, _Restart):
            self._restart(item.domain)
        elif isinstance(item, BalloonChanged):
            entry = self._entries.get(item.domain.uuid)
            if entry is not None:
                entry.worker.balloon_changed(item.actual_kib)
        elif isinstance(item, MetadataChanged):
            self._reload_policy(item.domain)
        else:
            self._on_lifecycle(item)

    def _reload_policy(self, domain: DomainRef, *, redefined: bool = False) -> None:
        entry = self._entries.get(domain.uuid)
        if entry is not None:
            entry.worker.reload_policy(redefined=redefined)

    def _on_lifecycle(self, event: LifecycleEvent) -> None:
        domain, kind = event.domain, event.kind
        if kind in (LifecycleKind.STARTED, LifecycleKind.RESUMED):
            self._ensure(domain)
            self._entries[domain.uuid].worker.resume()
        elif kind is LifecycleKind.SUSPENDED:
            entry = self._entries.get(domain.uuid)
            if entry is not None:
                entry.worker.pause()
        elif kind is LifecycleKind.DEFINED:
            self._reload_policy(domain, redefined=True)
        elif kind is LifecycleKind.STOPPED:
            self._remove(
                domain, f"{kind.value} (event {event.event}, detail {event.detail})"
            )

    def _ensure(self, domain: DomainRef) -> None:
        if domain.uuid in self._entries:
            return
        memory = self._memory.setdefault(domain.uuid, DomainMemory())
        worker = DomainWorker(
            self._hv,
            domain,
            self._settings,
            memory,
            host=self._host,
            on_gone=self._on_gone,
            on_disconnected=lambda why: self._enqueue(ConnectionLost(why)),
            clock=self._clock,
            metrics=self._metrics.domain(domain),
        )
        task = asyncio.create_task(worker.run(), name=f"domain {domain.name}")
        task.add_done_callback(functools.partial(self._task_done, domain))
        self._entries[domain.uuid] = _Entry(worker, task)
        self._log.info("domain_added", domain=domain.name, uuid=domain.uuid)

    def _on_gone(self, domain: DomainRef, reason: str) -> None:
        entry = self._entries.get(domain.uuid)
        worker = entry.worker if entry is not None else None
        self._enqueue(_DomainGone(domain, reason, worker))

    def _task_done(self, domain: DomainRef | None, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug in a task must not leave a domain, or the host, unwatched:
        # log it and start a new task one period later.
        self._log.error(
            "task_crashed",
            task=task.get_name(),
            restart_in_s=self._settings.stats_period,
            exc_info=task.exception(),
        )
        loop = asyncio.get_running_loop()
        loop.call_later(self._settings.stats_period, self._enqueue, _Restart(domain))

    def _restart(self, domain: DomainRef | None) -> None:
        if not self._connected:
            return  # reconnecting rebuilds every task
        if domain is None:
            if self._host_task is not None and self._host_task.done():
                self._start_host_watch()
            return
        entry = self._entries.get(domain.uuid)
        if entry is not None and entry.task.done():
            del self._entries[domain.uuid]
            self._ensure(domain)

    def _remove(self, domain: DomainRef, reason: str) -> None:
        entry = self._entries.pop(domain.uuid, None)
        self._memory.pop(domain.uuid, None)
        self._hv.forget(domain)
        self._metrics.forget(domain)
        if entry is None:
            return
        entry.task.cancel()
        self._log.info(
            "domain_removed", domain=domain.name, uuid=domain.uuid, reason=reason
        )

    async def _reconcile(self) -> None:
        """Make the registry match the hypervisor's list of active domains."""
        active = await self._hv.list_active_domains()
        active_ids = {ref.uuid for ref in active}
        for entry in list(self._entries.values()):
            if entry.worker.domain.uuid not in active_ids:
                self._remove(entry.worker.domain, "not active after reconnect")
        for uuid in set(self._memory) - active_ids:
            del self._memory[uuid]
        for ref in active:
            self._ensure(ref)

    async def _read_host_once(self) -> None:
        """Read the host's memory before any domain task can grant.

        Without a reading, a grant would not be limited by host_reserve.
        """
        try:
            memory = await self._hv.host_memory()
        except Disconnected:
            raise
        except HypervisorError as exc:
            self._log.warning("host_memory_failed", error=str(exc), error_code=exc.code)
            return
        self._host.available_kib = memory.available_kib
        self._metrics.host_memory(memory.available_kib)

    def _start_host_watch(self) -> None:
        watch = HostWatch(
            self._hv,
            self._settings.host_warn,
            self._settings.stats_period,
            self._clock,
            view=self._host,
            metrics=self._metrics,
        )
        self._watch = watch
        self._host_task = asyncio.create_task(watch.run(), name="host watch")
        self._host_task.add_done_callback(functools.partial(self._task_done, None))

    async def _cancel_tasks(self) -> None:
        tasks = [entry.task for entry in self._entries.values()]
        self._entries.clear()
        if self._host_task is not None:
            tasks.append(self._host_task)
            self._host_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _reconnect(self, reason: str, stop: asyncio.Event) -> None:
        if not self._connected:
            return
        self._connected = False
        self._metrics.connection(False)
        self._log.warning(
            "libvirt_disconnected", reason=reason, domains=len(self._entries)
        )
        await self._cancel_tasks()
        self._metrics.forget_domains()
        await self._hv.close()
        self._drain_queue()

        attempts = await self._connect_with_backoff(stop)
        if attempts is None:
            return
        self._start_host_watch()
        self._log.info(
            "libvirt_reconnected", attempts=attempts, domains=len(self._entries)
        )

    async def _connect_with_backoff(
        self, stop: asyncio.Event, *, failed_once: bool = False
    ) -> int | None:
        """Connect and reconcile, retrying with backoff until it works.

        With ``failed_once``, an attempt has just failed, so the first one
        here waits. Returns the number of attempts, or None if ``stop`` was
        set first.
        """
        delay = RECONNECT_INITIAL_S
        attempts = 0
        if failed_once:
            attempts = 1
            await _sleep_or_stop(delay, stop)
            delay = min(delay * 2, RECONNECT_MAX_S)
        while not stop.is_set():
            attempts += 1
            try:
                if not await self._connect_unless_stopped(stop):
                    return None
            except HypervisorError as exc:
                self._log.debug(
                    "libvirt_reconnect_failed", error=str(exc), attempt=attempts
                )
                await self._hv.close()
                await _sleep_or_stop(delay, stop)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            return attempts
        return None

    def _drain_queue(self) -> None:
        # Events queued before the loss refer to the old connection.
        while not self._queue.empty():
            self._queue.get_nowait()

    def state_document(self) -> dict[str, Any]:
        """Return each domain's status as the state file records it."""
        now = self._clock()
        domains = {}
        for uuid, entry in self._entries.items():
            status, reason = entry.worker.status(now)
            domains[uuid] = {
                "domain": entry.worker.domain.name,
                "status": status,
                "reason": reason,
            }
        return {
            "uri": self._hv.uri,
            "pid": os.getpid(),
            "written_at": time.time(),
            "stats_period_s": self._settings.stats_period,
            "domains": domains,
        }

    async def _write_state_forever(self) -> None:
        path = state_path(self._settings.state_dir, self._hv.uri)
        failing = False
        try:
            while True:
                try:
                    await asyncio.to_thread(write_state, path, self.state_document())
                    failing = False
                except OSError as exc:
                    level = logging.DEBUG if failing else logging.WARNING
                    self._log.log(
                        level, "state_write_failed", path=str(path), error=str(exc)
                    )
                    failing = True
                await asyncio.sleep(self._settings.stats_period)
        finally:
            with contextlib.suppress(OSError):
                remove_state(path)

    async def _shutdown(self) -> None:
        count = len(self._entries)
        if self._state_task is not None:
            self._state_task.cancel()
            await asyncio.gather(self._state_task, return_exceptions=True)
        await self._cancel_tasks()
        await self._hv.close()
        self._metrics.close()
        self._log.info("controller_stopped", domains=count)


async def _sleep_or_stop(delay: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay):
            await stop.wait()
