from pathlib import Path

import pytest

from balloonctl.config import ConfigError, Settings, build_settings, load_file
from balloonctl.units import MIB


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "balloonctl.toml"
    path.write_text(text)
    return path


def test_defaults_match_documented_values() -> None:
    settings = build_settings({}, {})

    assert settings == Settings()
    assert settings.uri == "qemu:///system"
    assert settings.stats_period == 5
    assert settings.min_unused == 100 * MIB
    assert settings.max_release == 50 * MIB
    assert settings.host_warn == 200 * MIB


def test_file_values_are_parsed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'uri = "test:///default"\nstats_period = 2\nmin_unused = "256 MiB"\n'
        'max_release = "1 GiB"\nhost_warn = "2 GiB"\ndry_run = true\n'
        'log_format = "json"\ncall_timeout = 2.5\n',
    )

    settings = build_settings(load_file(path), {})

    assert settings.uri == "test:///default"
    assert settings.stats_period == 2
    assert settings.min_unused == 256 * MIB
    assert settings.max_release == 1024 * MIB
    assert settings.host_warn == 2048 * MIB
    assert settings.dry_run is True
    assert settings.log_format == "json"
    assert settings.call_timeout == 2.5


def test_flags_override_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'min_unused = "256 MiB"\nstats_period = 2\n')

    settings = build_settings(
        load_file(path), {"min_unused": "64 MiB", "stats_period": None}
    )

    assert settings.min_unused == 64 * MIB
    assert settings.stats_period == 2


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('min_unused = "100"\n', ["'min_unused'", "'100'", "a unit is required"]),
        ("min_unused = 100\n", ["'min_unused'", "100", "with a unit"]),
        ('max_release = "5 MB"\n', ["'max_release'", "unknown unit 'MB'"]),
        ("stats_period = 0\n", ["'stats_period'", "from 1 to 3600"]),
        ('stats_period = "soon"\n', ["'stats_period'", "'soon'"]),
        ('stats_period = "5"\n', ["'stats_period'", "'5'", "without quotes"]),
        ("stats_period = 1.5\n", ["'stats_period'", "1.5"]),
        ('dry_run = "yes"\n', ["'dry_run'", "true or false"]),
        ('log_level = "loud"\n', ["'log_level'", "'loud'", "debug, info"]),
        ("call_timeout = -1\n", ["'call_timeout'", "-1"]),
        ('colour = "blue"\n', ["'colour'", "is unknown", "valid keys are"]),
        ("min_unused = \n", ["not valid TOML"]),
        ('uri = ""\n', ["'uri'", "libvirt URI"]),
    ],
)
def test_file_errors_name_key_and_value(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as info:
        build_settings(load_file(path), {})

    for fragment in fragments:
        assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as info:
        load_file(path)

    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        ({"min_unused": "100"}, ["--min-unused", "'100'", "a unit is required"]),
        ({"stats_period": "0"}, ["--stats-period", "'0'"]),
        ({"max_release": "0 MiB"}, ["max_release", "greater than 0"]),
        ({"min_unused": "0 KiB"}, ["min_unused", "greater than 0"]),
        (
            {"min_release": "60 MiB", "max_release": "50 MiB"},
            ["min_release", "61440 KiB", "max_release"],
        ),
    ],
)
def test_flag_errors_name_flag_and_value(
    flags: dict[str, object], fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        build_settings({}, flags)

    for fragment in fragments:
        assert fragment in str(info.value)


def test_domain_sections_and_patterns_are_parsed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'include = ["web-*", "db-*"]\nexclude = "db-test*"\nmetric = "usable"\n'
        '[domains."web-1"]\nmin_unused = "256 MiB"\nmanaged = true\n'
        '[domains."db-2"]\nmanaged = false\nfloor_percent = 25\n',
    )

    settings = build_settings(load_file(path), {})

    assert settings.include == ("web-*", "db-*")
    assert settings.exclude == ("db-test*",)
    assert settings.metric == "usable"
    assert settings.domains["web-1"] == {"min_unused": 256 * MIB, "managed": True}
    assert settings.domains["db-2"] == {"managed": False, "floor_percent": 25.0}


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('[domains."web-1"]\nmin_unused = "5"\n', ["'web-1'", "'min_unused'", "'5'"]),
        ('[domains."web-1"]\nuri = "x"\n', ["'web-1'", "'uri'", "is unknown"]),
        ('domains = "all"\n', ["'domains'", "table"]),
        ("include = [1]\n", ["'include'", "patterns"]),
        ("floor_percent = 95\n", ["'floor_percent'", "0 to 90"]),
        ('metric = "free"\n', ["'metric'", "unused, usable"]),
        ("stuck_periods = 0\n", ["'stuck_periods'", "1 to 1000"]),
        # A section is checked together with the global values it keeps.
        (
            '[domains."db"]\nmin_release = "60 MiB"\n',
            ["'db'", "min_release (61440 KiB)", "max_release (51200 KiB)"],
        ),
        ('[domains."db"]\nmin_unused = "0 KiB"\n', ["'db'", "min_unused"]),
        (
            'grant_slack = "200 MiB"\n',
            ["grant_slack (204800 KiB)", "min_unused (102400 KiB)"],
        ),
        (
            '[domains."db"]\nmin_unused = "2 MiB"\n',
            ["'db'", "grant_slack (4096 KiB)", "min_unused (2048 KiB)"],
        ),
    ],
)
def test_policy_key_errors_name_key_and_value(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as info:
        build_settings(load_file(path), {})

    for fragment in fragments:
        assert fragment in str(info.value)


def test_host_reserve_defaults_to_host_warn() -> None:
    assert (
        build_settings({}, {"host_warn": "1 GiB"}).effective_host_reserve == 1024 * MIB
    )
    assert (
        build_settings({}, {"host_reserve": "300 MiB"}).effective_host_reserve
        == 300 * MIB
    )
