"""Parsing and validation of user-given values (durations, sizes, names).

Every function raises :class:`InvalidInput` naming the field, so that the CLI,
the API and the portal refuse bad input the same way, before any side effect.
"""

from __future__ import annotations

import math
import re

from siterecovery.domain.errors import InvalidInput, clip
from siterecovery.domain.model import SiteRole

_DURATION = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MAX_DURATION = 100 * 365 * 86400.0
"""Seconds: longer is a mistake, and would overflow the dates computed from it."""
MAX_SIZE = (1 << 63) - 1
"""Bytes: what a signed 64-bit integer (SQL, qemu) holds."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""Matched whole (``fullmatch``): ``$`` would let a trailing newline through."""


def parse_duration(
    field: str, text: str | float | int, *, minimum: float = 0.0, maximum: float = MAX_DURATION
) -> float:
    """Seconds from ``"30s"``, ``"5m"``, ``"24h"``, ``"1d"``, ``"250ms"`` or a number.

    A number is seconds, as every duration reads back in JSON (``Policy``), so
    what the API returns can be sent back to it.
    """
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _DURATION.fullmatch(text)
        if not match:
            raise InvalidInput(
                field=field, reason=f"'{clip(text)}' is not a duration (e.g. 30s, 5m, 24h)"
            )
        value = float(match[1]) * _DURATION_UNITS[match[2] or "s"]
    if not math.isfinite(value):
        raise InvalidInput(field=field, reason=f"'{text}' is not a finite duration")
    if value < minimum:
        raise InvalidInput(field=field, reason=f"must be at least {minimum:g}s, got {value:g}s")
    if value > maximum:
        raise InvalidInput(field=field, reason=f"must be at most {maximum:g}s, got {value:g}s")
    return value


def duration_text(seconds: float) -> str:
    """A duration in the largest unit that says it exactly (``2d``, ``90m``,
    ``45s``, ``0.5s``): the words a user types for :func:`parse_duration`."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def parse_size(field: str, text: str | int, *, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """Bytes from ``"1G"``, ``"512M"``, ``"64KiB"`` or a number (binary units)."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(text)
        if not match:
            raise InvalidInput(
                field=field, reason=f"'{clip(str(text))}' is not a size (e.g. 1G, 512M)"
            )
        unit = (match[2] or "").lower().rstrip("b").rstrip("i")
        number = float(match[1])
        if not math.isfinite(number):
            raise InvalidInput(field=field, reason=f"'{text}' is not a finite size")
        value = int(number * _SIZE_UNITS[unit])
    if value < minimum:
        raise InvalidInput(field=field, reason=f"must be at least {minimum} bytes, got {value}")
    if value > maximum:
        raise InvalidInput(field=field, reason=f"must be at most {maximum} bytes, got {value}")
    return value


def check_name(field: str, name: str) -> str:
    """A name for a site, host, VM or switch: letters, digits, '.', '_', '-'."""
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            field=field,
            reason=f"'{clip(name)}' is not a valid name (1-63 letters, digits, '.', '_', '-')",
        )
    return name


def check_positive(field: str, value: int, *, minimum: int = 1, maximum: int | None = None) -> int:
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise InvalidInput(field=field, reason=f"must be at least {minimum}{upper}, got {value}")
    return value


BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(count: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 GiB`` (binary units, one decimal)."""
    value, unit = float(count), 0
    while abs(value) >= 1024 and unit < len(BINARY_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {BINARY_UNITS[unit]}"


def parse_role(role: str) -> SiteRole:
    """A site's role from its name (InvalidInput naming ``role`` otherwise)."""
    try:
        return SiteRole(role)
    except ValueError:
        allowed = ", ".join(r.value for r in SiteRole)
        raise InvalidInput(field="role", reason=f"'{role}' is not one of {allowed}") from None
