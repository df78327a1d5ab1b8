"""Settings: defaults, the TOML config file and command-line overrides."""

import dataclasses
import ipaddress
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from balloonctl.units import MIB, SizeError, parse_size, shorten

LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
METRICS = ("unused", "usable")

# A config file larger than this is rejected unread. A file with a section
# for each of a thousand domains is about 100 KiB.
MAX_CONFIG_BYTES = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ListenAddress:
    """An IP address and TCP port to listen on; port 0 picks a free port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class ConfigError(Exception):
    """An invalid setting; the message names the key or flag and the value."""

    def __init__(
        self, message: str, key: str | None = None, value: object = None
    ) -> None:
        super().__init__(message)
        self.key = key
        self.value = value


@dataclasses.dataclass(frozen=True)
class Settings:
    """All settings of the controller. Sizes are KiB, times seconds."""

    uri: str = "qemu:///system"
    # Every hypervisor to manage; empty means just ``uri``. build_settings
    # fills both, with ``uri`` the first of ``uris``.
    uris: tuple[str, ...] = ()
    stats_period: int = 5
    min_unused: int = 100 * MIB
    max_release: int = 50 * MIB
    min_release: int = 1 * MIB
    host_warn: int = 200 * MIB
    call_timeout: float = 10.0
    dry_run: bool = False
    log_format: str = "auto"
    log_level: str = "info"
    grow_margin: int = 64 * MIB
    floor_min: int = 128 * MIB
    floor_percent: float = 10.0
    # None means the same as host_warn.
    host_reserve: int | None = None
    release_cooldown: int = 6
    stuck_periods: int = 3
    manual_grace: float = 600.0
    distress_major_faults: int = 100
    grant_slack: int = 4 * MIB
    metric: str = "unused"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    domains: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    state_dir: str = "/run/balloonctl"
    # None means no metrics endpoint and no listening socket.
    metrics_listen: ListenAddress | None = None

    @property
    def effective_host_reserve(self) -> int:
        return self.host_warn if self.host_reserve is None else self.host_reserve

    @property
    def hosts(self) -> tuple[str, ...]:
        """Return the URIs of every hypervisor to manage, in the given order."""
        return self.uris or (self.uri,)

    def for_host(self, uri: str) -> "Settings":
        """Return these settings for one hypervisor's controller."""
        return dataclasses.replace(self, uri=uri, uris=(uri,))


def _parse_uri(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a libvirt URI such as 'qemu:///system'")
    return value.strip()


def _parse_uris(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("expected a list of libvirt URIs, such as ['qemu:///system']")
    uris = tuple(_parse_uri(item) for item in value)
    for index, uri in enumerate(uris):
        if uri in uris[:index]:
            raise ValueError(f"{uri!r} is listed twice; list each URI once")
    return uris


def _parse_size(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError("expected a string with a unit, such as '100 MiB'")
    try:
        return parse_size(value)
    except SizeError as exc:
        raise ValueError(str(exc)) from exc


def _parse_period(value: object) -> int:
    # libvirt's virDomainSetMemoryStatsPeriod takes whole seconds.
    if isinstance(value, bool):
        raise ValueError("expected whole seconds, such as 5")
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,6}", value.strip()):
            raise ValueError("expected whole seconds, such as 5")
        value = int(value.strip())
    if not isinstance(value, int) or not 1 <= value <= 3600:
        raise ValueError("expected whole seconds from 1 to 3600")
    return value


def _parse_timeout(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected seconds, such as 10")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError("expected seconds, such as 10") from None
    if not isinstance(value, int | float) or not (0 < value <= 600):
        raise ValueError("expected seconds greater than 0 and at most 600")
    if not math.isfinite(value):
        raise ValueError("expected a finite number of seconds")
    return float(value)


def _parse_count(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value.strip()):
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number from {low} to {high}")
        if not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return value

    return parse


def _parse_percent(value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip().removesuffix("%"))
        except ValueError:
            raise ValueError("expected a percentage from 0 to 90, such as 20") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a percentage from 0 to 90, such as 20")
    if not (0 <= value <= 90):
        raise ValueError("expected a percentage from 0 to 90, such as 20")
    return float(value)


def _parse_grace(value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError("expected seconds, such as 600") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected seconds, such as 600")
    if not (0 <= value <= 86400) or not math.isfinite(value):
        raise ValueError("expected seconds from 0 to 86400")
    return float(value)


def _parse_directory(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a directory path, such as '/run/balloonctl'")
    return value.strip()


_LISTEN_FORMS = (
    "expected HOST:PORT, :PORT or PORT, such as 127.0.0.1:9700, "
    "with an IPv6 address in brackets, such as [::1]:9700"
)


def parse_listen_address(value: object) -> ListenAddress:
    """Parse ``HOST:PORT``, ``:PORT`` or ``PORT``; no host means 127.0.0.1.

    HOST is an IPv4 address, an IPv6 address in brackets or ``localhost``.
    Other host names are rejected rather than resolved, so the address that
    is bound is the one written in the configuration.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return ListenAddress("127.0.0.1", _parse_port(str(value)))
    if not isinstance(value, str):
        raise ValueError(_LISTEN_FORMS)
    text = value.strip()
    if re.fullmatch(r"[0-9]+", text):
        return ListenAddress("127.0.0.1", _parse_port(text))
    bracketed = re.fullmatch(r"\[([^\]]+)\]:([0-9]+)", text)
    if bracketed:
        host, port = bracketed.groups()
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"{host!r} in brackets is not an IPv6 address; {_LISTEN_FORMS}"
            ) from None
        return ListenAddress(str(address), _parse_port(port))
    plain = re.fullmatch(r"([^:\[\]]*):([0-9]+)", text)
    if not plain:
        raise ValueError(_LISTEN_FORMS)
    host, port = plain.groups()
    if host in ("", "localhost"):
        return ListenAddress("127.0.0.1", _parse_port(port))
    try:
        return ListenAddress(str(ipaddress.IPv4Address(host)), _parse_port(port))
    except ipaddress.AddressValueError:
        raise ValueError(
            f"{host!r} is not an IP address; host names other than localhost "
            "are not resolved, so give the address to listen on"
        ) from None


def _parse_port(text: str) -> int:
    # A port of more than 5 digits is out of range; the length check keeps
    # int() away from arbitrarily long strings.
    port = int(text) if len(text) <= 5 else -1
    if not 0 <= port <= 65535:
        raise ValueError(f"port {shorten(text)} is out of range; expected 0 to 65535")
    return port


def _parse_patterns(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(
        isinstance(item, str) and item for item in value
    ):
        raise ValueError("expected a list of domain name patterns, such as ['web-*']")
    return tuple(value)


def _parse_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value.lower()

    return parse


_PARSERS: dict[str, Callable[[object], Any]] = {
    "uri": _parse_uri,
    "uris": _parse_uris,
    "stats_period": _parse_period,
    "min_unused": _parse_size,
    "max_release": _parse_size,
    "min_release": _parse_size,
    "host_warn": _parse_size,
    "call_timeout": _parse_timeout,
    "dry_run": _parse_bool,
    "log_format": _choice(LOG_FORMATS),
    "log_level": _choice(LOG_LEVELS),
    "grow_margin": _parse_size,
    "floor_min": _parse_size,
    "floor_percent": _parse_percent,
    "host_reserve": _parse_size,
    "release_cooldown": _parse_count(0, 1000),
    "stuck_periods": _parse_count(1, 1000),
    "manual_grace": _parse_grace,
    "distress_major_faults": _parse_count(1, 10**9),
    "grant_slack": _parse_size,
    "metric": _choice(METRICS),
    "state_dir": _parse_directory,
    "include": _parse_patterns,
    "exclude": _parse_patterns,
    "metrics_listen": parse_listen_address,
}

# Keys a [domains."NAME"] section may set, with their parsers.
DOMAIN_KEYS: dict[str, Callable[[object], Any]] = {
    "managed": _parse_bool,
    "min_unused": _parse_size,
    "max_release": _parse_size,
    "min_release": _parse_size,
    "grow_margin": _parse_size,
    "floor_min": _parse_size,
    "floor_percent": _parse_percent,
    "metric": _choice(METRICS),
}


def flag_name(key: str) -> str:
    """Return the command-line flag that sets config ``key``."""
    if key == "uris":
        return "--uri"  # given once per URI
    return "--" + key.replace("_", "-")


def _unreadable(path: Path, error: OSError) -> ConfigError:
    return ConfigError(
        f"cannot read config file {str(path)!r}: {error.strerror}; "
        "pass the path of a readable TOML file"
    )


def _read_text(path: Path) -> str:
    """Read at most ``MAX_CONFIG_BYTES`` of UTF-8 text, or raise ConfigError."""
    try:
        # O_NONBLOCK keeps a FIFO at the path from blocking the open, which
        # would otherwise hang start-up or a reload until someone writes.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(
            f"config file {str(path)!r} is not a regular file; "
            "pass the path of a readable TOML file"
        )
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise _unreadable(path, exc) from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {str(path)!r} is larger than {MAX_CONFIG_BYTES} bytes; "
            "a balloonctl config file is a few KiB, so check the path"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (invalid byte at "
            f"offset {exc.start}); save it as UTF-8"
        ) from exc


def insecure_reason(path: Path) -> str | None:
    """Return why other users could change the config file, or None.

    The file decides which guests are shrunk and how far, so a file that a
    group or other users may write, or one that another non-root user owns
    while balloonctl runs as root, lets them control the guests.
    """
    try:
        status = path.stat()
    except OSError:
        return None  # load_file reports a file that cannot be read
    problems = []
    if status.st_mode & stat.S_IWGRP:
        problems.append("writable by its group")
    if status.st_mode & stat.S_IWOTH:
        problems.append("writable by other users")
    euid = os.geteuid()
    if euid == 0 and status.st_uid != 0:
        problems.append(f"owned by uid {status.st_uid} while balloonctl runs as root")
    elif euid != 0 and status.st_uid not in (0, euid):
        problems.append(f"owned by uid {status.st_uid}, another user")
    return ", ".join(problems) if problems else None


def load_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file and return its validated values by key."""
    text = _read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not valid TOML: {exc}"
        ) from exc
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigError(
            f"config file {str(path)!r} nests arrays or tables too deeply; "
            "no balloonctl key takes nested values"
        ) from None

    where = f"config file {str(path)!r}"
    raw = dict(raw)
    sections = raw.pop("domains", {})
    _reject_quoted_numbers(raw, where)
    values = _validate(raw, lambda key: f"{where}: key {key!r}")
    if "uri" in values and "uris" in values:
        raise ConfigError(
            f"{where}: keys 'uri' and 'uris' are both set; set 'uris' to the "
            "list of every hypervisor, or 'uri' to just one",
            key="uris",
            value=raw["uris"],
        )
    values["domains"] = _validate_domains(sections, where)
    return values


# Keys whose TOML value must be a number; flags arrive as strings instead.
NUMERIC_KEYS = frozenset(
    {
        "stats_period",
        "call_timeout",
        "floor_percent",
        "release_cooldown",
        "stuck_periods",
        "manual_grace",
        "distress_major_faults",
    }
)


def _reject_quoted_numbers(raw: Mapping[str, object], where: str) -> None:
    for key, value in raw.items():
        if key in NUMERIC_KEYS and isinstance(value, str):
            raise ConfigError(
                f"{where}: key {key!r}: invalid value {shorten(value)}: "
                f"expected a number without quotes, such as {key} = 5",
                key=key,
                value=value,
            )


def _validate_domains(sections: object, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(sections, dict):
        raise ConfigError(
            f"{where}: key 'domains' must be a table of [domains.\"NAME\"] sections"
        )
    domains = {}
    for name, section in sections.items():
        label = f"{where}: [domains.{name!r}]"
        if not isinstance(section, dict):
            raise ConfigError(f"{label} must be a table, got {shorten(section)}")
        _reject_quoted_numbers(section, label)
        domains[name] = _validate(section, _naming(label), DOMAIN_KEYS)
    return domains


def _naming(label: str) -> Callable[[str], str]:
    def where(key: str) -> str:
        return f"{label} key {key!r}"

    return where


def _validate(
    raw: Mapping[str, object],
    where: Callable[[str], str],
    parsers: Mapping[str, Callable[[object], Any]] = _PARSERS,
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        parser = parsers.get(key)
        if parser is None:
            raise ConfigError(
                f"{where(key)} is unknown; valid keys are {', '.join(parsers)}",
                key=key,
                value=value,
            )
        try:
            values[key] = parser(value)
        except ValueError as exc:
            raise ConfigError(
                f"{where(key)}: invalid value {shorten(value)}: {exc}",
                key=key,
                value=value,
            ) from exc
    return values


def build_settings(
    file_values: Mapping[str, Any], flag_values: Mapping[str, object]
) -> Settings:
    """Combine defaults, file values and flags (flags win) into Settings.

    ``flag_values`` contains the raw command-line strings of the flags that were
    given; flags that were not given must be absent or None.
    """
    given = {key: value for key, value in flag_values.items() if value is not None}
    flags = _validate(given, flag_name)
    values = dict(file_values)
    if "uri" in flags or "uris" in flags:
        # URIs on the command line replace the file's whole list.
        values.pop("uri", None)
        values.pop("uris", None)
    values.update(flags)
    if values.get("uris"):
        values["uri"] = values["uris"][0]
    elif "uri" in values:
        values["uris"] = (values["uri"],)
    settings = Settings(**values)
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    check_limits(settings.min_unused, settings.max_release, settings.min_release)
    _check_grant_slack(settings.grant_slack, settings.min_unused, "")
    # A section's values combine with the global ones, so a section can be
    # wrong only together with them: check each combination now rather than
    # when the domain first appears.
    for name, section in settings.domains.items():
        min_unused = section.get("min_unused", settings.min_unused)
        where = f"[domains.{name!r}]: "
        try:
            check_limits(
                min_unused,
                section.get("max_release", settings.max_release),
                section.get("min_release", settings.min_release),
            )
        except ConfigError as exc:
            raise ConfigError(where + str(exc), key=exc.key, value=exc.value) from exc
        _check_grant_slack(settings.grant_slack, min_unused, where)


def _check_grant_slack(grant_slack: int, min_unused: int, where: str) -> None:
    if grant_slack >= min_unused:
        raise ConfigError(
            f"{where}grant_slack ({grant_slack} KiB) must be less than "
            f"min_unused ({min_unused} KiB), or no guest short of memory is "
            "ever granted any; lower grant_slack",
            key="grant_slack",
        )


def check_limits(min_unused: int, max_release: int, min_release: int) -> None:
    """Reject buffer and step sizes that cannot work together."""
    if min_unused <= 0:
        raise ConfigError(
            f"min_unused must be greater than 0 KiB, got {min_unused} KiB; "
            "a guest with no free memory left starts killing processes",
            key="min_unused",
        )
    if max_release <= 0:
        raise ConfigError(
            f"max_release must be greater than 0 KiB, got {max_release} KiB",
            key="max_release",
        )
    if min_release > max_release:
        raise ConfigError(
            f"min_release ({min_release} KiB) must not exceed "
            f"max_release ({max_release} KiB); lower min_release",
            key="min_release",
        )
