"""Cost per domain and resident memory, with ``balloonctl run`` as a child.

The controller runs as its own process against a test driver file with N
running domains, so its CPU time (every thread, from /proc) contains nothing
of the benchmark. The floor loop (``tests.bench.floor``) then runs against
the same file and period. Both are measured over the same number of
windows after every domain has had its first decision.
"""

import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.bench import children
from tests.bench.results import BenchResult
from tests.bench.testdriver import write_node


@dataclasses.dataclass
class Readings:
    cpu_percent: list[float]
    us_per_domain_period: list[float]
    resident_mib: list[float]
    ready_s: float


def measure(
    child: children.Child,
    ready: Callable[[list[str]], bool],
    domains: int,
    period: int,
    windows: int,
    window_s: float,
) -> Readings:
    """Start ``child``, wait until ready and one more period, read each window."""
    with child:
        ready_s = child.wait_ready(ready)
        time.sleep(period)
        cpu_percent = []
        per_domain = []
        resident = []
        for _ in range(windows):
            cpu_before = child.cpu_seconds()
            wall_before = time.monotonic()
            time.sleep(window_s)
            cpu = child.cpu_seconds() - cpu_before
            wall = time.monotonic() - wall_before
            cpu_percent.append(100 * cpu / wall)
            if domains:
                periods = wall / period
                per_domain.append(1e6 * cpu / (domains * periods))
            resident.append(child.resident_kib() / 1024)
    return Readings(cpu_percent, per_domain, resident, ready_s)


def window_length(period: int, window_s: float) -> float:
    # A window covers whole periods, so each holds the same number of samples.
    return period * max(1, round(window_s / period))


def run_cost(
    cases: list[tuple[int, int]], windows: int, window_s: float
) -> BenchResult:
    """Measure each (domains, period) case for the controller and the floor."""
    result = BenchResult("cost")
    result.settings = {
        "cases_domains_period_s": cases,
        "windows": windows,
        "window_s": window_s,
    }
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        workdir = Path(tmp)
        for size, period in cases:
            length = window_length(period, window_s)
            if True:
                uri = write_node(workdir, size)
                own = measure(
                    children.controller(uri, period, workdir),
                    children.controller_ready(size),
                    size,
                    period,
                    windows,
                    length,
                )
                floor = measure(
                    children.floor_loop(uri, period, workdir),
                    children.floor_ready,
                    size,
                    period,
                    windows,
                    length,
                )
                key = f"domains_{size}/period_{period}s"
                result.add(f"{key}/controller_cpu_percent", own.cpu_percent, "%")
                result.add(
                    f"{key}/controller_us_per_domain_period",
                    own.us_per_domain_period,
                    "us",
                )
                result.add(
                    f"{key}/floor_us_per_domain_period",
                    floor.us_per_domain_period,
                    "us",
                )
                ratios = [
                    mine / base if base > 0 else float("inf")
                    for mine, base in zip(
                        own.us_per_domain_period,
                        floor.us_per_domain_period,
                        strict=True,
                    )
                ]
                result.add(f"{key}/ratio_to_floor", ratios, "x")
                result.add(f"{key}/controller_ready_s", [own.ready_s], "s")
    result.notes.append(
        "the domains sit at their buffer, so each period costs info and "
        "memoryStats per domain and no setMemoryFlags"
    )
    return result


def run_memory(sizes: list[int], windows: int) -> BenchResult:
    result = BenchResult("memory")
    period = 1
    result.settings = {"sizes": sizes, "period_s": period, "windows": windows}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        workdir = Path(tmp)
        for size in sizes:
            uri = write_node(workdir, size)
            own = measure(
                children.controller(uri, period, workdir),
                children.controller_ready(size),
                size,
                period,
                windows,
                period,
            )
            floor = measure(
                children.floor_loop(uri, period, workdir),
                children.floor_ready,
                size,
                period,
                windows,
                period,
            )
            key = f"domains_{size}"
            result.add(f"{key}/controller_rss_mib", own.resident_mib, "MiB")
            result.add(f"{key}/floor_rss_mib", floor.resident_mib, "MiB")
    result.notes.append(
        "the test driver keeps its domains inside the process that opens it, "
        "so both figures contain the driver's own state; the floor loop's "
        "figure is that state plus the interpreter and libvirt"
    )
    return result
