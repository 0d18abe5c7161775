"""node_agent.facts.units: the one rule set for sizes and durations (spec, CLI and node flags)."""

from __future__ import annotations

import pytest

from node_agent.facts.errors import InvalidSizeError, StoreError
from node_agent.facts.units import format_size, parse_duration, parse_size

# -- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "nbytes"),
    [
        ("4GiB", 4 << 30),
        ("8GiB", 8 << 30),
        ("512MiB", 512 << 20),
        ("2GB", 2_000_000_000),
        ("1.5GB", 1_500_000_000),
        ("64 KiB", 64 << 10),
        ("1TiB", 1 << 40),
        ("3tb", 3 * 10**12),
        ("10kb", 10_000),
        ("7MB", 7_000_000),
        ("100B", 100),
        ("4096", 4096),
        ("4gib", 4 << 30),
        ("2g", 2 << 30),
        (1024, 1024),
        (2048.0, 2048),
        (0, 0),
    ],
)
def test_parse_size_accepts(value: object, nbytes: int) -> None:
    assert parse_size(value) == nbytes


@pytest.mark.parametrize(
    ("short", "binary"), [("8K", "8KiB"), ("8M", "8MiB"), ("8G", "8GiB"), ("8T", "8TiB")]
)
def test_a_one_letter_unit_is_binary(short: str, binary: str) -> None:
    assert parse_size(short) == parse_size(binary) == parse_size(short.lower())


def test_a_unit_ending_in_b_without_i_is_decimal() -> None:
    assert parse_size("8GB") == 8 * 10**9 != parse_size("8G")


@pytest.mark.parametrize(
    "value",
    ["", "GiB", "-1GiB", "4 gigs", "1.5B", "0.1KiB", "8Gi", "9" * 400 + "GiB", True, -1, 1.5, None],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="is not a size; write 4GiB, 512MiB, 2GB"):
        parse_size(value)


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "8 gigs", "0"])
def test_parse_size_rejects_nonsense_naming_it(text: str) -> None:
    with pytest.raises(InvalidSizeError, match="--budget"):
        parse_size(text, what="--budget", minimum=1)


def test_a_size_error_is_a_store_error_and_a_value_error() -> None:
    with pytest.raises(InvalidSizeError) as info:
        parse_size("lots")
    assert isinstance(info.value, StoreError) and isinstance(info.value, ValueError)


def test_an_absurd_size_is_a_size_error_not_a_crash() -> None:
    with pytest.raises(InvalidSizeError, match="too large"):
        parse_size("9" * 400 + "GiB")


def test_a_size_below_the_minimum_names_the_minimum() -> None:
    with pytest.raises(InvalidSizeError) as info:
        parse_size("1KiB", what="--part-size", minimum=5 << 20)
    assert str(info.value).startswith("--part-size: '1KiB': must be at least 5.00 MiB")


@pytest.mark.parametrize(
    ("nbytes", "decimals", "text"),
    [(100, 2, "100 B"), (1536, 2, "1.50 KiB"), (1536, 1, "1.5 KiB"), (4 << 30, 1, "4.0 GiB")],
)
def test_format_size_uses_binary_units(nbytes: int, decimals: int, text: str) -> None:
    assert format_size(nbytes, decimals) == text


# -- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m 15s", 5415.0),
        ("1.5h", 5400.0),
        ("2M", 120.0),
        ("90", 90.0),
        ("0.25", 0.25),
        ("0s", 0.0),
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    ["30x", "", "s", "m5", "5m1h", "1h30", "-5s", "-1", "1d", "inf", "nan", True, None, [30]],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="is not a duration; write 30s, 5m, 1h"):
        parse_duration(value)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -0.5])
def test_parse_duration_rejects_odd_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(value)
