"""covering index for review candidates

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_index("ix_predictions_run_confidence")
        batch_op.create_index(
            "ix_predictions_run_confidence_grade", ["run_id", "confidence", "grade", "image_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_index("ix_predictions_run_confidence_grade")
        batch_op.create_index("ix_predictions_run_confidence", ["run_id", "confidence"], unique=False)
