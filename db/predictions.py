"""Queries of the Inference page: the models and pools to choose from, and what a model
predicted for a pool, aggregated in SQL so that the page stays fast at 100k predictions."""

from datetime import datetime
from typing import NamedTuple

import numpy as np
import pandas as pd
from sqlalchemy import case, func, select

from db.schema import Image, Prediction, Run, Source
from db.session import read_scope


class Model(NamedTuple):
    id: int
    name: str
    checkpoint: str
    best_qwk: float | None
    trained_at: datetime


class Pool(NamedTuple):
    id: int
    name: str
    role: str
    images: int


def models(db_url: str) -> list[Model]:
    """The runs that have a checkpoint to predict with, newest first."""
    with read_scope(db_url) as session:
        rows = session.execute(
            select(
                Run.id, Run.name, Run.checkpoint, Run.best_qwk, func.coalesce(Run.finished_at, Run.created_at)
            )
            .where(Run.checkpoint.is_not(None))
            .order_by(Run.id.desc())
        ).all()
    return [
        Model(run_id, name, checkpoint, best_qwk, trained_at)
        for run_id, name, checkpoint, best_qwk, trained_at in rows
        if checkpoint is not None  # always, by the query's where; narrows the type
    ]


def pools(db_url: str) -> list[Pool]:
    """Every source with its image count; unlabelled pools first, as they are what
    inference is usually for."""
    with read_scope(db_url) as session:
        rows = session.execute(
            select(Source.id, Source.name, Source.role, func.count(Image.id))
            .outerjoin(Image)
            .group_by(Source.id)
            .order_by(case((Source.role == "unlabelled", 0), else_=1), Source.id)
        ).all()
    return [Pool(*row) for row in rows]


def _of(run_id: int, source_id: int) -> tuple:
    return Prediction.run_id == run_id, Image.source_id == source_id


def grade_counts(db_url: str, run_id: int, source_id: int, min_confidence: float = 0.0) -> dict[int, int]:
    """Images of the pool per predicted grade, counting those with confidence >=
    min_confidence (the Review page's candidates when it is the threshold)."""
    with read_scope(db_url) as session:
        rows = session.execute(
            select(Prediction.grade, func.count(Prediction.id))
            .join(Image)
            .where(*_of(run_id, source_id), Prediction.confidence >= min_confidence)
            .group_by(Prediction.grade)
        ).all()
    return {grade: count for grade, count in rows}


def predicted_count(db_url: str, run_id: int, source_id: int, since: datetime | None = None) -> int:
    """Images of the pool that the run has predicted: all, or those predicted since `since`
    (what a running inference has done so far, whichever process did it)."""
    query = select(func.count(Prediction.id)).join(Image).where(*_of(run_id, source_id))
    if since is not None:
        query = query.where(Prediction.created_at >= since)
    with read_scope(db_url) as session:
        return session.execute(query).scalar_one()


def run_grade_counts(db_url: str, run_id: int) -> dict[int, int]:
    """Every image the run predicted, whichever pool, per predicted grade."""
    with read_scope(db_url) as session:
        rows = session.execute(
            select(Prediction.grade, func.count(Prediction.id))
            .where(Prediction.run_id == run_id)
            .group_by(Prediction.grade)
        ).all()
    return {grade: count for grade, count in rows}


def confidence_histogram(db_url: str, run_id: int, source_id: int, bins: int = 20) -> pd.DataFrame:
    """Predictions per confidence bin and predicted grade: columns grade, confidence (the
    bin's lower edge), count. Confidence 1.0 falls into the last bin."""
    # A CASE over the edges, as CAST rounds on PostgreSQL and truncates on SQLite.
    index = case(*[(Prediction.confidence < (i + 1) / bins, i) for i in range(bins - 1)], else_=bins - 1)
    with read_scope(db_url) as session:
        rows = session.execute(
            select(Prediction.grade, index.label("bin"), func.count(Prediction.id))
            .join(Image)
            .where(*_of(run_id, source_id))
            .group_by(Prediction.grade, "bin")
            .order_by("bin", Prediction.grade)
        ).all()
    frame = pd.DataFrame(rows, columns=["grade", "bin", "count"])
    frame["confidence"] = frame.pop("bin") / bins
    return frame[["grade", "confidence", "count"]]


def submission_frame(
    db_url: str, run_id: int, source_id: int, referable_at: float | None = None
) -> pd.DataFrame:
    """The Kaggle submission of a model on a pool: id_code (the image's name), diagnosis
    (the predicted grade, 0-3), in import order; with `referable_at` (the run's operating
    point) also referable: yes when P(grade >= 2) reaches it, else no."""
    with read_scope(db_url) as session:
        rows = session.execute(
            select(Image.name, Prediction.grade, Prediction.p2 + Prediction.p3)
            .join(Image)
            .where(*_of(run_id, source_id))
            .order_by(Image.id)
        ).all()
    frame = pd.DataFrame(rows, columns=["id_code", "diagnosis", "referable"])
    if referable_at is None:
        return frame.drop(columns="referable")
    frame["referable"] = np.where(frame["referable"] >= referable_at, "yes", "no")
    return frame
