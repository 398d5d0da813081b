"""the model of a run each epoch belongs to: runs trained by folds train several

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Epochs recorded before this revision are their run's one model: fold 0.
    with op.batch_alter_table("epochs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fold", sa.Integer(), nullable=False, server_default="0"))
        batch_op.drop_constraint("uq_epochs_run_epoch", type_="unique")
        batch_op.create_unique_constraint("uq_epochs_run_fold_epoch", ["run_id", "fold", "epoch"])


def downgrade() -> None:
    op.execute("DELETE FROM epochs WHERE fold <> 0")  # the models of runs by folds
    with op.batch_alter_table("epochs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_epochs_run_fold_epoch", type_="unique")
        batch_op.create_unique_constraint("uq_epochs_run_epoch", ["run_id", "epoch"])
        batch_op.drop_column("fold")
