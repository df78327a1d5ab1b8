"""The ``balloonctl run`` supervisor: one Controller per URI in one event loop.

The supervisor owns what is shared by every hypervisor: the signals, the
per-URI locks, the configuration and its reload on SIGHUP, and the systemd
notifications (READY, STATUS, WATCHDOG, STOPPING).
"""

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from balloonctl import lock
from balloonctl.config import (
    ConfigError,
    ListenAddress,
    Settings,
    build_settings,
    load_file,
)
from balloonctl.controller import ConnectFailed, Controller
from balloonctl.libvirt_adapter import LibvirtHypervisor
from balloonctl.metrics import NO_METRICS, HostMetrics
from balloonctl.notify import Notifier

# Settings a running process cannot take over from a reloaded file. A change
# to one is logged as needing a restart, and the running value stays.
#   uri, uris: each URI has its own connection, lock and state file.
#   state_dir: the locks and state files are already open there.
#   dry_run: a dry run's connections are read-only.
#   call_timeout: the connections' adapters were built with it.
#   log_format: the log renderer is chosen once at start.
#   metrics_listen: the metrics endpoint is already listening.
RESTART_KEYS = (
    "uri",
    "uris",
    "state_dir",
    "dry_run",
    "call_timeout",
    "log_format",
    "metrics_listen",
)

# How often STATUS= is refreshed when the number of domains changes.
STATUS_INTERVAL_S = 1.0


def load_settings(config: Path | None, flags: Mapping[str, object]) -> Settings:
    """Build settings from the config file (if any) and command-line flags."""
    file_values = load_file(config) if config is not None else {}
    return build_settings(file_values, flags)


def make_hypervisor(uri: str, settings: Settings) -> LibvirtHypervisor:
    """Build the adapter for ``uri``, read-only for a dry run; nothing is opened."""
    return LibvirtHypervisor(
        uri, call_timeout=settings.call_timeout, read_only=settings.dry_run
    )


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def as_field(self) -> dict[str, Any]:
        return {"key": self.key, "old": _plain(self.old), "new": _plain(self.new)}


def _plain(value: Any) -> Any:
    """Return ``value`` in a form the JSON log renderer writes as itself."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, ListenAddress):
        return str(value)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def diff_settings(old: Settings, new: Settings) -> list[Change]:
    changes = []
    for field in dataclasses.fields(Settings):
        before, after = getattr(old, field.name), getattr(new, field.name)
        if before != after:
            changes.append(Change(field.name, before, after))
    return changes


class Supervisor:
    """Run a Controller per URI until stopped, and reload on request."""

    def __init__(
        self,
        settings: Settings,
        *,
        config: Path | None = None,
        flags: Mapping[str, object] | None = None,
        notifier: Notifier | None = None,
        hypervisor_factory: Callable[[str, Settings], Any] = make_hypervisor,
        host_metrics: Callable[[str], HostMetrics] = lambda uri: NO_METRICS,
    ) -> None:
        self.settings = settings
        self._config = config
        self._flags = dict(flags or {})
        self._notifier = notifier if notifier is not None else Notifier(None)
        self.hypervisors = [hypervisor_factory(uri, settings) for uri in settings.hosts]
        self.controllers = [
            Controller(hv, settings.for_host(hv.uri), metrics=host_metrics(hv.uri))
            for hv in self.hypervisors
        ]
        self.stop = asyncio.Event()
        self._locks: list[lock.HostLock] = []
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False
        # READY=1 was sent; a reload before that must not send it early.
        self._ready = False
        self._log = structlog.stdlib.get_logger("balloonctl")

    def take_locks(self) -> None:
        """Lock every URI for this process; raises LockHeld or LockFailed.

        A dry run changes nothing, so it takes no lock and can run beside
        the controller that manages the same hypervisor.
        """
        if self.settings.dry_run:
            return
        try:
            for uri in self.settings.hosts:
                self._locks.append(lock.acquire(self.settings.state_dir, uri))
        except (lock.LockHeld, lock.LockFailed):
            self.release_locks()
            raise

    def release_locks(self) -> None:
        for held in self._locks:
            held.release()
        self._locks.clear()

    async def run(self) -> None:
        """Serve until ``stop`` is set.

        With one URI, a failed first connection raises ConnectFailed, as it
        always has. With several, a host that cannot be reached is retried
        in the background while the others are managed, and ConnectFailed
        is raised only if every host failed its first attempt.
        """
        several = len(self.controllers) > 1
        tasks = [
            asyncio.create_task(
                controller.run(self.stop, retry_first=several),
                name=f"controller {controller.uri}",
            )
            for controller in self.controllers
        ]
        helpers: list[asyncio.Task[None]] = []
        try:
            await self._wait_settled(tasks)
            if not any(controller.connected for controller in self.controllers):
                stopped_first = self.stop.is_set()
                self.stop.set()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                if stopped_first and not any(
                    isinstance(result, BaseException) for result in results
                ):
                    # SIGTERM arrived while every host was still connecting.
                    return
                failed = [task.exception() for task in tasks if not task.cancelled()]
                first = next((exc for exc in failed if exc is not None), None)
                if isinstance(first, ConnectFailed):
                    raise first
                errors = "; ".join(
                    f"{controller.uri!r}: {controller.first_error}"
                    for controller in self.controllers
                )
                raise ConnectFailed(f"no URI could be reached ({errors})")
            self._notifier.send("READY=1", f"STATUS={self.status_text()}")
            self._ready = True
            helpers.append(asyncio.create_task(self._status_forever(), name="status"))
            if self._notifier.watchdog_s is not None:
                helpers.append(
                    asyncio.create_task(self._watchdog_forever(), name="watchdog")
                )
            await self.stop.wait()
            self._notifier.send("STOPPING=1", "STATUS=stopping")
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        finally:
            self.stop.set()
            for task in [*helpers, *tasks]:
                task.cancel()
            await asyncio.gather(*helpers, *tasks, return_exceptions=True)
            if self._reloading is not None:
                self._reloading.cancel()
            self._notifier.close()

    async def _wait_settled(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait until every host has connected, failed once, or ended."""
        waits = [
            asyncio.ensure_future(controller.settled.wait())
            for controller in self.controllers
        ]
        try:
            for wait, task in zip(waits, tasks, strict=True):
                await asyncio.wait({wait, task}, return_when=asyncio.FIRST_COMPLETED)
                if task.done() and not task.cancelled() and task.exception():
                    exc = task.exception()
                    assert exc is not None
                    if not isinstance(exc, ConnectFailed):
                        raise exc
        finally:
            for wait in waits:
                wait.cancel()

    def status_text(self) -> str:
        """Return the STATUS= line: domains found, hosts connected, managed."""
        domains = sum(len(controller.domains) for controller in self.controllers)
        managed = sum(controller.managed_count() for controller in self.controllers)
        connected = sum(1 for controller in self.controllers if controller.connected)
        total = len(self.controllers)
        return (
            f"{domains} domain{'s' if domains != 1 else ''} "
            f"on {connected} of {total} host{'s' if total != 1 else ''}, "
            f"{managed} managed"
        )

    async def _status_forever(self) -> None:
        sent = ""
        while True:
            text = self.status_text()
            if text != sent:
                self._notifier.send(f"STATUS={text}")
                sent = text
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def _watchdog_forever(self) -> None:
        # This task runs on the event loop, so a blocked loop stops the
        # pings and systemd restarts the service after WatchdogSec.
        assert self._notifier.watchdog_s is not None
        while True:
            self._notifier.send("WATCHDOG=1")
            await asyncio.sleep(self._notifier.watchdog_s)

    def request_reload(self) -> None:
        """Handle SIGHUP: re-read the config file in the background.

        A SIGHUP during a reload makes that reload run once more when it
        ends, so a file changed in between is not missed.
        """
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.create_task(self._reload_until_current())

    async def _reload_until_current(self) -> None:
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again:
                return

    async def reload(self) -> None:
        """Re-read the config file and apply what changed; log the outcome."""
        path = self._config
        if path is None:
            self._log.warning(
                "config_reload_failed",
                path=None,
                key=None,
                value=None,
                error="no config file was given at start (--config), "
                "so there is nothing to reload",
            )
            return
        # MONOTONIC_USEC= lets Type=notify-reload (systemd 253) match this
        # RELOADING=1 to its reload request; older systemd ignores it.
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if self._ready:
            self._notifier.send(
                "RELOADING=1",
                f"MONOTONIC_USEC={now_us}",
                "STATUS=reloading the config",
            )
        try:
            new = await asyncio.to_thread(load_settings, path, self._flags)
        except ConfigError as exc:
            self._log.warning(
                "config_reload_failed",
                path=str(path),
                key=exc.key,
                value=_plain(exc.value),
                error=str(exc),
            )
            self._send_ready_again()
            return
        self.apply(new, str(path))
        self._send_ready_again()

    def _send_ready_again(self) -> None:
        if self._ready:
            self._notifier.send("READY=1", f"STATUS={self.status_text()}")

    def apply(self, new: Settings, path: str) -> None:
        """Apply ``new`` except the keys that need a restart."""
        old = self.settings
        changes = diff_settings(old, new)
        frozen = [change for change in changes if change.key in RESTART_KEYS]
        live = [change for change in changes if change.key not in RESTART_KEYS]
        kept = {key: getattr(old, key) for key in RESTART_KEYS}
        effective = dataclasses.replace(new, **kept)
        self.settings = effective
        for controller in self.controllers:
            controller.update_settings(effective.for_host(controller.uri))
        if old.log_level != effective.log_level:
            logging.getLogger().setLevel(effective.log_level.upper())
        self._log.info(
            "config_reloaded",
            path=path,
            changed=[change.as_field() for change in live],
        )
        if frozen:
            self._log.warning(
                "config_restart_required",
                path=path,
                changed=[change.as_field() for change in frozen],
            )
