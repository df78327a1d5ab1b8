"""The running controller's per-domain status, shared with ``balloonctl plan``.

``balloonctl run`` writes a small JSON file once per period. ``plan`` reads
it to show what only the running controller has: which balloons are stuck
and which domains are in the grace period after a manual change.
"""

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any


def uri_digest(uri: str) -> str:
    """Return the short hash that names a URI's files in the state dir."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def state_path(state_dir: str, uri: str) -> Path:
    """Return the state file for ``uri``: one per hypervisor, named by hash."""
    return Path(state_dir) / f"state-{uri_digest(uri)}.json"


def write_state(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document), encoding="utf-8")
    os.replace(temporary, path)


def remove_state(path: Path) -> None:
    path.unlink(missing_ok=True)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**22:
        return False  # Linux pids are below 2**22
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fresh(document: dict[str, Any], now: float) -> bool:
    """Tell whether the file was written within three of the writer's periods."""
    written_at, period = document.get("written_at"), document.get("stats_period_s")
    if not isinstance(written_at, int | float) or not isinstance(period, int | float):
        return False
    return 0 <= now - written_at <= 3 * period + 5


def read_state(
    path: Path, uri: str, now: float | None = None
) -> dict[str, dict[str, str]]:
    """Return the domains' status by uuid, or {} without a live controller.

    A file left by a controller that has exited or stopped writing, or one
    for another URI, is ignored, and so is one that cannot be read or parsed.
    ``now`` is the wall-clock time in seconds (default: the current time).
    """
    now = time.time() if now is None else now
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict) or document.get("uri") != uri:
        return {}
    if not _alive(document.get("pid")) or not _fresh(document, now):
        return {}
    domains = document.get("domains")
    return domains if isinstance(domains, dict) else {}
