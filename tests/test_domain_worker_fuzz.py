"""DomainWorker fed absurd statistics through the in-memory hypervisor.

No libvirt driver reports arbitrary figures on demand (the test driver's
are synthetic and consistent), so a fake returns them. Two guests share
one HostView, as under the controller: whatever one guest reports, its own
targets stay within its floor and maximum, and the other guest's targets
are the same as when it runs alone.
"""

import asyncio
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from balloonctl.config import Settings
from balloonctl.domain import DomainMemory, DomainWorker, HostView
from balloonctl.domain_policy import global_params
from balloonctl.hypervisor import MemoryStats
from balloonctl.units import MIB
from tests.fakes import FakeDomain, FakeHypervisor

SETTINGS = Settings(stats_period=5)
PARAMS = global_params(SETTINGS)
PERIODS = 12

figure = st.one_of(
    st.none(),
    st.just(0),
    st.integers(min_value=-(2**64), max_value=-1),
    st.integers(min_value=2**63, max_value=2**65),
    st.integers(min_value=0, max_value=4096 * MIB),
)
absurd_stats = st.builds(
    MemoryStats,
    actual=figure,
    unused=figure,
    available=figure,
    usable=figure,
    last_update=st.none() | st.integers(min_value=-1, max_value=2**64),
    swap_in=figure,
    major_fault=figure,
)

# Figures that agree with each other, so that the wild guest is released and
# granted memory between its absurd reports.
plausible_stats = st.integers(min_value=1, max_value=2048 * MIB).flatmap(
    lambda actual: st.builds(
        MemoryStats,
        actual=st.just(actual),
        unused=st.integers(min_value=0, max_value=actual),
        available=st.just(actual),
        usable=st.none(),
        last_update=st.none(),
        swap_in=st.none() | st.integers(min_value=0, max_value=2**64),
        major_fault=st.none(),
    )
)


def make_worker(
    fake: FakeHypervisor, domain: FakeDomain, host: HostView, clock: list[float]
) -> DomainWorker:
    return DomainWorker(
        fake,
        domain.ref,
        SETTINGS,
        DomainMemory(),
        host=host,
        on_gone=lambda ref, why: None,
        on_disconnected=lambda why: None,
        clock=lambda: clock[0],
    )


async def run_periods(wild_stats: list[MemoryStats] | None) -> tuple[list[int], ...]:
    """Run a calm guest, and a wild one when given, for PERIODS periods."""
    fake = FakeHypervisor()
    fake.connected = True
    fake.host_available = 400 * MIB
    host = HostView()
    clock = [1000.0]
    calm = fake.add("calm", actual=1024 * MIB, used=300 * MIB)
    workers = [make_worker(fake, calm, host, clock)]
    wild = None
    if wild_stats is not None:
        wild = fake.add("wild", actual=2048 * MIB, maximum=2048 * MIB)
        workers.append(make_worker(fake, wild, host, clock))
    stats = itertools.cycle(wild_stats or [None])
    for _ in range(PERIODS):
        # As the host watch does once a period.
        host.available_kib = fake.host_available
        if wild is not None:
            wild.stats = next(stats)
        for worker in workers:
            await worker._step()
        clock[0] += SETTINGS.stats_period
    return calm.targets, wild.targets if wild is not None else []


@settings(max_examples=150, deadline=None)
@given(
    wild_stats=st.lists(absurd_stats | plausible_stats, min_size=1, max_size=PERIODS)
)
def test_absurd_stats_stay_with_their_guest(wild_stats: list[MemoryStats]) -> None:
    alone, _ = asyncio.run(run_periods(None))
    calm_targets, wild_targets = asyncio.run(run_periods(wild_stats))

    assert calm_targets == alone
    floor = PARAMS.floor(2048 * MIB)
    for target in wild_targets:
        assert floor <= target <= 2048 * MIB


def test_calm_guest_alone_is_released() -> None:
    # The comparison above means something only if the calm guest acts.
    alone, _ = asyncio.run(run_periods(None))

    assert alone
    assert all(
        a - b <= PARAMS.max_release for a, b in itertools.pairwise([1024 * MIB, *alone])
    )
