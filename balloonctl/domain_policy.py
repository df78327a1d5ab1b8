"""Per-domain policy: exclusions, the domain's XML metadata and config sections.

A domain's parameters come from three layers, the first that sets a value
winning: a ``<policy>`` element in the domain's own ``<metadata>``, in the
namespace ``NAMESPACE``; a ``[domains."NAME"]`` section of the config file;
the global settings. Domains whose memory cannot be ballooned (pinned by a
passthrough device, locked or backed by huge pages, or with no balloon) are
excluded whatever the layers contain.
"""

import dataclasses
import fnmatch
import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import Callable, Mapping
from typing import Any

from balloonctl.config import DOMAIN_KEYS, ConfigError, Settings, check_limits
from balloonctl.policy import Metric, Params

NAMESPACE = "urn:balloonctl:policy:1"
METADATA_TAG = f"{{{NAMESPACE}}}policy"

# A domain XML larger than this is not parsed, which bounds the memory and
# time one domain's definition can cost.
MAX_XML_BYTES = 10 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class DomainPolicy:
    """The outcome for one domain: managed with ``params``, or why not."""

    state: str  # "managed", "excluded" or "invalid"
    params: Params | None = None
    reason: str = ""
    field: str | None = None
    value: str | None = None
    sources: tuple[str, ...] = ()

    @property
    def managed(self) -> bool:
        return self.state == "managed"


class PolicyInvalid(Exception):
    def __init__(self, field: str, value: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


def global_params(settings: Settings) -> Params:
    return Params(
        min_unused=settings.min_unused,
        max_release=settings.max_release,
        min_release=settings.min_release,
        grow_margin=settings.grow_margin,
        floor_min=settings.floor_min,
        floor_percent=settings.floor_percent,
        host_reserve=settings.effective_host_reserve,
        stats_period=float(settings.stats_period),
        release_cooldown_periods=settings.release_cooldown,
        stuck_periods=settings.stuck_periods,
        manual_grace_s=settings.manual_grace,
        distress_major_faults=settings.distress_major_faults,
        metric=Metric(settings.metric),
        grant_slack=settings.grant_slack,
    )


def exclusion_reason(root: ET.Element) -> str | None:
    """Return why this domain's memory cannot be ballooned, or None."""
    devices = root.find("devices")
    if devices is not None and devices.find("hostdev") is not None:
        return "hostdev passthrough device pins the guest's memory"
    if devices is not None and devices.find("interface[@type='hostdev']") is not None:
        return "hostdev interface (SR-IOV passthrough) pins the guest's memory"
    backing = root.find("memoryBacking")
    if backing is not None and backing.find("locked") is not None:
        return "memoryBacking locked pins the guest's memory"
    if backing is not None and backing.find("hugepages") is not None:
        return "memoryBacking hugepages cannot be ballooned"
    balloon = devices.find("memballoon") if devices is not None else None
    if balloon is not None and balloon.get("model") == "none":
        return "memballoon model is none"
    return None


def read_metadata(root: ET.Element) -> dict[str, Any]:
    """Parse the balloonctl ``<policy>`` element of the domain's metadata."""
    metadata = root.find("metadata")
    element = metadata.find(METADATA_TAG) if metadata is not None else None
    if element is None:
        return {}

    raw: dict[str, object] = {}
    managed = element.get("managed")
    if managed is not None:
        if managed not in ("yes", "no"):
            raise PolicyInvalid("managed", managed, "expected 'yes' or 'no'")
        raw["managed"] = managed == "yes"
    for child in element:
        key = child.tag.removeprefix(f"{{{NAMESPACE}}}")
        text = (child.text or "").strip()
        if len(child):
            raise PolicyInvalid(key, text, "expected a plain value, not child elements")
        if key in raw:
            # Silently taking the first or the last of two values would
            # apply a value the operator may not have meant.
            raise PolicyInvalid(key, text, "set more than once; keep one element")
        raw[key] = text
    return _parse_layer(raw, DOMAIN_KEYS)


def _parse_layer(
    raw: Mapping[str, object], parsers: Mapping[str, Callable[[object], Any]]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        parser = parsers.get(key)
        if parser is None:
            raise PolicyInvalid(
                key, str(value), f"unknown field; use {', '.join(parsers)}"
            )
        if key == "floor_percent" and isinstance(value, str):
            value = value.removesuffix("%")
        try:
            values[key] = parser(value)
        except ValueError as exc:
            raise PolicyInvalid(key, str(value), str(exc)) from exc
    return values


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _pattern_exclusion(name: str, settings: Settings) -> str | None:
    if settings.include and not _matches(name, settings.include):
        return "name matches no include pattern"
    if _matches(name, settings.exclude):
        return "name matches an exclude pattern"
    return None


class _DoctypeFound(Exception):
    pass


class _RootReached(Exception):
    pass


def _has_doctype(xml_text: str) -> bool:
    """Tell whether the document declares a DTD before its root element.

    Only the prolog is parsed: the scan stops at the DTD or the root element,
    before any entity is declared, expanded or fetched.
    """
    parser = xml.parsers.expat.ParserCreate()

    def on_doctype(*_args: object) -> None:
        raise _DoctypeFound

    def on_element(*_args: object) -> None:
        raise _RootReached

    parser.StartDoctypeDeclHandler = on_doctype
    parser.StartElementHandler = on_element
    try:
        parser.Parse(xml_text, True)
    except _DoctypeFound:
        return True
    except (_RootReached, xml.parsers.expat.ExpatError):
        return False
    return False


def _parse(xml_text: str) -> ET.Element | DomainPolicy:
    if len(xml_text) > MAX_XML_BYTES:
        return DomainPolicy("invalid", reason="domain XML is too large to parse")
    # libvirt never writes a DTD into a domain's XML, and entity attacks
    # (billion laughs, external entities that read local files) need one, so
    # such a document is rejected before ElementTree expands anything.
    if _has_doctype(xml_text):
        return DomainPolicy(
            "invalid",
            reason="domain XML has a DTD (<!DOCTYPE>), which libvirt never writes",
        )
    try:
        return ET.fromstring(xml_text)
    except ET.ParseError as exc:
        return DomainPolicy("invalid", reason=f"domain XML is not valid: {exc}")


def resolve(
    name: str, xml_text: str, settings: Settings, metadata_xml: str | None = None
) -> DomainPolicy:
    """Work out whether and how to manage a domain from its XML and the config.

    ``xml_text`` is the live XML, which decides the exclusions. The metadata
    comes from ``metadata_xml`` when given (the persistent XML of a domain
    that was just redefined), otherwise from the live XML.
    """
    root = _parse(xml_text)
    if isinstance(root, DomainPolicy):
        return root
    excluded = exclusion_reason(root)
    if excluded is not None:
        return DomainPolicy("excluded", reason=excluded)
    metadata_root = root if metadata_xml is None else _parse(metadata_xml)
    if isinstance(metadata_root, DomainPolicy):
        return metadata_root

    try:
        metadata = read_metadata(metadata_root)
    except PolicyInvalid as exc:
        return _invalid("metadata", exc)
    section = dict(settings.domains.get(name, {}))
    sources = tuple(
        label for label, layer in (("metadata", metadata), ("config", section)) if layer
    )
    merged = {**section, **metadata}

    managed = merged.pop("managed", None)
    if managed is False:
        where = "metadata" if "managed" in metadata else "config section"
        return DomainPolicy("excluded", reason=f"managed is off in the {where}")
    if managed is None:
        by_pattern = _pattern_exclusion(name, settings)
        if by_pattern is not None:
            return DomainPolicy("excluded", reason=by_pattern)

    try:
        params = _build_params(settings, merged)
    except PolicyInvalid as exc:
        return _invalid("+".join(sources) or "settings", exc)
    return DomainPolicy("managed", params=params, sources=sources)


def _invalid(where: str, exc: PolicyInvalid) -> DomainPolicy:
    return DomainPolicy(
        "invalid",
        reason=f"{where}: {exc}",
        field=exc.field,
        value=exc.value,
    )


def _build_params(settings: Settings, overrides: Mapping[str, Any]) -> Params:
    params = global_params(settings)
    if "metric" in overrides:
        overrides = {**overrides, "metric": Metric(overrides["metric"])}
    params = dataclasses.replace(params, **overrides)
    try:
        check_limits(params.min_unused, params.max_release, params.min_release)
    except ConfigError as exc:
        field = exc.key or "policy"
        raise PolicyInvalid(field, str(getattr(params, field, "")), str(exc)) from exc
    return params
