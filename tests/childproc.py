"""``balloonctl run`` child processes and test-driver host files for the
service tests (lock, several hosts, reload, systemd notifications)."""

import signal
import subprocess
import uuid
from pathlib import Path

from tests.e2e.controller_proc import ControllerProcess


class ChildProcess(ControllerProcess):
    """A ``balloonctl run`` child with its pid and signals exposed."""

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def send(self, signum: signal.Signals) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the child to exit on its own and return its exit code."""
        assert self._process is not None
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"balloonctl still ran after {timeout} s") from None
        return self.stop()


def host_file(path: Path, *names: str, memory_mib: int = 1024) -> str:
    """Write a test-driver host with running domains ``names``; return its URI.

    libvirt's test driver reads a host from an XML file given as the URI's
    path; its domains start out running, with ``unused`` half of ``actual``.
    """
    domains = "".join(
        f"""
  <domain type='test'>
    <name>{name}</name>
    <uuid>{uuid.uuid4()}</uuid>
    <memory unit='MiB'>{memory_mib}</memory>
    <currentMemory unit='MiB'>{memory_mib}</currentMemory>
    <os><type>hvm</type></os>
    <devices><memballoon model='virtio'/></devices>
  </domain>"""
        for name in names
    )
    path.write_text(f"<node>{domains}\n</node>\n")
    return f"test://{path.resolve()}"
