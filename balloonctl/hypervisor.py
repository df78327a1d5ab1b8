"""The seam between the controller and a hypervisor.

The controller uses only this interface. ``balloonctl.libvirt_adapter``
implements it over libvirt-python; tests may implement it to produce faults
that a real hypervisor cannot produce on demand. Every method raises only the
exceptions in ``balloonctl.errors``.
"""

import dataclasses
import enum
from collections.abc import Callable
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class DomainRef:
    uuid: str
    name: str


class DomainState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    OTHER = "other"


@dataclasses.dataclass(frozen=True)
class DomainInfo:
    state: DomainState
    maximum_kib: int


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """A domain's balloon statistics in KiB; a figure not reported is None.

    ``swap_in`` is KiB swapped in since the guest booted and ``major_fault``
    a count since boot; both are counters that a reboot resets.
    """

    actual: int | None
    unused: int | None
    available: int | None
    usable: int | None
    last_update: int | None
    swap_in: int | None = None
    major_fault: int | None = None


@dataclasses.dataclass(frozen=True)
class HostMemory:
    available_kib: int
    source: str


class LifecycleKind(enum.Enum):
    DEFINED = "defined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    OTHER = "other"


@dataclasses.dataclass(frozen=True)
class LifecycleEvent:
    domain: DomainRef
    kind: LifecycleKind
    event: int
    detail: int


@dataclasses.dataclass(frozen=True)
class BalloonChanged:
    """The balloon's actual size changed (VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE)."""

    domain: DomainRef
    actual_kib: int


@dataclasses.dataclass(frozen=True)
class MetadataChanged:
    domain: DomainRef


@dataclasses.dataclass(frozen=True)
class ConnectionLost:
    reason: str


HypervisorEvent = LifecycleEvent | BalloonChanged | MetadataChanged | ConnectionLost
EventSink = Callable[[HypervisorEvent], None]


class Hypervisor(Protocol):
    """Asynchronous access to one hypervisor connection."""

    @property
    def uri(self) -> str: ...

    async def connect(self, on_event: EventSink | None) -> None:
        """Open the connection and deliver lifecycle events to ``on_event``.

        ``on_event`` is called on the event loop and must not block. With
        None, no events are registered.
        """

    async def close(self) -> None:
        """Deregister events and close the connection; never raises."""

    async def list_active_domains(self) -> list[DomainRef]: ...

    async def domain_info(self, domain: DomainRef) -> DomainInfo: ...

    async def set_stats_period(self, domain: DomainRef, seconds: int) -> None: ...

    async def memory_stats(self, domain: DomainRef) -> MemoryStats: ...

    async def sample(self, domain: DomainRef) -> tuple[DomainInfo, MemoryStats | None]:
        """Return ``domain_info`` and, for a running domain, ``memory_stats``.

        The domain task calls this once a period. It may read both in one
        call to the hypervisor, which costs less than two.
        """

    async def domain_xml(self, domain: DomainRef, *, inactive: bool = False) -> str:
        """Return the domain's live XML, or with ``inactive`` its persistent one."""

    async def set_target(self, domain: DomainRef, kib: int) -> None:
        """Set the live balloon target; the persistent config is not touched."""

    async def host_memory(self) -> HostMemory: ...

    def forget(self, domain: DomainRef) -> None:
        """Drop anything cached for a domain that has gone away."""
