"""The portal: server-rendered pages (FastAPI + Jinja2 + htmx) over the service layer.

A thin shell like the CLI and the API: each page reads, and each button
calls, the same service functions the JSON API calls; refusals show the error
tree's code and message. Sign-in takes the vault's API token and gives a
signed cookie session; every POST carries the session's CSRF token. No Node
build: htmx is vendored in ``static/`` (htmx.org 2.0.11, Zero-Clause BSD).

Pages: ``/`` overview, ``/items`` replicated items, ``/items/{vm}`` an item and
its recovery points, ``/items/{vm}/failover?type=…`` the failover dialog,
``/jobs`` and ``/jobs/{id}``; ``/plans`` recovery plans and replication groups,
``/plans/{name}`` a plan, ``/plans/{name}/operations/{op}`` a plan operation's
dialog; ``/login``.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles

from siterecovery.portal import actions, auth, pages, recovery
from siterecovery.portal.render import STATIC

router = APIRouter(include_in_schema=False)
router.include_router(auth.router)
router.include_router(pages.router)
router.include_router(actions.router)
router.include_router(recovery.router)


def install(app: FastAPI) -> None:
    """Serve the portal from ``app``: its routes, static files and 401/403 pages."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for exc_class, handler in auth.HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
