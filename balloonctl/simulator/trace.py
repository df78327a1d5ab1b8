"""Trace files: each guest's memory demand over time, as CSV or JSON lines.

A row sets a guest's demand (and optionally its page cache) from ``time`` on,
until the next row for that guest. Comment lines start with ``#``. A comment
whose text starts with ``@`` is a directive: ``@host-memory SIZE`` sets the
host's total memory and ``@maximum GUEST SIZE`` a guest's configured memory.
docs/simulator.md gives the full format.
"""

import bisect
import csv
import dataclasses
import json
import math
from pathlib import Path

from balloonctl.units import GIB, SizeError, parse_size

# Configured memory of a guest that has no @maximum directive.
DEFAULT_MAXIMUM = 4 * GIB

REQUIRED_COLUMNS = ("time", "guest", "demand")
OPTIONAL_COLUMNS = ("cache",)
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")

# Longer lines are cut to this many characters in error messages.
MAX_SHOWN_CHARS = 60


class TraceError(ValueError):
    """An invalid trace file. The message names the file, the line and the value."""

    def __init__(self, source: str, line: int | None, message: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class Point:
    """The memory a guest's workload wants from ``time`` (seconds) on, in KiB."""

    time: float
    demand: int
    cache: int = 0


@dataclasses.dataclass(frozen=True)
class GuestTrace:
    """One guest's configured memory (KiB) and its demand points in time order."""

    name: str
    maximum: int
    points: tuple[Point, ...]

    def step_values(self, period: float, steps: int) -> tuple[list[int], list[int]]:
        """Return the highest demand and cache in each step of ``period`` seconds.

        Step ``k`` covers ``[k * period, (k + 1) * period)``. A value that holds
        only part of a step counts for the whole step, so that short bursts
        between two reports are not lost.
        """
        times = [point.time for point in self.points]
        demand: list[int] = []
        cache: list[int] = []
        for k in range(steps):
            start = k * period
            first = bisect.bisect_right(times, start) - 1
            end = max(bisect.bisect_left(times, start + period), first + 1)
            window = self.points[first:end]
            demand.append(max(point.demand for point in window))
            cache.append(max(point.cache for point in window))
        return demand, cache


@dataclasses.dataclass(frozen=True)
class Trace:
    """A parsed trace file. ``end`` is the time of its last row, in seconds."""

    name: str
    guests: tuple[GuestTrace, ...]
    end: float
    host_memory: int | None = None


def load_trace(path: Path) -> Trace:
    """Read and parse a trace file: JSON lines for a JSON_SUFFIXES name, else CSV."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(source, None, "file not found") from None
    except OSError as exc:
        raise TraceError(source, None, f"failed to read file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(source, None, f"not UTF-8 text: {exc.reason}") from exc
    json_lines = path.suffix.lower() in JSON_SUFFIXES
    return parse_trace(text, source, name=path.stem, json_lines=json_lines)


def parse_trace(text: str, source: str, *, name: str, json_lines: bool) -> Trace:
    """Parse a trace from ``text``. ``source`` names it in error messages."""
    builder = _Builder(source)
    header: tuple[str, ...] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            builder.add_comment(number, line[1:].strip())
        elif json_lines:
            builder.add_row(number, *_json_row(source, number, line))
        elif header is None:
            header = _csv_header(source, number, line)
        else:
            builder.add_row(number, *_csv_row(source, number, line, header))
    if not json_lines and header is None:
        raise TraceError(source, None, "missing header; expected 'time,guest,demand'")
    return builder.finish(name)


def _csv_header(source: str, number: int, line: str) -> tuple[str, ...]:
    columns = tuple(field.strip() for field in next(csv.reader([line])))
    known = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
    for column in columns:
        if column not in known:
            raise TraceError(
                source,
                number,
                f"unknown column {column!r} in header; "
                f"expected {','.join(REQUIRED_COLUMNS)} and optionally cache",
            )
        if columns.count(column) > 1:
            raise TraceError(source, number, f"column {column!r} appears twice")
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise TraceError(
            source,
            number,
            f"header {_excerpt(line)} lacks column {missing[0]!r}; "
            f"expected {','.join(REQUIRED_COLUMNS)}",
        )
    return columns


_Row = tuple[float, str, int, int]


def _csv_row(source: str, number: int, line: str, header: tuple[str, ...]) -> _Row:
    fields = [field.strip() for field in next(csv.reader([line]))]
    if len(fields) != len(header):
        raise TraceError(
            source,
            number,
            f"expected {len(header)} fields ({','.join(header)}), found "
            f"{len(fields)} in {_excerpt(line)}",
        )
    row = dict(zip(header, fields, strict=True))
    time = _parse_time(source, number, row["time"])
    guest = _parse_guest(source, number, row["guest"])
    demand = _parse_size(source, number, "demand", row["demand"])
    cache_text = row.get("cache", "")
    cache = _parse_size(source, number, "cache", cache_text) if cache_text else 0
    return time, guest, demand, cache


def _json_row(source: str, number: int, line: str) -> _Row:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(
            source, number, f"invalid JSON: {exc.msg} at column {exc.colno}"
        ) from None
    except ValueError as exc:
        # For example an integer of more than 4300 digits (Python's limit).
        raise TraceError(source, number, f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise TraceError(
            source, number, f"expected a JSON object, found {_excerpt(line)}"
        )

    known = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
    for key in value:
        if key not in known:
            raise TraceError(
                source,
                number,
                f"unknown key {key!r}; expected time, guest, demand and "
                "optionally cache",
            )
    for key in REQUIRED_COLUMNS:
        if key not in value:
            raise TraceError(source, number, f"missing key {key!r}")

    time = value["time"]
    if isinstance(time, bool) or not isinstance(time, int | float):
        raise TraceError(
            source, number, f"invalid time {time!r}: expected a number of seconds"
        )
    if isinstance(time, int) and abs(time) > 10**15:
        raise TraceError(
            source, number, f"invalid time {str(time)[:40]}: too large for seconds"
        )

    guest = _parse_guest(source, number, _json_string(source, number, value, "guest"))
    demand = _parse_size(
        source, number, "demand", _json_string(source, number, value, "demand")
    )
    cache = 0
    if "cache" in value:
        cache_text = _json_string(source, number, value, "cache")
        cache = _parse_size(source, number, "cache", cache_text)
    return _check_time(source, number, float(time), repr(time)), guest, demand, cache


def _json_string(source: str, number: int, value: dict[str, object], key: str) -> str:
    field = value[key]
    if not isinstance(field, str):
        expected = "a name" if key == "guest" else 'a size such as "300 MiB"'
        raise TraceError(
            source,
            number,
            f"invalid {key} {field!r}: expected a JSON string, {expected}",
        )
    return field


def _excerpt(text: str) -> str:
    if len(text) <= MAX_SHOWN_CHARS:
        return repr(text)
    return repr(text[:MAX_SHOWN_CHARS]) + "..."


def _parse_time(source: str, number: int, text: str) -> float:
    try:
        time = float(text)
    except ValueError:
        raise TraceError(
            source, number, f"invalid time {text!r}: expected a number of seconds"
        ) from None
    return _check_time(source, number, time, repr(text))


def _check_time(source: str, number: int, time: float, written: str) -> float:
    if not math.isfinite(time) or time < 0:
        raise TraceError(
            source,
            number,
            f"invalid time {written}: expected a finite number of seconds, 0 or more",
        )
    return time


def _parse_guest(source: str, number: int, text: str) -> str:
    if not text or any(char.isspace() for char in text):
        raise TraceError(
            source,
            number,
            f"invalid guest name {text!r}: expected a non-empty name without spaces",
        )
    return text


def _parse_size(source: str, number: int, field: str, text: str) -> int:
    try:
        return parse_size(text)
    except SizeError as exc:
        raise TraceError(source, number, f"{field}: {exc}") from None


class _Builder:
    """Rows and directives collected so far, checked as they arrive."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.points: dict[str, list[Point]] = {}
        self.maxima: dict[str, tuple[int, int]] = {}
        self.host_memory: int | None = None
        self.last_time = 0.0

    def add_row(
        self, number: int, time: float, guest: str, demand: int, cache: int
    ) -> None:
        if time < self.last_time:
            raise TraceError(
                self.source,
                number,
                f"time {time:g} s is before the previous row's {self.last_time:g} s; "
                "rows must be in time order",
            )
        points = self.points.setdefault(guest, [])
        if points and points[-1].time == time:
            raise TraceError(
                self.source,
                number,
                f"second row for guest {guest!r} at time {time:g} s",
            )
        if not points and time != 0:
            raise TraceError(
                self.source,
                number,
                f"guest {guest!r} first appears at time {time:g} s; "
                "every guest needs a row at time 0",
            )
        points.append(Point(time, demand, cache))
        self.last_time = time

    def add_comment(self, number: int, text: str) -> None:
        if not text.startswith("@"):
            return
        name, _, rest = text[1:].partition(" ")
        if name == "host-memory":
            if self.host_memory is not None:
                raise TraceError(self.source, number, "second @host-memory directive")
            self.host_memory = self._positive_size(number, "@host-memory", rest)
        elif name == "maximum":
            guest, _, size = rest.strip().partition(" ")
            guest = _parse_guest(self.source, number, guest)
            if guest in self.maxima:
                raise TraceError(
                    self.source, number, f"second @maximum for guest {guest!r}"
                )
            maximum = self._positive_size(number, "@maximum", size)
            self.maxima[guest] = (maximum, number)
        else:
            raise TraceError(
                self.source,
                number,
                f"unknown directive '@{name}'; expected "
                "'@host-memory SIZE' or '@maximum GUEST SIZE'",
            )

    def _positive_size(self, number: int, directive: str, text: str) -> int:
        size = _parse_size(self.source, number, directive, text.strip())
        if size <= 0:
            raise TraceError(
                self.source,
                number,
                f"{directive}: size {text.strip()!r} must be greater than 0",
            )
        return size

    def finish(self, name: str) -> Trace:
        if not self.points:
            raise TraceError(self.source, None, "no rows")
        for guest, (_, number) in self.maxima.items():
            if guest not in self.points:
                raise TraceError(
                    self.source,
                    number,
                    f"@maximum names guest {guest!r}, which has no rows",
                )
        if self.last_time <= 0:
            raise TraceError(
                self.source,
                None,
                "every row is at time 0; add a last row at the time the run ends",
            )
        guests = tuple(
            GuestTrace(
                name=guest,
                maximum=self.maxima.get(guest, (DEFAULT_MAXIMUM, 0))[0],
                points=tuple(points),
            )
            for guest, points in self.points.items()
        )
        return Trace(name, guests, self.last_time, self.host_memory)
