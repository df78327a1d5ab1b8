"""Isolation: how late other domains' samples are while one domain hangs.

A hung libvirt call (a QEMU monitor that does not answer) cannot be
produced on demand on libvirt's test driver, so this benchmark slows one
domain down itself: ``DelayingHypervisor`` is the real ``LibvirtHypervisor``
with that one domain's handle wrapped so that each of its calls sleeps
before it reaches libvirt. The sleep happens inside the adapter's worker
thread, under its call timeout, which is where a real hung call would
block. Every other domain's calls go to libvirt unchanged.

Each window first runs with no delay (the baseline), then with the delay.
A sample's lateness is the time since that domain's previous sample minus
the stats period.
"""

import asyncio
import itertools
import time
from typing import Any

from balloonctl.hypervisor import DomainInfo, DomainRef, MemoryStats
from balloonctl.libvirt_adapter import LibvirtHypervisor
from tests.bench import inprocess
from tests.bench.results import BenchResult, percentile

PERIOD_S = 1


class _SlowDomain:
    """A virDomain whose every call first sleeps ``delay_s`` when enabled."""

    def __init__(self, dom: Any, owner: "DelayingHypervisor") -> None:
        self._dom = dom
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._dom, name)
        if not callable(method):
            return method

        def delayed(*args: Any, **kwargs: Any) -> Any:
            if self._owner.delay_s:
                time.sleep(self._owner.delay_s)
            return method(*args, **kwargs)

        return delayed


class DelayingHypervisor(LibvirtHypervisor):
    """The real adapter, with one domain's calls delayed and samples timed."""

    def __init__(self, uri: str, victim: str, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        self.victim = victim
        self.delay_s = 0.0
        self.sampled_at: dict[str, list[float]] = {}

    async def _domain(self, ref: DomainRef) -> Any:
        dom = await super()._domain(ref)
        if ref.uuid == self.victim:
            return _SlowDomain(dom, self)
        return dom

    async def memory_stats(self, domain: DomainRef) -> MemoryStats:
        stats = await super().memory_stats(domain)
        self._record(domain)
        return stats

    async def sample(self, domain: DomainRef) -> tuple[DomainInfo, MemoryStats | None]:
        info, stats = await super().sample(domain)
        if stats is not None:
            self._record(domain)
        return info, stats

    def _record(self, domain: DomainRef) -> None:
        self.sampled_at.setdefault(domain.uuid, []).append(time.monotonic())


def lateness(
    hv: DelayingHypervisor, start: float, end: float, period: float
) -> list[float]:
    """Return the lateness in seconds of non-victim samples taken in [start, end)."""
    late = []
    for uuid, times in hv.sampled_at.items():
        if uuid == hv.victim:
            continue
        for previous, current in itertools.pairwise(times):
            if start <= current < end:
                late.append(current - previous - period)
    return late


async def run(
    sizes: list[int], delay_s: float, window_s: float, repeats: int
) -> BenchResult:
    result = BenchResult("isolation")
    result.settings = {
        "domains": sizes,
        "delay_s": delay_s,
        "window_s": window_s,
        "repeats": repeats,
        "period_s": PERIOD_S,
    }
    for size in sizes:
        runs = await _measure(size, delay_s, window_s, repeats)
        for key, values in runs.items():
            unit = "samples" if key.endswith("victim_samples") else "ms"
            result.add(f"domains_{size}/{key}", values, unit)
    return result


async def _measure(
    domains: int, delay_s: float, window_s: float, repeats: int
) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {}
    async with inprocess.connection() as conn:
        created = await inprocess.create_domains(conn, "bench-iso", domains)
        victim = created[0].UUIDString()
        hv = DelayingHypervisor(inprocess.TEST_URI, victim)
        async with inprocess.controller(conn, domains, period=PERIOD_S, hypervisor=hv):
            for _ in range(repeats):
                for phase, delay in (("baseline", 0.0), ("delayed", delay_s)):
                    hv.delay_s = delay
                    start = time.monotonic()
                    await asyncio.sleep(window_s)
                    late = lateness(hv, start, time.monotonic(), PERIOD_S)
                    runs.setdefault(f"{phase}/lateness_p50", []).append(
                        1000 * percentile(late, 0.5)
                    )
                    runs.setdefault(f"{phase}/lateness_p99", []).append(
                        1000 * percentile(late, 0.99)
                    )
                    runs.setdefault(f"{phase}/lateness_max", []).append(
                        1000 * max(late)
                    )
                    victim_samples = hv.sampled_at.get(victim, [])
                    runs.setdefault(f"{phase}/victim_samples", []).append(
                        sum(1 for when in victim_samples if when >= start)
                    )
            hv.delay_s = 0.0
    return runs
