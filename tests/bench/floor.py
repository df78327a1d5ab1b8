"""The floor for the cost benchmark: one synchronous loop, no asyncio.

``python -m tests.bench.floor URI PERIOD`` makes, for every active domain
and every period, the libvirt calls that balloonctl's domain task makes
(``info``, ``memoryStats``, and ``setMemoryFlags`` when the policy asks for
a change), decides with the same pure policy function and reads the host's
memory once a period as the host watch does. It has no events, no threads,
no timeouts, no logging and no state file, so its CPU time is what the
calls and the decisions cost by themselves. It prints ``ready`` once it has
set up every domain and runs until SIGTERM.
"""

import signal
import sys
import time

import libvirt

from balloonctl.config import Settings
from balloonctl.domain_policy import resolve
from balloonctl.policy import Action, History, Sample, decide


def _host_available_kib(conn: libvirt.virConnect) -> int:
    try:
        stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
    except libvirt.libvirtError:
        stats = {}
    if "free" in stats:
        return sum(int(stats.get(key, 0)) for key in ("free", "buffers", "cached"))
    return int(conn.getFreeMemory()) // 1024


def main(uri: str, period: int) -> int:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    libvirt.registerErrorHandler(lambda _context, _error: None, None)
    conn = libvirt.open(uri)
    settings = Settings(uri=uri, stats_period=period)
    domains = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        policy = resolve(dom.name(), dom.XMLDesc(0), settings)
        if policy.params is not None:
            dom.setMemoryStatsPeriod(period, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            domains.append([dom, policy.params, History()])
    print(f"ready {len(domains)}", flush=True)

    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    next_period = time.monotonic()
    while True:
        host = _host_available_kib(conn)
        for entry in domains:
            dom, params, history = entry
            info = dom.info()
            if info[0] != libvirt.VIR_DOMAIN_RUNNING:
                continue
            stats = dom.memoryStats()
            sample = Sample(
                actual=stats.get("actual"),
                unused=stats.get("unused"),
                maximum=int(info[1]),
                last_update=None,
                taken_at=time.monotonic(),
                usable=stats.get("usable"),
                available=stats.get("available"),
                swap_in=stats.get("swap_in"),
                major_fault=stats.get("major_fault"),
            )
            decision, entry[2] = decide(sample, history, params, host)
            if decision.target is not None and decision.action is not Action.KEEP:
                dom.setMemoryFlags(decision.target, live)
        next_period += period
        time.sleep(max(0.0, next_period - time.monotonic()))


def _exit_on_signal(_signum: int, _frame: object) -> None:
    # Raised between two calls (Python runs signal handlers between
    # bytecodes), which ends the sleep at once.
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
