"""The systemd notification protocol (sd_notify), without libsystemd.

systemd passes the path of a datagram socket in ``NOTIFY_SOCKET``; each
message is one datagram of ``KEY=VALUE`` lines. A path that starts with
``@`` names a socket in the abstract namespace. Without ``NOTIFY_SOCKET``
(not started by systemd, or a unit that is not ``Type=notify``) every
method does nothing.
"""

import logging
import os
import socket
from collections.abc import Mapping

import structlog


class Notifier:
    """Send state changes and watchdog pings to the service manager."""

    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        self._address = _socket_address(address) if address else None
        self.watchdog_s = watchdog_s
        self._socket: socket.socket | None = None
        self._failing = False
        self._log = structlog.stdlib.get_logger("balloonctl")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "Notifier":
        environ = os.environ if environ is None else environ
        return cls(environ.get("NOTIFY_SOCKET"), watchdog_interval(environ))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *lines: str) -> None:
        """Send one datagram of ``KEY=VALUE`` lines; log a failure once."""
        if self._address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                # A full socket buffer must not block the event loop.
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            self._log.log(
                level,
                "notify_failed",
                message=lines[0].split("=", 1)[0],
                error=str(exc),
            )
            self._failing = True
            return
        self._failing = False

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(address: str) -> str | bytes:
    if address.startswith("@"):
        # Linux abstract namespace: a leading NUL byte, no file.
        return b"\0" + address[1:].encode()
    return address


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Return how often to ping the watchdog in seconds, or None for never.

    systemd sets ``WATCHDOG_USEC`` to the unit's WatchdogSec in
    microseconds. Pings go out at half of it, as sd_watchdog_enabled(3)
    recommends. ``WATCHDOG_PID``, when set, names the one process meant to
    ping.
    """
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000
