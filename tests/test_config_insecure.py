"""A config file other users could change is reported at start-up.

Real files with real modes and owners, read by a real ``balloonctl run``
child; the check itself is also run in-process for each case.
"""

import os
from pathlib import Path

import pytest

from balloonctl.config import insecure_reason
from tests.childproc import ChildProcess

NOBODY = 65534


def config_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "balloonctl.toml"
    path.write_text('stats_period = 1\nhost_warn = "0 KiB"\n')
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("mode", "fragment"),
    [(0o664, "writable by its group"), (0o646, "writable by other users")],
)
def test_writable_config_is_reported(tmp_path: Path, mode: int, fragment: str) -> None:
    config = config_file(tmp_path, mode)

    with ChildProcess("--uri", "test:///default", "--config", str(config)) as child:
        warning = child.wait_event("config_insecure", timeout=15)
        child.wait_event("controller_started", timeout=15)

    assert warning["level"] == "warning"
    assert warning["path"] == str(config)
    assert warning["mode"] == f"{mode:04o}"
    assert fragment in warning["reason"]
    assert "chmod go-w" in warning["reason"]
    assert fragment in (insecure_reason(config) or "")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_config_owned_by_other_user_is_reported(tmp_path: Path) -> None:
    config = config_file(tmp_path, 0o644)
    os.chown(config, NOBODY, NOBODY)

    with ChildProcess("--uri", "test:///default", "--config", str(config)) as child:
        warning = child.wait_event("config_insecure", timeout=15)

    assert warning["owner_uid"] == NOBODY
    assert f"owned by uid {NOBODY}" in warning["reason"]


def test_private_config_is_not_reported(tmp_path: Path) -> None:
    config = config_file(tmp_path, 0o600)

    with ChildProcess("--uri", "test:///default", "--config", str(config)) as child:
        child.wait_event("memory_released", timeout=15)

    assert insecure_reason(config) is None
    assert child.events("config_insecure") == []
