"""``balloonctl run`` and the floor loop as child processes, measured from /proc."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from tests.bench.testdriver import cpu_seconds, resident_kib

READY_TIMEOUT_S = 120.0


class Child:
    """A child process whose standard output goes to a file that is polled."""

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.args = args
        self.output_path = workdir / f"{name}.out"
        self._stderr_path = workdir / f"{name}.err"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        with (
            open(self.output_path, "wb") as stdout,
            open(self._stderr_path, "wb") as stderr,
        ):
            self._process = subprocess.Popen(self.args, stdout=stdout, stderr=stderr)

    def output_lines(self) -> list[str]:
        return self.output_path.read_text(errors="replace").splitlines()

    def wait_ready(
        self, is_ready: Callable[[list[str]], bool], timeout: float = READY_TIMEOUT_S
    ) -> float:
        """Poll the output until ``is_ready`` returns True; return the seconds taken."""
        started = time.monotonic()
        while not is_ready(self.output_lines()):
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"{self.args[:4]} exited with {self._process.returncode}: "
                    + self._stderr_path.read_text(errors="replace")[-2000:]
                )
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{self.args[:4]} not ready within {timeout} s")
            time.sleep(0.2)
        return time.monotonic() - started

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def resident_kib(self) -> int:
        return resident_kib(self.pid)

    def stop(self, timeout: float = 15.0) -> int:
        process = self._process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        return process.returncode

    def __enter__(self) -> "Child":
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def controller(uri: str, period: int, workdir: Path) -> Child:
    """Return (not started) ``balloonctl run`` at the default info level."""
    state_dir = tempfile.mkdtemp(prefix="state-", dir=workdir)
    args = [
        sys.executable,
        "-m",
        "balloonctl",
        "run",
        "--uri",
        uri,
        "--stats-period",
        str(period),
        "--log-format",
        "json",
        "--state-dir",
        state_dir,
    ]
    return Child(args, workdir, "controller")


def floor_loop(uri: str, period: int, workdir: Path) -> Child:
    args = [sys.executable, "-m", "tests.bench.floor", uri, str(period)]
    return Child(args, workdir, "floor")


def controller_ready(domains: int) -> Callable[[list[str]], bool]:
    """Ready once ``controller_started`` is logged and every domain had a decision."""

    def check(lines: list[str]) -> bool:
        started = False
        decided = set()
        for raw in lines:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("event") == "controller_started":
                started = True
            elif line.get("event") == "memory_kept":
                decided.add(line.get("uuid"))
        return started and len(decided) >= domains

    return check


def floor_ready(lines: list[str]) -> bool:
    return any(line.startswith("ready") for line in lines)
