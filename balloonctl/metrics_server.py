"""The HTTP endpoint that serves ``/metrics`` and nothing else.

prometheus_client's own ``start_http_server`` answers every path with the
metrics, so this module serves the registry with the standard library's
``ThreadingHTTPServer`` and a handler that knows one path. The server runs
in a daemon thread, which keeps scrapes off the event loop: formatting the
registry and reading ``/proc`` for the process metrics never delay a
libvirt event. Metric updates from the loop are safe meanwhile because
prometheus_client guards every metric with a lock.
"""

import asyncio
import contextlib
import http.server
import socket
import socketserver
import threading
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from balloonctl.config import ListenAddress
from balloonctl.metrics import NO_METRICS, HostMetrics, PrometheusMetrics

METRICS_PATH = "/metrics"
# A connection is closed this long after it was accepted, whatever the
# client sends: a client trickling one byte at a time cannot keep its slot.
# A scrape of a thousand domains is formatted in well under a second.
CONNECTION_DEADLINE_S = 5.0
# Connections served at once; more are closed at once, so a flood of slow
# clients cannot start a thread each.
MAX_CONNECTIONS = 16
# How often the server thread checks for a stop request; stopping waits for
# up to this long.
POLL_INTERVAL_S = 0.1


class MetricsListenError(Exception):
    """The metrics endpoint could not listen on its address."""

    def __init__(self, address: ListenAddress, error: OSError) -> None:
        super().__init__(f"{address}: {error.strerror or error}")
        self.address = address
        self.error = error


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"
    timeout = CONNECTION_DEADLINE_S

    def version_string(self) -> str:
        # The Server header names the program only, not the Python version.
        return "balloonctl"

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _reject_method(self) -> None:
        self._respond(405, b"method not allowed; use GET\n", allow="GET, HEAD")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _reject_method

    def _serve(self, *, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path != METRICS_PATH:
            self._respond(404, b"not found; metrics are at /metrics\n", send_body)
            return
        encode, content_type = choose_encoder(self.headers.get("Accept", ""))
        self._respond(200, encode(self.server.registry), send_body, content_type)

    def _respond(
        self,
        code: int,
        body: bytes,
        send_body: bool = True,
        content_type: str = "text/plain; charset=utf-8",
        allow: str | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if allow is not None:
            self.send_header("Allow", allow)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes arrive every few seconds; logging each would bury the
        # controller's own lines.
        pass


class _Server(http.server.ThreadingHTTPServer):
    def __init__(self, address: ListenAddress, registry: CollectorRegistry) -> None:
        self.address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.registry = registry
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((address.host, address.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the address up with getfqdn, a DNS
        # query that an IP literal does not need.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # The handler's socket timeout bounds each read; this timer bounds
        # the whole connection. Shutting the socket down wakes the handler's
        # blocked read, which then ends the request.
        deadline = threading.Timer(
            CONNECTION_DEADLINE_S, _shut_down_quietly, args=(request,)
        )
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        structlog.stdlib.get_logger("balloonctl").error(
            "metrics_request_failed", exc_info=True
        )


def _shut_down_quietly(connection: socket.socket) -> None:
    # The handler may have closed the socket already.
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class MetricsExporter:
    """The metrics of one ``balloonctl run``: registry, endpoint and lag probe."""

    def __init__(self, address: ListenAddress | None) -> None:
        self.metrics = PrometheusMetrics() if address is not None else None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._probe: asyncio.Task[None] | None = None
        self._address = address

    @property
    def port(self) -> int | None:
        """The bound TCP port, or None when metrics are off."""
        return None if self._server is None else self._server.server_address[1]

    def host(self, uri: str) -> HostMetrics:
        """Return the observer for the controller of ``uri``."""
        if self.metrics is None:
            return NO_METRICS
        return self.metrics.host(uri)

    def start(self) -> None:
        """Listen and serve in a thread; call on the running event loop.

        Raises MetricsListenError when the address cannot be bound. With
        metrics off this does nothing, so no socket is opened.
        """
        if self._address is None or self.metrics is None:
            return
        try:
            self._server = _Server(self._address, self.metrics.registry)
        except OSError as exc:
            raise MetricsListenError(self._address, exc) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(POLL_INTERVAL_S,),
            name="metrics server",
            daemon=True,
        )
        self._thread.start()
        self._probe = asyncio.create_task(
            self.metrics.probe_loop_lag(), name="event loop lag probe"
        )
        structlog.stdlib.get_logger("balloonctl").info(
            "metrics_listening",
            host=self._address.host,
            port=self.port,
            path=METRICS_PATH,
        )

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self._server is not None:
            # shutdown() waits for serve_forever to notice, up to one poll
            # interval, so it runs in a thread.
            await asyncio.to_thread(self._stop_server, self._server)
            self._server = None

    def _stop_server(self, server: _Server) -> None:
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join()
