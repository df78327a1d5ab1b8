"""Memory sizes: parse sizes with an explicit unit, format them for people.

Everything inside balloonctl counts memory in KiB, the unit libvirt uses for
domain memory and node memory statistics.
"""

import re

KIB = 1
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB

_UNITS = {"kib": KIB, "mib": MIB, "gib": GIB, "tib": TIB}
_SIZE_RE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]*)\s*$")


class SizeError(ValueError):
    """A size string that cannot be parsed."""


def parse_size(text: str) -> int:
    """Parse a size such as ``"100 MiB"`` or ``"1.5GiB"`` into whole KiB.

    A unit is required because a bare number is ambiguous (libvirt uses KiB,
    /proc uses kB, most people think in MiB). Only binary units are accepted.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise SizeError(
            f"invalid size {text!r}: expected a number and a unit, such as '100 MiB'"
        )

    number, unit = match.group("number"), match.group("unit")
    if not unit:
        raise SizeError(
            f"invalid size {text!r}: a unit is required (KiB, MiB, GiB or TiB), "
            f"for example '{number} MiB'"
        )
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise SizeError(
            f"invalid size {text!r}: unknown unit {unit!r}; use KiB, MiB, GiB or TiB"
        )

    kib = float(number) * factor
    if kib != int(kib):
        raise SizeError(f"invalid size {text!r}: not a whole number of KiB")
    return int(kib)


def format_size(kib: int) -> str:
    """Format KiB for a table: ``512.0 MiB``, ``1.50 GiB``, ``640 KiB``."""
    magnitude = abs(kib)
    if magnitude >= GIB:
        return f"{kib / GIB:.2f} GiB"
    if magnitude >= MIB:
        return f"{kib / MIB:.1f} MiB"
    return f"{kib} KiB"
