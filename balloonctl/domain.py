"""The per-domain task: set the stats period, then sample, decide and act."""

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

import structlog

from balloonctl.config import Settings
from balloonctl.errors import (
    CallTimedOut,
    Disconnected,
    DomainGone,
    DomainNotRunning,
    HypervisorError,
)
from balloonctl.hypervisor import DomainRef, DomainState, Hypervisor, MemoryStats
from balloonctl.policy import (
    Action,
    Decision,
    Reason,
    Request,
    Sample,
    Thresholds,
    decide,
)

# Failed calls are retried after one period, then after twice as long each
# time, up to this many seconds.
MAX_BACKOFF_S = 60.0

Clock = Callable[[], float]


def thresholds_from(settings: Settings) -> Thresholds:
    return Thresholds(
        min_unused=settings.min_unused,
        max_release=settings.max_release,
        min_release=settings.min_release,
        stats_period=settings.stats_period,
    )


def sample_from(stats: MemoryStats, maximum_kib: int, taken_at: float) -> Sample:
    return Sample(
        actual=stats.actual,
        unused=stats.unused,
        maximum=maximum_kib,
        last_update=stats.last_update,
        taken_at=taken_at,
    )


@dataclasses.dataclass
class DomainMemory:
    """State kept for one domain across reconnects."""

    request: Request | None = None
    missing: tuple[str, ...] = ()
    last_reason: Reason | None = None


class DomainWorker:
    """Manage one domain's balloon until cancelled or the domain goes away."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        domain: DomainRef,
        settings: Settings,
        memory: DomainMemory,
        *,
        on_gone: Callable[[DomainRef, str], None],
        on_disconnected: Callable[[str], None],
        clock: Clock = time.monotonic,
    ) -> None:
        self.domain = domain
        self._hv = hypervisor
        self._settings = settings
        self._memory = memory
        self._on_gone = on_gone
        self._on_disconnected = on_disconnected
        self._clock = clock
        self._thresholds = thresholds_from(settings)
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._period_set = False
        self._period_failed = False
        self._failures = 0
        self._log = structlog.stdlib.get_logger("balloonctl").bind(
            domain=domain.name, uuid=domain.uuid
        )

    def pause(self) -> None:
        """Stop sampling until ``resume``; called for a suspended domain."""
        if self._resumed.is_set():
            self._log.info("domain_paused")
        self._resumed.clear()

    def resume(self) -> None:
        if not self._resumed.is_set():
            self._log.info("domain_resumed")
        self._resumed.set()

    async def run(self) -> None:
        period = float(self._settings.stats_period)
        while True:
            await self._resumed.wait()
            delay = period
            try:
                await self._step()
                self._record_success()
            except DomainGone:
                self._on_gone(self.domain, "domain gone")
                return
            except DomainNotRunning:
                self._on_gone(self.domain, "domain not running")
                return
            except Disconnected as exc:
                self._on_disconnected(str(exc))
            except HypervisorError as exc:
                delay = self._record_failure(exc, period)
            await asyncio.sleep(delay)

    def _record_success(self) -> None:
        if self._failures:
            self._log.info("domain_call_recovered", failures=self._failures)
        self._failures = 0

    def _record_failure(self, exc: HypervisorError, period: float) -> float:
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        backoff: float = period * 2 ** (self._failures - 1)
        delay = min(backoff, max(MAX_BACKOFF_S, period))
        self._log.log(
            level,
            "domain_call_failed",
            error=str(exc),
            error_code=exc.code,
            timed_out=isinstance(exc, CallTimedOut),
            failures=self._failures,
            retry_in_s=delay,
        )
        return delay

    async def _step(self) -> None:
        if not self._period_set:
            await self._try_set_period()

        info = await self._hv.domain_info(self.domain)
        if info.state is not DomainState.RUNNING:
            # A lifecycle event normally pauses the task first; this covers a
            # domain that was paused before balloonctl saw it.
            return

        stats = await self._hv.memory_stats(self.domain)
        sample = sample_from(stats, info.maximum_kib, self._clock())
        decision = decide(sample, self._memory.request, self._thresholds)
        self._report(decision, sample)
        if decision.action is Action.RELEASE:
            await self._release(decision, sample)

    async def _try_set_period(self) -> None:
        """Set the stats period; on failure, sample anyway and retry next time.

        A domain without a balloon device rejects the period. Its statistics
        then lack ``unused``, so the decision leaves it alone.
        """
        period = self._settings.stats_period
        if self._settings.dry_run:
            # A dry run changes nothing on the domain, the period included.
            self._log.info("stats_period_unchanged", dry_run=True)
            self._period_set = True
            return

        try:
            await self._hv.set_stats_period(self.domain, period)
        except (DomainGone, DomainNotRunning, Disconnected, CallTimedOut):
            raise
        except HypervisorError as exc:
            if not self._period_failed:
                self._log.warning(
                    "stats_period_failed", error=str(exc), error_code=exc.code
                )
            self._period_failed = True
            return
        self._log.info("stats_period_set", period_s=period)
        self._period_set = True

    async def _release(self, decision: Decision, sample: Sample) -> None:
        assert decision.target is not None
        if not self._settings.dry_run:
            await self._hv.set_target(self.domain, decision.target)
        self._memory.request = Request(
            target=decision.target,
            requested_at=self._clock(),
            last_update=sample.last_update,
        )
        self._log.info(
            "memory_released",
            actual_kib=sample.actual,
            target_kib=decision.target,
            unused_kib=sample.unused,
            released_kib=decision.release,
            maximum_kib=sample.maximum,
            dry_run=self._settings.dry_run,
        )

    def _report(self, decision: Decision, sample: Sample) -> None:
        """Log what changed since the last period; repeats go to debug."""
        memory = self._memory
        if decision.reason is Reason.STATS_UNAVAILABLE:
            if decision.missing != memory.missing:
                self._log.warning("stats_unavailable", missing=list(decision.missing))
            memory.missing = decision.missing
        elif memory.missing:
            self._log.info("stats_available")
            memory.missing = ()

        changed = decision.reason is not memory.last_reason
        memory.last_reason = decision.reason
        if (
            decision.action is Action.RELEASE
            or decision.reason is Reason.STATS_UNAVAILABLE
        ):
            return

        figures = {
            "reason": decision.reason.value,
            "actual_kib": sample.actual,
            "unused_kib": sample.unused,
            "maximum_kib": sample.maximum,
        }
        if decision.reason is Reason.STATS_INVALID:
            level = logging.WARNING if changed else logging.DEBUG
            self._log.log(level, "stats_invalid", **figures)
        else:
            level = logging.INFO if changed else logging.DEBUG
            self._log.log(level, "memory_kept", **figures)
