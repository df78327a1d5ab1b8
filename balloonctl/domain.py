"""The per-domain task: read the policy, set the stats period, then each
period sample, decide and act."""

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable

import structlog

from balloonctl.config import Settings
from balloonctl.domain_policy import DomainPolicy, resolve
from balloonctl.errors import (
    CallStillRunning,
    CallTimedOut,
    Disconnected,
    DomainGone,
    DomainNotRunning,
    HypervisorError,
)
from balloonctl.hypervisor import DomainRef, Hypervisor, MemoryStats
from balloonctl.metrics import DomainMetrics
from balloonctl.policy import (
    Action,
    Decision,
    History,
    Reason,
    Sample,
    decide,
    is_foreign_change,
    note_manual_change,
)

# Failed calls are retried after one period, then after twice as long each
# time, up to this many seconds.
MAX_BACKOFF_S = 60.0

Clock = Callable[[], float]


def sample_from(stats: MemoryStats, maximum_kib: int, taken_at: float) -> Sample:
    return Sample(
        actual=stats.actual,
        unused=stats.unused,
        maximum=maximum_kib,
        last_update=stats.last_update,
        taken_at=taken_at,
        usable=stats.usable,
        available=stats.available,
        swap_in=stats.swap_in,
        major_fault=stats.major_fault,
    )


def next_tick(now: float, period: float, previous: float | None = None) -> float:
    """Return the next moment, a multiple of ``period``, to sample a domain.

    Every domain task samples at the same ticks, so their calls reach a
    worker thread as one batch (balloonctl.batching). After ``previous``,
    the tick the task last sampled at, comes the tick one period later,
    even when that step ended late. Otherwise (a domain's first sample, a
    retry after a failure) it is the first tick at least half a period
    away, so a wait is between half a period and one and a half.
    """
    if previous is not None and previous + period > now:
        return previous + period
    tick = math.ceil(now / period) * period
    if tick - now < period / 2:
        tick += period
    return tick


@dataclasses.dataclass
class DomainMemory:
    """State kept for one domain across reconnects."""

    history: History = dataclasses.field(default_factory=History)
    missing: tuple[str, ...] = ()
    last_reason: Reason | None = None
    stale: bool = False
    stuck: bool = False


@dataclasses.dataclass
class HostView:
    """The host's available memory as last read by the host watch.

    Every domain decides against this one figure. A grant is subtracted from
    it at once, so grants made by several domains before the next reading
    cannot together take the host under ``host_reserve``.
    """

    available_kib: int | None = None

    def reserve(self, kib: int) -> None:
        if self.available_kib is not None:
            self.available_kib -= kib


def without_pause(history: History, paused_for: float) -> History:
    """Move a pending request's clocks forward by the time the guest was paused.

    A paused guest cannot move its balloon, so that time must not count
    toward calling the balloon stuck.
    """
    request = history.request
    if request is None:
        return history
    return dataclasses.replace(
        history,
        request=dataclasses.replace(
            request, requested_at=request.requested_at + paused_for
        ),
        progress_at=(
            None if history.progress_at is None else history.progress_at + paused_for
        ),
    )


class DomainWorker:
    """Manage one domain's balloon until cancelled or the domain goes away."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        domain: DomainRef,
        settings: Settings,
        memory: DomainMemory,
        *,
        host: HostView,
        on_gone: Callable[[DomainRef, str], None],
        on_disconnected: Callable[[str], None],
        clock: Clock = time.monotonic,
        metrics: DomainMetrics | None = None,
    ) -> None:
        self.domain = domain
        self._metrics = metrics if metrics is not None else DomainMetrics()
        self._hv = hypervisor
        self._settings = settings
        self._memory = memory
        self._host = host
        self._on_gone = on_gone
        self._on_disconnected = on_disconnected
        self._clock = clock
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._policy: DomainPolicy | None = None
        self._last_policy: DomainPolicy | None = None
        self._from_persistent = False
        self._period_set = False
        self._period_failed = False
        self._failures = 0
        # Failures that lengthen the retry delay; skipped calls do not count.
        self._backoff_steps = 0
        self._rejected_targets: set[int] = set()
        # Set when the domain could not be observed for a while (paused, or
        # its calls failing), so the next sample starts the stale clock anew.
        self._restart_stale_clock = False
        # When the domain was paused, and the paused time not yet taken off
        # a pending request's clocks.
        self._paused_at: float | None = None
        self._paused_for = 0.0
        self._log = structlog.stdlib.get_logger("balloonctl").bind(
            uri=hypervisor.uri, domain=domain.name, uuid=domain.uuid
        )

    @property
    def policy(self) -> DomainPolicy | None:
        return self._policy

    def status(self, now: float) -> tuple[str, str]:
        """Return the domain's status for ``balloonctl plan``, and why."""
        policy = self._policy or self._last_policy
        if policy is None:
            return "starting", "policy not read yet"
        if not policy.managed:
            return policy.state, policy.reason
        memory = self._memory
        if memory.stuck:
            return "stuck", "the balloon made no progress toward its target"
        until = memory.history.manual_until
        if until is not None and now < until:
            return "grace", f"manual change; releases resume in {until - now:.0f} s"
        if memory.missing:
            missing = ", ".join(memory.missing)
            return "no_stats", f"the guest reports no balloon statistics ({missing})"
        if memory.stale:
            return "stale", "the guest's statistics stopped advancing"
        return "managed", ""

    def pause(self) -> None:
        """Stop sampling until ``resume``; called for a suspended domain."""
        if self._resumed.is_set():
            self._log.info("domain_paused")
            self._paused_at = self._clock()
        self._resumed.clear()
        self._report_status()

    def _report_status(self) -> None:
        # "paused" exists only in the metrics, since plan shows the
        # domain's state in a column of its own.
        if self._resumed.is_set():
            self._metrics.status(self.status(self._clock())[0])
        else:
            self._metrics.status("paused")

    def resume(self) -> None:
        if not self._resumed.is_set():
            self._log.info("domain_resumed")
            # A paused guest cannot report; its silence is not staleness.
            self._restart_stale_clock = True
            if self._paused_at is not None:
                self._paused_for += self._clock() - self._paused_at
                self._paused_at = None
        self._resumed.set()

    def reload_policy(self, *, redefined: bool = False) -> None:
        """Read the domain's policy again before the next sample.

        After a redefinition the metadata comes from the new persistent XML,
        which libvirt does not copy into the running domain's live XML.
        """
        self._policy = None
        self._from_persistent = redefined

    def update_settings(self, settings: Settings) -> None:
        """Use ``settings`` from the next period on (a configuration reload).

        The policy is resolved again, so ``policy_applied`` shows the new
        parameters, and a new stats period is set on the domain.
        """
        previous, self._settings = self._settings, settings
        self._policy = None
        if previous.stats_period != settings.stats_period:
            self._period_set = False
            self._period_failed = False

    def balloon_changed(self, actual_kib: int) -> None:
        """Handle a balloon-change event: start the grace period if not ours."""
        policy = self._policy
        if policy is None or not policy.managed:
            return
        if is_foreign_change(self._memory.history, actual_kib):
            self._note_manual(actual_kib, "balloon_change_event")

    def _note_manual(self, actual_kib: int, seen_by: str) -> None:
        assert self._policy is not None and self._policy.params is not None
        params = self._policy.params
        self._memory.history = note_manual_change(
            self._memory.history, self._clock(), params, actual_kib
        )
        self._log.info(
            "manual_change_detected",
            actual_kib=actual_kib,
            seen_by=seen_by,
            grace_s=params.manual_grace_s,
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        tick: float | None = None
        while True:
            await self._resumed.wait()
            # Read each time: a reload may have changed the period.
            period = float(self._settings.stats_period)
            delay: float | None = None
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
                self._restart_stale_clock = True
            self._report_status()
            if delay is None:
                tick = next_tick(loop.time(), period, tick)
                delay = tick - loop.time()
            else:
                tick = None
            await asyncio.sleep(delay)

    def _record_success(self) -> None:
        if self._failures:
            self._log.info("domain_call_recovered", failures=self._failures)
        self._failures = 0
        self._backoff_steps = 0

    def _record_failure(self, exc: HypervisorError, period: float) -> float:
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        if isinstance(exc, CallStillRunning):
            # Nothing reached libvirt, so retrying every period costs nothing
            # and the domain is sampled within a period of the stuck call
            # returning (a QEMU process that was stopped, say).
            delay = period
        else:
            self._backoff_steps += 1
            # The exponent is capped so that a long outage cannot overflow it.
            backoff: float = period * 2 ** min(self._backoff_steps - 1, 16)
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

    async def _load_policy(self) -> DomainPolicy:
        xml = await self._hv.domain_xml(self.domain)
        persistent = None
        if self._from_persistent:
            persistent = await self._hv.domain_xml(self.domain, inactive=True)
        policy = resolve(self.domain.name, xml, self._settings, persistent)
        self._policy = policy
        previous, self._last_policy = self._last_policy, policy
        if previous == policy:
            return policy
        if policy.state == "invalid":
            self._log.warning(
                "policy_invalid",
                field=policy.field,
                value=policy.value,
                error=policy.reason,
            )
        elif policy.state == "excluded":
            self._log.info("domain_excluded", reason=policy.reason)
        else:
            assert policy.params is not None
            self._log.info(
                "policy_applied",
                sources=list(policy.sources),
                metric=policy.params.metric.value,
                min_unused_kib=policy.params.min_unused,
                max_release_kib=policy.params.max_release,
                floor_min_kib=policy.params.floor_min,
                floor_percent=policy.params.floor_percent,
            )
        return policy

    async def _step(self) -> None:
        policy = self._policy or await self._load_policy()
        if not policy.managed:
            return
        assert policy.params is not None
        if not self._period_set:
            await self._try_set_period()

        info, stats = await self._hv.sample(self.domain)
        if stats is None:
            # Not running. A lifecycle event normally pauses the task first;
            # this covers a domain that was paused before balloonctl saw it.
            return

        sample = sample_from(stats, info.maximum_kib, self._clock())
        if self._restart_stale_clock:
            self._memory.history = dataclasses.replace(
                self._memory.history, report_seen_at=None
            )
            self._restart_stale_clock = False
        if self._paused_for:
            self._memory.history = without_pause(self._memory.history, self._paused_for)
            self._paused_for = 0.0
        if sample.actual is not None and is_foreign_change(
            self._memory.history, sample.actual
        ):
            self._note_manual(sample.actual, "sample")
        decision, history = decide(
            sample, self._memory.history, policy.params, self._host.available_kib
        )
        self._report(decision, sample)
        self._metrics.decided(sample, decision)
        if decision.target is not None and decision.action is not Action.KEEP:
            await self._act(decision, sample)
        if self._settings.dry_run:
            # Nothing was requested, so there is nothing to wait for: no
            # pending target that could look stuck, no cooldown.
            previous = self._memory.history
            history = dataclasses.replace(
                history, request=None, last_grant_at=previous.last_grant_at
            )
        self._memory.history = history
        if self._memory.stuck and history.stuck_count == 0:
            self._log.info("balloon_recovered", actual_kib=sample.actual)
            self._memory.stuck = False

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

    async def _act(self, decision: Decision, sample: Sample) -> None:
        assert decision.target is not None
        if decision.target in self._rejected_targets:
            self._log.debug("target_skipped", target_kib=decision.target)
            return
        if not self._settings.dry_run:
            try:
                await self._hv.set_target(self.domain, decision.target)
            except HypervisorError as exc:
                if exc.code == _VIR_ERR_INVALID_ARG:
                    # Rejected as too large: the maximum is read again next
                    # period, and the same value is not requested again.
                    self._rejected_targets.add(decision.target)
                raise
            self._metrics.requested(decision)
        if decision.action is Action.GRANT:
            self._host.reserve(decision.change)
        self._log_action(decision, sample)

    def _log_action(self, decision: Decision, sample: Sample) -> None:
        common = {
            "actual_kib": sample.actual,
            "target_kib": decision.target,
            "unused_kib": sample.unused,
            "usable_kib": sample.usable,
            "maximum_kib": sample.maximum,
            "floor_kib": decision.floor,
            "dry_run": self._settings.dry_run,
        }
        if decision.action is Action.RELEASE:
            self._log.info("memory_released", released_kib=decision.change, **common)
        elif decision.action is Action.GRANT:
            self._log.info(
                "memory_granted",
                granted_kib=decision.change,
                reason=decision.reason.value,
                emergency=decision.emergency,
                **common,
            )
        else:
            self._memory.stuck = True
            self._log.warning("balloon_stuck", **common)

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

        if decision.stale and not memory.stale:
            self._log.warning("stats_stale", last_update=sample.last_update)
        memory.stale = decision.stale

        changed = decision.reason is not memory.last_reason
        memory.last_reason = decision.reason
        if decision.action is not Action.KEEP:
            return
        if decision.reason is Reason.STATS_UNAVAILABLE:
            return
        self._log_kept(decision, sample, changed)

    def _log_kept(self, decision: Decision, sample: Sample, changed: bool) -> None:
        if not changed and not self._log.isEnabledFor(logging.DEBUG):
            # Repeats go to debug, every period for every domain; structlog
            # would drop them only after building the event.
            return
        figures = {
            "reason": decision.reason.value,
            "actual_kib": sample.actual,
            "unused_kib": sample.unused,
            "usable_kib": sample.usable,
            "maximum_kib": sample.maximum,
        }
        if decision.reason is Reason.STATS_INVALID:
            level = logging.WARNING if changed else logging.DEBUG
            self._log.log(
                level, "stats_invalid", figures=list(decision.invalid), **figures
            )
        else:
            level = logging.INFO if changed else logging.DEBUG
            self._log.log(level, "memory_kept", **figures)


# libvirt's VIR_ERR_INVALID_ARG, which setMemoryFlags raises for a target
# above the maximum; kept here so this module does not import libvirt.
_VIR_ERR_INVALID_ARG = 8
