"""Smoke tests of the e2e guest image: balloon statistics, setmem and the serial shell.

These check the test environment itself, not balloonctl: if they fail, the
controller's end-to-end tests cannot mean anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import libvirt
import pytest

from tests.e2e import harness

pytestmark = pytest.mark.e2e

GUEST_MEMORY_MIB = 512
STATS_PERIOD_S = 2
BOOT_TIMEOUT_S = 120.0
# Three stats periods: enough for QEMU to poll the guest at least twice.
STATS_TIMEOUT_S = 3 * STATS_PERIOD_S + 1
SETMEM_TIMEOUT_S = 10.0


def memory_stats(domain: libvirt.virDomain) -> dict[str, int]:
    stats: dict[str, int] = domain.memoryStats()
    return stats


def wait_for_stats(
    domain: libvirt.virDomain,
    condition: Callable[[dict[str, int]], bool],
    timeout: float,
    description: str,
) -> dict[str, int]:
    """Poll the memory stats until ``condition`` returns True and return them."""

    def poll() -> dict[str, int] | None:
        stats = memory_stats(domain)
        return stats if condition(stats) else None

    return harness.wait_until(poll, timeout=timeout, description=description)


@pytest.fixture(scope="module")
def module_conn(libvirtd: harness.Libvirtd) -> Iterator[libvirt.virConnect]:
    conn = libvirtd.connect()
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def balloon_guest(
    module_conn: libvirt.virConnect, guest_image: harness.GuestImage
) -> Iterator[harness.Guest]:
    with harness.Guest(
        module_conn, guest_image, "smoke-balloon", memory_mib=GUEST_MEMORY_MIB
    ) as guest:
        guest.wait_booted(BOOT_TIMEOUT_S)
        guest.domain.setMemoryStatsPeriod(
            STATS_PERIOD_S, libvirt.VIR_DOMAIN_AFFECT_LIVE
        )
        yield guest


@pytest.fixture(scope="module")
def driverless_guest(
    module_conn: libvirt.virConnect, guest_image: harness.GuestImage
) -> Iterator[harness.Guest]:
    with harness.Guest(
        module_conn,
        guest_image,
        "smoke-no-balloon",
        memory_mib=GUEST_MEMORY_MIB,
        balloon_driver=False,
    ) as guest:
        guest.wait_booted(BOOT_TIMEOUT_S)
        guest.domain.setMemoryStatsPeriod(
            STATS_PERIOD_S, libvirt.VIR_DOMAIN_AFFECT_LIVE
        )
        yield guest


def test_balloon_guest_reports_unused_and_actual(balloon_guest: harness.Guest) -> None:
    stats = wait_for_stats(
        balloon_guest.domain,
        lambda s: "unused" in s,
        timeout=STATS_TIMEOUT_S,
        description=f"'unused' in the memory stats of {balloon_guest.name}",
    )

    assert "actual" in stats, stats
    assert stats["actual"] == GUEST_MEMORY_MIB * 1024, stats
    assert 0 < stats["unused"] < GUEST_MEMORY_MIB * 1024, stats


def test_set_memory_lowers_actual(balloon_guest: harness.Guest) -> None:
    domain = balloon_guest.domain
    full_kib = GUEST_MEMORY_MIB * 1024
    target_kib = (GUEST_MEMORY_MIB - 128) * 1024

    domain.setMemoryFlags(target_kib, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    try:
        stats = wait_for_stats(
            domain,
            lambda s: s["actual"] <= target_kib,
            timeout=SETMEM_TIMEOUT_S,
            description=f"'actual' of {balloon_guest.name} to reach {target_kib} KiB",
        )
        assert stats["actual"] == target_kib, stats
    finally:
        domain.setMemoryFlags(full_kib, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    restored = wait_for_stats(
        domain,
        lambda s: s["actual"] == full_kib,
        timeout=SETMEM_TIMEOUT_S,
        description=f"'actual' of {balloon_guest.name} to return to {full_kib} KiB",
    )
    assert restored["actual"] == full_kib, restored


def test_guest_without_driver_reports_no_unused(
    driverless_guest: harness.Guest,
) -> None:
    rc, lsmod = driverless_guest.run("lsmod")
    assert rc == 0, lsmod
    assert "virtio_balloon" not in lsmod

    # No stats ever arrive from a guest without the driver, so the test
    # waits for what would be three stats periods before it looks.
    with pytest.raises(TimeoutError):
        wait_for_stats(
            driverless_guest.domain,
            lambda s: "unused" in s,
            timeout=STATS_TIMEOUT_S,
            description="'unused' in the stats of a guest without virtio_balloon",
        )

    stats = memory_stats(driverless_guest.domain)
    assert "unused" not in stats, stats
    assert "actual" in stats, stats


def test_serial_shell_runs_command(balloon_guest: harness.Guest) -> None:
    rc, output = balloon_guest.run("echo hello; uname -r")
    assert rc == 0, output
    assert output.startswith("hello\n"), output

    rc, output = balloon_guest.run("echo to-stderr >&2; exit 3")
    assert rc == 3, output
    assert output == "to-stderr\n"


def test_serial_shell_fills_tmpfs(balloon_guest: harness.Guest) -> None:
    rc, output = balloon_guest.run(
        "mkdir -p /mnt/smoke && mount -t tmpfs -o size=64m tmpfs /mnt/smoke"
        " && dd if=/dev/zero of=/mnt/smoke/fill bs=1M count=32"
    )
    try:
        assert rc == 0, output
        assert "32+0 records out" in output
    finally:
        balloon_guest.run("umount /mnt/smoke")


def test_balloon_module_unload_freezes_stats(balloon_guest: harness.Guest) -> None:
    domain = balloon_guest.domain
    rc, output = balloon_guest.run("rmmod virtio_balloon")
    assert rc == 0, output
    _, unloaded_lsmod = balloon_guest.run("lsmod")
    frozen = memory_stats(domain)
    time.sleep(2 * STATS_PERIOD_S + 1)
    still_frozen = memory_stats(domain)

    rc, output = balloon_guest.run("modprobe virtio_balloon")
    assert rc == 0, output
    _, reloaded_lsmod = balloon_guest.run("lsmod")
    resumed = wait_for_stats(
        domain,
        lambda s: s["last_update"] > still_frozen["last_update"],
        timeout=STATS_TIMEOUT_S,
        description=f"fresh stats from {balloon_guest.name} after modprobe",
    )

    assert "virtio_balloon" not in unloaded_lsmod
    # libvirt keeps returning the last stats the driver sent, with the old
    # last_update, and still lists "unused".
    assert "unused" in still_frozen, still_frozen
    assert still_frozen["last_update"] == frozen["last_update"], still_frozen
    assert "virtio_balloon" in reloaded_lsmod
    assert "unused" in resumed, resumed
