"""at most one unfinished job of each kind, held by a partial unique index

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ACTIVE = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    # A race before this index could have left two unfinished jobs of a kind: the newest stays.
    op.execute(
        "UPDATE jobs SET status = 'failed', error = 'another job of its kind was "
        "started at the same moment' WHERE status IN ('queued', 'running') AND id NOT IN "
        "(SELECT max(id) FROM jobs WHERE status IN ('queued', 'running') GROUP BY kind)"
    )
    op.create_index(
        "ux_jobs_active_kind", "jobs", ["kind"], unique=True, sqlite_where=ACTIVE, postgresql_where=ACTIVE
    )


def downgrade() -> None:
    op.drop_index("ux_jobs_active_kind", table_name="jobs")
