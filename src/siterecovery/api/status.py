"""HTTP statuses by error category: the one table, for the engine's API and the agent's."""

from __future__ import annotations

from siterecovery.domain.errors import Category

STATUS = {
    Category.USAGE: 400,
    Category.NOT_FOUND: 404,
    Category.RULE: 409,
    Category.CONFLICT: 409,
    Category.CANCELLED: 409,
    Category.IO: 502,
    Category.INTERNAL: 500,
    Category.AUTH: 401,
}
