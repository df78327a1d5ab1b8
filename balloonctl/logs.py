"""structlog set-up: JSON lines for log shippers, readable lines on a terminal.

structlog events and records from the standard ``logging`` module (which
libvirt-python and libvirtaio use) pass through the same processors and the
same renderer, so every line has ``timestamp``, ``level`` and ``event``.
"""

import atexit
import contextlib
import logging
import logging.handlers
import queue
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def choose_format(log_format: str, stream: TextIO) -> str:
    """Resolve ``auto`` to ``console`` on a terminal and ``json`` elsewhere."""
    if log_format != "auto":
        return log_format
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


# Lines waiting for a slow reader; past this many, new lines are dropped and
# counted rather than blocking the event loop or growing without bound.
QUEUE_LINES = 10_000


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Render on the caller's thread, queue the line, drop it if full."""

    def __init__(self, lines: "queue.Queue[logging.LogRecord]") -> None:
        super().__init__(lines)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _OutputHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that stops writing once its output is gone.

    When the log reader goes away (``run | head``, a restarted journald),
    every write fails. The standard handler prints a traceback to stderr
    for each line; this one reports it once on stderr and drops the rest, and
    balloonctl goes on managing memory.
    """

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        if not self.broken:
            self.broken = True
            with contextlib.suppress(OSError, ValueError):
                print(
                    f"balloonctl: cannot write log lines ({error}); "
                    "dropping them from now on",
                    file=sys.stderr,
                    flush=True,
                )


class _Writer(logging.handlers.QueueListener):
    """A queue listener whose stop gives up after a few seconds.

    A reader that never reads again must not hold up the process's exit; the
    writer thread is a daemon thread, so it does not either.
    """

    def enqueue_sentinel(self) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put(self._sentinel, timeout=5)  # type: ignore[attr-defined]

    def stop(self) -> None:
        thread = self._thread
        if thread is not None:
            self.enqueue_sentinel()
            thread.join(timeout=5)
            self._thread = None


_listener: logging.handlers.QueueListener | None = None


def stop_log_writer() -> None:
    """Write out queued lines and stop the writer thread, if one runs.

    Lines dropped because the reader fell behind are counted on stderr.
    """
    global _listener
    if _listener is None:
        return
    _listener.stop()
    _listener = None
    for handler in logging.getLogger().handlers:
        dropped = getattr(handler, "dropped", 0)
        if dropped:
            print(f"balloonctl: {dropped} log lines were dropped", file=sys.stderr)


def configure_logging(
    log_format: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    threaded: bool = False,
) -> None:
    """Route structlog and stdlib logging to ``stream`` (stdout by default).

    With ``threaded``, a writer thread does the writing, so a log reader that
    stops reading (a full pipe) cannot block the event loop.
    """
    output = stream if stream is not None else sys.stdout
    renderer: Processor
    if choose_format(log_format, output) == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    stop_log_writer()
    handler: logging.Handler = _OutputHandler(output)
    handler.setFormatter(formatter)
    if threaded:
        writer = handler
        writer.setFormatter(logging.Formatter("%(message)s"))
        handler = _DroppingQueueHandler(queue.Queue(QUEUE_LINES))
        handler.setFormatter(formatter)
        _start_writer(handler, writer)

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def _start_writer(
    source: logging.handlers.QueueHandler, writer: logging.Handler
) -> None:
    global _listener
    _listener = _Writer(source.queue, writer)
    _listener.start()
    atexit.register(stop_log_writer)


def get_logger(**bound: Any) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger with ``bound`` fields on every line."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger("balloonctl")
    return logger.bind(**bound)
