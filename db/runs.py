"""Model versions: which run is active (its predictions make the review queue)."""

from sqlalchemy import select, update

from db.schema import Run
from db.session import session_scope


def active_run_id(db_url: str) -> int | None:
    """The promoted run, else the newest finished run that has a checkpoint."""
    with session_scope(db_url) as session:
        promoted = session.scalar(select(Run.id).where(Run.active))
        if promoted is not None:
            return promoted
        return session.scalar(select(Run.id).where(Run.status == "done",
                                                    Run.checkpoint.is_not(None))
                              .order_by(Run.id.desc()))


def promote(db_url: str, run_id: int) -> None:
    """Make `run_id` the active model, and no other."""
    with session_scope(db_url) as session:
        run = session.get(Run, run_id)
        if run is None or run.checkpoint is None:
            raise ValueError(f"run {run_id} has no checkpoint to promote")
        session.execute(update(Run).values(active=Run.id == run_id))
