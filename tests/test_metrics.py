"""The metrics observers, the endpoint and the listen address setting."""

import asyncio
import contextlib
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable

import pytest
import pytest_asyncio
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from balloonctl import controller as controller_module
from balloonctl import metrics_server
from balloonctl.config import (
    ConfigError,
    ListenAddress,
    Settings,
    build_settings,
    parse_listen_address,
)
from balloonctl.controller import Controller
from balloonctl.hypervisor import DomainRef
from balloonctl.metrics import STATUSES, PrometheusMetrics
from balloonctl.metrics_server import MetricsExporter, MetricsListenError
from balloonctl.policy import Action, Decision, Reason, Sample
from balloonctl.units import MIB
from tests.fakes import FakeHypervisor
from tests.logcapture import LogCapture

URI = "fake:///"
ALPHA = DomainRef("00000000-0000-0000-0000-00000000000a", "alpha")
BETA = DomainRef("00000000-0000-0000-0000-00000000000b", "beta")


def sample(actual: int, unused: int | None = 600 * MIB) -> Sample:
    return Sample(
        actual=actual, unused=unused, maximum=2048 * MIB, last_update=1, taken_at=0.0
    )


def release(target: int, change: int) -> Decision:
    return Decision(Action.RELEASE, Reason.RELEASE, target, change, floor=128 * MIB)


def value(
    metrics: PrometheusMetrics, name: str, ref: DomainRef, **labels: str
) -> float | None:
    return metrics.registry.get_sample_value(
        name, {"host": URI, "domain": ref.name, "uuid": ref.uuid, **labels}
    )


def series_of(metrics: PrometheusMetrics, ref: DomainRef) -> list[str]:
    return [
        sample.name
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.labels.get("uuid") == ref.uuid
    ]


def test_decision_sets_figures_in_bytes() -> None:
    metrics = PrometheusMetrics()
    domain = metrics.host(URI).domain(ALPHA)

    domain.decided(sample(1024 * MIB), release(974 * MIB, 50 * MIB))

    assert value(metrics, "balloonctl_domain_actual_bytes", ALPHA) == 1024 * MIB * 1024
    assert value(metrics, "balloonctl_domain_unused_bytes", ALPHA) == 600 * MIB * 1024
    assert value(metrics, "balloonctl_domain_maximum_bytes", ALPHA) == 2 * 1024**3
    assert value(metrics, "balloonctl_domain_floor_bytes", ALPHA) == 128 * 1024**2
    decisions = value(
        metrics,
        "balloonctl_domain_decisions_total",
        ALPHA,
        action="release",
        reason="free_above_buffer",
    )
    assert decisions == 1
    # Deciding is not requesting: no target until one is set.
    assert value(metrics, "balloonctl_domain_target_bytes", ALPHA) is None


def test_request_sets_target_and_counts_bytes() -> None:
    metrics = PrometheusMetrics()
    domain = metrics.host(URI).domain(ALPHA)

    domain.requested(release(974 * MIB, 50 * MIB))
    domain.requested(release(924 * MIB, 50 * MIB))
    domain.requested(Decision(Action.GRANT, Reason.GRANT, 1000 * MIB, 76 * MIB))

    assert value(metrics, "balloonctl_domain_target_bytes", ALPHA) == 1000 * 1024**2
    released = value(metrics, "balloonctl_domain_released_bytes_total", ALPHA)
    granted = value(metrics, "balloonctl_domain_granted_bytes_total", ALPHA)
    assert released == 100 * 1024**2
    assert granted == 76 * 1024**2


def test_missing_figure_has_no_series() -> None:
    metrics = PrometheusMetrics()
    domain = metrics.host(URI).domain(ALPHA)
    domain.decided(sample(1024 * MIB), release(974 * MIB, 50 * MIB))

    domain.decided(
        sample(1024 * MIB, unused=None), Decision(Action.KEEP, Reason.STATS_UNAVAILABLE)
    )

    assert value(metrics, "balloonctl_domain_unused_bytes", ALPHA) is None
    assert value(metrics, "balloonctl_domain_actual_bytes", ALPHA) == 1024 * 1024**2


def test_status_is_a_state_set() -> None:
    metrics = PrometheusMetrics()
    host = metrics.host(URI)
    domain = host.domain(ALPHA)

    domain.status("stuck")

    values = {
        status: value(metrics, "balloonctl_domain_status", ALPHA, status=status)
        for status in STATUSES
    }
    assert values.pop("stuck") == 1
    assert set(values.values()) == {0}
    assert (
        metrics.registry.get_sample_value("balloonctl_managed_domains", {"host": URI})
        == 1
    )


def test_excluded_domain_keeps_only_status() -> None:
    metrics = PrometheusMetrics()
    host = metrics.host(URI)
    domain = host.domain(ALPHA)
    domain.status("managed")
    domain.decided(sample(1024 * MIB), release(974 * MIB, 50 * MIB))
    domain.requested(release(974 * MIB, 50 * MIB))

    domain.status("excluded")

    assert set(series_of(metrics, ALPHA)) == {"balloonctl_domain_status"}
    assert value(metrics, "balloonctl_domain_status", ALPHA, status="excluded") == 1
    assert (
        metrics.registry.get_sample_value("balloonctl_managed_domains", {"host": URI})
        == 0
    )


def test_forgotten_domain_leaves_no_series() -> None:
    metrics = PrometheusMetrics()
    host = metrics.host(URI)
    for ref in (ALPHA, BETA):
        domain = host.domain(ref)
        domain.status("managed")
        domain.decided(sample(1024 * MIB), release(974 * MIB, 50 * MIB))
        domain.decided(sample(974 * MIB), Decision(Action.KEEP, Reason.NO_NEW_REPORT))
        domain.requested(release(974 * MIB, 50 * MIB))

    host.forget(ALPHA)

    assert series_of(metrics, ALPHA) == []
    assert "balloonctl_domain_actual_bytes" in series_of(metrics, BETA)
    assert (
        metrics.registry.get_sample_value("balloonctl_managed_domains", {"host": URI})
        == 1
    )


def test_closed_host_leaves_no_series() -> None:
    metrics = PrometheusMetrics()
    host = metrics.host(URI)
    host.connection(True)
    host.host_memory(4096 * MIB)
    domain = host.domain(ALPHA)
    domain.status("managed")
    domain.decided(sample(1024 * MIB), release(974 * MIB, 50 * MIB))

    host.close()

    labelled = [
        sample
        for family in metrics.registry.collect()
        for sample in family.samples
        if "host" in sample.labels
    ]
    assert labelled == []


def test_registries_are_independent() -> None:
    first, second = PrometheusMetrics(), PrometheusMetrics()

    first.host(URI).host_memory(100 * MIB)

    labels = {"host": URI}
    name = "balloonctl_host_available_memory_bytes"
    assert first.registry.get_sample_value(name, labels) == 100 * 1024**2
    assert second.registry.get_sample_value(name, labels) is None


def test_names_follow_prometheus_conventions() -> None:
    metrics = PrometheusMetrics()
    host = metrics.host(URI)
    domain = host.domain(ALPHA)
    domain.decided(sample(1024 * MIB), release(974 * MIB, 50 * MIB))
    domain.requested(release(974 * MIB, 50 * MIB))
    domain.status("managed")
    host.host_memory(1024 * MIB)

    families = [
        family
        for family in metrics.registry.collect()
        if family.name.startswith("balloonctl_")
    ]

    assert families
    for family in families:
        assert re.fullmatch("[a-z_]+", family.name), family.name
        if family.unit:
            assert family.name.endswith("_" + family.unit), family.name
        if "_bytes" in family.name or "_seconds" in family.name:
            assert family.unit in ("bytes", "seconds"), family.name
        if family.type == "counter":
            names = {sample.name for sample in family.samples}
            assert names <= {family.name + "_total"}, family.name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9700", ListenAddress("127.0.0.1", 9700)),
        (":9700", ListenAddress("127.0.0.1", 9700)),
        ("localhost:9700", ListenAddress("127.0.0.1", 9700)),
        ("0.0.0.0:9700", ListenAddress("0.0.0.0", 9700)),
        ("[::1]:9700", ListenAddress("::1", 9700)),
        ("[::]:0", ListenAddress("::", 0)),
        (" 10.0.0.1:65535 ", ListenAddress("10.0.0.1", 65535)),
        (9700, ListenAddress("127.0.0.1", 9700)),
    ],
)
def test_listen_address_forms(text: object, expected: ListenAddress) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("::1:9700", "in brackets"),
        ("[nope]:9700", "'nope' in brackets is not an IPv6 address"),
        ("example.org:9700", "'example.org' is not an IP address"),
        ("127.0.0.1:65536", "port '65536' is out of range"),
        ("127.0.0.1:123456789", "out of range"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
        (True, "expected HOST:PORT"),
    ],
)
def test_listen_address_rejected(text: object, fragment: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_listen_address(text)

    assert fragment in str(error.value)


def test_listen_flag_error_names_flag_and_value() -> None:
    with pytest.raises(ConfigError) as error:
        build_settings({}, {"metrics_listen": "host:99"})

    assert "--metrics-listen" in str(error.value)
    assert "'host:99'" in str(error.value)


def test_listen_address_string_round_trips() -> None:
    for text in ("127.0.0.1:9700", "[::1]:0"):
        assert str(parse_listen_address(text)) == text


@pytest_asyncio.fixture
async def exporter(logs: LogCapture) -> AsyncIterator[MetricsExporter]:
    running = MetricsExporter(ListenAddress("127.0.0.1", 0))
    running.start()
    assert running.metrics is not None
    running.host(URI).host_memory(512 * MIB)
    try:
        yield running
    finally:
        await running.stop()


def fetch(
    port: int | None, path: str, method: str = "GET", host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.asyncio
async def test_endpoint_serves_metrics(
    exporter: MetricsExporter, logs: LogCapture
) -> None:
    status, headers, body = await asyncio.to_thread(fetch, exporter.port, "/metrics")

    listening = logs.events("metrics_listening")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert listening[0]["port"] == exporter.port
    assert listening[0]["host"] == "127.0.0.1"
    available = families["balloonctl_host_available_memory_bytes"].samples
    assert [s.value for s in available] == [512 * 1024**2]
    assert "process_resident_memory_bytes" in families
    assert "python_info" in families


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "path", ["/", "/metrics/", "/favicon.ico", "/metrics/../etc", "/index.html"]
)
async def test_other_paths_get_404(exporter: MetricsExporter, path: str) -> None:
    status, _, body = await asyncio.to_thread(fetch, exporter.port, path)

    assert status == 404
    assert b"balloonctl_" not in body


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_get_405(exporter: MetricsExporter, method: str) -> None:
    status, headers, body = await asyncio.to_thread(
        fetch, exporter.port, "/metrics", method
    )

    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert b"balloonctl_" not in body


@pytest.mark.asyncio
async def test_head_has_no_body(exporter: MetricsExporter) -> None:
    status, headers, body = await asyncio.to_thread(
        fetch, exporter.port, "/metrics", "HEAD"
    )

    assert status == 200
    assert int(headers["Content-Length"]) > 0
    assert body == b""


@pytest.mark.asyncio
async def test_query_string_still_serves_metrics(exporter: MetricsExporter) -> None:
    status, _, body = await asyncio.to_thread(fetch, exporter.port, "/metrics?x=1")

    assert status == 200
    assert b"balloonctl_build_info" in body


class BrokenCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        raise RuntimeError("collector bug")


@pytest.mark.asyncio
async def test_failing_scrape_is_logged(
    exporter: MetricsExporter, logs: LogCapture
) -> None:
    assert exporter.metrics is not None
    exporter.metrics.registry.register(BrokenCollector())

    with pytest.raises(OSError):
        await asyncio.to_thread(fetch, exporter.port, "/metrics")
    failed = await logs.wait_event("metrics_request_failed")
    status, _, _ = await asyncio.to_thread(fetch, exporter.port, "/")

    assert "collector bug" in failed["exception"]
    assert status == 404


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.asyncio
@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
async def test_endpoint_listens_on_ipv6(logs: LogCapture) -> None:
    running = MetricsExporter(ListenAddress("::1", 0))
    running.start()
    try:
        status, _, _ = await asyncio.to_thread(
            fetch, running.port, "/metrics", host="[::1]"
        )
    finally:
        await running.stop()

    assert status == 200


@pytest.mark.asyncio
async def test_port_in_use_raises_listen_error(logs: LogCapture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = MetricsExporter(ListenAddress("127.0.0.1", port))

        with pytest.raises(MetricsListenError) as error:
            running.start()

    assert f"127.0.0.1:{port}" in str(error.value)
    assert running.port is None


@pytest.mark.asyncio
async def test_stop_closes_the_socket(logs: LogCapture) -> None:
    running = MetricsExporter(ListenAddress("127.0.0.1", 0))
    running.start()
    port = running.port

    await running.stop()

    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1):
        pass


def trickle_until_closed(port: int | None, interval: float, limit: float) -> float:
    """Send one byte every ``interval`` s until the server closes the socket.

    Returns how long the connection lasted, or ``limit`` if it never closed.
    """
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), 2) as client:
        client.settimeout(interval)
        for byte in b"GET /metrics HTTP/1.1\r\n" * 10:
            if time.monotonic() - started > limit:
                break
            try:
                client.sendall(bytes([byte]))
                if client.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
    return time.monotonic() - started


@pytest.mark.asyncio
async def test_trickling_client_loses_its_slot(
    logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_server, "CONNECTION_DEADLINE_S", 1.0)
    monkeypatch.setattr(metrics_server, "MAX_CONNECTIONS", 2)
    running = MetricsExporter(ListenAddress("127.0.0.1", 0))
    running.start()
    try:
        lasted = await asyncio.gather(
            *(
                asyncio.to_thread(trickle_until_closed, running.port, 0.2, 6.0)
                for _ in range(2)
            )
        )
        # The server frees a slot just after it closes the connection, so
        # the first scrape may still find both slots taken.
        status = 0
        for _ in range(20):
            with contextlib.suppress(OSError):
                status, _, _ = await asyncio.to_thread(fetch, running.port, "/metrics")
                break
            await asyncio.sleep(0.05)
    finally:
        await running.stop()

    # Each read arrives well within the per-read timeout, so only the
    # connection deadline can have closed them.
    assert max(lasted) < 4.0
    assert status == 200


def test_disabled_exporter_opens_nothing() -> None:
    running = MetricsExporter(None)

    running.start()

    assert running.metrics is None
    assert running.port is None


@pytest.mark.asyncio
async def test_loop_lag_probe_records_a_blocked_loop() -> None:
    metrics = PrometheusMetrics()
    probe = asyncio.create_task(metrics.probe_loop_lag(interval=0.05))
    await asyncio.sleep(0)  # the probe starts its first sleep
    # Block the loop well past the probe's wake-up time, as a blocking call
    # in a coroutine would.
    time.sleep(0.3)  # noqa: ASYNC251
    await asyncio.sleep(0.01)
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)

    registry = metrics.registry
    count = registry.get_sample_value("balloonctl_event_loop_lag_seconds_count")
    total = registry.get_sample_value("balloonctl_event_loop_lag_seconds_sum")
    assert count is not None and count >= 1
    # The probe cannot wake before the block ends, 0.3 s after it slept.
    assert total is not None and total >= 0.3 - 0.05


@pytest.mark.asyncio
async def test_disconnect_removes_domain_series(
    logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libvirt cannot drop a connection on demand, so this uses the fake.
    monkeypatch.setattr(controller_module, "RECONNECT_INITIAL_S", 0.05)
    fake = FakeHypervisor()
    alpha = fake.add("alpha")
    metrics = PrometheusMetrics()
    host = metrics.host(fake.uri)
    controller = Controller(fake, Settings(uri=fake.uri, stats_period=1), metrics=host)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    labels = {"host": fake.uri, "domain": "alpha", "uuid": alpha.ref.uuid}
    up = {"host": fake.uri}
    try:
        await logs.wait_event("memory_released", domain="alpha")
        seen_up = metrics.registry.get_sample_value("balloonctl_libvirt_up", up)
        seen_actual = metrics.registry.get_sample_value(
            "balloonctl_domain_actual_bytes", labels
        )
        fake.refuse_connects = 1000
        fake.drop_connection()
        await logs.wait_event("libvirt_disconnected")
        await logs.wait_event("libvirt_reconnect_failed")

        down = metrics.registry.get_sample_value("balloonctl_libvirt_up", up)
        during = series_of(metrics, alpha.ref)
        fake.refuse_connects = 0
        await logs.wait_event("libvirt_reconnected", timeout=3)
        back = metrics.registry.get_sample_value("balloonctl_libvirt_up", up)
        await wait_until(
            lambda: (
                metrics.registry.get_sample_value(
                    "balloonctl_domain_actual_bytes", labels
                )
                is not None
            )
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 3)

    assert seen_up == 1
    assert seen_actual is not None
    assert down == 0
    assert during == []
    assert back == 1
    assert series_of(metrics, alpha.ref) == []


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    # The registry signals no change, so this polls it.
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
