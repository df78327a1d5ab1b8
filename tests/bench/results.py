"""Figures, summaries and the description of the machine they ran on."""

import dataclasses
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile: ``fraction`` 0.99 gives p99."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summary(runs: Sequence[float], unit: str) -> dict[str, Any]:
    """Summarize one figure's repeated runs as min, median and max."""
    if not runs:
        raise ValueError("a figure needs at least one run")
    return {
        "unit": unit,
        "min": min(runs),
        "median": statistics.median(runs),
        "max": max(runs),
        "runs": list(runs),
    }


@dataclasses.dataclass
class BenchResult:
    """One sub-benchmark's figures, settings and the load while it ran."""

    name: str
    figures: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    load_before: tuple[float, float, float] = dataclasses.field(
        default_factory=os.getloadavg
    )
    load_after: tuple[float, float, float] | None = None
    seconds: float = 0.0

    def add(self, key: str, runs: Sequence[float], unit: str) -> None:
        self.figures[key] = summary(runs, unit)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """Describe the machine, interpreter and libraries."""
    import libvirt

    library = libvirt.getVersion()
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "libvirt": f"{library // 1_000_000}.{library // 1000 % 1000}.{library % 1000}",
        "libvirt_python": _version("libvirt-python"),
        "structlog": _version("structlog"),
        "load_at_start": os.getloadavg(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def render(results: Sequence[BenchResult]) -> str:
    """Format the figures as a plain table."""
    lines = []
    for result in results:
        load = ", ".join(f"{value:.2f}" for value in result.load_before)
        header = f"== {result.name} ({result.seconds:.0f} s, load before {load})"
        lines.append(header)
        if result.skipped is not None:
            lines.append(f"   skipped: {result.skipped}")
        if result.error is not None:
            lines.append(f"   failed: {result.error}")
        for key, figure in result.figures.items():
            lines.append(
                f"   {key:<56} {_number(figure['min']):>10} "
                f"{_number(figure['median']):>10} {_number(figure['max']):>10} "
                f"{figure['unit']}"
            )
        lines.extend(f"   note: {note}" for note in result.notes)
    return "\n".join(lines)


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"
