import os
import time
from pathlib import Path

from balloonctl.state import read_state, remove_state, state_path, write_state

URI = "qemu:///system"


def document(pid: int, uri: str = URI, age_s: float = 0.0) -> dict[str, object]:
    return {
        "uri": uri,
        "pid": pid,
        "written_at": time.time() - age_s,
        "stats_period_s": 5,
        "domains": {"u-1": {"domain": "web1", "status": "grace", "reason": "x"}},
    }


def test_state_round_trip(tmp_path: Path) -> None:
    path = state_path(str(tmp_path), URI)

    write_state(path, document(os.getpid()))

    assert read_state(path, URI)["u-1"]["status"] == "grace"
    assert list(tmp_path.iterdir()) == [path]


def test_state_of_exited_controller_is_ignored(tmp_path: Path) -> None:
    path = state_path(str(tmp_path), URI)
    # Linux pids stay below 2**22, so this one cannot be running.
    write_state(path, document(2**30))

    assert read_state(path, URI) == {}


def test_state_of_silent_controller_is_ignored(tmp_path: Path) -> None:
    path = state_path(str(tmp_path), URI)
    write_state(path, document(os.getpid(), age_s=60))

    assert read_state(path, URI) == {}


def test_out_of_range_pid_is_ignored(tmp_path: Path) -> None:
    path = state_path(str(tmp_path), URI)
    write_state(path, document(2**31))

    assert read_state(path, URI) == {}


def test_state_for_other_uri_is_ignored(tmp_path: Path) -> None:
    path = state_path(str(tmp_path), URI)
    write_state(path, document(os.getpid(), uri="test:///default"))

    assert read_state(path, URI) == {}


def test_unreadable_state_is_ignored(tmp_path: Path) -> None:
    path = state_path(str(tmp_path), URI)
    path.write_text("{not json")

    assert read_state(path, URI) == {}
    assert read_state(tmp_path / "absent.json", URI) == {}


def test_each_uri_has_its_own_file(tmp_path: Path) -> None:
    first = state_path(str(tmp_path), "qemu:///system")
    second = state_path(str(tmp_path), "qemu+ssh://host/system")

    assert first != second
    remove_state(first)
    assert not first.exists()
