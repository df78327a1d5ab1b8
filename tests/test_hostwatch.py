from balloonctl.hostwatch import REPEAT_WARNING_S, HostWatch
from balloonctl.hypervisor import HostMemory
from balloonctl.units import MIB
from tests.fakes import FakeHypervisor
from tests.logcapture import LogCapture


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch_with_clock() -> tuple[HostWatch, Clock]:
    clock = Clock()
    return HostWatch(FakeHypervisor(), 200 * MIB, 5.0, clock), clock


def test_low_memory_warns_once_then_every_minute(logs: LogCapture) -> None:
    watch, clock = watch_with_clock()
    low = HostMemory(150 * MIB, "node_memory_stats")

    watch.observe(low)
    clock.now += 5
    watch.observe(low)
    clock.now += REPEAT_WARNING_S - 5
    watch.observe(low)

    warnings = logs.events("host_memory_low")
    assert len(warnings) == 2
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["available_kib"] == 150 * MIB
    assert warnings[0]["host_warn_kib"] == 200 * MIB
    assert warnings[0]["source"] == "node_memory_stats"
    assert warnings[0]["repeated"] is False
    assert warnings[1]["repeated"] is True


def test_threshold_itself_counts_as_low(logs: LogCapture) -> None:
    watch, _clock = watch_with_clock()

    watch.observe(HostMemory(200 * MIB, "node_free_memory"))

    assert len(logs.events("host_memory_low")) == 1


def test_recovery_logged_once_at_info(logs: LogCapture) -> None:
    watch, clock = watch_with_clock()

    watch.observe(HostMemory(100 * MIB, "node_memory_stats"))
    clock.now += 5
    watch.observe(HostMemory(300 * MIB, "node_memory_stats"))
    clock.now += 5
    watch.observe(HostMemory(300 * MIB, "node_memory_stats"))

    recovered = logs.events("host_memory_recovered")
    assert len(recovered) == 1
    assert recovered[0]["level"] == "info"
    assert recovered[0]["available_kib"] == 300 * MIB


def test_healthy_host_logs_nothing(logs: LogCapture) -> None:
    watch, _clock = watch_with_clock()

    watch.observe(HostMemory(8192 * MIB, "node_memory_stats"))

    assert logs.lines == []
