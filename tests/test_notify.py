"""The systemd notification protocol, read from a real datagram socket that
a real ``balloonctl run`` child sends to."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloonctl.notify import Notifier, watchdog_interval
from tests.childproc import ChildProcess, host_file

ROOT = Path(__file__).resolve().parents[1]


class NotifySocket:
    """A bound AF_UNIX datagram socket, as systemd's NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.messages: list[list[str]] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bound = b"\0" + address[1:].encode() if address.startswith("@") else address
        self._socket.bind(bound)

    def receive_until(self, key: str, timeout: float = 20.0) -> list[str]:
        """Read datagrams until one has line ``key``; return that one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._socket.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                break
            lines = data.decode().split("\n")
            self.messages.append(lines)
            if key in lines or any(line.startswith(f"{key}=") for line in lines):
                return lines
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")

    def first_lines(self) -> list[str]:
        return [message[0] for message in self.messages]

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


class NotifiedChild(ChildProcess):
    def __init__(self, environment: dict[str, str], *args: str) -> None:
        super().__init__(*args)
        self._environment = environment

    def start(self) -> None:
        # ControllerProcess passes the test's environment on; add to it
        # only for the child's lifetime.
        saved = dict(os.environ)
        os.environ.update(self._environment)
        try:
            super().start()
        finally:
            os.environ.clear()
            os.environ.update(saved)


def notified(
    tmp_path: Path, listener: NotifySocket, *args: str, **environment: str
) -> NotifiedChild:
    return NotifiedChild(
        {"NOTIFY_SOCKET": listener.address, **environment},
        "--stats-period",
        "1",
        "--state-dir",
        str(tmp_path),
        *args,
    )


def test_ready_watchdog_stopping_in_order(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    child = notified(
        tmp_path,
        notify_socket,
        "--uri",
        "test:///default",
        WATCHDOG_USEC="1000000",
    )
    with child:
        ready = notify_socket.receive_until("READY")
        child.wait_event("controller_started", timeout=20)
        # Refreshed once the domain's policy is read.
        notify_socket.receive_until("STATUS=1 domain on 1 of 1 host, 1 managed")
        notify_socket.receive_until("WATCHDOG")
        notify_socket.receive_until("WATCHDOG")
        child.send(signal.SIGTERM)
        stopping = notify_socket.receive_until("STOPPING")
        code = child.wait_exit()

    assert code == 0
    assert ready[0] == "READY=1"
    assert ready[1].startswith("STATUS=1 domain on 1 of 1 host, ")
    assert stopping == ["STOPPING=1", "STATUS=stopping"]
    keys = notify_socket.first_lines()
    assert keys[0] == "READY=1"
    assert keys[-1] == "STOPPING=1"
    assert keys.count("WATCHDOG=1") >= 2


def test_abstract_socket_gets_ready(tmp_path: Path) -> None:
    listener = NotifySocket(f"@bctl-test-{uuid.uuid4()}")
    try:
        with notified(tmp_path, listener, "--uri", "test:///default"):
            ready = listener.receive_until("READY")
    finally:
        listener.close()

    assert ready[0] == "READY=1"


def test_ready_waits_for_every_host(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    alpha = host_file(tmp_path / "alpha.xml", "alpha-1", "alpha-2")
    missing = f"test://{tmp_path}/nonexistent.xml"

    with notified(tmp_path, notify_socket, "--uri", alpha, "--uri", missing):
        ready = notify_socket.receive_until("READY")

    # Both hosts had settled: one connected with its two domains, one failed.
    assert ready[0] == "READY=1"
    assert ready[1].startswith("STATUS=2 domains on 1 of 2 hosts, ")


def test_other_watchdog_pid_sends_no_pings(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    child = notified(
        tmp_path,
        notify_socket,
        "--uri",
        "test:///default",
        WATCHDOG_USEC="200000",
        WATCHDOG_PID="1",
    )
    with child:
        notify_socket.receive_until("READY")
        # With a ping due every 0.1 s, two periods would carry several.
        child.wait_event("memory_released", timeout=20)
        child.wait_event("memory_released", timeout=20)
        child.send(signal.SIGTERM)
        notify_socket.receive_until("STOPPING")

    assert "WATCHDOG=1" not in notify_socket.first_lines()


def test_reload_sends_reloading_then_ready(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    config = tmp_path / "balloonctl.toml"
    config.write_text("stuck_periods = 3\n")
    child = notified(
        tmp_path, notify_socket, "--uri", "test:///default", "--config", str(config)
    )
    with child:
        notify_socket.receive_until("READY")
        config.write_text("stuck_periods = 4\n")
        child.send(signal.SIGHUP)
        reloading = notify_socket.receive_until("RELOADING")
        ready = notify_socket.receive_until("READY")

    assert reloading[1].startswith("MONOTONIC_USEC=")
    assert int(reloading[1].split("=", 1)[1]) > 0
    assert ready[0] == "READY=1"


def test_interval_is_half_the_watchdog() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0


@pytest.mark.parametrize(
    "environment",
    [
        {},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"},
    ],
)
def test_no_watchdog_interval(environment: dict[str, str]) -> None:
    assert watchdog_interval(environment) is None


def test_watchdog_pid_of_this_process() -> None:
    environment = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}

    assert watchdog_interval(environment) == 1.0


def test_without_notify_socket_sends_nothing() -> None:
    notifier = Notifier.from_environment({})

    assert not notifier.enabled
    notifier.send("READY=1")  # must not raise


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_unit_file_passes_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists, so point it at this venv's command.
    script = Path(sys.executable).with_name("balloonctl")
    text = (ROOT / "contrib" / "systemd" / "balloonctl.service").read_text()
    assert "/opt/balloonctl/bin/balloonctl run" in text
    unit = tmp_path / "balloonctl.service"
    unit.write_text(text.replace("/opt/balloonctl/bin/balloonctl", str(script)))
    assert SYSTEMD_ANALYZE is not None

    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_unit_file_has_required_settings() -> None:
    lines = (ROOT / "contrib" / "systemd" / "balloonctl.service").read_text()
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in lines.splitlines()
        if "=" in line and not line.startswith("#")
    }

    assert settings["Type"] == "notify"
    assert settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"] == "2"
    assert settings["RuntimeDirectory"] == "balloonctl"
    assert settings["WatchdogSec"] == "30s"
    assert settings["ProtectSystem"] == "strict"
    assert "Requires" not in settings
