"""Where the agents of remote sites answer (table ``site_agents``, Alembic 0005).

A row says how the engine reaches one site's agent: its URL, the certificate
pinned at join time (and its fingerprint) and the name of the vault key
holding the engine's secret for it (``agent-SITE`` in the ``keys`` table, so
it is wrapped under the vault master key and re-wrapped by its rotation like
every key). A site without a row is served by this process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ForeignKey, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column

from siterecovery.store.repo import VaultStore
from siterecovery.store.schema import Base


class SiteAgentRow(Base):
    __tablename__ = "site_agents"
    site: Mapped[str] = mapped_column(String(64), ForeignKey("sites.name"), primary_key=True)
    url: Mapped[str] = mapped_column(String(512))
    cert_pem: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(80))
    secret_key: Mapped[str] = mapped_column(String(64))
    joined: Mapped[datetime]


@dataclass(frozen=True, slots=True)
class AgentRecord:
    site: str
    url: str
    cert_pem: str
    fingerprint: str
    secret_key: str
    joined: datetime


def add_agent(store: VaultStore, *, record: AgentRecord) -> None:
    with store.session() as s:
        s.add(
            SiteAgentRow(
                site=record.site, url=record.url, cert_pem=record.cert_pem,
                fingerprint=record.fingerprint, secret_key=record.secret_key,
                joined=record.joined,
            )
        )  # fmt: skip


def find_agent(store: VaultStore, *, site: str) -> AgentRecord | None:
    with store.session() as s:
        row = s.get(SiteAgentRow, site)
        return None if row is None else _record(row)


def list_agents(store: VaultStore) -> list[AgentRecord]:
    with store.session() as s:
        return [_record(r) for r in s.scalars(select(SiteAgentRow).order_by(SiteAgentRow.site))]


def _record(row: SiteAgentRow) -> AgentRecord:
    return AgentRecord(
        site=row.site, url=row.url, cert_pem=row.cert_pem, fingerprint=row.fingerprint,
        secret_key=row.secret_key, joined=row.joined,
    )  # fmt: skip
