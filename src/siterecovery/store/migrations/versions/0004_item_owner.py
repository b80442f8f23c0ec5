"""item ownership as columns: owner (compare-and-set) and claim (a pass's successor)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=80), nullable=True))
        batch.add_column(sa.Column("owner_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("claim", sa.String(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("claim")
        batch.drop_column("owner_since")
        batch.drop_column("owner")
