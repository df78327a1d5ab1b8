"""Capture balloonctl's real structlog output as parsed JSON lines."""

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any

from balloonctl.logs import configure_logging

Line = dict[str, Any]


class LogCapture(io.TextIOBase):
    """A text stream that parses each JSON line written to it."""

    def __init__(self) -> None:
        self.lines: list[Line] = []
        self._buffer = ""
        self._changed = asyncio.Event()

    def write(self, text: str) -> int:
        self._buffer += text
        *complete, self._buffer = self._buffer.split("\n")
        for raw in complete:
            if raw.strip():
                self.lines.append(json.loads(raw))
        self._changed.set()
        return len(text)

    def isatty(self) -> bool:
        return False

    def events(self, name: str, **fields: Any) -> list[Line]:
        return [
            line
            for line in self.lines
            if line["event"] == name
            and all(line.get(key) == value for key, value in fields.items())
        ]

    async def wait_for(
        self, predicate: Callable[[Line], bool], timeout: float = 5.0
    ) -> Line:
        """Return the first line matching ``predicate``, waiting if needed."""
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                self._changed.clear()
                await self._changed.wait()

    async def wait_event(self, name: str, timeout: float = 5.0, **fields: Any) -> Line:
        def matches(line: Line) -> bool:
            return line["event"] == name and all(
                line.get(key) == value for key, value in fields.items()
            )

        return await self.wait_for(matches, timeout)


def capture_logs(level: str = "debug") -> LogCapture:
    capture = LogCapture()
    configure_logging("json", level, capture)
    return capture
