"""Real guests: convergence and grant latency on QEMU guests under TCG.

This uses the end-to-end harness (tests/e2e/harness.py): a private libvirtd
on the system sockets, guests booted from the image of
scripts/build-guest.sh, and ``balloonctl run`` as a child process
(tests/e2e/controller_proc.py). It holds /run/lock/balloonctl-e2e.lock, the
lock every e2e pytest session holds, for the whole time it has a libvirtd.

Two figures, both compared with the stats period, because a guest reports
its statistics once a period and balloonctl samples once a period:

- convergence: from an idle 512 MiB guest's ``domain_added`` to the
  ``memory_kept`` line that says nothing more is worth releasing;
- grant latency: from the moment a burst starts filling a tmpfs in the
  guest to the controller's ``memory_granted`` line for that guest.
"""

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator

from tests.bench.results import BenchResult
from tests.e2e import harness
from tests.e2e.controller_proc import ControllerProcess, settled

E2E_LOCK = "/run/lock/balloonctl-e2e.lock"
# After a release settles, unused is 100 to 150 MiB, and after a grant it
# is about 100 MiB plus the 64 MiB grow margin; 80 MiB takes either under
# the 100 MiB buffer. Three bursts stay below the 512 MiB maximum.
BURST_MIB = 80
MOUNT_TMPFS = "mkdir -p /mnt/fill && mount -t tmpfs -o size=400m tmpfs /mnt/fill"


def skip_reason() -> str | None:
    if os.environ.get("BENCH_SKIP_REAL") == "1":
        return "BENCH_SKIP_REAL=1"
    return harness.skip_reason()


@contextlib.contextmanager
def e2e_libvirtd() -> Iterator[tuple[harness.Libvirtd, float]]:
    """Hold the e2e lock and a libvirtd; yield it and the seconds spent waiting."""
    waited_from = time.monotonic()
    with open(E2E_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waited = time.monotonic() - waited_from
        with harness.Libvirtd() as daemon:
            conn = daemon.connect()
            try:
                harness.destroy_leftover_domains(conn)
            finally:
                conn.close()
            yield daemon, waited


def run(guests: int, bursts: int, period: int) -> BenchResult:
    result = BenchResult("real")
    result.settings = {
        "guests": guests,
        "bursts_per_guest": bursts,
        "burst_mib": BURST_MIB,
        "period_s": period,
        "guest_memory_mib": 512,
    }
    reason = skip_reason()
    if reason is not None:
        result.skipped = reason
        return result

    image = harness.build_guest_image()
    with e2e_libvirtd() as (daemon, waited):
        result.notes.append(f"waited {waited:.0f} s for the e2e lock")
        conn = daemon.connect()
        try:
            converge, grant = _measure(conn, image, guests, bursts, period)
        finally:
            conn.close()
    result.add("convergence_s", converge, "s")
    result.add("convergence_periods", [value / period for value in converge], "periods")
    result.add("grant_latency_s", grant, "s")
    result.add("grant_latency_periods", [value / period for value in grant], "periods")
    return result


def _measure(
    conn: object, image: harness.GuestImage, guests: int, bursts: int, period: int
) -> tuple[list[float], list[float]]:
    with contextlib.ExitStack() as stack:
        started = [
            stack.enter_context(harness.Guest(conn, image, f"bench-{index}"))
            for index in range(guests)
        ]
        for guest in started:
            guest.wait_booted()
        for guest in started:
            guest.run(MOUNT_TMPFS)
        state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-"))
        controller = stack.enter_context(
            ControllerProcess("--stats-period", str(period), "--state-dir", state_dir)
        )
        converge = []
        for guest in started:
            added = controller.wait_event("domain_added", domain=guest.name)
            done = controller.wait_for(settled(guest.name), timeout=300)
            converge.append(done["_received"] - added["_received"])

        grant = []
        for guest in started:
            for index in range(bursts):
                burst_at = time.monotonic()
                status, output = guest.run(
                    f"dd if=/dev/zero of=/mnt/fill/burst{index} bs=1M "
                    f"count={BURST_MIB} 2>&1",
                    timeout=120,
                )
                if status != 0:
                    raise RuntimeError(f"burst in {guest.name} failed: {output}")
                granted = controller.wait_for(
                    lambda line, name=guest.name, since=burst_at: (
                        line["event"] == "memory_granted"
                        and line.get("domain") == name
                        and line["_received"] > since
                    ),
                    timeout=60,
                )
                grant.append(granted["_received"] - burst_at)
                # Let the guest report its new size before the next burst.
                time.sleep(2 * period)
    return converge, grant
