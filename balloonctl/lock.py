"""One ``balloonctl run`` per hypervisor: a lock file per URI in the state dir.

The lock is an ``fcntl.flock`` on ``lock-HASH.pid`` (HASH as in the state
file's name), held for the life of the process. The kernel releases it when
the process dies, even by SIGKILL, so a stale file never blocks a restart.
The holder's pid is written into the file so that a second instance can
name it.
"""

import fcntl
import os
import stat
from pathlib import Path

from balloonctl.state import uri_digest


class LockHeld(Exception):
    """Another process holds the lock for a URI."""

    def __init__(self, uri: str, path: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(
            f"{uri!r} is already managed by balloonctl {holder} "
            f"(lock file {str(path)!r}); stop that process first, or give "
            "this one another URI"
        )
        self.uri = uri
        self.path = path
        self.pid = pid


class LockFailed(Exception):
    """The lock file could not be created or locked."""


def lock_path(state_dir: str, uri: str) -> Path:
    return Path(state_dir) / f"lock-{uri_digest(uri)}.pid"


class HostLock:
    """An exclusive lock on one URI, released by ``release`` or at exit."""

    def __init__(self, uri: str, path: Path, fd: int) -> None:
        self.uri = uri
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        # The file stays: removing it would let a third process lock a new
        # file while a second one still waits on the old one.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def acquire(state_dir: str, uri: str) -> HostLock:
    """Lock ``uri`` for this process and write its pid into the lock file.

    Raises LockHeld naming the holder's pid, or LockFailed if the state
    directory or the file cannot be created.
    """
    path = lock_path(state_dir, uri)
    if path.parent.exists() and not path.parent.is_dir():
        raise LockFailed(
            f"state directory {str(path.parent)!r} is not a directory; "
            "set --state-dir to a writable directory"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a symbolic link planted at the lock's path must not
        # make balloonctl truncate the file it points to.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise LockFailed(
            f"cannot create lock file {str(path)!r}: {exc.strerror}; "
            "set --state-dir to a writable directory"
        ) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockFailed(f"lock file {str(path)!r} is not a regular file; remove it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise LockHeld(uri, path, pid) from None
    except OSError as exc:
        os.close(fd)
        raise LockFailed(f"cannot lock {str(path)!r}: {exc.strerror}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{uri}\n".encode(), 0)
    return HostLock(uri, path, fd)


def _read_pid(fd: int) -> int | None:
    try:
        first = os.pread(fd, 64, 0).split(b"\n", 1)[0]
        return int(first)
    except (OSError, ValueError):
        return None  # the holder has not written its pid yet
