"""The per-URI lock file: what it refuses to open."""

from pathlib import Path

import pytest

from balloonctl.lock import LockFailed, LockHeld, acquire, lock_path

URI = "test:///default"


def test_symlink_at_lock_path_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    lock_path(str(state_dir), URI).symlink_to(victim)

    with pytest.raises(LockFailed) as info:
        acquire(str(state_dir), URI)

    assert victim.read_text() == "keep me\n"
    assert "set --state-dir" in str(info.value)


def test_state_dir_that_is_a_file_is_named(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("")

    with pytest.raises(LockFailed) as info:
        acquire(str(not_a_dir), URI)

    assert f"{str(not_a_dir)!r} is not a directory" in str(info.value)


def test_directory_at_lock_path_is_refused(tmp_path: Path) -> None:
    lock_path(str(tmp_path), URI).mkdir()

    with pytest.raises(LockFailed):
        acquire(str(tmp_path), URI)


def test_second_lock_names_the_holder(tmp_path: Path) -> None:
    held = acquire(str(tmp_path), URI)
    try:
        with pytest.raises(LockHeld) as info:
            acquire(str(tmp_path), URI)
    finally:
        held.release()

    assert info.value.pid is not None
