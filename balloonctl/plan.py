"""``balloonctl plan``: one read-only pass that shows what would be done."""

import dataclasses
import json
import time
from typing import Any

from balloonctl.config import Settings
from balloonctl.domain import sample_from
from balloonctl.domain_policy import resolve
from balloonctl.errors import HypervisorError
from balloonctl.hypervisor import (
    DomainRef,
    DomainState,
    HostMemory,
    Hypervisor,
    MemoryStats,
)
from balloonctl.policy import Decision, History, decide
from balloonctl.state import read_state, state_path
from balloonctl.units import format_size


@dataclasses.dataclass(frozen=True)
class PlanRow:
    domain: DomainRef
    state: str
    status: str = "managed"
    metric: str | None = None
    floor_kib: int | None = None
    actual_kib: int | None = None
    unused_kib: int | None = None
    usable_kib: int | None = None
    maximum_kib: int | None = None
    action: str = "none"
    target_kib: int | None = None
    change_kib: int = 0
    reason: str = ""


def _history_for(stats: MemoryStats, now: float) -> History:
    """Build the history a one-shot pass can know: when the report was made.

    QEMU's last_update is the host's wall-clock time of the guest's latest
    report, so its age shows whether the statistics are stale. Stuck
    balloons and grace periods come from the running controller's state
    file instead; its pending requests are not visible here.
    """
    if stats.last_update is None:
        return History()
    age = max(time.time() - stats.last_update, 0.0)
    return History(report_time=stats.last_update, report_seen_at=now - age)


async def plan_domain(
    hv: Hypervisor, domain: DomainRef, settings: Settings, host_available: int | None
) -> PlanRow:
    """Decide for one domain as the controller would now, without acting."""
    try:
        policy = resolve(domain.name, await hv.domain_xml(domain), settings)
        if not policy.managed:
            return PlanRow(domain, "-", status=policy.state, reason=policy.reason)
        assert policy.params is not None
        info = await hv.domain_info(domain)
        if info.state is not DomainState.RUNNING:
            return PlanRow(domain, info.state.value, reason="domain not running")
        stats = await hv.memory_stats(domain)
    except HypervisorError as exc:
        return PlanRow(domain, "error", status="error", reason=str(exc))

    now = time.monotonic()
    sample = sample_from(stats, info.maximum_kib, now)
    decision, _history = decide(
        sample, _history_for(stats, now), policy.params, host_available
    )
    reason = decision.reason.value
    if decision.missing:
        reason += f" (missing: {', '.join(decision.missing)})"
    if decision.invalid:
        reason += f" ({'; '.join(decision.invalid)})"
    return PlanRow(
        domain,
        info.state.value,
        status=_status(decision),
        metric=policy.params.metric.value,
        floor_kib=policy.params.floor(info.maximum_kib),
        actual_kib=stats.actual,
        unused_kib=stats.unused,
        usable_kib=stats.usable,
        maximum_kib=info.maximum_kib,
        action=decision.action.value,
        target_kib=decision.target,
        change_kib=decision.change,
        reason=reason,
    )


async def make_plan(
    hv: Hypervisor, settings: Settings
) -> tuple[list[PlanRow], HostMemory | None]:
    domains = await hv.list_active_domains()
    try:
        host: HostMemory | None = await hv.host_memory()
    except HypervisorError:
        host = None
    available = host.available_kib if host is not None else None
    reported = read_state(state_path(settings.state_dir, settings.uri), settings.uri)
    rows = []
    for domain in domains:
        row = await plan_domain(hv, domain, settings, available)
        rows.append(_with_reported_status(row, reported.get(domain.uuid)))
    return sorted(rows, key=lambda row: row.domain.name), host


def _with_reported_status(row: PlanRow, reported: object) -> PlanRow:
    """Apply the running controller's status, which a one-shot pass cannot see.

    A stuck balloon or a grace period after a manual change means the
    controller releases nothing now, whatever the figures say.
    """
    if not isinstance(reported, dict) or row.status not in ("managed", "stale"):
        return row
    status = reported.get("status")
    if status not in ("stuck", "grace"):
        return row
    reason = f"{status}: {reported.get('reason', '')} (reported by balloonctl run)"
    if row.action != "release":
        return dataclasses.replace(row, status=status, reason=f"{reason}; {row.reason}")
    return dataclasses.replace(
        row, status=status, action="keep", target_kib=None, change_kib=0, reason=reason
    )


def render_json(
    rows: list[PlanRow], host: HostMemory | None, settings: Settings
) -> str:
    def row_dict(row: PlanRow) -> dict[str, Any]:
        fields = dataclasses.asdict(row)
        del fields["domain"]
        return {"domain": row.domain.name, "uuid": row.domain.uuid, **fields}

    document = {
        "uri": settings.uri,
        "host_available_kib": host.available_kib if host else None,
        "host_memory_source": host.source if host else None,
        "host_warn_kib": settings.host_warn,
        "domains": [row_dict(row) for row in rows],
    }
    return json.dumps(document, indent=2)


def _size(kib: int | None) -> str:
    return "-" if kib is None else format_size(kib)


def render_table(
    rows: list[PlanRow], host: HostMemory | None, settings: Settings
) -> str:
    header = (
        "DOMAIN",
        "STATE",
        "STATUS",
        "METRIC",
        "FLOOR",
        "ACTUAL",
        "UNUSED",
        "USABLE",
        "MAXIMUM",
        "ACTION",
        "TARGET",
        "REASON",
    )
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.domain.name,
                row.state,
                row.status,
                row.metric or "-",
                _size(row.floor_kib),
                _size(row.actual_kib),
                _size(row.unused_kib),
                _size(row.usable_kib),
                _size(row.maximum_kib),
                row.action,
                _size(row.target_kib),
                row.reason,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        + "  "
        + line[-1]
        for line in lines
    ]
    if host is None:
        text.append("host: available memory unknown")
    else:
        low = " (LOW)" if host.available_kib <= settings.host_warn else ""
        text.append(
            f"host: {format_size(host.available_kib)} available{low}, "
            f"warning at {format_size(settings.host_warn)} ({host.source})"
        )
    return "\n".join(text)


def _status(decision: Decision) -> str:
    # A domain without statistics is not managed in any useful sense: its
    # balloon is never moved until the guest reports them.
    if decision.missing:
        return "no_stats"
    return "stale" if decision.stale else "managed"
