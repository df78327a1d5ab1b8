"""Prometheus metrics, recorded through small observer objects.

The controller, the domain tasks and the host watch call a ``HostMetrics``
or a ``DomainMetrics``. The base classes record nothing and are what those
tasks get when metrics are off. ``PrometheusMetrics`` keeps the real series
in a private ``CollectorRegistry``, so that tests can create several and the
library's global default registry stays empty.

Every series about a domain carries the labels ``host`` (the libvirt URI),
``domain`` and ``uuid``, and is removed when the controller drops the
domain, so a scrape never shows a domain that balloonctl no longer manages.
All updates run on the event loop. The HTTP server reads the registry from
its own thread, which prometheus_client allows because each metric guards
its children with a lock.
"""

import asyncio
import contextlib
import dataclasses
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from balloonctl import __version__
from balloonctl.hypervisor import DomainRef
from balloonctl.policy import Action, Decision, Sample

# The statuses of ``DomainWorker.status``, and "paused"; each domain has one
# series per status in ``balloonctl_domain_status``, 1 for the current one,
# 0 otherwise.
STATUSES = (
    "starting",
    "managed",
    "stuck",
    "grace",
    "stale",
    "no_stats",
    "paused",
    "excluded",
    "invalid",
)
# Statuses of a domain whose balloon balloonctl moves.
MANAGED_STATUSES = frozenset({"managed", "stuck", "grace", "stale"})

# The event-loop lag probe sleeps this long and records how late it wakes.
LAG_PROBE_INTERVAL_S = 0.5
LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

_DOMAIN_LABELS = ("host", "domain", "uuid")
_HOST_LABELS = ("host",)


class DomainMetrics:
    """Observer of one domain's task; this base class records nothing."""

    def decided(self, sample: Sample, decision: Decision) -> None:
        """Record a sample and the policy's decision on it."""

    def requested(self, decision: Decision) -> None:
        """Record a balloon target that was set on the domain."""

    def status(self, status: str) -> None:
        """Record the domain's status, one of ``STATUSES``."""


class HostMetrics:
    """Observer of one hypervisor's controller; this base class records nothing."""

    def domain(self, ref: DomainRef) -> DomainMetrics:
        """Return the observer for a domain that got a task."""
        return DomainMetrics()

    def forget(self, ref: DomainRef) -> None:
        """Remove every series of a domain that the controller dropped."""

    def forget_domains(self) -> None:
        """Remove every domain's series, as after a lost connection."""

    def connection(self, up: bool) -> None:
        """Record whether the libvirt connection is open."""

    def host_memory(self, available_kib: int | None) -> None:
        """Record the host's available memory; None when it could not be read."""

    def close(self) -> None:
        """Remove every series of this host; the controller has stopped."""


NO_METRICS = HostMetrics()


@dataclasses.dataclass(frozen=True)
class _Families:
    """Every metric family, created once per registry."""

    actual: Gauge
    target: Gauge
    unused: Gauge
    usable: Gauge
    maximum: Gauge
    floor: Gauge
    released: Counter
    granted: Counter
    decisions: Counter
    domain_status: Gauge
    available: Gauge
    libvirt_up: Gauge
    managed: Gauge
    last_decision: Gauge
    loop_lag: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> "_Families":
        def domain_bytes(name: str, text: str) -> Gauge:
            return Gauge(
                f"balloonctl_domain_{name}_bytes",
                text,
                _DOMAIN_LABELS,
                unit="bytes",
                registry=registry,
            )

        def domain_total(name: str, text: str) -> Counter:
            return Counter(
                f"balloonctl_domain_{name}_bytes",
                text,
                _DOMAIN_LABELS,
                unit="bytes",
                registry=registry,
            )

        return cls(
            actual=domain_bytes("actual", "Memory the guest has (libvirt's actual)."),
            target=domain_bytes(
                "target", "The last balloon target balloonctl set on the domain."
            ),
            unused=domain_bytes("unused", "Memory the guest does not use (MemFree)."),
            usable=domain_bytes(
                "usable", "Memory the guest can use without swapping (MemAvailable)."
            ),
            maximum=domain_bytes("maximum", "The domain's maximum memory."),
            floor=domain_bytes(
                "floor", "balloonctl never shrinks the guest below this."
            ),
            released=domain_total(
                "released", "Memory released by lowering the target."
            ),
            granted=domain_total("granted", "Memory granted by raising the target."),
            decisions=Counter(
                "balloonctl_domain_decisions",
                "Policy decisions by action and reason.",
                (*_DOMAIN_LABELS, "action", "reason"),
                registry=registry,
            ),
            domain_status=Gauge(
                "balloonctl_domain_status",
                "1 for the domain's current status, 0 for the others.",
                (*_DOMAIN_LABELS, "status"),
                registry=registry,
            ),
            available=Gauge(
                "balloonctl_host_available_memory_bytes",
                "The host's available memory as libvirt reports it.",
                _HOST_LABELS,
                unit="bytes",
                registry=registry,
            ),
            libvirt_up=Gauge(
                "balloonctl_libvirt_up",
                "1 while the libvirt connection is open, 0 while reconnecting.",
                _HOST_LABELS,
                registry=registry,
            ),
            managed=Gauge(
                "balloonctl_managed_domains",
                "Running domains whose balloon balloonctl moves.",
                _HOST_LABELS,
                registry=registry,
            ),
            last_decision=Gauge(
                "balloonctl_last_decision_timestamp_seconds",
                "Unix time of the last policy decision for any domain of the host.",
                _HOST_LABELS,
                unit="seconds",
                registry=registry,
            ),
            loop_lag=Histogram(
                "balloonctl_event_loop_lag_seconds",
                "How late a task that sleeps a fixed interval wakes up.",
                unit="seconds",
                buckets=LAG_BUCKETS_S,
                registry=registry,
            ),
        )


class PrometheusMetrics:
    """The process's metrics: one registry, a ``HostMetrics`` per URI."""

    def __init__(self) -> None:
        # The library's extra *_created series would double the number of
        # counter series for no use in Prometheus's text format. The switch
        # is global and applies to metrics created after it.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        # The client library's process (CPU, memory, open files), platform
        # (Python version) and garbage-collector collectors, on this registry.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        Info(
            "balloonctl_build",
            "The running balloonctl version.",
            registry=self.registry,
        ).info({"version": __version__})
        self._families = _Families.create(self.registry)

    def host(self, uri: str) -> "PrometheusHostMetrics":
        return PrometheusHostMetrics(self._families, uri)

    async def probe_loop_lag(self, interval: float = LAG_PROBE_INTERVAL_S) -> None:
        """Record, until cancelled, how late a sleep of ``interval`` wakes up.

        A late wake-up means something held the event loop: a blocking call
        in a coroutine, or a flood of callbacks.
        """
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            late = loop.time() - start - interval
            self._families.loop_lag.observe(max(late, 0.0))


class PrometheusHostMetrics(HostMetrics):
    """The series of one libvirt URI and of the domains its controller runs."""

    def __init__(self, families: _Families, uri: str) -> None:
        self.families = families
        self.uri = uri
        self._domains: dict[str, PrometheusDomainMetrics] = {}
        # Both series exist from the start, so that alerts on them need no
        # rule for a missing series.
        families.libvirt_up.labels(uri).set(0)
        families.managed.labels(uri).set(0)

    def domain(self, ref: DomainRef) -> "PrometheusDomainMetrics":
        observer = self._domains.get(ref.uuid)
        if observer is None or observer.ref != ref:
            self.forget(ref)
            observer = PrometheusDomainMetrics(self, ref)
            self._domains[ref.uuid] = observer
        return observer

    def forget(self, ref: DomainRef) -> None:
        observer = self._domains.pop(ref.uuid, None)
        if observer is not None:
            observer.remove_series()
        self.count_managed()

    def forget_domains(self) -> None:
        for observer in self._domains.values():
            observer.remove_series()
        self._domains.clear()
        self.count_managed()

    def connection(self, up: bool) -> None:
        self.families.libvirt_up.labels(self.uri).set(1 if up else 0)

    def host_memory(self, available_kib: int | None) -> None:
        gauge = self.families.available
        if available_kib is None:
            _remove(gauge, self.uri)
        else:
            gauge.labels(self.uri).set(available_kib * 1024)

    def close(self) -> None:
        self.forget_domains()
        families = self.families
        for gauge in (
            families.available,
            families.libvirt_up,
            families.managed,
            families.last_decision,
        ):
            _remove(gauge, self.uri)

    def decision_made(self) -> None:
        self.families.last_decision.labels(self.uri).set(time.time())

    def count_managed(self) -> None:
        count = sum(1 for observer in self._domains.values() if observer.is_managed)
        self.families.managed.labels(self.uri).set(count)


class PrometheusDomainMetrics(DomainMetrics):
    """The series of one domain, labelled with its host, name and uuid."""

    def __init__(self, host: PrometheusHostMetrics, ref: DomainRef) -> None:
        self.ref = ref
        self._host = host
        self._families = host.families
        self._labels = (host.uri, ref.name, ref.uuid)
        self._status: str | None = None
        # The (action, reason) pairs counted so far, which ``remove`` needs.
        self._decision_labels: set[tuple[str, str]] = set()

    @property
    def is_managed(self) -> bool:
        return self._status in MANAGED_STATUSES

    def decided(self, sample: Sample, decision: Decision) -> None:
        families = self._families
        figures = (
            (families.actual, sample.actual),
            (families.unused, sample.unused),
            (families.usable, sample.usable),
            (families.maximum, sample.maximum),
            (families.floor, decision.floor),
        )
        for gauge, kib in figures:
            # A figure the guest did not report is unknown, not zero.
            if kib is None:
                _remove(gauge, *self._labels)
            else:
                gauge.labels(*self._labels).set(kib * 1024)
        pair = (decision.action.value, decision.reason.value)
        self._decision_labels.add(pair)
        families.decisions.labels(*self._labels, *pair).inc()
        self._host.decision_made()

    def requested(self, decision: Decision) -> None:
        families = self._families
        if decision.target is not None:
            families.target.labels(*self._labels).set(decision.target * 1024)
        if decision.action is Action.RELEASE:
            families.released.labels(*self._labels).inc(decision.change * 1024)
        elif decision.action is Action.GRANT:
            families.granted.labels(*self._labels).inc(decision.change * 1024)

    def status(self, status: str) -> None:
        if status == self._status:
            return
        if status in ("excluded", "invalid"):
            # An excluded or invalid domain is not sampled, so its figures
            # would only go stale. A paused guest's memory stays as it was.
            self._remove_memory_series()
        self._status = status
        for each in STATUSES:
            value = 1 if each == status else 0
            self._families.domain_status.labels(*self._labels, each).set(value)
        self._host.count_managed()

    def remove_series(self) -> None:
        self._remove_memory_series()
        for each in STATUSES:
            _remove(self._families.domain_status, *self._labels, each)
        self._status = None

    def _remove_memory_series(self) -> None:
        families = self._families
        for metric in (
            families.actual,
            families.target,
            families.unused,
            families.usable,
            families.maximum,
            families.floor,
            families.released,
            families.granted,
        ):
            _remove(metric, *self._labels)
        for pair in self._decision_labels:
            _remove(families.decisions, *self._labels, *pair)
        self._decision_labels.clear()


def _remove(metric: Gauge | Counter, *labels: str) -> None:
    """Remove one labelled series; a series that does not exist is no error.

    prometheus_client 0.20 raises KeyError for a label set without a
    series, and 0.26 ignores it.
    """
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
