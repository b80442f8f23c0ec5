"""Routes: encryption keys. Answers carry name, created and fingerprint, never material."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from siterecovery.api.deps import Ctx
from siterecovery.api.models import Body
from siterecovery.services import keys

router = APIRouter()


class KeyIn(Body):
    name: str


@router.get("/keys")
def list_keys(ctx: Ctx) -> list[dict[str, Any]]:
    return keys.list_keys(ctx)


@router.post("/keys", status_code=201)
def create_key(ctx: Ctx, body: KeyIn) -> dict[str, Any]:
    return keys.create_key(ctx, name=body.name)
