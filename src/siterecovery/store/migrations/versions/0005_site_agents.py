"""site agents: where a remote site's agent answers and its pinned certificate

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "site_agents",
        sa.Column("site", sa.String(length=64), sa.ForeignKey("sites.name"), nullable=False),
        sa.Column("url", sa.String(length=512), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=80), nullable=False),
        sa.Column("secret_key", sa.String(length=64), nullable=False),
        sa.Column("joined", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("site"),
    )


def downgrade() -> None:
    op.drop_table("site_agents")
