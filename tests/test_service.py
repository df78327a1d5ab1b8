"""``balloonctl run`` as a real child process: the per-URI lock, several
hosts in one process, and plan over several hosts."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.childproc import ChildProcess, host_file

BALLOONCTL = [sys.executable, "-m", "balloonctl"]


def child(state_dir: Path, *args: str) -> ChildProcess:
    return ChildProcess("--stats-period", "1", "--state-dir", str(state_dir), *args)


def test_second_instance_exits_1_naming_pid(tmp_path: Path) -> None:
    with child(tmp_path, "--uri", "test:///default") as first:
        first.wait_event("controller_started", timeout=20)
        second = child(tmp_path, "--uri", "test:///default")
        second.start()
        code = second.wait_exit(20)

    assert code == 1
    assert f"pid {first.pid}" in second.stderr
    assert "test:///default" in second.stderr
    assert "Traceback" not in second.stderr
    failed = second.events("controller_failed")
    assert len(failed) == 1
    assert failed[0]["uri"] == "test:///default"
    assert second.events("controller_started") == []


def test_lock_is_per_uri(tmp_path: Path) -> None:
    other = host_file(tmp_path / "other.xml", "other-1")

    with child(tmp_path, "--uri", "test:///default") as first:
        first.wait_event("controller_started", timeout=20)
        with child(tmp_path, "--uri", other) as second:
            started = second.wait_event("controller_started", timeout=20)

    assert started["uri"] == other


def test_sigkilled_holder_does_not_block_restart(tmp_path: Path) -> None:
    with child(tmp_path, "--uri", "test:///default") as first:
        first.wait_event("controller_started", timeout=20)
        first.send(signal.SIGKILL)
        assert first.wait_exit() == -signal.SIGKILL
    lock_files = list(tmp_path.glob("lock-*.pid"))
    assert len(lock_files) == 1
    assert lock_files[0].read_text().split()[0] == str(first.pid)

    with child(tmp_path, "--uri", "test:///default") as restarted:
        started = restarted.wait_event("controller_started", timeout=20)
        holder = lock_files[0].read_text().split()[0]

    assert started["uri"] == "test:///default"
    assert holder == str(restarted.pid)


def test_dry_run_takes_no_lock(tmp_path: Path) -> None:
    with child(tmp_path, "--uri", "test:///default") as managing:
        managing.wait_event("controller_started", timeout=20)
        with child(tmp_path, "--uri", "test:///default", "--dry-run") as dry:
            started = dry.wait_event("controller_started", timeout=20)

    assert started["dry_run"] is True


def test_several_hosts_in_one_process(tmp_path: Path) -> None:
    alpha = host_file(tmp_path / "alpha.xml", "alpha-1")
    beta = host_file(tmp_path / "beta.xml", "beta-1", "beta-2")
    missing = f"test://{tmp_path}/nonexistent.xml"
    args = ["--uri", alpha, "--uri", beta, "--uri", missing]

    with child(tmp_path, *args) as process:
        process.wait_event("libvirt_connect_failed", timeout=20, uri=missing)
        for uri in (alpha, beta):
            process.wait_event("controller_started", timeout=20, uri=uri)
        for name, uri in (("alpha-1", alpha), ("beta-1", beta), ("beta-2", beta)):
            released = process.wait_event("memory_released", timeout=20, domain=name)
            assert released["uri"] == uri
        # The unreachable host is retried while the others are managed.
        process.wait_event("libvirt_reconnect_failed", timeout=20, uri=missing)
    code = process.returncode

    assert code == 0
    started = {line["uri"] for line in process.events("controller_started")}
    assert started == {alpha, beta}
    # The test driver runs in the process, so it has no keepalive.
    keepalive = {line["keepalive"] for line in process.events("controller_started")}
    assert keepalive == {False}
    added = {(line["uri"], line["domain"]) for line in process.events("domain_added")}
    assert added == {(alpha, "alpha-1"), (beta, "beta-1"), (beta, "beta-2")}
    own = [line for line in process.lines if line.get("logger") == "balloonctl"]
    without_uri = [line for line in own if "uri" not in line]
    assert without_uri == []


def test_every_host_unreachable_exits_1(tmp_path: Path) -> None:
    first = f"test://{tmp_path}/first.xml"
    second = f"test://{tmp_path}/second.xml"

    process = child(tmp_path, "--uri", first, "--uri", second)
    process.start()
    code = process.wait_exit(20)

    assert code == 1
    assert first in process.stderr
    assert second in process.stderr
    failed = {line["uri"] for line in process.events("libvirt_connect_failed")}
    assert failed == {first, second}


def test_same_uri_twice_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [*BALLOONCTL, "run", "--uri", "test:///default", "--uri", "test:///default"],
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert result.returncode == 2
    assert "listed twice" in result.stderr
    assert "--uri" in result.stderr


def plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BALLOONCTL, "plan", *args], capture_output=True, text=True, timeout=20
    )


def test_plan_shows_every_host(tmp_path: Path) -> None:
    alpha = host_file(tmp_path / "alpha.xml", "alpha-1")
    beta = host_file(tmp_path / "beta.xml", "beta-1")

    result = plan("--uri", alpha, "--uri", beta, "--state-dir", str(tmp_path))

    assert result.returncode == 0, result.stderr
    blocks = result.stdout.split("\n\n")
    assert len(blocks) == 2
    assert blocks[0].startswith(f"uri: {alpha}\n")
    assert "alpha-1" in blocks[0]
    assert "beta-1" not in blocks[0]
    assert blocks[1].startswith(f"uri: {beta}\n")
    assert "beta-1" in blocks[1]


def test_plan_json_lists_hosts_and_errors(tmp_path: Path) -> None:
    alpha = host_file(tmp_path / "alpha.xml", "alpha-1")
    missing = f"test://{tmp_path}/nonexistent.xml"

    result = plan("--uri", alpha, "--uri", missing, "--json")

    assert result.returncode == 1
    assert missing in result.stderr
    hosts = json.loads(result.stdout)["hosts"]
    assert [host["uri"] for host in hosts] == [alpha, missing]
    assert [domain["domain"] for domain in hosts[0]["domains"]] == ["alpha-1"]
    assert "error" in hosts[1]


def test_pid_in_lock_file_is_alive_holder(tmp_path: Path) -> None:
    with child(tmp_path, "--uri", "test:///default") as process:
        process.wait_event("controller_started", timeout=20)
        (lock_file,) = tmp_path.glob("lock-*.pid")
        pid = int(lock_file.read_text().split()[0])
        os.kill(pid, 0)  # raises if no such process

    assert pid == process.pid


def test_dry_run_writes_no_files(tmp_path: Path) -> None:
    with child(tmp_path, "--uri", "test:///default", "--dry-run") as dry:
        first = dry.wait_event("memory_released", timeout=20)
        dry.wait_for(
            lambda line: line["event"] == "memory_released" and line is not first,
            timeout=20,
        )
        written = sorted(path.name for path in tmp_path.iterdir())

    assert written == []


def test_unwritable_state_dir_exits_1(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")

    process = child(not_a_directory, "--uri", "test:///default")
    process.start()
    code = process.wait_exit(20)

    assert code == 1
    assert f"{str(not_a_directory)!r} is not a directory" in process.stderr
    assert "--state-dir" in process.stderr
    assert process.events("controller_started") == []


class SilentListener:
    """A loopback TCP server that accepts connections and never answers.

    libvirt's remote client waits for the server's reply to its first
    message, so a connection to this server hangs until call_timeout.
    """

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.accepted = threading.Event()
        self._clients: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._clients.append(client)
            self.accepted.set()

    def close(self) -> None:
        self._server.close()
        for client in self._clients:
            client.close()


def test_sigterm_during_a_hanging_connect_exits_0(tmp_path: Path) -> None:
    listener = SilentListener()
    uri = f"qemu+tcp://127.0.0.1:{listener.port}/system"
    try:
        with child(tmp_path, "--uri", uri, "--call-timeout", "60") as running:
            assert listener.accepted.wait(20), "balloonctl never connected"
            # Well under call_timeout: the old code waited all 60 s for the
            # connection attempt and then exited 1.
            code = running.stop(timeout=15)
    finally:
        listener.close()

    assert code == 0, running.stderr
    assert "Traceback" not in running.stderr
    assert running.events("controller_stopped")


def test_sigterm_while_one_host_hangs_exits_0(tmp_path: Path) -> None:
    listener = SilentListener()
    hanging = f"qemu+tcp://127.0.0.1:{listener.port}/system"
    working = host_file(tmp_path / "a.xml", "alpha")
    try:
        with child(
            tmp_path, "--uri", working, "--uri", hanging, "--call-timeout", "60"
        ) as running:
            running.wait_event("controller_started", timeout=20)
            assert listener.accepted.wait(20), "balloonctl never connected"
            code = running.stop(timeout=15)
    finally:
        listener.close()

    assert code == 0, running.stderr
    assert "Traceback" not in running.stderr
