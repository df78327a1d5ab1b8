"""Run a real libvirtd and QEMU guests for balloonctl's end-to-end tests.

The pieces:

- ``skip_reason()`` returns why these tests cannot run on this machine.
- ``build_guest_image()`` runs scripts/build-guest.sh and returns the
  kernel and initramfs paths.
- ``Libvirtd`` starts a private libvirtd on the default system sockets, so
  ``qemu:///system`` reaches it, or reuses one that already accepts
  connections there.
- ``Guest`` boots a transient domain from the image and runs shell commands
  in it over its second serial port.

Everything here is synchronous and uses only the standard library and
libvirt-python. Importing this module replaces libvirt's default error
handler, which prints every error to stderr, for the whole process. Guests
run under TCG (``<domain type='qemu'>``), so KVM is not needed. Domain
names start with ``DOMAIN_PREFIX`` so that ``destroy_leftover_domains()``
can find what an earlier run left behind.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar
from xml.sax.saxutils import escape, quoteattr

try:
    import libvirt
except ImportError:  # skip_reason() reports it.
    libvirt = None

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_GUEST_SCRIPT = REPO_ROOT / "scripts" / "build-guest.sh"

LIBVIRT_URI = "qemu:///system"
LIBVIRTD_BINARY = Path("/usr/sbin/libvirtd")
QEMU_BINARY = Path("/usr/bin/qemu-system-x86_64")
LIBVIRT_CONFIG_DIR = Path("/etc/libvirt")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
# libvirtd's QEMU driver, running as root, writes each domain's QEMU pid here.
QEMU_STATE_DIR = Path("/run/libvirt/qemu")

DOMAIN_PREFIX = "bctl-e2e-"

# Runs guests as root with no cgroups, namespaces, security driver or
# virtlogd, which is what works on a machine without systemd.
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

# Root connects without polkit. The log level 3 keeps warnings and errors.
LIBVIRTD_CONF_TEMPLATE = """\
auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:{log_path}"
"""

SHELL_MARKER_PREFIX = "__BCTL_DONE_"
# The tty's canonical-mode line buffer has room for 4095 bytes plus the newline.
MAX_SHELL_LINE_BYTES = 4000
BOOT_PROBE_INTERVAL_S = 0.5

T = TypeVar("T")


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    """Keep libvirt from printing every error to stderr. The errors are still raised."""


if libvirt is not None:
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)


def skip_reason() -> str | None:
    """Return why the end-to-end tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "end-to-end tests need root: they start libvirtd on the system socket"
    if libvirt is None:
        return "Python module libvirt not found: pip install libvirt-python"
    if not Path("/bin/busybox").exists():
        return "/bin/busybox not found: run scripts/install-deps.sh"
    if _libvirtd_responds():
        return None
    # Only needed when Libvirtd has to start its own daemon.
    for path in (LIBVIRTD_BINARY, QEMU_BINARY):
        if not path.exists():
            return f"{path} not found: run scripts/install-deps.sh"
    if shutil.which("unshare") is None:
        return "unshare not found: install util-linux"
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        return "system user libvirt-qemu not found: run scripts/install-deps.sh"
    return _mount_namespace_problem()


def _mount_namespace_problem() -> str | None:
    result = subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return (
            "unshare --mount failed, so libvirtd cannot get a private qemu.conf "
            f"(CAP_SYS_ADMIN is needed): {result.stderr.strip()}"
        )
    return None


def wait_until(
    condition: Callable[[], T | None],
    timeout: float,
    interval: float = 0.2,
    description: str = "condition",
) -> T:
    """Call ``condition`` until it returns something other than None or False.

    Returns that value, or raises TimeoutError naming ``description`` after
    ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(interval)


def open_connection(uri: str = LIBVIRT_URI) -> libvirt.virConnect:
    """Open a read-write libvirt connection. Raises libvirt.libvirtError."""
    return libvirt.open(uri)


def _libvirtd_responds(uri: str = LIBVIRT_URI) -> bool:
    """Check that ``uri`` accepts a connection and its QEMU driver replies."""
    if libvirt is None:
        return False
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        conn.getVersion()
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def destroy_leftover_domains(conn: libvirt.virConnect) -> list[str]:
    """Destroy and undefine every domain whose name starts with DOMAIN_PREFIX.

    Returns the names it removed.
    """
    removed = []
    for domain in conn.listAllDomains():
        name = domain.name()
        if not name.startswith(DOMAIN_PREFIX):
            continue
        try:
            if domain.isActive():
                domain.destroy()
            if domain.isPersistent():
                domain.undefine()
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
        removed.append(name)
    return removed


@dataclass(frozen=True)
class GuestImage:
    """Kernel and initramfs built by scripts/build-guest.sh."""

    kernel: Path
    initramfs: Path


def build_guest_image(
    cache_dir: Path | None = None, timeout: float = 900.0
) -> GuestImage:
    """Run scripts/build-guest.sh and return the image it built or found cached.

    ``cache_dir`` sets BALLOONCTL_CACHE for the script. Without it the
    script's default applies (/var/cache/balloonctl unless the environment
    sets BALLOONCTL_CACHE). Raises RuntimeError with the script's stderr
    when it fails.
    """
    env = dict(os.environ)
    if cache_dir is not None:
        env["BALLOONCTL_CACHE"] = str(cache_dir)
    result = subprocess.run(
        ["sh", str(BUILD_GUEST_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{BUILD_GUEST_SCRIPT} failed with exit status {result.returncode}:\n"
            f"{result.stderr}"
        )
    paths = dict(
        line.split("=", 1) for line in result.stdout.splitlines() if "=" in line
    )
    try:
        image = GuestImage(
            kernel=Path(paths["kernel"]), initramfs=Path(paths["initramfs"])
        )
    except KeyError as error:
        raise RuntimeError(
            f"{BUILD_GUEST_SCRIPT} printed no {error.args[0]}= line; "
            f"stdout was:\n{result.stdout}"
        ) from None
    return image


class Libvirtd:
    """A libvirtd that serves ``qemu:///system`` for the tests.

    ``start()`` reuses a daemon that already accepts connections on
    ``qemu:///system`` and then never stops it. Otherwise it starts
    /usr/sbin/libvirtd with a private configuration directory in a temporary
    directory.

    libvirtd 9.0 running as root reads qemu.conf only from /etc/libvirt and
    has no option to change that. So the daemon runs in a private mount
    namespace in which the temporary directory is bind-mounted over
    /etc/libvirt. The real /etc/libvirt is never written, and the daemon's
    sockets in /run/libvirt stay visible to every process. QEMU processes
    inherit the namespace, which lives on while any of them runs.

    NOTE: a reused daemon keeps its own qemu.conf. If it runs QEMU as an
    unprivileged user or with a security driver, that user needs access to
    the image cache and to the guests' temporary directories.
    """

    def __init__(self, start_timeout: float = 60.0) -> None:
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._reused = False

    @property
    def pid(self) -> int | None:
        """Process id of the libvirtd this object started, or None."""
        return self._process.pid if self._process is not None else None

    @property
    def reused(self) -> bool:
        """True when start() found a libvirtd that was already running."""
        return self._reused

    @property
    def log_path(self) -> Path | None:
        """libvirtd's log file (warnings and errors), or None when reused or stopped."""
        return self._workdir / "libvirtd.log" if self._workdir is not None else None

    def log_text(self) -> str:
        """Return libvirtd's log file followed by its stdout and stderr."""
        if self._workdir is None:
            return ""
        parts = []
        for name in ("libvirtd.log", "libvirtd.out"):
            path = self._workdir / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def connect(self) -> libvirt.virConnect:
        """Open a new read-write connection to ``qemu:///system``."""
        return open_connection(LIBVIRT_URI)

    def start(self) -> None:
        """Start libvirtd or reuse a running one, then wait until connecting works."""
        if self._process is not None or self._reused:
            return
        if _libvirtd_responds():
            self._reused = True
            return
        self._workdir = Path(tempfile.mkdtemp(prefix="bctl-libvirtd-"))
        try:
            self._write_config()
            self._spawn()
            self._wait_until_answering()
        except BaseException:
            self.stop()
            self._remove_workdir()
            raise

    def stop(self) -> None:
        """Destroy leftover test domains, then stop the libvirtd this object started.

        Does nothing for a reused daemon or when already stopped. QEMU
        processes outlive libvirtd, which is why the domains go first.
        """
        if self._process is None:
            return
        if self._process.poll() is None and _libvirtd_responds():
            conn = self.connect()
            try:
                destroy_leftover_domains(conn)
            finally:
                conn.close()
        self._signal_and_wait(signal.SIGTERM)
        self._process = None
        self._remove_workdir()

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to libvirtd, wait for it to exit and start it again.

        Running guests keep running and the new daemon reconnects to them.
        Connections opened before the restart are closed: open new ones
        with connect() and pass them to Guest.reconnect(). Pass
        signal.SIGKILL to simulate a crash. Raises RuntimeError for a
        reused daemon.
        """
        if self._reused:
            raise RuntimeError(
                "cannot restart a libvirtd that this harness did not start"
            )
        self.kill(sig)
        self.respawn()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to libvirtd and wait for it to exit; guests keep running.

        Call respawn() to start the daemon again. Raises RuntimeError for a
        reused daemon.
        """
        if self._reused:
            raise RuntimeError("cannot kill a libvirtd that this harness did not start")
        if self._process is None:
            raise RuntimeError("libvirtd is not running: call start() first")
        self._signal_and_wait(sig)

    def respawn(self) -> None:
        """Start libvirtd again after kill() and wait until connecting works."""
        if self._process is None:
            raise RuntimeError("libvirtd was never started: call start() first")
        if self._process.poll() is None:
            raise RuntimeError(f"libvirtd (pid {self._process.pid}) is still running")
        self._spawn()
        self._wait_until_answering()

    def __enter__(self) -> Libvirtd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _write_config(self) -> None:
        assert self._workdir is not None
        config_dir = self._workdir / "etc-libvirt"
        config_dir.mkdir()
        (config_dir / "qemu.conf").write_text(QEMU_CONF)
        log_path = self._workdir / "libvirtd.log"
        (config_dir / "libvirtd.conf").write_text(
            LIBVIRTD_CONF_TEMPLATE.format(log_path=log_path)
        )

    def _spawn(self) -> None:
        assert self._workdir is not None
        LIBVIRT_CONFIG_DIR.mkdir(parents=True, exist_ok=True)
        config_dir = self._workdir / "etc-libvirt"
        # unshare and sh both exec, so the child's pid is libvirtd's pid.
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            'mount --bind "$1" "$2" && exec "$3" --config "$2/libvirtd.conf"',
            "sh",
            str(config_dir),
            str(LIBVIRT_CONFIG_DIR),
            str(LIBVIRTD_BINARY),
        ]
        with open(self._workdir / "libvirtd.out", "ab") as output:
            # A session of its own keeps a Ctrl-C in the test runner from
            # reaching libvirtd before the fixtures have destroyed the guests.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_until_answering(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout
        while not _libvirtd_responds():
            status = self._process.poll()
            if status is not None:
                raise RuntimeError(
                    f"libvirtd (pid {self._process.pid}) exited with status {status} "
                    f"before accepting connections on {LIBVIRT_URI}.\n"
                    f"{self.log_text()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"libvirtd (pid {self._process.pid}) timed out: no connection "
                    f"on {LIBVIRT_URI} within {self.start_timeout} s.\n"
                    f"{self.log_text()}"
                )
            time.sleep(0.2)

    def _signal_and_wait(self, sig: int, timeout: float = 30.0) -> None:
        assert self._process is not None
        if self._process.poll() is not None:
            return
        self._process.send_signal(sig)
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class Guest:
    """A transient QEMU guest booted from the image of scripts/build-guest.sh.

    ttyS0 (serial0) is the console and goes to a log file. ttyS1 (serial1)
    is a unix socket on which the guest runs a non-interactive shell, used
    by ``run()``. The domain is created with createXML, so libvirt keeps no
    definition of it after it stops. ``memory`` and ``currentMemory`` are
    both ``memory_mib``, and the domain has a virtio memballoon.

    ``name`` gets DOMAIN_PREFIX in front unless it already starts with it.
    ``balloon_driver=False`` boots with ``balloonctl.balloon=0``, so the
    guest never loads virtio_balloon. ``metadata_xml`` is inserted as is
    inside ``<metadata>`` and must be namespaced elements, for example
    ``<b:policy xmlns:b="urn:example">...</b:policy>``.
    ``memballoon_attributes`` adds attributes to ``<memballoon>``, for
    example ``{"autodeflate": "on", "freePageReporting": "on"}`` (both are
    in libvirt 9.0's schema).

    The kernel runs with panic=-1 and the domain with on_reboot=destroy, so
    a guest kernel panic stops the domain. libvirt reports that as the
    lifecycle events SHUTDOWN (detail GUEST) and STOPPED (detail SHUTDOWN),
    the same as a shutdown from inside the guest. console_log() shows the
    panic message.

    ``persistent=True`` defines the domain (defineXML) and starts it
    (virDomainCreate) instead, and destroy() also undefines it.

    Using it as a context manager calls start() on entry and destroy() on
    exit. destroy() can be called any number of times.
    """

    def __init__(
        self,
        conn: libvirt.virConnect,
        image: GuestImage,
        name: str,
        memory_mib: int = 512,
        balloon_driver: bool = True,
        metadata_xml: str | None = None,
        vcpus: int = 1,
        memballoon_attributes: dict[str, str] | None = None,
        persistent: bool = False,
    ) -> None:
        full_name = name if name.startswith(DOMAIN_PREFIX) else DOMAIN_PREFIX + name
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", full_name):
            raise ValueError(
                f"invalid guest name {full_name!r}: use letters, digits, '_', '.', '-'"
            )
        if memory_mib < 64:
            raise ValueError(
                f"memory_mib {memory_mib} is too small: the guest needs at least 64"
            )
        self.conn = conn
        self.image = image
        self.name = full_name
        self.memory_mib = memory_mib
        self.balloon_driver = balloon_driver
        self.metadata_xml = metadata_xml
        self.vcpus = vcpus
        self.memballoon_attributes = dict(memballoon_attributes or {})
        self.persistent = persistent
        self._domain: libvirt.virDomain | None = None
        self._workdir: Path | None = None
        self._socket: socket.socket | None = None
        self._buffer = b""
        self._started_at: float | None = None
        self._final_console_log = ""

    @property
    def domain(self) -> libvirt.virDomain:
        """The running domain. Raises RuntimeError before start() or after destroy()."""
        if self._domain is None:
            raise RuntimeError(f"guest {self.name} is not running")
        return self._domain

    @property
    def console_log_path(self) -> Path | None:
        return self._workdir / "console.log" if self._workdir is not None else None

    @property
    def shell_socket_path(self) -> Path | None:
        return self._workdir / "shell.sock" if self._workdir is not None else None

    def kernel_cmdline(self) -> str:
        cmdline = "console=ttyS0 panic=-1"
        if not self.balloon_driver:
            cmdline += " balloonctl.balloon=0"
        return cmdline

    def domain_xml(self) -> str:
        """Return the domain XML that start() passes to createXML or defineXML."""
        if self._workdir is None:
            raise RuntimeError("domain_xml() needs the guest's directory: call start()")
        metadata = (
            f"  <metadata>{self.metadata_xml}</metadata>\n" if self.metadata_xml else ""
        )
        memballoon = "".join(
            f" {key}={quoteattr(value)}"
            for key, value in self.memballoon_attributes.items()
        )
        # on_reboot=destroy: with panic=-1 a guest kernel panic (for example
        # an OOM with nothing left to kill) stops the domain instead of
        # rebooting it.
        return f"""\
<domain type='qemu'>
  <name>{self.name}</name>
{metadata}  <memory unit='MiB'>{self.memory_mib}</memory>
  <currentMemory unit='MiB'>{self.memory_mib}</currentMemory>
  <vcpu>{self.vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(self.image.kernel))}</kernel>
    <initrd>{escape(str(self.image.initramfs))}</initrd>
    <cmdline>{self.kernel_cmdline()}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU_BINARY}</emulator>
    <serial type='file'>
      <source path='{escape(str(self.console_log_path))}'/>
      <target port='0'/>
    </serial>
    <serial type='unix'>
      <source mode='bind' path='{escape(str(self.shell_socket_path))}'/>
      <target port='1'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='virtio'{memballoon}/>
  </devices>
</domain>
"""

    def start(self) -> None:
        """Create the domain. Returns as soon as QEMU runs, before the guest booted."""
        if self._domain is not None:
            return
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self._check_socket_path()
        self._started_at = time.monotonic()
        try:
            if self.persistent:
                self._domain = self.conn.defineXML(self.domain_xml())
                self._domain.create()
            else:
                self._domain = self.conn.createXML(self.domain_xml(), 0)
        except BaseException:
            self.destroy()
            raise

    def wait_booted(self, timeout: float = 60.0) -> float:
        """Wait until the shell on ttyS1 replies and return the seconds since start().

        Raises TimeoutError, or RuntimeError when the domain stops first,
        with the end of the console log in the message.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._check_domain_active()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"guest {self.name}: shell on ttyS1 did not reply "
                    f"within {timeout} s; "
                    f"console log ends with:\n{self._console_tail()}"
                )
            if self._probe_shell(min(BOOT_PROBE_INTERVAL_S, remaining)):
                assert self._started_at is not None
                return time.monotonic() - self._started_at

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run ``command`` with sh -c in the guest and return (exit status, output).

        The output is stdout and stderr together. The command reads
        /dev/null as stdin and runs with oom_score_adj 0, so the OOM killer
        may pick it but never the shell serving ttyS1. Each call is a new
        shell, so variables and cd do not carry over. An exit status of 137
        means SIGKILL, which is what the OOM killer sends. A command ending
        in ``&`` returns at once and its background job keeps running.

        Memory in a tmpfs has no swap to go to, and killing a process does
        not free it. A tmpfs filled past the guest's memory therefore leaves
        the OOM killer nothing to free, and the next allocation panics the
        guest kernel. Anonymous memory is freed by the OOM kill: for example
        ``dd if=/dev/zero bs=200M count=1 2>/dev/null | sleep 600 &`` keeps
        200 MiB allocated, because dd blocks writing to the pipe, until the
        OOM killer or the test kills dd.

        Raises ValueError for control characters other than tab and newline
        (the tty would act on them) or a command longer than
        MAX_SHELL_LINE_BYTES, TimeoutError after ``timeout`` seconds, and
        ConnectionError when the serial socket closes.
        """
        nonce = secrets.token_hex(8)
        line = _shell_line(command, nonce)
        self._send(line)
        marker = re.compile(
            rb"\n"
            + re.escape(f"{SHELL_MARKER_PREFIX}{nonce}_".encode())
            + rb"(\d+)__\n"
        )
        try:
            data, match = self._read_until(marker, time.monotonic() + timeout)
        except TimeoutError:
            raise TimeoutError(
                f"guest {self.name}: command {command!r} did not finish "
                f"within {timeout} s"
            ) from None
        output = _strip_stale_results(data[: match.start()])
        return int(match.group(1)), output.decode(errors="replace")

    def console_log(self) -> str:
        """Return the console (ttyS0) output so far, or all of it after destroy()."""
        path = self.console_log_path
        if path is None or not path.exists():
            return self._final_console_log
        return path.read_text(errors="replace")

    def qemu_log(self) -> str:
        """Return libvirt's QEMU log for this domain: command line and QEMU's stderr."""
        path = QEMU_LOG_DIR / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def qemu_pid(self) -> int:
        """Return the pid of the domain's QEMU process, from libvirtd's pid file."""
        if self._domain is None:
            raise RuntimeError(f"guest {self.name} is not running")
        return int((QEMU_STATE_DIR / f"{self.name}.pid").read_text().strip())

    def reconnect(self, conn: libvirt.virConnect) -> None:
        """Use ``conn`` from now on and look the domain up again through it.

        Libvirtd.restart() closes every connection opened before it, so a
        test calls this with a new connection after a restart.
        """
        self.conn = conn
        if self._domain is not None:
            self._domain = conn.lookupByName(self.name)

    def destroy(self) -> None:
        """Stop the domain if it runs and remove the guest's temporary directory.

        The directory is removed even when libvirt raises, for example on a
        connection that a libvirtd restart closed.
        """
        self._close_socket()
        try:
            self._destroy_domain()
        finally:
            self._remove_workdir()

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.destroy()

    def _check_socket_path(self) -> None:
        # sun_path in struct sockaddr_un has 108 bytes, including the NUL.
        path = str(self.shell_socket_path)
        if len(path.encode()) > 107:
            self._remove_workdir()
            raise ValueError(
                f"serial socket path {path!r} is longer than 107 bytes: "
                "use a shorter guest name or TMPDIR"
            )

    def _destroy_domain(self) -> None:
        if self._domain is None:
            return
        try:
            self._domain.destroy()
        except libvirt.libvirtError as error:
            if error.get_error_code() not in (
                libvirt.VIR_ERR_NO_DOMAIN,
                libvirt.VIR_ERR_OPERATION_INVALID,
            ):
                raise
        finally:
            domain, self._domain = self._domain, None
            if self.persistent:
                _undefine_if_defined(domain)

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            self._final_console_log = self.console_log()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _check_domain_active(self) -> None:
        try:
            active = self.domain.isActive()
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            active = False
        if not active:
            raise RuntimeError(
                f"guest {self.name} stopped; console log ends with:\n"
                f"{self._console_tail()}\n"
                f"QEMU log:\n{self.qemu_log()}"
            )

    def _console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console_log().splitlines()[-lines:])

    def _probe_shell(self, timeout: float) -> bool:
        """Send one echo and report whether its reply arrived within ``timeout``.

        The leading newline ends any partial line left from earlier probes.
        The probe has no quotes or brackets, so even a truncated copy cannot
        be a syntax error, which would make the shell exit.
        """
        deadline = time.monotonic() + timeout
        token = f"__BCTL_READY_{secrets.token_hex(8)}__"
        try:
            self._send(f"\necho {token}\n".encode())
            self._read_until(re.compile(re.escape(token.encode()) + rb"\n"), deadline)
        except TimeoutError:
            return False
        except OSError:
            # QEMU has not created the socket yet, or closed the connection.
            self._close_socket()
            time.sleep(max(0.0, deadline - time.monotonic()))
            return False
        self._buffer = b""
        return True

    def _connect_socket(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.shell_socket_path))
            except OSError:
                sock.close()
                raise
            self._socket = sock
            self._buffer = b""
        return self._socket

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, data: bytes) -> None:
        self._connect_socket().sendall(data)

    def _read_until(
        self, pattern: re.Pattern[bytes], deadline: float
    ) -> tuple[bytes, re.Match[bytes]]:
        """Read from the shell socket until ``pattern`` matches the buffered data.

        Returns the data up to the end of the match and the match. The rest
        stays buffered for the next read.
        """
        sock = self._connect_socket()
        while True:
            match = pattern.search(self._buffer)
            if match is not None:
                data = self._buffer[: match.end()]
                self._buffer = self._buffer[match.end() :]
                return data, match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply from the guest shell")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no reply from the guest shell") from None
            if not chunk:
                self._close_socket()
                raise ConnectionError(f"guest {self.name}: shell socket closed by QEMU")
            self._buffer += chunk


def _undefine_if_defined(domain: libvirt.virDomain) -> None:
    try:
        domain.undefine()
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise


def _shell_line(command: str, nonce: str) -> bytes:
    """Wrap ``command`` into one line for the shell on ttyS1.

    The printf prints a newline before the marker, so the marker always
    starts a line. The reader removes that newline again.
    """
    bad = [c for c in command if (ord(c) < 32 and c not in "\t\n") or ord(c) == 127]
    if bad:
        raise ValueError(
            f"command contains control characters {bad!r}, "
            "which the guest tty interprets"
        )
    quoted = shlex.quote(command)
    line = (
        f"(echo 0 >/proc/self/oom_score_adj; exec sh -c {quoted}) </dev/null 2>&1; "
        f"printf '\\n{SHELL_MARKER_PREFIX}%s_%s__\\n' {nonce} \"$?\"\n"
    ).encode()
    if len(line) > MAX_SHELL_LINE_BYTES:
        raise ValueError(
            f"command is {len(line)} bytes once wrapped; the guest tty accepts at most "
            f"{MAX_SHELL_LINE_BYTES}"
        )
    return line


_STALE_RESULT = re.compile(
    rb"\n" + re.escape(SHELL_MARKER_PREFIX.encode()) + rb"[0-9a-f]+_\d+__\n"
)


def _strip_stale_results(data: bytes) -> bytes:
    """Drop the output of earlier commands whose run() timed out."""
    parts = _STALE_RESULT.split(data)
    return parts[-1]
