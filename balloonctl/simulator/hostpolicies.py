"""Host-driven balloon policies: oVirt MOM's and Proxmox VE's default rules.

Both act on the host's free memory first and on the guests' figures second.
The constants and steps follow the published sources named in each class.
Sizes are KiB, as everywhere in balloonctl.
"""

import collections
import dataclasses
from collections.abc import Sequence

from balloonctl.simulator.views import GuestView, HostView
from balloonctl.units import MIB


class _Interval:
    """A schedule that is due every ``seconds``, first at time 0."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.next_run = 0.0

    def due(self, time: float) -> bool:
        if time < self.next_run:
            return False
        while self.next_run <= time:
            self.next_run += self.seconds
        return True


# From oVirt MOM's doc/balloon.rules (commit e0f3d3b) and doc/mom-balloon.conf:
# policy-engine-interval and sample-history-length.
MOM_POLICY_INTERVAL_S = 10.0
MOM_HISTORY_LENGTH = 10
MOM_PRESSURE_THRESHOLD = 0.20
MOM_PRESSURE_CRITICAL = 0.05
MOM_MIN_GUEST_FREE_PERCENT = 0.20
MOM_MAX_BALLOON_CHANGE_PERCENT = 0.05
MOM_MIN_BALLOON_CHANGE_PERCENT = 0.0025


class MomPolicy:
    """oVirt MOM's default balloon rules (doc/balloon.rules in oVirt/mom).

    When host free memory, averaged over the last 10 samples, is under 20 %
    of the host's memory, every guest shrinks. Otherwise every guest below
    its maximum grows. MOM counts the host's MemFree, Buffers and Cached as
    free. The model's host has no page cache, so that is the host's
    available memory. A guest's used memory is its average allocation minus
    its average ``unused``. The guaranteed minimum (libvirt's
    ``memtune/min_guarantee``, which MOM reads as ``balloon_min``) is 0,
    because no guest in a trace configures one.
    """

    def __init__(self) -> None:
        self.interval = _Interval(MOM_POLICY_INTERVAL_S)
        self.host_free: collections.deque[int] = collections.deque(
            maxlen=MOM_HISTORY_LENGTH
        )
        self.allocations: dict[str, collections.deque[int]] = {}
        self.unused: dict[str, collections.deque[int]] = {}

    def targets(self, view: HostView) -> dict[str, int]:
        self._collect(view)
        if not self.interval.due(view.time):
            return {}
        host_free_percent = _mean(self.host_free) / view.total
        targets = {}
        for guest in view.guests:
            if host_free_percent < MOM_PRESSURE_THRESHOLD:
                target = self._shrink(guest, host_free_percent)
            else:
                target = self._grow(guest)
            if target is not None:
                targets[guest.name] = target
        return targets

    def _collect(self, view: HostView) -> None:
        self.host_free.append(view.available)
        for guest in view.guests:
            if guest.name not in self.allocations:
                self.allocations[guest.name] = collections.deque(
                    maxlen=MOM_HISTORY_LENGTH
                )
                self.unused[guest.name] = collections.deque(maxlen=MOM_HISTORY_LENGTH)
            self.allocations[guest.name].append(guest.stats.actual)
            self.unused[guest.name].append(guest.stats.unused)

    def _used(self, guest: GuestView) -> float:
        return _mean(self.allocations[guest.name]) - _mean(self.unused[guest.name])

    def _shrink(self, guest: GuestView, host_free_percent: float) -> int | None:
        current = guest.stats.actual
        if host_free_percent <= MOM_PRESSURE_CRITICAL:
            # Critical pressure: a negative free share forces the guest to swap.
            guest_free_percent = -0.05 + host_free_percent
        else:
            guest_free_percent = MOM_MIN_GUEST_FREE_PERCENT * (
                host_free_percent / MOM_PRESSURE_THRESHOLD
            )
        floor = max(0.0, self._used(guest) + guest_free_percent * current)
        size = max(current * (1 - MOM_MAX_BALLOON_CHANGE_PERCENT), floor)
        if size <= current and _change_big_enough(current, size):
            return int(size)
        return None

    def _grow(self, guest: GuestView) -> int | None:
        current = guest.stats.actual
        if current >= guest.maximum:
            return None
        floor = max(0.0, self._used(guest) + MOM_MIN_GUEST_FREE_PERCENT * current)
        size = max(current * (1 + MOM_MAX_BALLOON_CHANGE_PERCENT), floor)
        size = min(size, guest.maximum)
        if _change_big_enough(current, size):
            return int(size)
        return None


def _mean(values: Sequence[int]) -> float:
    return sum(values) / len(values)


def _change_big_enough(current: int, size: float) -> bool:
    return abs(size - current) > MOM_MIN_BALLOON_CHANGE_PERCENT * current


# From Proxmox VE's PVE/AutoBalloon.pm and PVE/Service/pvestatd.pm.
PVE_INTERVAL_S = 10.0
PVE_HOST_TARGET = 0.8
PVE_DEADBAND = 10 * MIB
PVE_MAX_CHANGE = 100 * MIB
PVE_DEFAULT_SHARES = 1000
PVE_PRESSURE_SHARE = 0.25
# The configured minimum ("balloon" in a VM's config) that the simulator
# gives every guest, as a share of its maximum.
PVE_MINIMUM_SHARE = 0.25
# A safety stop for the redistribution loop, which the Perl original lacks.
PVE_MAX_ROUNDS = 1000


@dataclasses.dataclass(frozen=True)
class VmStatus:
    """The fields of one entry of pvestatd's vmstatus that the algorithm reads."""

    balloon: int
    minimum: int
    maximum: int
    freemem: int
    shares: int = PVE_DEFAULT_SHARES


class ProxmoxPolicy:
    """Proxmox VE's auto-ballooning, pvestatd's ``compute_alg1``.

    Every 10 s the goal is 80 % of the host's memory minus the host's used
    memory (MemTotal minus MemAvailable). Within 10 MiB of the goal nothing
    changes. Otherwise the guests share the goal in proportion to their
    shares, growth going first to guests under pressure (MemFree at most
    25 % of their minimum) and shrinking first to the others, at most
    100 MiB per guest and cycle.
    """

    def __init__(self) -> None:
        self.interval = _Interval(PVE_INTERVAL_S)

    def targets(self, view: HostView) -> dict[str, int]:
        if not self.interval.due(view.time):
            return {}
        used = view.total - view.available
        goal = int(view.total * PVE_HOST_TARGET - used)
        vms = {
            guest.name: VmStatus(
                balloon=guest.stats.actual,
                minimum=int(guest.maximum * PVE_MINIMUM_SHARE),
                maximum=guest.maximum,
                freemem=guest.stats.unused,
            )
            for guest in view.guests
        }
        result = compute_balloons(vms, goal)
        return {
            name: size for name, size in result.items() if size != vms[name].balloon
        }


def compute_balloons(vms: dict[str, VmStatus], goal: int) -> dict[str, int]:
    """Return new balloon sizes for a change of ``goal`` KiB in host usage."""
    everyone = list(vms)
    pressure = [name for name in everyone if not _has_room(vms[name])]
    room = [name for name in everyone if _has_room(vms[name])]
    result: dict[str, int] = {}
    if goal > PVE_DEADBAND:
        rest = _change(vms, result, pressure, goal)
        if rest >= goal:
            _change(vms, result, everyone, rest)
    elif goal < -PVE_DEADBAND:
        rest = _change(vms, result, room, goal)
        if rest <= goal:
            _change(vms, result, everyone, rest)
    return result


def _has_room(vm: VmStatus) -> bool:
    return (
        vm.freemem > 0
        and vm.freemem > vm.minimum * PVE_PRESSURE_SHARE
        and vm.balloon >= vm.minimum
    )


def _change(
    vms: dict[str, VmStatus], result: dict[str, int], names: list[str], amount: int
) -> int:
    """Spread ``amount`` over ``names`` by shares and return the part left over."""
    rest = amount
    done: set[str] = set()
    repeat, progress, rounds = True, 1, 0
    while rest and repeat and progress and rounds < PVE_MAX_ROUNDS:
        rounds += 1
        active = [name for name in names if name not in done]
        shares_total = sum(vms[name].shares for name in active)
        allocated = sum(
            result.get(name, vms[name].balloon) - vms[name].minimum for name in active
        )
        pool = allocated + rest
        repeat, progress, changes = False, 0, 0
        for name in active:
            vm = vms[name]
            desired = vm.minimum + int(pool / shares_total * vm.shares)
            if desired > vm.maximum or desired < vm.minimum:
                desired = min(max(desired, vm.minimum), vm.maximum)
                repeat = True
            if amount > 0 and desired > vm.balloon:
                balloon = min(vm.balloon + PVE_MAX_CHANGE, desired)
            elif desired < vm.balloon:
                balloon = max(vm.balloon - PVE_MAX_CHANGE, desired)
            else:
                done.add(name)
                continue
            if balloon == vm.balloon:
                continue
            change = balloon - result.get(name, vm.balloon)
            result[name] = balloon
            if change:
                changes += change
                progress += abs(balloon - vm.balloon)
                repeat = True
        rest -= changes
    return rest
