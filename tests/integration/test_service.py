"""The supervisor in this process: read-only dry runs, several hosts, reload."""

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from balloonctl.config import Settings
from balloonctl.errors import HypervisorError
from balloonctl.libvirt_adapter import LibvirtHypervisor
from balloonctl.notify import Notifier
from balloonctl.service import Supervisor, load_settings, make_hypervisor
from balloonctl.units import MIB
from tests.childproc import host_file
from tests.fakes import FakeHypervisor
from tests.integration.conftest import TEST_URI
from tests.logcapture import LogCapture


async def connected(uri: str, settings: Settings) -> LibvirtHypervisor:
    hypervisor = make_hypervisor(uri, settings)
    await hypervisor.connect(None)
    return hypervisor


@pytest.mark.asyncio
async def test_dry_run_connection_rejects_writes(tmp_path: Path) -> None:
    uri = host_file(tmp_path / "host.xml", "dry-1")
    hypervisor = await connected(uri, Settings(dry_run=True))
    try:
        (domain,) = await hypervisor.list_active_domains()
        with pytest.raises(HypervisorError, match="read only"):
            await hypervisor.set_target(domain, 512 * MIB)
        with pytest.raises(HypervisorError, match="read only"):
            await hypervisor.set_stats_period(domain, 1)
    finally:
        await hypervisor.close()
        hypervisor.shutdown_threads()


@pytest.mark.asyncio
async def test_managing_connection_accepts_writes(tmp_path: Path) -> None:
    uri = host_file(tmp_path / "host.xml", "wet-1")
    hypervisor = await connected(uri, Settings(dry_run=False))
    try:
        (domain,) = await hypervisor.list_active_domains()
        await hypervisor.set_target(domain, 512 * MIB)
        stats = await hypervisor.memory_stats(domain)
    finally:
        await hypervisor.close()
        hypervisor.shutdown_threads()

    assert stats.actual == 512 * MIB


async def serving(supervisor: Supervisor) -> AsyncIterator[Supervisor]:
    task = asyncio.create_task(supervisor.run())
    try:
        yield supervisor
    finally:
        supervisor.stop.set()
        await asyncio.wait_for(task, 10)
        for hypervisor in supervisor.hypervisors:
            hypervisor.shutdown_threads()


def settings_for(tmp_path: Path, *uris: str, **overrides: Any) -> Settings:
    base = Settings(
        uri=uris[0],
        uris=uris,
        stats_period=1,
        call_timeout=5.0,
        state_dir=str(tmp_path / "state"),
    )
    return dataclasses.replace(base, **overrides)


@pytest.mark.asyncio
async def test_hosts_use_own_connections(tmp_path: Path, logs: LogCapture) -> None:
    alpha = host_file(tmp_path / "alpha.xml", "alpha-1", "alpha-2")
    beta = host_file(tmp_path / "beta.xml", "beta-1")
    missing = f"test://{tmp_path}/nonexistent.xml"
    supervisor = Supervisor(settings_for(tmp_path, alpha, beta, missing))

    async for running in serving(supervisor):
        await logs.wait_event("libvirt_connect_failed", uri=missing)
        for name, uri in (("alpha-1", alpha), ("alpha-2", alpha), ("beta-1", beta)):
            line = await logs.wait_event("memory_released", domain=name)
            assert line["uri"] == uri
        connected_hosts = [c.uri for c in running.controllers if c.connected]
        status = running.status_text()

    assert connected_hosts == [alpha, beta]
    assert status == "3 domains on 2 of 3 hosts, 3 managed"
    hosts = {line["uri"] for line in logs.events("host_memory_low")}
    assert hosts == {alpha, beta}


@pytest.mark.asyncio
async def test_single_host_settings_unchanged(tmp_path: Path) -> None:
    settings = Settings(uri=TEST_URI, state_dir=str(tmp_path))

    assert settings.hosts == (TEST_URI,)
    assert settings.for_host(TEST_URI) == dataclasses.replace(
        settings, uris=(TEST_URI,)
    )


@pytest.mark.asyncio
async def test_reload_changes_next_decision(
    tmp_path: Path, logs: LogCapture, test_conn: Any
) -> None:
    # The built-in domain reports 1 GiB unused of 2 GiB: above a 100 MiB
    # buffer it is released, and with a 1 GiB buffer it is kept.
    dom = test_conn.lookupByName("test")
    await asyncio.to_thread(
        dom.setMemoryFlags, 2048 * MIB, libvirt.VIR_DOMAIN_AFFECT_LIVE
    )
    config = tmp_path / "balloonctl.toml"
    config.write_text("stats_period = 1\n")
    flags = {"uri": TEST_URI, "state_dir": str(tmp_path), "dry_run": True}
    settings = load_settings(config, flags)
    supervisor = Supervisor(settings, config=config, flags=flags)

    async for _running in serving(supervisor):
        await logs.wait_event("memory_released", domain="test")
        config.write_text('stats_period = 1\nmin_unused = "1 GiB"\n')
        await supervisor.reload()
        reloaded = await logs.wait_event("config_reloaded")
        kept = await logs.wait_event(
            "memory_kept", domain="test", reason="free_within_buffer"
        )

    assert reloaded["changed"] == [
        {"key": "min_unused", "old": 100 * MIB, "new": 1024 * MIB}
    ]
    assert logs.events("config_restart_required") == []
    assert kept["uri"] == TEST_URI
    assert supervisor.settings.min_unused == 1024 * MIB


class RecordingNotifier(Notifier):
    """Record each message with whether every host had settled when sent."""

    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[tuple[tuple[str, ...], list[bool]]] = []
        self.supervisor: Supervisor | None = None

    def send(self, *lines: str) -> None:
        assert self.supervisor is not None
        settled = [c.settled.is_set() for c in self.supervisor.controllers]
        self.sent.append((lines, settled))


@pytest.mark.asyncio
async def test_ready_after_every_host_settles(tmp_path: Path, logs: LogCapture) -> None:
    alpha = host_file(tmp_path / "alpha.xml", "alpha-1")
    missing = f"test://{tmp_path}/nonexistent.xml"
    notifier = RecordingNotifier()
    supervisor = Supervisor(settings_for(tmp_path, missing, alpha), notifier=notifier)
    notifier.supervisor = supervisor

    async for _running in serving(supervisor):
        await logs.wait_event("controller_started", uri=alpha)
        await logs.wait_event("libvirt_reconnect_failed", uri=missing)

    ready = [settled for lines, settled in notifier.sent if lines[0] == "READY=1"]
    assert ready == [[True, True]]


def real_or_fake(fake: FakeHypervisor) -> Any:
    """Build the real adapter for test-driver URIs and return ``fake`` for its own.

    The fake plays a remote host whose connection is refused at
    start and dropped later, which the test driver cannot do on demand.
    """

    def factory(uri: str, settings: Settings) -> Any:
        return fake if uri == fake.uri else make_hypervisor(uri, settings)

    return factory


@pytest.mark.asyncio
async def test_lost_host_leaves_others_alone(tmp_path: Path, logs: LogCapture) -> None:
    alpha = host_file(tmp_path / "alpha.xml", "alpha-1", memory_mib=8192)
    fake = FakeHypervisor("fake:///remote")
    fake.add("remote-1")
    fake.refuse_connects = 2
    supervisor = Supervisor(
        settings_for(tmp_path, alpha, fake.uri), hypervisor_factory=real_or_fake(fake)
    )
    task = asyncio.create_task(supervisor.run())
    try:
        await logs.wait_event("libvirt_connect_failed", uri=fake.uri)
        await logs.wait_event("controller_started", uri=alpha)
        await logs.wait_event("controller_started", uri=fake.uri, timeout=10)
        fake.drop_connection()
        lost = await logs.wait_event("libvirt_disconnected", uri=fake.uri)
        after = await logs.wait_for(
            lambda line: (
                line["event"] == "memory_released"
                and line.get("uri") == alpha
                and line["timestamp"] > lost["timestamp"]
            )
        )
        await logs.wait_event("libvirt_reconnected", uri=fake.uri)
    finally:
        supervisor.stop.set()
        await asyncio.wait_for(task, 10)
        supervisor.hypervisors[0].shutdown_threads()

    assert after["domain"] == "alpha-1"
    assert logs.events("libvirt_disconnected", uri=alpha) == []
    assert logs.events("controller_started", uri=alpha)[0]["domains"] == 1


def test_dry_run_supervisor_builds_read_only(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, TEST_URI, dry_run=True)

    supervisor = Supervisor(settings)

    assert [hv.read_only for hv in supervisor.hypervisors] == [True]


@pytest.mark.asyncio
async def test_sighup_during_reload_reruns_it(tmp_path: Path, logs: LogCapture) -> None:
    config = tmp_path / "balloonctl.toml"
    config.write_text("stuck_periods = 3\n")
    flags = {"uri": TEST_URI, "state_dir": str(tmp_path)}
    supervisor = Supervisor(load_settings(config, flags), config=config, flags=flags)
    real_reload = supervisor.reload
    calls = 0

    async def reload_with_sighup() -> None:
        # A second SIGHUP arrives while the first reload runs.
        nonlocal calls
        calls += 1
        if calls == 1:
            supervisor.request_reload()
        await real_reload()

    supervisor.reload = reload_with_sighup  # type: ignore[method-assign]
    supervisor.request_reload()
    await logs.wait_for(lambda line: len(logs.events("config_reloaded")) == 2)
    for hypervisor in supervisor.hypervisors:
        hypervisor.shutdown_threads()

    assert calls == 2


@pytest.mark.asyncio
async def test_dry_run_connection_refuses_writes(tmp_path: Path) -> None:
    # libvirt itself refuses every change on a read-only connection, so a
    # dry run cannot move a balloon even through a bug in balloonctl.
    settings = settings_for(tmp_path, TEST_URI, dry_run=True)
    hypervisor = Supervisor(settings).hypervisors[0]
    await hypervisor.connect(None)
    try:
        domain = (await hypervisor.list_active_domains())[0]
        before = (await hypervisor.memory_stats(domain)).actual
        assert before is not None

        with pytest.raises(HypervisorError) as info:
            await hypervisor.set_target(domain, before - 50 * 1024)

        after = (await hypervisor.memory_stats(domain)).actual
    finally:
        await hypervisor.close()
        hypervisor.shutdown_threads()

    assert "read only" in str(info.value).lower() or "read-only" in str(info.value)
    assert after == before
