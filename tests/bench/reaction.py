"""Reaction latency: from a domain's creation to balloonctl acting on it.

For each start the benchmark notes the wall-clock time, creates a 512 MiB
domain with ``createXML`` and reads, from the controller's JSON lines, the
timestamps of that domain's ``stats_period_set`` and of its first decision
(``memory_released``, since unused is above the buffer). The domain is then
destroyed, so the controller manages the same number of domains throughout.
Starts are spaced by a random pause so that they fall at every phase of the
other domains' periods.
"""

import asyncio
import random
import time

from tests.bench import inprocess
from tests.bench.inprocess import log_time
from tests.bench.results import BenchResult, percentile
from tests.bench.testdriver import domain_xml

PERIOD_S = 1
MAX_PAUSE_S = 0.1


async def one_start(running: inprocess.Running, name: str) -> tuple[float, float]:
    """Start one domain; return the seconds to stats_period_set and to a decision."""
    xml = domain_xml(name, current_mib=512)
    created_at = time.time()
    dom = await asyncio.to_thread(running.conn.createXML, xml, 0)
    logs = running.logs
    period_set = await logs.wait_event("stats_period_set", domain=name, timeout=60)
    decided = await logs.wait_for(
        lambda line: (
            line.get("domain") == name and line["event"] in inprocess.DECISIONS
        ),
        timeout=60,
    )
    await asyncio.to_thread(dom.destroy)
    await logs.wait_event("domain_removed", domain=name, timeout=60)
    return log_time(period_set) - created_at, log_time(decided) - created_at


async def run(sizes: list[int], starts: int, repeats: int) -> BenchResult:
    result = BenchResult("reaction")
    result.settings = {
        "managed_domains": sizes,
        "starts_per_repeat": starts,
        "repeats": repeats,
        "period_s": PERIOD_S,
        "max_pause_s": MAX_PAUSE_S,
    }
    rng = random.Random(1)
    for size in sizes:
        runs: dict[str, list[float]] = {}
        async with inprocess.connection() as conn:
            await inprocess.create_domains(conn, "bench-bg", size)
            async with inprocess.controller(conn, size, period=PERIOD_S) as running:
                for repeat in range(repeats):
                    to_period, to_decision = [], []
                    for index in range(starts):
                        await asyncio.sleep(rng.uniform(0, MAX_PAUSE_S))
                        name = f"bench-new-{repeat}-{index}"
                        period_s, decision_s = await one_start(running, name)
                        to_period.append(1000 * period_s)
                        to_decision.append(1000 * decision_s)
                        # Keep the captured lines from growing without bound.
                        del running.logs.lines[:]
                    for label, values in (
                        ("stats_period_set", to_period),
                        ("first_decision", to_decision),
                    ):
                        runs.setdefault(f"{label}_p50", []).append(
                            percentile(values, 0.5)
                        )
                        runs.setdefault(f"{label}_p99", []).append(
                            percentile(values, 0.99)
                        )
                        runs.setdefault(f"{label}_max", []).append(max(values))
        for key, values in runs.items():
            result.add(f"managed_{size}/{key}", values, "ms")
    return result
