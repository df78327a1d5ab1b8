"""Render simulation results as a Markdown table or as JSON."""

import dataclasses
import json
from collections.abc import Sequence

from balloonctl.simulator.metrics import CONVERGE_BAND, CONVERGE_HOLD_S, Result
from balloonctl.simulator.model import ModelParams
from balloonctl.units import MIB

COLUMNS = (
    "trace",
    "policy",
    "released MiB",
    "of oracle",
    "under buffer s",
    "swap MiB·s",
    "OOM",
    "changes",
    "converged s",
    "host overcommit s",
)


def render_table(results: Sequence[Result]) -> str:
    """Return a Markdown table with one row per trace and policy."""
    rows = [COLUMNS, tuple("---" for _ in COLUMNS)]
    rows.extend(_row(result) for result in results)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _row(result: Result) -> tuple[str, ...]:
    fraction = (
        "n/a" if result.oracle_fraction is None else f"{result.oracle_fraction:.1%}"
    )
    converged = "never" if result.converged_s is None else f"{result.converged_s:.0f}"
    return (
        result.trace,
        result.policy,
        f"{result.released_kib / MIB:.0f}",
        fraction,
        f"{result.under_buffer_s:.0f}",
        f"{result.swap_kib_s / MIB:.0f}",
        str(result.oom_events),
        str(result.target_changes),
        converged,
        f"{result.host_overcommit_s:.0f}",
    )


def render_json(
    results: Sequence[Result], period: int, model: ModelParams, buffer: int
) -> str:
    """Return the results and the model's constants as JSON, sizes in KiB."""
    document = {
        "period_s": period,
        "buffer_kib": buffer,
        "model": {
            "overhead_kib": model.overhead,
            "swap_limit_kib": model.swap_limit,
            "balloon_rate_kib_per_s": model.balloon_rate,
            "swap_in_share_per_s": model.swap_in_share,
        },
        "converge_band_kib": CONVERGE_BAND,
        "converge_hold_s": CONVERGE_HOLD_S,
        "results": [dataclasses.asdict(result) for result in results],
    }
    return json.dumps(document, indent=2)
