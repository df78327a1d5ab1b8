"""Malformed config files: every one is a ConfigError naming the file or key.

The in-process tests here cover breadth (hypothesis over load_file and
build_settings); tests/test_cli.py runs representative files through a real
``balloonctl`` child process.
"""

import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloonctl.config import (
    DOMAIN_KEYS,
    MAX_CONFIG_BYTES,
    NUMERIC_KEYS,
    ConfigError,
    Settings,
    build_settings,
    load_file,
)


def write_bytes(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "balloonctl.toml"
    path.write_bytes(data)
    return path


def test_deep_nesting_is_config_error(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, b"include = " + b"[" * 50_000 + b"]" * 50_000)

    with pytest.raises(ConfigError) as info:
        load_file(path)

    assert str(path) in str(info.value)
    assert "nests" in str(info.value)


def test_deep_inline_tables_are_config_error(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, b"domains = " + b"{a=" * 5_000 + b"1" + b"}" * 5_000)

    with pytest.raises(ConfigError) as info:
        load_file(path)

    assert str(path) in str(info.value)


def test_file_over_size_limit_is_rejected_unparsed(tmp_path: Path) -> None:
    # 50 MB of a valid TOML string: parsing it would take seconds and
    # hundreds of MB; the limit rejects it after reading 1 MiB.
    path = tmp_path / "huge.toml"
    with path.open("wb") as file:
        file.write(b'uri = "')
        file.write(b"a" * (50 * 1000 * 1000))
        file.write(b'"\n')

    with pytest.raises(ConfigError) as info:
        load_file(path)

    assert str(path) in str(info.value)
    assert f"larger than {MAX_CONFIG_BYTES} bytes" in str(info.value)


def test_non_utf8_names_offset(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, b'uri = "test:///default"\nmin_unused = "\xff MiB"\n')

    with pytest.raises(ConfigError) as info:
        load_file(path)

    assert str(path) in str(info.value)
    assert "not UTF-8" in str(info.value)
    assert "offset 38" in str(info.value)


def test_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path)

    assert str(tmp_path) in str(info.value)
    assert "not a regular file" in str(info.value)


def test_fifo_is_rejected_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "balloonctl.toml"
    os.mkfifo(fifo)

    # Opening a FIFO for reading blocks until a writer appears; the old
    # code hung here.
    with pytest.raises(ConfigError) as info:
        load_file(fifo)

    assert "not a regular file" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever the mode")
def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, b'uri = "test:///default"\n')
    path.chmod(0)

    with pytest.raises(ConfigError) as info:
        load_file(path)

    assert "Permission denied" in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("min_unused = -5\n", ["'min_unused'", "-5"]),
        ('min_unused = "-5 MiB"\n', ["'min_unused'", "'-5 MiB'"]),
        ('floor_min = "128"\n', ["'floor_min'", "unit is required"]),
        ("stats_period = true\n", ["'stats_period'", "True"]),
        ("stats_period = 1e400\n", ["'stats_period'", "inf"]),
        ("call_timeout = nan\n", ["'call_timeout'", "nan"]),
        ("manual_grace = inf\n", ["'manual_grace'", "inf"]),
        ("host_warn = 1979-05-27\n", ["'host_warn'", "1979"]),
        ("include = [[]]\n", ["'include'", "patterns"]),
        ("exclude = ['']\n", ["'exclude'", "patterns"]),
        ("uri = {a = 1}\n", ["'uri'", "libvirt URI"]),
        ("[domains]\nweb = 1\n", ["'web'", "must be a table"]),
        ('[domains.web]\nmanaged = "yes"\n', ["'web'", "'managed'", "true or false"]),
        ("[domains.web]\nstats_period = 5\n", ["'web'", "'stats_period'", "unknown"]),
        ("[min_unused]\n", ["'min_unused'", "{}"]),
        ("uri = 'a'\nuri = 'b'\n", ["not valid TOML", "uri"]),
    ],
)
def test_wrong_types_name_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write_bytes(tmp_path, text.encode())

    with pytest.raises(ConfigError) as info:
        build_settings(load_file(path), {})

    for fragment in fragments:
        assert fragment in str(info.value)
    assert str(path) in str(info.value)


# Hypothesis: arbitrary bytes, arbitrary TOML-ish text and well-formed TOML
# with arbitrary values for real keys. Nothing but ConfigError may escape.

KEYS = [*Settings.__dataclass_fields__, "colour", "domains"]
toml_scalars = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(
        lambda x: {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(x), repr(x))
    ),
    st.sampled_from(["true", "false", "1979-05-27", "07:32:00", "[]", "{}"]),
    st.text(string.printable, max_size=20).map(
        lambda s: '"' + s.replace('"', "") + '"'
    ),
    st.sampled_from(
        ['"100 MiB"', '"0 KiB"', '"-1 MiB"', '"1.5 GiB"', '"9" ', '"5 MB"']
    ),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
    max_leaves=6,
)
toml_documents = st.lists(
    st.tuples(st.sampled_from(KEYS), toml_values),
    max_size=6,
    unique_by=lambda kv: kv[0],
).map(lambda pairs: "".join(f"{key} = {value}\n" for key, value in pairs))
section_documents = st.lists(
    st.tuples(
        st.text(string.ascii_letters + "-.* ", min_size=1, max_size=8),
        st.sampled_from([*DOMAIN_KEYS, "uri", "colour"]),
        toml_values,
    ),
    max_size=4,
).map(
    lambda rows: "".join(
        f'[domains."{name}"]\n{key} = {value}\n' for name, key, value in rows
    )
)


def check_load(tmp_path: Path, data: bytes) -> None:
    path = write_bytes(tmp_path, data)
    try:
        build_settings(load_file(path), {})
    except ConfigError as exc:
        message = str(exc)
        assert message
        # Every message names the file or the offending key.
        assert str(path) in message or getattr(exc, "key", None), message


fuzz_settings = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@fuzz_settings
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_only_config_error(tmp_path: Path, data: bytes) -> None:
    check_load(tmp_path, data)


@fuzz_settings
@given(text=st.text(max_size=200))
def test_arbitrary_text_only_config_error(tmp_path: Path, text: str) -> None:
    check_load(tmp_path, text.encode("utf-8", "surrogatepass"))


@fuzz_settings
@given(text=toml_documents)
def test_wrong_values_only_config_error(tmp_path: Path, text: str) -> None:
    check_load(tmp_path, text.encode())


@fuzz_settings
@given(text=section_documents)
def test_wrong_sections_only_config_error(tmp_path: Path, text: str) -> None:
    check_load(tmp_path, text.encode())


@fuzz_settings
@given(
    flags=st.dictionaries(
        st.sampled_from(sorted(set(Settings.__dataclass_fields__) - {"domains"})),
        st.text(max_size=12) | st.none(),
        max_size=5,
    )
)
def test_arbitrary_flags_only_config_error(flags: dict[str, object]) -> None:
    try:
        build_settings({}, flags)
    except ConfigError as exc:
        assert str(exc)


def test_numeric_keys_exist() -> None:
    assert set(NUMERIC_KEYS) <= set(Settings.__dataclass_fields__)
