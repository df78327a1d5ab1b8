"""An in-memory hypervisor behind the seam, for faults on demand.

libvirt's drivers offer no way to drop a connection, fail one domain's
calls or reject reconnection at a chosen moment, and this fake does. Everything
else is tested against real libvirt.
"""

import asyncio
import dataclasses
import itertools

from balloonctl.errors import Disconnected, DomainGone, HypervisorError
from balloonctl.hypervisor import (
    ConnectionLost,
    DomainInfo,
    DomainRef,
    DomainState,
    EventSink,
    HostMemory,
    LifecycleEvent,
    LifecycleKind,
    MemoryStats,
)
from balloonctl.units import MIB


@dataclasses.dataclass
class FakeDomain:
    ref: DomainRef
    actual: int = 1024 * MIB
    maximum: int = 2048 * MIB
    used: int = 300 * MIB
    state: DomainState = DomainState.RUNNING
    fail_with: Exception | None = None
    hang: bool = False
    reports_unused: bool = True
    # The guest's own timestamp of its statistics; None means not reported.
    last_update: int | None = None
    # Targets above this are rejected as libvirt rejects one above maximum.
    reject_above: int | None = None
    targets: list[int] = dataclasses.field(default_factory=list)
    # Returned as they are instead of figures derived from actual and used,
    # for absurd statistics that a real guest's driver could report.
    stats: MemoryStats | None = None
    xml: str = (
        "<domain type='fake'><devices><memballoon model='virtio'/></devices></domain>"
    )


class FakeHypervisor:
    def __init__(self, uri: str = "fake:///") -> None:
        self._uri = uri
        self.domains: dict[str, FakeDomain] = {}
        self.host_available = 8192 * MIB
        self.connected = False
        self.connects = 0
        self.refuse_connects = 0
        self._on_event: EventSink | None = None
        self._serial = itertools.count()

    @property
    def uri(self) -> str:
        return self._uri

    def add(self, name: str, **fields: object) -> FakeDomain:
        ref = DomainRef(
            uuid=f"00000000-0000-0000-0000-{next(self._serial):012d}", name=name
        )
        domain = FakeDomain(ref, **fields)  # type: ignore[arg-type]
        self.domains[ref.uuid] = domain
        return domain

    def emit(self, domain: FakeDomain, kind: LifecycleKind) -> None:
        assert self._on_event is not None
        self._on_event(LifecycleEvent(domain.ref, kind, 0, 0))

    def drop_connection(self) -> None:
        """Behave like libvirtd exiting: calls fail and the close callback fires."""
        self.connected = False
        assert self._on_event is not None
        self._on_event(ConnectionLost("eof"))

    async def connect(self, on_event: EventSink | None) -> None:
        self.connects += 1
        if self.refuse_connects > 0:
            self.refuse_connects -= 1
            raise Disconnected("connection refused")
        self._on_event = on_event
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    def _check(self) -> None:
        if not self.connected:
            raise Disconnected("not connected")

    async def _get(self, ref: DomainRef) -> FakeDomain:
        self._check()
        domain = self.domains.get(ref.uuid)
        if domain is None:
            raise DomainGone(f"no domain {ref.name}")
        if domain.hang:
            await asyncio.Event().wait()
        if domain.fail_with is not None:
            raise domain.fail_with
        return domain

    async def list_active_domains(self) -> list[DomainRef]:
        self._check()
        return [d.ref for d in self.domains.values()]

    async def domain_info(self, domain: DomainRef) -> DomainInfo:
        found = await self._get(domain)
        return DomainInfo(found.state, found.maximum)

    async def set_stats_period(self, domain: DomainRef, seconds: int) -> None:
        await self._get(domain)

    async def memory_stats(self, domain: DomainRef) -> MemoryStats:
        found = await self._get(domain)
        if found.stats is not None:
            return found.stats
        unused = found.actual - found.used if found.reports_unused else None
        return MemoryStats(
            found.actual, unused, found.actual, unused, found.last_update
        )

    async def sample(self, domain: DomainRef) -> tuple[DomainInfo, MemoryStats | None]:
        info = await self.domain_info(domain)
        if info.state is not DomainState.RUNNING:
            return info, None
        return info, await self.memory_stats(domain)

    async def domain_xml(self, domain: DomainRef, *, inactive: bool = False) -> str:
        found = await self._get(domain)
        return found.xml

    async def set_target(self, domain: DomainRef, kib: int) -> None:
        found = await self._get(domain)
        found.targets.append(kib)
        if found.reject_above is not None and kib > found.reject_above:
            raise HypervisorError("cannot set memory higher than max memory", code=8)
        found.actual = kib

    async def host_memory(self) -> HostMemory:
        self._check()
        return HostMemory(self.host_available, "fake")

    def forget(self, domain: DomainRef) -> None:
        pass
