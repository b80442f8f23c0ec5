"""What every request body shares: unknown fields are refused, and one JSON
representation per kind of value, both ways.

A typo must not be ignored: ``{"type": "test", "dryrun": true}`` would start a
real failover. Every request model derives from :class:`Body` (``extra="forbid"``),
and the refusal is our ``INVALID_INPUT`` document naming the field (``api/app.py``).

Durations and sizes are accepted as a number (seconds, bytes: what GET
answers) or as a string with a unit (``"30s"``, ``"5m"``, ``"512M"``); the
service parses both (``domain/values.py``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

Duration = str | StrictInt | Annotated[StrictFloat, Field(allow_inf_nan=False)]
"""Seconds, or a string such as ``"30s"``, ``"5m"``, ``"24h"``."""

Size = str | StrictInt
"""Bytes, or a string such as ``"512M"``, ``"1G"`` (binary units)."""


class Body(BaseModel):
    """Base of every request model: a field the model does not know is refused."""

    model_config = ConfigDict(extra="forbid")
