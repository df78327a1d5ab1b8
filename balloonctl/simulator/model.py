"""The guest model: allocation, demand, swap and the balloon's movement.

A guest has a maximum (its configured memory), an allocation (``actual``,
what the balloon leaves it) and a demand (what its workload wants, from the
trace). The model evaluates a step's state when the step starts, before the
balloon moves, so a demand that rises at a step counts against the
allocation the guest had then. All sizes are KiB and all times are seconds.
"""

import dataclasses

from balloonctl.units import MIB

PAGE_KIB = 4


@dataclasses.dataclass(frozen=True)
class ModelParams:
    """The constants of the guest model; docs/simulator.md explains each."""

    # Kernel text, page tables, slab and reserves: memory of the guest that
    # its workload never gets and the balloon cannot take.
    overhead: int = 64 * MIB
    # The guest's swap space. Demand that exceeds the allocation's room by
    # more than this is an out-of-memory kill.
    swap_limit: int = 256 * MIB
    # How fast the balloon inflates or deflates, in KiB per second.
    balloon_rate: int = 256 * MIB
    # Share of the swapped memory that the workload touches, and so reads
    # back, each second while it is swapped.
    swap_in_share: float = 0.1


DEFAULT_MODEL = ModelParams()


@dataclasses.dataclass(frozen=True)
class GuestStats:
    """One report of a guest, with the fields of virDomainMemoryStats."""

    actual: int
    unused: int  # MemFree: neither used nor page cache
    usable: int  # MemAvailable: free memory plus the page cache
    available: int  # MemTotal, which shrinks as the balloon inflates
    swap_in: int  # KiB read back from swap since boot
    major_fault: int
    last_update: int  # whole seconds, the time of this report


class Guest:
    """One guest's allocation, demand and counters, advanced a step at a time."""

    def __init__(
        self, name: str, maximum: int, model: ModelParams = DEFAULT_MODEL
    ) -> None:
        self.name = name
        self.maximum = maximum
        self.model = model
        self.actual = maximum
        self.target = maximum
        self.demand = 0
        self.cache = 0
        self.swap_in = 0
        self.major_fault = 0
        self.in_oom = False
        self.oom_events = 0

    @property
    def free(self) -> int:
        """Allocation minus overhead and demand; negative while swapping."""
        return self.actual - self.model.overhead - self.demand

    @property
    def swapped(self) -> int:
        """Demand beyond the allocation's room, up to the swap limit."""
        return min(max(-self.free, 0), self.model.swap_limit)

    def start_step(self, demand: int, cache: int, seconds: float) -> bool:
        """Apply the step's demand and advance the swap counters over the step.

        Return True if the guest has just run out of memory. One event counts
        each time the demand passes the limit. The workload is not killed, so
        the guest stays out of memory, with no further events, until the
        allocation catches up or the demand falls.
        """
        self.demand = demand
        self.cache = cache
        oom = -self.free > self.model.swap_limit
        event = oom and not self.in_oom
        self.in_oom = oom
        if event:
            self.oom_events += 1

        read_back = int(self.swapped * self.model.swap_in_share * seconds)
        self.swap_in += read_back
        self.major_fault += read_back // PAGE_KIB
        return event

    def stats(self, time: float) -> GuestStats:
        """Return the report the guest makes at ``time``."""
        room = max(self.free, 0)
        cached = min(self.cache, room)
        return GuestStats(
            actual=self.actual,
            unused=room - cached,
            usable=room,
            available=self.actual,
            swap_in=self.swap_in,
            major_fault=self.major_fault,
            last_update=int(time),
        )

    def set_target(self, target: int) -> None:
        """Request a balloon target, as virDomainSetMemoryFlags does.

        libvirt rejects a target above the maximum, so one is cut to it.
        """
        self.target = min(max(target, 0), self.maximum)

    def move_balloon(self, seconds: float) -> None:
        """Move the allocation toward the target at the balloon's rate.

        Inflation takes free memory and page cache but never memory the
        workload uses, so it stops at overhead plus demand, and does not start
        at all while the guest swaps.
        """
        step = int(self.model.balloon_rate * seconds)
        if self.target > self.actual:
            self.actual = min(self.target, self.actual + step)
        elif self.target < self.actual:
            floor = min(self.actual, self.model.overhead + self.demand)
            self.actual = max(self.target, floor, self.actual - step)
