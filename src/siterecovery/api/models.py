"""What every request body shares: unknown fields are refused, and one JSON
representation per kind of value, both ways.

A typo must not be ignored: ``{"type": "test", "dryrun": true}`` would start a
real failover. Every request model derives from :class:`Body` (``extra="forbid"``),
and the refusal is our ``INVALID_INPUT`` document naming the field (``api/app.py``).

Durations and sizes are accepted as a number (seconds, bytes: what GET
answers) or as a string with a unit (``"30s"``, ``"5m"``, ``"512M"``); the
service parses both (``domain/values.py``) and refuses what is out of range.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainValidator, WithJsonSchema


def _duration(value: object) -> str | float:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return value
    raise ValueError("a duration: a number of seconds, or a string such as 30s, 5m, 24h")


def _size(value: object) -> str | int:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError("a size: a whole number of bytes, or a string such as 512M, 1G")


Duration = Annotated[
    str | float,
    PlainValidator(_duration),
    WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string"}]}),
]
"""Seconds, or a string such as ``"30s"``, ``"5m"``, ``"24h"``."""

Size = Annotated[
    str | int,
    PlainValidator(_size),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}]}),
]
"""Bytes, or a string such as ``"512M"``, ``"1G"`` (binary units)."""


class Body(BaseModel):
    """Base of every request model: a field the model does not know is refused."""

    model_config = ConfigDict(extra="forbid")
