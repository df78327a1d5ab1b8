"""``balloonctl plan``: one read-only pass that shows what would be done."""

import dataclasses
import json
import time
from typing import Any

from balloonctl.config import Settings
from balloonctl.domain import sample_from, thresholds_from
from balloonctl.errors import HypervisorError
from balloonctl.hypervisor import DomainRef, DomainState, HostMemory, Hypervisor
from balloonctl.policy import decide
from balloonctl.units import format_size


@dataclasses.dataclass(frozen=True)
class PlanRow:
    domain: DomainRef
    state: str
    actual_kib: int | None = None
    unused_kib: int | None = None
    maximum_kib: int | None = None
    action: str = "none"
    target_kib: int | None = None
    release_kib: int = 0
    reason: str = ""


async def plan_domain(hv: Hypervisor, domain: DomainRef, settings: Settings) -> PlanRow:
    """Decide for one domain as the controller would now, without acting."""
    try:
        info = await hv.domain_info(domain)
        if info.state is not DomainState.RUNNING:
            return PlanRow(domain, info.state.value, reason="domain not running")
        stats = await hv.memory_stats(domain)
    except HypervisorError as exc:
        return PlanRow(domain, "error", reason=str(exc))

    sample = sample_from(stats, info.maximum_kib, time.monotonic())
    decision = decide(sample, None, thresholds_from(settings))
    reason = decision.reason.value
    if decision.missing:
        reason += f" (missing: {', '.join(decision.missing)})"
    return PlanRow(
        domain,
        info.state.value,
        actual_kib=stats.actual,
        unused_kib=stats.unused,
        maximum_kib=info.maximum_kib,
        action=decision.action.value,
        target_kib=decision.target,
        release_kib=decision.release,
        reason=reason,
    )


async def make_plan(
    hv: Hypervisor, settings: Settings
) -> tuple[list[PlanRow], HostMemory | None]:
    domains = await hv.list_active_domains()
    rows = [await plan_domain(hv, domain, settings) for domain in domains]
    try:
        host = await hv.host_memory()
    except HypervisorError:
        host = None
    return sorted(rows, key=lambda row: row.domain.name), host


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
        "ACTUAL",
        "UNUSED",
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
                _size(row.actual_kib),
                _size(row.unused_kib),
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
