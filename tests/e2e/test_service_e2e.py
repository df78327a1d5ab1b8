"""Several hypervisor URIs in one ``balloonctl run``, against a real libvirtd."""

import pytest

from tests.e2e import harness
from tests.e2e.controller_proc import ControllerProcess

pytestmark = pytest.mark.e2e

QEMU_URI = "qemu:///system"
# libvirt's test driver inside the real daemon, reached over its socket.
TEST_URI = "test+unix:///default"


def test_two_daemon_uris_in_one_process(libvirtd: harness.Libvirtd) -> None:
    args = ["--uri", QEMU_URI, "--uri", TEST_URI, "--stats-period", "1"]
    with ControllerProcess(*args) as controller:
        started = {
            uri: controller.wait_event("controller_started", uri=uri, timeout=30)
            for uri in (QEMU_URI, TEST_URI)
        }
        added = controller.wait_event("domain_added", uri=TEST_URI, timeout=10)
        libvirtd.restart()
        back = {
            uri: controller.wait_event("libvirt_reconnected", uri=uri, timeout=30)
            for uri in (QEMU_URI, TEST_URI)
        }
    code = controller.returncode

    assert code == 0
    # Both connections go through libvirt's remote driver to the daemon,
    # so both accept keepalive.
    assert started[QEMU_URI]["keepalive"] is True
    assert started[TEST_URI]["keepalive"] is True
    assert added["domain"] == "test"
    assert set(back) == {QEMU_URI, TEST_URI}
    assert controller.events("domain_added", uri=QEMU_URI, domain="test") == []
