"""The command line, run as a real process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import balloonctl

BALLOONCTL = [sys.executable, "-m", "balloonctl"]


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BALLOONCTL, *args], capture_output=True, text=True, timeout=timeout
    )


def test_version_matches_package() -> None:
    result = run("--version")

    assert result.returncode == 0
    assert result.stdout.strip() == f"balloonctl {balloonctl.__version__}"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("balloonctl")

    result = subprocess.run([script, "--help"], capture_output=True, text=True)

    assert result.returncode == 0
    assert "run" in result.stdout
    assert "plan" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["run", "--min-unused", "100"], ["--min-unused", "'100'", "unit is required"]),
        (["run", "--host-warn", "2 GB"], ["--host-warn", "unknown unit 'GB'"]),
        (["plan", "--stats-period", "fast"], ["--stats-period", "'fast'"]),
        (["run", "--config", "/nonexistent/balloonctl.toml"], ["/nonexistent"]),
    ],
)
def test_bad_setting_exits_2_naming_it(args: list[str], fragments: list[str]) -> None:
    result = run(*args)

    assert result.returncode == 2
    for fragment in fragments:
        assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_key_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('max_release = "50"\n')

    result = run("run", "--config", str(config))

    assert result.returncode == 2
    assert "'max_release'" in result.stderr
    assert str(config) in result.stderr


def test_unknown_log_format_exits_2() -> None:
    result = run("run", "--log-format", "xml")

    assert result.returncode == 2
    assert "xml" in result.stderr


def test_unreachable_uri_exits_1_without_traceback(tmp_path: Path) -> None:
    uri = "test:///nonexistent/host.xml"

    result = run("run", "--uri", uri, "--state-dir", str(tmp_path))

    assert result.returncode == 1
    assert uri in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    failed = [json.loads(line) for line in result.stdout.splitlines()]
    assert failed[-1]["event"] == "controller_failed"


def test_plan_table_shows_domain_and_reason() -> None:
    result = run("plan", "--uri", "test:///default")

    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()[:2]
    assert header.split() == [
        "DOMAIN",
        "STATE",
        "STATUS",
        "METRIC",
        "FLOOR",
        "ACTUAL",
        "UNUSED",
        "USABLE",
        "MAXIMUM",
        "ACTION",
        "TARGET",
        "REASON",
    ]
    assert row.split()[:4] == ["test", "running", "managed", "unused"]
    assert "2.00 GiB" in row
    assert "release" in row
    assert "free_above_buffer" in row


NO_STATS_NODE = """<node>
  <cpu><nodes>1</nodes><sockets>1</sockets><cores>1</cores><threads>1</threads>
    <mhz>2000</mhz><model>i686</model><active>1</active></cpu>
  <memory>8388608</memory>
  <domain type='test'>
    <name>quiet</name>
    <memory unit='MiB'>768</memory>
    <vcpu>1</vcpu>
    <os><type>hvm</type></os>
  </domain>
</node>
"""


def test_plan_marks_a_domain_without_statistics(tmp_path: Path) -> None:
    # A test-driver domain defined in a file reports no balloon statistics,
    # like a guest whose balloon driver is not loaded.
    node = tmp_path / "node.xml"
    node.write_text(NO_STATS_NODE)

    result = run("plan", "--uri", f"test://{node}")

    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[1].split()
    assert row[:3] == ["quiet", "running", "no_stats"]
    assert "keep" in row


def test_plan_json_gives_exact_kib() -> None:
    result = run("plan", "--uri", "test:///default", "--json", "--min-unused", "1 GiB")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    (domain,) = document["domains"]
    assert domain["domain"] == "test"
    assert domain["actual_kib"] == 2097152
    assert domain["unused_kib"] == 1048576
    assert domain["maximum_kib"] == 8388608
    assert domain["action"] == "keep"
    assert domain["reason"] == "free_within_buffer"
    assert domain["status"] == "managed"
    assert domain["metric"] == "unused"
    assert domain["floor_kib"] == 8388608 // 10
    assert document["host_memory_source"] == "node_free_memory"


def start_run(state_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *BALLOONCTL,
            "run",
            "--uri",
            "test:///default",
            "--stats-period",
            "1",
            "--state-dir",
            str(state_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(process: subprocess.Popen[str], event: str) -> None:
    """Read the child's JSON lines up to the first ``event``."""
    assert process.stdout is not None
    for line in process.stdout:
        if json.loads(line)["event"] == event:
            return
    raise AssertionError(f"the child exited before logging {event}")


def test_sigterm_exits_0_within_2s(tmp_path: Path) -> None:
    process = start_run(tmp_path)
    try:
        read_until(process, "memory_released")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=5)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    assert process.returncode == 0
    assert elapsed < 2.0
    assert "Traceback" not in stderr
    assert json.loads(stdout.splitlines()[-1])["event"] == "controller_stopped"


def test_sigint_exits_0(tmp_path: Path) -> None:
    process = start_run(tmp_path)
    read_until(process, "controller_started")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=5)

    assert process.returncode == 0
    assert "Traceback" not in stderr
    assert json.loads(stdout.splitlines()[-1])["event"] == "controller_stopped"


def test_sighup_without_config_keeps_running(tmp_path: Path) -> None:
    process = start_run(tmp_path)
    read_until(process, "controller_started")
    process.send_signal(signal.SIGHUP)
    read_until(process, "config_reload_failed")
    process.send_signal(signal.SIGTERM)
    _stdout, stderr = process.communicate(timeout=5)

    assert process.returncode == 0
    assert "Traceback" not in stderr


def test_plan_into_closed_pipe_exits_0() -> None:
    plan = subprocess.Popen(
        [*BALLOONCTL, "plan", "--uri", "test:///default"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert plan.stdout is not None
    plan.stdout.close()
    _stdout, stderr = plan.communicate(timeout=20)

    assert plan.returncode == 0
    assert b"Traceback" not in stderr


def _catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_sigterm_while_reading_settings_exits_0(tmp_path: Path) -> None:
    # A config file with many sections takes a moment to read; the stop
    # signal is sent as soon as the process catches SIGTERM, which is
    # before the settings are read.
    config = tmp_path / "balloonctl.toml"
    config.write_text(
        "".join(f'[domains."d{n}"]\nmin_unused = "200 MiB"\n' for n in range(20000))
    )
    process = subprocess.Popen(
        [
            *BALLOONCTL,
            "run",
            "--uri",
            "test:///default",
            "--config",
            str(config),
            "--log-format",
            "json",
            "--state-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not _catches_sigterm(process.pid) and time.monotonic() < deadline:
            time.sleep(0.001)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    events = [json.loads(line)["event"] for line in stdout.splitlines()]
    assert "controller_stopped" in events
