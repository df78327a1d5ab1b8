"""Faults on a real libvirtd with QEMU guests under TCG, and how long recovery took.

Each test states what must hold and records the measured recovery times.
With ``-s`` they are printed as they are measured. At the end of the module
they are also written to ``figures.json`` in a pytest temporary directory,
whose path is printed. docs/reliability.md lists the figures of a run.

Two guests, fault-a and fault-b, are booted once and shared by the tests in
file order. A test that needs a guest to disappear starts its own.
"""

import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import libvirt
import pytest

from tests.e2e import harness
from tests.e2e.controller_proc import ControllerProcess, Line, settled

pytestmark = pytest.mark.e2e

PERIOD_S = 2
CALL_TIMEOUT_S = 3
# Each sample of a managed domain logs exactly one of these (memory_kept at
# debug level when its reason repeats, and the tests log at debug).
SAMPLE_EVENTS = {"memory_kept", "memory_released", "memory_granted", "stats_invalid"}
REQUEST_EVENTS = {"memory_released", "memory_granted", "balloon_stuck"}
STOP_DEADLINE_S = 2.0


class GuestPair:
    """The two shared guests and the connection they currently use."""

    def __init__(self, libvirtd: harness.Libvirtd, guests: list[harness.Guest]):
        self.libvirtd = libvirtd
        self.guests = guests
        self.conn = guests[0].conn

    def reconnect(self) -> None:
        """Open a new connection for the guests after a libvirtd restart."""
        old, self.conn = self.conn, self.libvirtd.connect()
        for guest in self.guests:
            guest.reconnect(self.conn)
        # The daemon that served the old connection is gone.
        with contextlib.suppress(libvirt.libvirtError):
            old.close()


@pytest.fixture(scope="module")
def pair(
    libvirtd: harness.Libvirtd, guest_image: harness.GuestImage
) -> Iterator[GuestPair]:
    conn = libvirtd.connect()
    guests = [
        harness.Guest(conn, guest_image, "fault-a"),
        harness.Guest(conn, guest_image, "fault-b"),
    ]
    shared = GuestPair(libvirtd, guests)
    try:
        for guest in guests:
            guest.start()
        for guest in guests:
            guest.wait_booted(timeout=120)
        yield shared
    finally:
        for guest in guests:
            guest.destroy()
        shared.conn.close()


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    recorded: dict[str, Any] = {}
    yield recorded
    path = tmp_path_factory.mktemp("faults") / "figures.json"
    path.write_text(json.dumps(recorded, indent=2) + "\n")
    print(f"\nfault recovery figures written to {path}")


def record(figures: dict[str, Any], scenario: str, **values: Any) -> None:
    figures[scenario] = values
    print(f"\n[fault figures] {scenario}: {json.dumps(values)}")


def start_controller(state_dir: Path) -> ControllerProcess:
    return ControllerProcess(
        "--stats-period",
        str(PERIOD_S),
        "--call-timeout",
        str(CALL_TIMEOUT_S),
        "--state-dir",
        str(state_dir),
    )


def logged_at(line: Line) -> float:
    """Return the line's own timestamp (the controller's clock) in epoch seconds."""
    return datetime.datetime.fromisoformat(line["timestamp"]).timestamp()


def is_sample(domain: str, after: float = 0.0) -> Callable[[Line], bool]:
    """Match a sample line of ``domain`` received after monotonic time ``after``."""

    def matches(line: Line) -> bool:
        return (
            line["event"] in SAMPLE_EVENTS
            and line.get("domain") == domain
            and line["_received"] > after
        )

    return matches


def lines_between(
    proc: ControllerProcess, start: float, end: float = float("inf")
) -> list[Line]:
    """Return the lines received between the monotonic times ``start`` and ``end``."""
    return [line for line in proc.lines if start <= line["_received"] <= end]


def sample_gaps(lines: list[Line], domain: str) -> list[float]:
    """Return the seconds between consecutive sample lines of ``domain``."""
    times = [logged_at(line) for line in lines if is_sample(domain)(line)]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def warnings_and_errors(lines: list[Line], domain: str | None = None) -> list[Line]:
    return [
        line
        for line in lines
        if line["level"] in ("warning", "error")
        and (domain is None or line.get("domain") == domain)
    ]


def stop_and_time(proc: ControllerProcess) -> tuple[int, float]:
    """Send SIGTERM and return the exit status and the seconds until exit.

    A controller still running after STOP_DEADLINE_S is killed, which makes
    the status -9.
    """
    started = time.monotonic()
    code = proc.stop(timeout=STOP_DEADLINE_S)
    return code, time.monotonic() - started


def wait_managed(proc: ControllerProcess, guests: list[harness.Guest]) -> None:
    for guest in guests:
        proc.wait_for(is_sample(guest.name), timeout=120)


def test_paused_guest_unchanged_until_resumed(
    pair: GuestPair, tmp_path: Path, figures: dict[str, Any]
) -> None:
    guest, other = pair.guests
    with start_controller(tmp_path) as proc:
        # The guests start at 512 MiB, so releases are under way when the
        # guest is paused and would go on without the pause.
        proc.wait_event("memory_released", domain=guest.name, timeout=120)
        guest.domain.suspend()
        paused = proc.wait_event("domain_paused", domain=guest.name, timeout=5)
        # QEMU sends at most one BALLOON_CHANGE event a second (its
        # monitor_qapi_event_conf throttle), and libvirt's figure follows
        # those events, so the last move before the pause may arrive late.
        time.sleep(1.5)
        actual_paused = guest.domain.info()[2]
        time.sleep(4 * PERIOD_S)
        actual_before_resume = guest.domain.info()[2]
        guest.domain.resume()
        resumed_at = time.monotonic()
        resumed = proc.wait_event("domain_resumed", domain=guest.name, timeout=5)
        first = proc.wait_for(is_sample(guest.name, resumed_at), timeout=4 * PERIOD_S)
        proc.wait_event("memory_released", domain=guest.name, timeout=30)
    record(
        figures,
        "paused",
        first_sample_after_resume_s=round(first["_received"] - resumed_at, 2),
    )

    # A sample that read the domain as running just before the suspend may
    # still log its request right after domain_paused; allow 1 s for it.
    while_paused = lines_between(proc, paused["_received"] + 1, resumed["_received"])
    assert [
        line
        for line in while_paused
        if line.get("domain") == guest.name and line is not resumed
    ] == []
    assert actual_before_resume == actual_paused
    assert proc.events("memory_kept", domain=other.name) or proc.events(
        "memory_released", domain=other.name
    )
    assert warnings_and_errors(proc.lines) == []
    assert proc.returncode == 0


@dataclasses.dataclass
class StoppedQemuRun:
    """What one 60 s SIGSTOP of fault-b's QEMU left in the controller's log."""

    proc: ControllerProcess
    stopped: harness.Guest
    other: harness.Guest
    stopped_at: float
    continued_at: float
    timed_out: Line
    recovered: Line
    # The slowest info() plus memoryStats() on fault-a through the test's
    # own connection while fault-b was stopped.
    probe_max_s: float


@pytest.fixture(scope="module")
def stopped_qemu_run(
    pair: GuestPair,
    tmp_path_factory: pytest.TempPathFactory,
    figures: dict[str, Any],
) -> StoppedQemuRun:
    """Stop fault-b's QEMU with SIGSTOP for 60 s while the controller runs."""
    other, guest = pair.guests
    with start_controller(tmp_path_factory.mktemp("sigstop")) as proc:
        proc.wait_for(settled(guest.name), timeout=180)
        proc.wait_for(settled(other.name), timeout=180)
        pid = guest.qemu_pid()
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        probes = []
        try:
            timed_out = proc.wait_event(
                "domain_call_failed", domain=guest.name, timeout=3 * CALL_TIMEOUT_S
            )
            while time.monotonic() < stopped_at + 60:
                probe_started = time.monotonic()
                other.domain.info()
                other.domain.memoryStats()
                probes.append(time.monotonic() - probe_started)
                time.sleep(0.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        continued_at = time.monotonic()
        recovered = proc.wait_event(
            "domain_call_recovered", domain=guest.name, timeout=70
        )
        sampled = proc.wait_for(is_sample(guest.name, continued_at), timeout=70)
        time.sleep(2 * PERIOD_S)
    run = StoppedQemuRun(
        proc, guest, other, stopped_at, continued_at, timed_out, recovered, max(probes)
    )
    during = lines_between(proc, stopped_at, continued_at)
    record(
        figures,
        "sigstop_60s",
        stopped_s=round(continued_at - stopped_at, 1),
        timeout_reported_after_s=round(timed_out["_received"] - stopped_at, 2),
        recovered_after_sigcont_s=round(recovered["_received"] - continued_at, 2),
        first_sample_after_sigcont_s=round(sampled["_received"] - continued_at, 2),
        other_guest_max_sample_gap_s=round(max(sample_gaps(during, other.name)), 2),
        other_guest_warnings=[
            line["error"] for line in warnings_and_errors(during, other.name)
        ],
        second_connection_max_call_s=round(run.probe_max_s, 3),
    )
    return run


def test_stopped_qemu_reported_once(stopped_qemu_run: StoppedQemuRun) -> None:
    run = stopped_qemu_run
    during = lines_between(run.proc, run.stopped_at, run.recovered["_received"])

    assert run.timed_out["level"] == "warning"
    assert run.timed_out["timed_out"] is True
    assert warnings_and_errors(during, run.stopped.name) == [run.timed_out]
    assert [line for line in during if line["level"] == "error"] == []
    assert "Traceback" not in run.proc.stderr, run.proc.stderr
    assert run.proc.returncode == 0


# NOTE: in 13 of 14 runs on the machine described in docs/reliability.md,
# fault-a had a sample one period late or a call timing out while fault-b's
# QEMU was stopped. Calls on fault-a through a second connection never took
# more than 0.2 s meanwhile. So the delay is on the controller's own
# connection, which carries the hung call, and its cause is not found yet.
# The test is not strict, because it passes now and then.
@pytest.mark.xfail(
    reason="a call hung on one domain delays other domains' calls on the "
    "same connection by seconds",
    strict=False,
)
def test_other_guest_on_schedule_while_qemu_stopped(
    stopped_qemu_run: StoppedQemuRun,
) -> None:
    run = stopped_qemu_run
    during = lines_between(run.proc, run.stopped_at, run.recovered["_received"])
    gaps = sample_gaps(during, run.other.name)
    # The schedule is read from the log, so no line may be missing.
    assert "log lines were dropped" not in run.proc.stderr

    assert warnings_and_errors(during, run.other.name) == []
    assert len(gaps) >= 60 // PERIOD_S - 2
    assert max(gaps) <= 2 * PERIOD_S, gaps


def test_sigterm_with_call_hung_exits_at_once(
    pair: GuestPair, tmp_path: Path, figures: dict[str, Any]
) -> None:
    _, guest = pair.guests
    with start_controller(tmp_path) as proc:
        wait_managed(proc, pair.guests)
        pid = guest.qemu_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            proc.wait_event(
                "domain_call_failed", domain=guest.name, timeout=3 * CALL_TIMEOUT_S
            )
            code, elapsed = stop_and_time(proc)
        finally:
            os.kill(pid, signal.SIGCONT)
    record(figures, "sigterm_call_hung", exit_s=round(elapsed, 2))

    assert code == 0, proc.stderr
    assert proc.events("controller_stopped")
    assert proc.events("exit_with_calls_in_flight")
    assert "Traceback" not in proc.stderr, proc.stderr


def test_domain_destroyed_during_hung_call(
    pair: GuestPair,
    guest_image: harness.GuestImage,
    tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    with harness.Guest(pair.conn, guest_image, "fault-gone") as doomed:
        doomed.wait_booted(timeout=120)
        with start_controller(tmp_path) as proc:
            wait_managed(proc, [*pair.guests, doomed])
            os.kill(doomed.qemu_pid(), signal.SIGSTOP)
            # The first call that reaches the stopped QEMU's monitor hangs
            # until QEMU dies; its timeout line shows it is in flight.
            hung = proc.wait_event(
                "domain_call_failed", domain=doomed.name, timeout=3 * CALL_TIMEOUT_S
            )
            destroy_started = time.monotonic()
            # virDomainDestroy sends SIGTERM, which a stopped process leaves
            # pending, and SIGKILL some seconds later.
            doomed.destroy()
            destroyed_at = time.monotonic()
            removed = proc.wait_event("domain_removed", domain=doomed.name, timeout=10)
            time.sleep(3 * PERIOD_S)
            end = time.monotonic()
    after = lines_between(proc, hung["_received"] + 0.001, end)
    record(
        figures,
        "destroyed_during_hung_call",
        destroy_call_s=round(destroyed_at - destroy_started, 2),
        removed_after_destroy_s=round(removed["_received"] - destroyed_at, 2),
        others_max_sample_gap_s={
            guest.name: round(max(sample_gaps(after, guest.name)), 2)
            for guest in pair.guests
        },
        others_warnings=[line["event"] for line in warnings_and_errors(after)],
    )

    doomed_lines = [line for line in after if line.get("domain") == doomed.name]
    assert warnings_and_errors(doomed_lines) == []
    assert [line for line in after if line["level"] == "error"] == []
    assert [line for line in doomed_lines if line["event"] in REQUEST_EVENTS] == []
    assert proc.events("domain_removed", domain=doomed.name) == [removed]
    # The other guests' schedule is not asserted here: while a call hangs,
    # other domains' calls on the same connection can be seconds late, which
    # test_other_guest_on_schedule_while_qemu_stopped shows (an open bug).
    for guest in pair.guests:
        assert any(is_sample(guest.name)(line) for line in after)
    assert proc.returncode == 0


def test_libvirtd_killed_guests_managed_again(
    pair: GuestPair,
    guest_image: harness.GuestImage,
    tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    libvirtd = pair.libvirtd
    pids = {guest.name: guest.qemu_pid() for guest in pair.guests}
    with start_controller(tmp_path) as proc:
        wait_managed(proc, pair.guests)
        killed_at = time.monotonic()
        try:
            libvirtd.kill(signal.SIGKILL)
            lost = proc.wait_event("libvirt_disconnected", timeout=15)
        finally:
            libvirtd.respawn()
        answering_at = time.monotonic()
        back = proc.wait_event("libvirt_reconnected", timeout=10)
        pair.reconnect()
        samples = {
            guest.name: proc.wait_for(is_sample(guest.name, back["_received"]), 30)
            for guest in pair.guests
        }
        with harness.Guest(pair.conn, guest_image, "fault-late") as late:
            created_at = time.monotonic()
            added = proc.wait_event("domain_added", domain=late.name, timeout=5)
        stats = {guest.name: guest.domain.memoryStats() for guest in pair.guests}
    record(
        figures,
        "libvirtd_sigkill",
        disconnect_logged_after_kill_s=round(lost["_received"] - killed_at, 2),
        libvirtd_answering_after_kill_s=round(answering_at - killed_at, 2),
        reconnected_after_answering_s=round(back["_received"] - answering_at, 2),
        reconnect_attempts=back["attempts"],
        first_sample_after_reconnect_s={
            name: round(line["_received"] - back["_received"], 2)
            for name, line in samples.items()
        },
        new_guest_added_after_create_s=round(added["_received"] - created_at, 2),
    )

    assert lost["level"] == "warning"
    assert back["domains"] >= 2
    for guest in pair.guests:
        assert guest.qemu_pid() == pids[guest.name]
        assert guest.domain.isActive()
        assert "unused" in stats[guest.name]
        readded = proc.events("domain_added", domain=guest.name)
        assert any(line["_received"] > lost["_received"] for line in readded)
    assert added["_received"] > back["_received"]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0


def test_sigterm_after_libvirtd_kill_exits_at_once(
    pair: GuestPair, tmp_path: Path, figures: dict[str, Any]
) -> None:
    libvirtd = pair.libvirtd
    with start_controller(tmp_path) as proc:
        wait_managed(proc, pair.guests)
        try:
            libvirtd.kill(signal.SIGKILL)
            proc.wait_event("libvirt_disconnected", timeout=15)
            code, elapsed = stop_and_time(proc)
        finally:
            libvirtd.respawn()
            pair.reconnect()
    record(figures, "sigterm_after_libvirtd_kill", exit_s=round(elapsed, 2))

    assert code == 0, proc.stderr
    assert proc.events("controller_stopped")
    assert "Traceback" not in proc.stderr, proc.stderr


def test_balloon_driver_unloaded_while_managed(
    pair: GuestPair, tmp_path: Path, figures: dict[str, Any]
) -> None:
    _, guest = pair.guests
    with start_controller(tmp_path) as proc:
        proc.wait_for(settled(guest.name), timeout=180)
        status, output = guest.run("rmmod virtio_balloon")
        unloaded_at = time.monotonic()
        time.sleep(8 * PERIOD_S)
        actual = guest.domain.info()[2]
    after = [
        line
        for line in lines_between(proc, unloaded_at)
        if line.get("domain") == guest.name
    ]
    reported = warnings_and_errors(after)
    print(json.dumps(after, indent=1))
    record(
        figures,
        "balloon_driver_unloaded",
        reported=[line["event"] for line in reported],
        reported_after_s=[
            round(line["_received"] - unloaded_at, 2) for line in reported
        ],
        actual_kib_after=actual,
    )

    assert status == 0, output
    assert [line for line in after if line["event"] in REQUEST_EVENTS] == []
    assert len(reported) == 1
    assert proc.returncode == 0


def current_memory_kib(xml: str) -> int:
    element = ElementTree.fromstring(xml).find("currentMemory")
    assert element is not None and element.text is not None
    assert element.get("unit", "KiB") == "KiB"
    return int(element.text)


def test_persistent_config_untouched(
    libvirt_conn: Any,
    guest_image: harness.GuestImage,
    tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    inactive = libvirt.VIR_DOMAIN_XML_INACTIVE
    with harness.Guest(
        libvirt_conn, guest_image, "fault-persistent", persistent=True
    ) as guest:
        guest.wait_booted(timeout=120)
        before = current_memory_kib(guest.domain.XMLDesc(inactive))
        with start_controller(tmp_path) as proc:
            proc.wait_for(settled(guest.name), timeout=180)
        live = current_memory_kib(guest.domain.XMLDesc(0))
        after = current_memory_kib(guest.domain.XMLDesc(inactive))
        assert guest.domain.isPersistent()
    record(
        figures,
        "persistent_config",
        persistent_before_kib=before,
        persistent_after_kib=after,
        live_after_kib=live,
    )

    assert proc.events("memory_released", domain=guest.name)
    assert live < before
    assert after == before
    assert libvirt_conn.listDefinedDomains().count(guest.name) == 0
