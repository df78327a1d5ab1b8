import pytest

from balloonctl.units import GIB, MIB, SizeError, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "kib"),
    [
        ("100 MiB", 100 * MIB),
        ("100MiB", 100 * MIB),
        ("1.5 GiB", 1536 * MIB),
        ("640 KiB", 640),
        ("2 gib", 2 * GIB),
        (" 50 MiB ", 50 * MIB),
        ("0 MiB", 0),
    ],
)
def test_parse_size_accepts(text: str, kib: int) -> None:
    assert parse_size(text) == kib


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("100", "a unit is required"),
        ("100 MB", "unknown unit 'MB'"),
        ("100 bytes", "unknown unit 'bytes'"),
        ("-5 MiB", "expected a number and a unit"),
        ("MiB", "expected a number and a unit"),
        ("", "expected a number and a unit"),
        ("0.5 KiB", "not a whole number of KiB"),
        ("1e3 MiB", "expected a number and a unit"),
        ("9" * 400 + " MiB", "expected a number and a unit"),
        ("\u0665 MiB", "expected a number and a unit"),
        ("1.9999999999999999 KiB", "not a whole number of KiB"),
    ],
)
def test_parse_size_rejects(text: str, message: str) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(text)

    assert message in str(info.value)
    assert repr(text)[:40] in str(info.value)


@pytest.mark.parametrize(
    ("kib", "text"),
    [(640, "640 KiB"), (512 * MIB, "512.0 MiB"), (3 * GIB // 2, "1.50 GiB")],
)
def test_format_size(kib: int, text: str) -> None:
    assert format_size(kib) == text
