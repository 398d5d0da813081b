"""Model versions: which run is active (its predictions make the review queue), the runs and
their epochs for comparison."""

from collections.abc import Sequence
from datetime import datetime

import pandas as pd
from sqlalchemy import String, case, cast, select, update
from sqlalchemy.orm import Session, load_only

from db.queries import labelled_images
from db.schema import Epoch, Promotion, Run
from db.session import read_scope, session_scope
from db.users import User, require_admin

CURVE_COLUMNS = ["run_id", "run", "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "qwk"]


def active_run_id(db_url: str) -> int | None:
    """The promoted run: its predictions make the review queue."""
    with read_scope(db_url) as session:
        return session.scalar(select(Run.id).where(Run.active))


def run_score(db_url: str, run_id: int) -> tuple[str, float | None]:
    """The run's name and best validation QWK (None when it was never validated here)."""
    with read_scope(db_url) as session:
        name, best_qwk = session.execute(select(Run.name, Run.best_qwk).where(Run.id == run_id)).one()
    return name, best_qwk


def run_checkpoint(db_url: str, run_id: int) -> str | None:
    """The file of the run's kept model; None while it trains."""
    with read_scope(db_url) as session:
        return session.scalar(select(Run.checkpoint).where(Run.id == run_id))


def run_config(db_url: str, run_id: int) -> dict:
    """The run's training config (TrainConfig's fields and train_counts); what an imported
    model's import recorded."""
    with read_scope(db_url) as session:
        return session.scalar(select(Run.config).where(Run.id == run_id)) or {}


def run_preprocess(db_url: str, run_id: int) -> dict | None:
    """The preprocessing the run's model takes its input with (PreprocessConfig.to_dict);
    None for a run whose config does not say (a model imported from a file)."""
    return run_config(db_url, run_id).get("preprocess")


def run_calibration(db_url: str, run_id: int) -> dict:
    """The run's calibration summary as training stored it; empty for a run trained before
    calibration was stored, or still training."""
    with read_scope(db_url) as session:
        calibration, temperature = session.execute(
            select(Run.calibration, Run.temperature).where(Run.id == run_id)
        ).one()
    return {"temperature": temperature, **calibration} if calibration else {}


def referable_threshold(db_url: str, run_id: int) -> float | None:
    """The run's operating point for referable DR (P(grade >= 2) at or above it); None for a
    run that has none (trained before operating points were chosen, or imported)."""
    return (run_calibration(db_url, run_id).get("screening") or {}).get("threshold")


def set_screening(db_url: str, run_id: int, screening: dict, user: User) -> None:
    """Store another operating point (a screening summary at another target sensitivity) as
    the run's; only an admin may."""
    require_admin(db_url, user, "change a model's operating point")
    with session_scope(db_url) as session:
        run = session.get(Run, run_id)
        if not run or not run.calibration:
            raise ValueError(f"run {run_id} has no calibration to change")
        run.calibration = {**run.calibration, "screening": screening}


def activate_first(session: Session, run: Run) -> None:
    """The first model with a checkpoint becomes active by itself; a later one waits for a
    Promote, so that a finished retrain never swaps the review queue under the reviewers."""
    if session.scalar(select(Run.id).where(Run.active)) is None:
        run.active = True


def promote(db_url: str, run_id: int, user: User) -> None:
    """Make `run_id` the active model, and no other; the promotion names `user`, who must be
    an admin (db.users.NotAllowed otherwise)."""
    require_admin(db_url, user, "promote a model")
    with session_scope(db_url) as session:
        run = session.get(Run, run_id)
        if run is None or run.checkpoint is None:
            raise ValueError(f"run {run_id} has no checkpoint to promote")
        session.execute(update(Run).values(active=Run.id == run_id))
        session.add(Promotion(run_id=run_id, account=user.name))


def promotions(db_url: str) -> list[tuple[str, str, datetime]]:
    """(run name, account, time) of every promotion, oldest first."""
    with read_scope(db_url) as session:
        return [
            (name, account, created_at)
            for name, account, created_at in session.execute(
                select(Run.name, Promotion.account, Promotion.created_at).join(Run).order_by(Promotion.id)
            )
        ]


def validation_size(db_url: str) -> int:
    """Labelled images of the validation sources, the yardstick every run is judged on."""
    return len(labelled_images(db_url, "validation"))


def _best(epochs: Sequence[Epoch], config: dict | None) -> Epoch | None:
    """The epoch the trainer kept as best.pth: the last one, or (config select "best", and
    runs from before that setting) the first of the highest val QWK. Of a run by folds, its
    own record (fold 0: out of fold, once every model is trained)."""
    own = [e for e in epochs if e.fold == 0]
    if not own:
        return None
    if (config or {}).get("select", "best") == "last":
        return own[-1]
    return max(own, key=lambda e: e.qwk)


def runs_frame(db_url: str) -> pd.DataFrame:
    """One row per run, newest first, with its config and the epoch it kept (see _best)."""
    with read_scope(db_url) as session:
        scores: dict[int, list[Epoch]] = {}
        # The per-image error lists can be long; the table needs only the scores.
        for epoch in session.scalars(
            select(Epoch)
            .order_by(Epoch.run_id, Epoch.epoch)
            .options(load_only(Epoch.run_id, Epoch.fold, Epoch.epoch, Epoch.qwk, Epoch.val_acc))
        ):
            scores.setdefault(epoch.run_id, []).append(epoch)
        rows = []
        for run in session.scalars(select(Run).order_by(Run.id.desc())):
            best = _best(scores.get(run.id, []), run.config)
            rows.append(
                (
                    run.id,
                    run.name,
                    run.model_name,
                    run.img_size,
                    run.config,
                    run.status,
                    run.checkpoint,
                    run.created_at,
                    len({e.epoch for e in scores.get(run.id, [])}),
                    best.qwk if best else run.best_qwk,
                    best.val_acc if best else None,
                    best.epoch if best else None,
                )
            )
    return pd.DataFrame(
        rows,
        columns=[
            "id",
            "name",
            "model",
            "img_size",
            "config",
            "status",
            "checkpoint",
            "created_at",
            "epochs_done",
            "best_qwk",
            "best_acc",
            "best_epoch",
        ],
    )


def epochs_frame(db_url: str, run_ids: list[int]) -> pd.DataFrame:
    """The per-epoch curves of the runs: lr, train/val loss and accuracy, val QWK. Each model
    of a run by folds is a curve of its own, "<run> · model <fold>"."""
    with read_scope(db_url) as session:
        rows = session.execute(
            select(
                Epoch.run_id,
                case((Epoch.fold == 0, Run.name), else_=Run.name + " · model " + cast(Epoch.fold, String)),
                Epoch.epoch,
                Epoch.lr,
                Epoch.train_loss,
                Epoch.train_acc,
                Epoch.val_loss,
                Epoch.val_acc,
                Epoch.qwk,
            )
            .join(Run)
            .where(Epoch.run_id.in_(run_ids))
            .order_by(Epoch.run_id, Epoch.fold, Epoch.epoch)
        ).all()
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def best_epoch(db_url: str, run_id: int) -> dict | None:
    """The epoch the run kept (see _best): its scores, per-class precision and recall, confusion
    matrix, and misclassified validation images ([path, true, predicted]); None if no epoch."""
    with read_scope(db_url) as session:
        best = _best(
            session.scalars(
                select(Epoch).where(Epoch.run_id == run_id, Epoch.fold == 0).order_by(Epoch.epoch)
            ).all(),
            session.scalar(select(Run.config).where(Run.id == run_id)),
        )
        if best is None:
            return None
        return {
            key: getattr(best, key)
            for key in ("epoch", "qwk", "val_acc", "val_loss", "precision", "recall", "confusion", "errors")
        }
