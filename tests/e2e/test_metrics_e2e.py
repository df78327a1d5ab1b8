"""The metrics endpoint of balloonctl run against a real libvirtd and guest."""

import urllib.request
from typing import Any

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import harness
from tests.e2e.controller_proc import ControllerProcess, settled

pytestmark = pytest.mark.e2e

URI = "qemu:///system"


def scrape(port: int) -> list[Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def value(samples: list[Any], name: str, **labels: str) -> float | None:
    for sample in samples:
        if sample.name == name and all(
            sample.labels.get(key) == wanted for key, wanted in labels.items()
        ):
            return float(sample.value)
    return None


def test_settled_guest_metrics_match_libvirt(
    libvirt_conn: Any, guest_image: harness.GuestImage
) -> None:
    with harness.Guest(libvirt_conn, guest_image, "metrics") as guest:
        guest.wait_booted()
        uuid = guest.domain.UUIDString()
        with ControllerProcess(
            "--stats-period", "2", "--metrics-listen", "127.0.0.1:0"
        ) as controller:
            listening = controller.wait_event("metrics_listening")
            kept = controller.wait_for(settled(guest.name), timeout=180)
            samples = scrape(listening["port"])
            releases = controller.events("memory_released", domain=guest.name)
            actual_kib = guest.domain.memoryStats()["actual"]
            node = libvirt_conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
        assert controller.returncode == 0

    labels = {"host": URI, "domain": guest.name, "uuid": uuid}
    assert releases
    actual = value(samples, "balloonctl_domain_actual_bytes", **labels)
    target = value(samples, "balloonctl_domain_target_bytes", **labels)
    maximum = value(samples, "balloonctl_domain_maximum_bytes", **labels)
    assert actual == kept["actual_kib"] * 1024
    assert actual == actual_kib * 1024
    assert target == releases[-1]["target_kib"] * 1024
    assert maximum == kept["maximum_kib"] * 1024
    managed = value(samples, "balloonctl_domain_status", status="managed", **labels)
    assert managed == 1
    assert value(samples, "balloonctl_libvirt_up", host=URI) == 1
    # The host's figure moves between the scrape and this reading, so only
    # its range is checked: above 0 and at most the host's total memory.
    available = value(samples, "balloonctl_host_available_memory_bytes", host=URI)
    assert available is not None
    assert 0 < available <= node["total"] * 1024
