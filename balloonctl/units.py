"""Memory sizes: parse sizes with an explicit unit, format them for people.

Everything inside balloonctl counts memory in KiB, the unit libvirt uses for
domain memory and node memory statistics.
"""

import decimal
import re

KIB = 1
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB

_UNITS = {"kib": KIB, "mib": MIB, "gib": GIB, "tib": TIB}
# ASCII digits only: Python's \d also matches other scripts' digits.
_SIZE_RE = re.compile(
    r"^\s*(?P<number>[0-9]{1,20}(?:\.[0-9]{1,20})?)\s*(?P<unit>[A-Za-z]*)\s*$"
)


class SizeError(ValueError):
    """A size string that cannot be parsed."""


def shorten(value: object, limit: int = 60) -> str:
    """Return ``repr(value)``, cut to ``limit`` characters for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_size(text: str) -> int:
    """Parse a size such as ``"100 MiB"`` or ``"1.5GiB"`` into whole KiB.

    A unit is required because a bare number is ambiguous (libvirt uses KiB,
    /proc uses kB, most people think in MiB). Only binary units are accepted.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise SizeError(
            f"invalid size {shorten(text)}: expected a number and a unit, "
            "such as '100 MiB'"
        )

    number, unit = match.group("number"), match.group("unit")
    if not unit:
        raise SizeError(
            f"invalid size {shorten(text)}: a unit is required (KiB, MiB, GiB or TiB), "
            f"for example '{number} MiB'"
        )
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise SizeError(
            f"invalid size {shorten(text)}: unknown unit {shorten(unit)}; "
            "use KiB, MiB, GiB or TiB"
        )

    # Decimal keeps large and fractional sizes exact, unlike float.
    kib = decimal.Decimal(number) * factor
    if kib != kib.to_integral_value():
        raise SizeError(f"invalid size {shorten(text)}: not a whole number of KiB")
    return int(kib)


def format_size(kib: int) -> str:
    """Format KiB for a table: ``512.0 MiB``, ``1.50 GiB``, ``640 KiB``."""
    magnitude = abs(kib)
    if magnitude >= GIB:
        return f"{kib / GIB:.2f} GiB"
    if magnitude >= MIB:
        return f"{kib / MIB:.1f} MiB"
    return f"{kib} KiB"
