"""The host-watch task: warn while the host's available memory is low."""

import asyncio
import logging
import time
from collections.abc import Callable

import structlog

from balloonctl.domain import HostView
from balloonctl.errors import Disconnected, HypervisorError
from balloonctl.hypervisor import HostMemory, Hypervisor
from balloonctl.metrics import NO_METRICS, HostMetrics

# While the host stays low, the warning is repeated at most this often.
REPEAT_WARNING_S = 60.0


class HostWatch:
    """Track whether the host is at or below ``host_warn`` and log changes."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        host_warn_kib: int,
        period_s: float,
        clock: Callable[[], float] = time.monotonic,
        view: HostView | None = None,
        metrics: HostMetrics = NO_METRICS,
    ) -> None:
        self._metrics = metrics
        self._hv = hypervisor
        self._host_warn = host_warn_kib
        self._period = period_s
        self._clock = clock
        self._view = view if view is not None else HostView()
        self._low = False
        self._last_warning = 0.0
        self._failing = False
        self._log = structlog.stdlib.get_logger("balloonctl").bind(uri=hypervisor.uri)

    def update(self, host_warn_kib: int, period_s: float) -> None:
        """Use a new threshold and period from the next reading on."""
        self._host_warn = host_warn_kib
        self._period = period_s

    async def run(self) -> None:
        while True:
            try:
                memory = await self._hv.host_memory()
            except Disconnected:
                pass  # the controller reconnects and logs it
            except HypervisorError as exc:
                self._record_failure(exc)
            else:
                self._failing = False
                self.observe(memory)
            await asyncio.sleep(self._period)

    def _record_failure(self, exc: HypervisorError) -> None:
        level = logging.DEBUG if self._failing else logging.WARNING
        self._log.log(level, "host_memory_failed", error=str(exc), error_code=exc.code)
        self._failing = True
        self._metrics.host_memory(None)

    def observe(self, memory: HostMemory) -> None:
        """Log a transition into or out of the low state, or a due repeat."""
        now = self._clock()
        self._view.available_kib = memory.available_kib
        self._metrics.host_memory(memory.available_kib)
        fields = {
            "available_kib": memory.available_kib,
            "host_warn_kib": self._host_warn,
            "source": memory.source,
        }
        if memory.available_kib <= self._host_warn:
            if not self._low or now - self._last_warning >= REPEAT_WARNING_S:
                self._log.warning("host_memory_low", repeated=self._low, **fields)
                self._last_warning = now
            self._low = True
        elif self._low:
            self._log.info("host_memory_recovered", **fields)
            self._low = False
