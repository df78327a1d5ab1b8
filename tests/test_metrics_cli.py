"""``balloonctl run`` with and without metrics, as a child process."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.childproc import host_file

BALLOONCTL = [sys.executable, "-m", "balloonctl"]
TEST_URI = "test:///default"
# The built-in domain keeps half of its memory unused; with this buffer it
# converges in a few steps from 2 GiB instead of shrinking for a minute.
FAST_BUFFER = ["--min-unused", "950 MiB", "--stats-period", "1"]


class Child:
    """A ``balloonctl run`` child whose JSON lines are read in a thread."""

    def __init__(self, *args: str, state_dir: Path) -> None:
        self.process = subprocess.Popen(
            [
                *BALLOONCTL,
                "run",
                "--uri",
                TEST_URI,
                "--state-dir",
                str(state_dir),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._queue.put(json.loads(raw))
        self._queue.put(None)

    def wait_event(self, event: str, timeout: float = 20, **fields: Any) -> Any:
        """Return the next line with ``event`` and ``fields``, reading on."""
        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                raise AssertionError(f"the child exited before logging {event}")
            self.lines.append(line)
            if line["event"] == event and all(
                line.get(key) == value for key, value in fields.items()
            ):
                return line

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        finally:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reader.join(timeout=5)
        assert self.process.stderr is not None
        return self.process.returncode, self.process.stderr.read()


@pytest.fixture
def child_runs(tmp_path: Path) -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


def start(child_runs: list[Child], tmp_path: Path, *args: str) -> Child:
    state_dir = tmp_path / f"state-{len(child_runs)}"
    child = Child(*args, state_dir=state_dir)
    child_runs.append(child)
    return child


def listening_inodes(pid: int) -> set[str]:
    """Return the inodes of the process's listening TCP sockets.

    /proc/PID/net/tcp and tcp6 list the sockets of the process's network
    namespace; the ones in state 0A (LISTEN) whose inode is also one of the
    process's open file descriptors belong to the process.
    """
    listening = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A":
                listening.add(fields[9])
    owned = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while listing
        if target.startswith("socket:["):
            owned.add(target[len("socket:[") : -1])
    return listening & owned


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(families: dict[str, Any], name: str, **labels: str) -> float | None:
    family = families.get(name)
    if family is None:
        return None
    for sample in family.samples:
        if all(sample.labels.get(key) == value for key, value in labels.items()):
            return float(sample.value)
    return None


def test_run_without_metrics_listens_nowhere(
    child_runs: list[Child], tmp_path: Path
) -> None:
    child = start(child_runs, tmp_path, "--stats-period", "1")
    child.wait_event("memory_released")

    inodes = listening_inodes(child.process.pid)

    assert inodes == set()
    assert not [line for line in child.lines if line["event"] == "metrics_listening"]


def test_run_with_metrics_listens_once(child_runs: list[Child], tmp_path: Path) -> None:
    # The check of the test above, shown to find a listening socket.
    child = start(child_runs, tmp_path, "--metrics-listen", "127.0.0.1:0")
    child.wait_event("controller_started")

    inodes = listening_inodes(child.process.pid)

    assert len(inodes) == 1


def test_metrics_match_the_log_lines(child_runs: list[Child], tmp_path: Path) -> None:
    child = start(child_runs, tmp_path, "--metrics-listen", ":0", *FAST_BUFFER)
    listening = child.wait_event("metrics_listening")
    added = child.wait_event("domain_added", domain="test")
    kept = child.wait_event(
        "memory_kept", domain="test", reason="release_below_min_release"
    )

    families = scrape(listening["port"])

    labels = {"host": TEST_URI, "domain": "test", "uuid": added["uuid"]}
    releases = [line for line in child.lines if line["event"] == "memory_released"]
    assert listening["host"] == "127.0.0.1"
    assert len(releases) >= 2
    actual = sample_value(families, "balloonctl_domain_actual_bytes", **labels)
    target = sample_value(families, "balloonctl_domain_target_bytes", **labels)
    unused = sample_value(families, "balloonctl_domain_unused_bytes", **labels)
    released = sample_value(families, "balloonctl_domain_released_bytes", **labels)
    assert actual == kept["actual_kib"] * 1024
    assert unused == kept["unused_kib"] * 1024
    assert target == releases[-1]["target_kib"] * 1024
    assert released == sum(line["released_kib"] for line in releases) * 1024
    decisions = sample_value(
        families,
        "balloonctl_domain_decisions",
        action="release",
        reason="free_above_buffer",
        **labels,
    )
    assert decisions == len(releases)
    assert sample_value(families, "balloonctl_libvirt_up", host=TEST_URI) == 1
    assert sample_value(families, "balloonctl_managed_domains", host=TEST_URI) == 1
    # The test driver reports 3 MiB free host memory (virNodeGetFreeMemory).
    available = sample_value(
        families, "balloonctl_host_available_memory_bytes", host=TEST_URI
    )
    assert available == 3 * 1024**2


def test_metrics_listen_from_config_file(
    child_runs: list[Child], tmp_path: Path
) -> None:
    config = tmp_path / "balloonctl.toml"
    config.write_text('metrics_listen = "127.0.0.1:0"\n')
    child = start(child_runs, tmp_path, "--config", str(config))

    listening = child.wait_event("metrics_listening")

    families = scrape(listening["port"])
    assert sample_value(families, "balloonctl_build_info") == 1


def test_bad_metrics_listen_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [*BALLOONCTL, "run", "--uri", TEST_URI, "--metrics-listen", "[::1:9700"],
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert result.returncode == 2
    assert "--metrics-listen" in result.stderr
    assert "'[::1:9700'" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_port_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                *BALLOONCTL,
                "run",
                "--uri",
                TEST_URI,
                "--state-dir",
                str(tmp_path),
                "--metrics-listen",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )

    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    failed = json.loads(result.stdout.splitlines()[-1])
    assert failed["event"] == "metrics_listen_failed"
    assert failed["address"] == f"127.0.0.1:{port}"


def test_several_hosts_have_their_own_series(
    child_runs: list[Child], tmp_path: Path
) -> None:
    other = host_file(tmp_path / "host.xml", "bctl-other")
    child = start(
        child_runs, tmp_path, "--uri", other, "--metrics-listen", "127.0.0.1:0"
    )
    listening = child.wait_event("metrics_listening")
    child.wait_event("memory_released", domain="test")
    child.wait_event("memory_released", domain="bctl-other")

    families = scrape(listening["port"])

    for uri in (TEST_URI, other):
        assert sample_value(families, "balloonctl_libvirt_up", host=uri) == 1
        assert sample_value(families, "balloonctl_managed_domains", host=uri) == 1
    hosts = {
        sample.labels["domain"]: sample.labels["host"]
        for sample in families["balloonctl_domain_actual_bytes"].samples
    }
    assert hosts == {"test": TEST_URI, "bctl-other": other}


def test_reload_keeps_metrics_address(child_runs: list[Child], tmp_path: Path) -> None:
    config = tmp_path / "balloonctl.toml"
    config.write_text('metrics_listen = "127.0.0.1:0"\n')
    child = start(child_runs, tmp_path, "--config", str(config))
    listening = child.wait_event("metrics_listening")
    child.wait_event("controller_started")

    config.write_text('metrics_listen = "127.0.0.1:1"\n')
    child.process.send_signal(signal.SIGHUP)
    restart = child.wait_event("config_restart_required")

    assert restart["changed"] == [
        {"key": "metrics_listen", "old": "127.0.0.1:0", "new": "127.0.0.1:1"}
    ]
    families = scrape(listening["port"])
    assert sample_value(families, "balloonctl_build_info") == 1
