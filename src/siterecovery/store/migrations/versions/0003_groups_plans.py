"""replication groups, recovery plans, common points, linked workloads

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "groups",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("members", sa.JSON(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("common_interval", sa.Float(), nullable=False),
        sa.Column("next_seq", sa.Integer(), nullable=False),
        sa.Column("last_common", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "plans",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("description", sa.String(length=1024), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("points") as batch:
        batch.add_column(sa.Column("common", sa.String(length=80), nullable=True))
        batch.create_index("ix_points_common", ["common"])
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("workload_link", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("workload_link")
    with op.batch_alter_table("points") as batch:
        batch.drop_index("ix_points_common")
        batch.drop_column("common")
    op.drop_table("plans")
    op.drop_table("groups")
