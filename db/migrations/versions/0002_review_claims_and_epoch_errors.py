"""review claims and epoch errors

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "claims",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("reviewer", sa.String(length=100), nullable=False),
        sa.Column("claimed_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_claims_image_id_images")),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_claims")),
    )
    with op.batch_alter_table("epochs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("errors", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("epochs", schema=None) as batch_op:
        batch_op.drop_column("errors")

    op.drop_table("claims")
