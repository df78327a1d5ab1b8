"""Grow-back, per-domain metadata and manual changes on real QEMU guests."""

import subprocess
import time
from typing import Any

import pytest

from balloonctl.domain_policy import NAMESPACE
from balloonctl.units import MIB
from tests.e2e import harness
from tests.e2e.controller_proc import ControllerProcess, settled

pytestmark = pytest.mark.e2e

PERIOD = "2"
# 25 steps of 10 MiB with 0.4 s between them: 250 MiB in about 10 s.
FILL_TMPFS = (
    "mkdir -p /mnt/fill && mount -t tmpfs -o size=400m tmpfs /mnt/fill && "
    "i=0; while [ $i -lt 25 ]; do "
    "dd if=/dev/zero of=/mnt/fill/part$i bs=1M count=10 2>/dev/null || exit 3; "
    "i=$((i+1)); sleep 0.4; done"
)


def test_burst_is_granted_and_guest_survives(
    libvirt_conn: Any, guest_image: harness.GuestImage
) -> None:
    with harness.Guest(libvirt_conn, guest_image, "burst") as guest:
        guest.wait_booted()
        with ControllerProcess("--stats-period", PERIOD) as controller:
            controller.wait_for(settled(guest.name), timeout=180)
            shrunk = guest.domain.memoryStats()["actual"]

            status, output = guest.run(FILL_TMPFS, timeout=60)
            granted = controller.wait_event("memory_granted", domain=guest.name)
            time.sleep(3 * int(PERIOD))
            grown = guest.domain.memoryStats()
            alive, _ = guest.run("echo alive", timeout=10)

            guest.run("rm -rf /mnt/fill/* && umount /mnt/fill", timeout=30)
            released_again = controller.wait_for(
                lambda line: (
                    line["event"] == "memory_released"
                    and line.get("domain") == guest.name
                    and line["_received"] > granted["_received"]
                ),
                timeout=120,
            )
        console = guest.console_log()

    assert status == 0, output
    assert granted["reason"] == "free_below_buffer"
    assert granted["granted_kib"] > 0
    assert granted["target_kib"] <= 512 * MIB
    assert grown["actual"] >= shrunk + 250 * MIB - 100 * MIB
    assert grown["unused"] >= 50 * MIB
    assert alive == 0
    assert "Out of memory" not in console
    assert "Kernel panic" not in console
    assert released_again["released_kib"] <= 50 * MIB
    assert not controller.events("domain_call_failed", domain=guest.name)


def test_metadata_switches_management_off(
    libvirt_conn: Any, guest_image: harness.GuestImage
) -> None:
    metadata = f"<b:policy xmlns:b='{NAMESPACE}' managed='no'/>"
    with harness.Guest(
        libvirt_conn, guest_image, "unmanaged", metadata_xml=metadata
    ) as guest:
        guest.wait_booted()
        with ControllerProcess("--stats-period", PERIOD) as controller:
            excluded = controller.wait_event("domain_excluded", domain=guest.name)
            time.sleep(4 * int(PERIOD))
            actual = guest.domain.memoryStats()["actual"]

    assert "metadata" in excluded["reason"]
    assert actual == 512 * MIB
    assert not controller.events("memory_released", domain=guest.name)
    assert not controller.events("stats_period_set", domain=guest.name)


def test_manual_setmem_not_fought_during_grace(
    libvirt_conn: Any, guest_image: harness.GuestImage
) -> None:
    with harness.Guest(libvirt_conn, guest_image, "manual") as guest:
        guest.wait_booted()
        with ControllerProcess("--stats-period", PERIOD) as controller:
            controller.wait_for(settled(guest.name), timeout=180)
            subprocess.run(
                [
                    "virsh",
                    "-c",
                    harness.LIBVIRT_URI,
                    "setmem",
                    guest.name,
                    "450M",
                    "--live",
                ],
                check=True,
                capture_output=True,
            )
            detected = controller.wait_event(
                "manual_change_detected", domain=guest.name, timeout=20
            )
            time.sleep(5 * int(PERIOD))
            actual = guest.domain.memoryStats()["actual"]
        kept = controller.events(
            "memory_kept", domain=guest.name, reason="manual_change_grace"
        )

    after = [
        line
        for line in controller.events("memory_released", domain=guest.name)
        if line["_received"] > detected["_received"]
    ]
    assert detected["grace_s"] == 600
    assert after == []
    assert kept
    assert abs(actual - 450 * MIB) <= 1024
