"""The running controller's per-domain status, shared with ``balloonctl plan``.

``balloonctl run`` writes a small JSON file once per period. ``plan`` reads
it to show what only the running controller has: which balloons are stuck
and which domains are in the grace period after a manual change.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def state_path(state_dir: str, uri: str) -> Path:
    """Return the state file for ``uri``: one per hypervisor, named by hash."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(state_dir) / f"state-{digest}.json"


def write_state(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document), encoding="utf-8")
    os.replace(temporary, path)


def remove_state(path: Path) -> None:
    path.unlink(missing_ok=True)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(path: Path, uri: str) -> dict[str, dict[str, str]]:
    """Return the domains' status by uuid, or {} without a live controller.

    A file left by a controller that has exited, or one for another URI, is
    ignored, and so is one that cannot be read or parsed.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict) or document.get("uri") != uri:
        return {}
    if not _alive(document.get("pid")):
        return {}
    domains = document.get("domains")
    return domains if isinstance(domains, dict) else {}
