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
