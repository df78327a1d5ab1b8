"""SIGHUP reload and ``balloonctl check-config``, with real child processes.

The child runs a dry run on ``test:///default``, whose built-in domain
reports 1 GiB unused of 2 GiB and, in a dry run, keeps reporting it: above a
100 MiB buffer it is released, and with a 1 GiB buffer it is kept. So the
decision after a reload shows which ``min_unused`` is in force.
"""

import signal
import subprocess
import sys
from pathlib import Path

from tests.childproc import ChildProcess
from tests.e2e.controller_proc import Line

BALLOONCTL = [sys.executable, "-m", "balloonctl"]
KIB_PER_GIB = 1024 * 1024


def dry_run(state_dir: Path, config: Path, *flags: str) -> ChildProcess:
    return ChildProcess(
        "--uri",
        "test:///default",
        "--dry-run",
        "--stats-period",
        "1",
        "--state-dir",
        str(state_dir),
        "--config",
        str(config),
        *flags,
    )


def decision_after(process: ChildProcess, line: Line) -> Line:
    """Return the first decision about ``test`` logged after ``line``."""

    def later_decision(candidate: Line) -> bool:
        return (
            candidate["event"] in ("memory_released", "memory_kept")
            and candidate.get("domain") == "test"
            and candidate["_received"] > line["_received"]
        )

    return process.wait_for(later_decision, timeout=20)


def test_reload_applies_valid_file(tmp_path: Path) -> None:
    config = tmp_path / "balloonctl.toml"
    config.write_text('min_unused = "100 MiB"\n')

    with dry_run(tmp_path, config) as process:
        process.wait_event("memory_released", timeout=20, domain="test")
        config.write_text('min_unused = "1 GiB"\n')
        process.send(signal.SIGHUP)
        reloaded = process.wait_event("config_reloaded", timeout=20)
        decision = decision_after(process, reloaded)
    code = process.returncode

    assert code == 0
    assert reloaded["path"] == str(config)
    assert reloaded["changed"] == [
        {"key": "min_unused", "old": 100 * 1024, "new": KIB_PER_GIB}
    ]
    assert decision["event"] == "memory_kept"
    assert decision["reason"] == "free_within_buffer"
    assert decision["uri"] == "test:///default"


def test_reload_rejects_invalid_file(tmp_path: Path) -> None:
    config = tmp_path / "balloonctl.toml"
    config.write_text('min_unused = "1 GiB"\n')

    with dry_run(tmp_path, config) as process:
        process.wait_event("memory_kept", timeout=20, domain="test")
        config.write_text('min_unused = "lots"\n')
        process.send(signal.SIGHUP)
        failed = process.wait_event("config_reload_failed", timeout=20)
        decision = decision_after(process, failed)

    assert failed["level"] == "warning"
    assert failed["key"] == "min_unused"
    assert failed["value"] == "lots"
    assert "'lots'" in failed["error"]
    assert process.events("config_reloaded") == []
    # The old 1 GiB buffer stays in force.
    assert decision["event"] == "memory_kept"
    assert decision["reason"] == "free_within_buffer"


def test_reload_keeps_flags_over_file(tmp_path: Path) -> None:
    config = tmp_path / "balloonctl.toml"
    config.write_text('max_release = "10 MiB"\n')

    with dry_run(tmp_path, config, "--min-unused", "1 GiB") as process:
        process.wait_event("memory_kept", timeout=20, domain="test")
        config.write_text('min_unused = "100 MiB"\nmax_release = "20 MiB"\n')
        process.send(signal.SIGHUP)
        reloaded = process.wait_event("config_reloaded", timeout=20)
        decision = decision_after(process, reloaded)

    assert reloaded["changed"] == [
        {"key": "max_release", "old": 10 * 1024, "new": 20 * 1024}
    ]
    assert decision["event"] == "memory_kept"


def test_reload_reports_restart_only_keys(tmp_path: Path) -> None:
    config = tmp_path / "balloonctl.toml"
    config.write_text("stuck_periods = 3\n")
    elsewhere = tmp_path / "elsewhere"

    with dry_run(tmp_path, config) as process:
        process.wait_event("controller_started", timeout=20)
        config.write_text(
            f'stuck_periods = 5\nstate_dir = "{elsewhere}"\ncall_timeout = 3\n'
        )
        process.send(signal.SIGHUP)
        restart = process.wait_event("config_restart_required", timeout=20)
        reloaded = process.events("config_reloaded")

    assert restart["level"] == "warning"
    # --state-dir was given on the command line, so the file's state_dir
    # does not count as a change.
    assert restart["changed"] == [{"key": "call_timeout", "old": 10.0, "new": 3.0}]
    assert len(reloaded) == 1
    assert reloaded[0]["changed"] == [{"key": "stuck_periods", "old": 3, "new": 5}]


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BALLOONCTL, "check-config", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_check_config_accepts_valid_file(tmp_path: Path) -> None:
    config = tmp_path / "ok.toml"
    config.write_text('uris = ["test:///default", "qemu:///system"]\n')

    result = check_config(str(config))

    assert result.returncode == 0
    assert result.stdout.strip() == (
        f"{config}: OK (manages test:///default, qemu:///system)"
    )
    assert result.stderr == ""


def test_check_config_error_matches_run(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('uri = "test:///default"\nstuck_periods = 0\n')

    checked = check_config(str(config))
    ran = subprocess.run(
        [*BALLOONCTL, "run", "--config", str(config), "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert checked.returncode == 2
    assert ran.returncode == 2
    assert "'stuck_periods'" in checked.stderr
    assert checked.stderr == ran.stderr


def test_check_config_rejects_uri_and_uris(tmp_path: Path) -> None:
    config = tmp_path / "both.toml"
    config.write_text('uri = "test:///default"\nuris = ["qemu:///system"]\n')

    result = check_config(str(config))

    assert result.returncode == 2
    assert "'uri' and 'uris'" in result.stderr


def test_check_config_missing_file_exits_2(tmp_path: Path) -> None:
    result = check_config(str(tmp_path / "absent.toml"))

    assert result.returncode == 2
    assert "absent.toml" in result.stderr
