from __future__ import annotations

import pytest

from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.values import check_name, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("24h", 86400.0), ("250ms", 0.25), ("2", 2.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration("interval", text) == seconds


@pytest.mark.parametrize("text", ["-5s", "soon", "5 parsecs", ""])
def test_bad_durations_name_the_field(text: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_duration("interval", text)
    assert refused.value.message.startswith("interval:")


@pytest.mark.parametrize(
    ("text", "size"), [("1G", 1 << 30), ("512M", 512 << 20), ("64KiB", 64 << 10)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size("disk", text) == size


def test_bad_names() -> None:
    check_name("name", "web-01.prod")
    for bad in ("", "-x", "a/b", "x" * 64, "é"):
        with pytest.raises(InvalidInput):
            check_name("name", bad)


@pytest.mark.parametrize("bad", ["web01\n", "web01\r\n", "\nweb01", "web 01"])
def test_names_are_matched_whole(bad: str) -> None:
    # A ``$`` anchor lets "web01\n" through: a name with a newline in a path,
    # a log line or a unit file.
    with pytest.raises(InvalidInput) as refused:
        check_name("name", bad)
    assert refused.value.fields["field"] == "name"


@pytest.mark.parametrize("number", [30, 30.0, 86400.0])
def test_a_duration_as_json_returns_it_is_accepted_back(number: float) -> None:
    assert parse_duration("interval", number) == float(number)


@pytest.mark.parametrize("text", ["1" * 400, "1" * 400 + "d"])
def test_endless_durations_and_sizes_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="interval"):
        parse_duration("interval", text)
    with pytest.raises(InvalidInput, match="disk"):
        parse_size("disk", text.replace("d", "G"))
    with pytest.raises(InvalidInput, match="interval"):
        parse_duration("interval", float("inf"))


def test_a_size_as_json_returns_it_is_accepted_back() -> None:
    assert parse_size("max-rate", 52428800, minimum=0) == 52428800


def test_durations_and_sizes_have_bounds() -> None:
    with pytest.raises(InvalidInput, match="at most"):
        parse_duration("retention", 1e308)
    with pytest.raises(InvalidInput, match="at most"):
        parse_size("max-rate", 1 << 70, minimum=0)
    assert parse_size("disk", "2G", maximum=2 << 30) == 2 << 30
