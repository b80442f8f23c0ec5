"""Alembic environment: the URL comes from the config the vault builds."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from siterecovery.store.schema import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url is not None
connectable = config.attributes.get("connection") or create_engine(url)


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=Base.metadata,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if hasattr(connectable, "connect") and not hasattr(connectable, "execute"):
    with connectable.connect() as conn:
        _run(conn)
else:
    _run(connectable)
