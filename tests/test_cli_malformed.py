"""Malformed config files given to real ``balloonctl run`` and ``plan`` processes.

Each case must exit 2 with one message that names the file (and the key,
where there is one) and says what to do, never with a traceback.
"""

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BALLOONCTL = [sys.executable, "-m", "balloonctl"]
NOBODY = 65534


def limit_memory() -> None:
    # A reader that tried to load an endless file would hit this limit and
    # fail instead of exhausting the machine's memory.
    resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))


def run_child(
    command: str, config: Path, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    args = [command, "--uri", "test:///default", "--config", str(config)]
    return subprocess.run(
        [*prefix, *BALLOONCTL, *args],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit_memory,
    )


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "balloonctl.toml"
    path.write_bytes(data)
    return path


CASES = {
    "bad TOML": (b"min_unused = \n", ["not valid TOML"]),
    "unknown key": (b'colour = "blue"\n', ["'colour'", "is unknown", "valid keys"]),
    "negative size": (b'max_release = "-50 MiB"\n', ["'max_release'", "'-50 MiB'"]),
    "unit-less size": (b'min_unused = "100"\n', ["'min_unused'", "100 MiB"]),
    "number for size": (b"min_unused = 100\n", ["'min_unused'", "with a unit"]),
    "wrong type": (b"stats_period = [5]\n", ["'stats_period'", "[5]"]),
    "bad section": (
        b'[domains."web"]\nmin_unused = "lots"\n',
        ["'web'", "'min_unused'", "'lots'"],
    ),
    "non-UTF-8": (b'uri = "test:///\xff"\n', ["not UTF-8", "save it as UTF-8"]),
    "deep nesting": (b"include = " + b"[" * 100_000 + b"]" * 100_000, ["nests"]),
}


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_config_exits_2(tmp_path: Path, command: str, case: str) -> None:
    data, fragments = CASES[case]
    config = write(tmp_path, data)

    result = run_child(command, config)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert str(config) in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_huge_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "huge.toml"
    with config.open("wb") as file:
        file.write(b'uri = "')
        file.write(b"a" * (50 * 1000 * 1000))
        file.write(b'"\n')

    result = run_child("run", config)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "larger than" in result.stderr
    assert str(config) in result.stderr


@pytest.mark.parametrize("command", ["run", "plan"])
def test_endless_file_exits_2(command: str) -> None:
    result = run_child(command, Path("/dev/zero"))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "'/dev/zero'" in result.stderr
    assert "not a regular file" in result.stderr


@pytest.mark.parametrize("command", ["run", "plan"])
def test_directory_config_exits_2(tmp_path: Path, command: str) -> None:
    result = run_child(command, tmp_path)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(tmp_path) in result.stderr
    assert "not a regular file" in result.stderr


def test_unreadable_config_exits_2(tmp_path: Path) -> None:
    config = write(tmp_path, b'uri = "test:///default"\n')
    config.chmod(0o600)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        # root reads any file, so the child runs as nobody (util-linux's
        # setpriv), for whom a root-owned mode 600 file is unreadable.
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed as root"
        prefix = (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
        tmp_path.chmod(0o755)
    else:
        config.chmod(0)

    result = run_child("run", config, prefix)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert str(config) in result.stderr
    assert "Permission denied" in result.stderr
