"""a partial index on the expert-graded images, for the review queue

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

GRADED = sa.text("grade IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_images_graded", "images", ["grade"], unique=False, sqlite_where=GRADED, postgresql_where=GRADED
    )


def downgrade() -> None:
    op.drop_index("ix_images_graded", table_name="images")
