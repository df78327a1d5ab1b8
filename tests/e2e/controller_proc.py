"""``balloonctl run`` as a real child process, with its JSON lines parsed."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

Line = dict[str, Any]

# A guest has converged when nothing more is worth releasing.
SETTLED_REASONS = {"free_within_buffer", "release_below_min_release"}


def settled(domain: str) -> Callable[[Line], bool]:
    """Match the line that says ``domain`` has converged to its buffer."""

    def matches(line: Line) -> bool:
        return (
            line["event"] == "memory_kept"
            and line.get("domain") == domain
            and line["reason"] in SETTLED_REASONS
        )

    return matches


class ControllerProcess:
    """Start ``python -m balloonctl run ARGS`` and collect its log lines."""

    def __init__(self, *args: str) -> None:
        self.args = ["run", "--log-format", "json", "--log-level", "debug", *args]
        if "--state-dir" not in args:
            # Its own lock and state file, so that it never meets another
            # balloonctl run on this machine.
            self.state_dir = tempfile.mkdtemp(prefix="bctl-state-")
            self.args += ["--state-dir", self.state_dir]
        self.lines: list[Line] = []
        self.stderr = ""
        self.returncode: int | None = None
        self._changed = threading.Condition()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "balloonctl", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for raw in self._process.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                # Keep reading: a line that is not JSON is a finding for the
                # test to report, not a reason to stop collecting.
                line = {"event": "_not_json", "level": "error", "text": raw}
            line["_received"] = time.monotonic()
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def events(self, name: str, **fields: Any) -> list[Line]:
        with self._changed:
            return [
                line
                for line in self.lines
                if line["event"] == name
                and all(line.get(key) == value for key, value in fields.items())
            ]

    def wait_for(self, predicate: Callable[[Line], bool], timeout: float) -> Line:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                exited = self._process is not None and self._process.poll() is not None
                if remaining <= 0 or exited:
                    break
                self._changed.wait(min(remaining, 0.5))
        raise AssertionError(self._describe_failure(timeout))

    def _describe_failure(self, timeout: float) -> str:
        """Stop the child, with its thread stacks if it still ran, and report."""
        process = self._process
        running = process is not None and process.poll() is None
        if running and process is not None:
            # balloonctl dumps every thread's stack to stderr on SIGUSR1.
            process.send_signal(signal.SIGUSR1)
            time.sleep(1)
        self.stop()
        own = [
            line for line in self.lines if line.get("logger") != "virEventAsyncIOImpl"
        ]
        return (
            f"no matching log line within {timeout} s; balloonctl "
            f"{'was still running' if running else 'had exited'}; "
            "last balloonctl lines:\n"
            + "\n".join(json.dumps(line) for line in own[-15:])
            + "\nstderr:\n"
            + self.stderr[-6000:]
        )

    def wait_event(self, name: str, timeout: float = 30.0, **fields: Any) -> Line:
        def matches(line: Line) -> bool:
            return line["event"] == name and all(
                line.get(key) == value for key, value in fields.items()
            )

        return self.wait_for(matches, timeout)

    def stop(self, timeout: float = 5.0) -> int:
        """Send SIGTERM and wait; kill by pid if it does not exit in time."""
        process = self._process
        if process is None or self.returncode is not None:
            return self.returncode if self.returncode is not None else 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        if self._reader is not None:
            self._reader.join(5)
        assert process.stderr is not None
        self.stderr = process.stderr.read()
        self.returncode = process.returncode
        return process.returncode

    def __enter__(self) -> "ControllerProcess":
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
