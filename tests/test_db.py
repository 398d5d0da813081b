"""Schema, migrations and concurrent writers, on SQLite and on a real PostgreSQL server; the
whole path of a team's server: import, an inference job, the predictions' upsert, review."""

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BOTH_BACKENDS, ROOT, tiny_checkpoint, wait_for_job
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from db.queries import sources_frame
from db.reviews import QueueFilter, claim_next, decide
from db.schema import Base, Epoch, Prediction, Review
from db.session import get_engine, migrate, read_scope, session_scope

MIGRATE = """
import sys
from db.session import migrate
migrate(sys.argv[1])
"""
WRITER = """
import sys
from db.schema import Image, Review, Source
from db.session import session_scope
url, name = sys.argv[1], sys.argv[2]
for i in range(100):
    with session_scope(url) as session:
        session.add(Review(image_id=1, decision="accept", grade=i % 4, reviewer=name))
"""


@BOTH_BACKENDS
def test_migrations_build_the_schema_from_an_empty_database(empty_db_url: str):
    migrate(empty_db_url)
    migrate(empty_db_url)  # a second start finds nothing to do
    inspector = inspect(get_engine(empty_db_url))
    assert set(inspector.get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    for table in Base.metadata.tables.values():
        columns = {c["name"] for c in inspector.get_columns(table.name)}
        assert columns == set(table.columns.keys()), table.name
    with get_engine(empty_db_url).connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


@BOTH_BACKENDS
def test_migration_0008_adds_the_seconds_of_each_decision(empty_db_url: str):
    migrate(empty_db_url, "0007")
    with session_scope(empty_db_url) as session:
        session.execute(
            text(
                "INSERT INTO sources (name, kind, root, role, created_at, report) "
                "VALUES ('s', 'folders', '/x', 'train', '2026-01-01', '{}')"
            )
        )
        session.execute(
            text(
                "INSERT INTO images (source_id, path, name, width, height, extra) "
                "VALUES (1, 'a.png', 'a', 1, 1, '{}')"
            )
        )
        session.execute(
            text(
                "INSERT INTO reviews (image_id, decision, grade, reviewer, "
                "created_at) VALUES (1, 'accept', 2, 'ana', '2026-01-01')"
            )
        )
    migrate(empty_db_url)
    column = next(
        c for c in inspect(get_engine(empty_db_url)).get_columns("reviews") if c["name"] == "seconds"
    )
    assert column["nullable"] and column["type"].python_type is float
    with read_scope(empty_db_url) as session:  # a decision made before keeps no time
        assert session.execute(select(Review.reviewer, Review.grade, Review.seconds)).all() == [
            ("ana", 2, None)
        ]


@BOTH_BACKENDS
def test_migration_0010_keeps_earlier_epochs_as_their_runs_one_model(empty_db_url: str):
    migrate(empty_db_url, "0009")
    with session_scope(empty_db_url) as session:
        session.execute(
            text(
                "INSERT INTO runs (name, model_name, img_size, status, config, temperature, "
                "calibration, active, created_at) VALUES ('r', 'm', 64, 'done', '{}', 1, '{}', "
                "false, '2026-01-01')"
            )
        )
        session.execute(
            text(
                "INSERT INTO epochs (run_id, epoch, lr, train_loss, train_acc, val_loss, val_acc, qwk, "
                "precision, recall, confusion, errors) VALUES (1, 1, 0.1, 1, 0.5, 1, 0.5, 0.3, "
                "'[]', '[]', '[]', '[]')"
            )
        )
    migrate(empty_db_url)
    model_1 = {"run_id": 1, "fold": 1, "epoch": 1, "lr": 0.1, "train_loss": 1, "train_acc": 0.5}
    model_1 |= {"val_loss": 1, "val_acc": 0.5, "qwk": 0.2}
    with session_scope(empty_db_url) as session:
        assert session.execute(select(Epoch.run_id, Epoch.fold, Epoch.epoch)).all() == [(1, 0, 1)]
        session.add(Epoch(**model_1))  # another model's first epoch
    with pytest.raises(IntegrityError), session_scope(empty_db_url) as session:
        session.add(Epoch(**model_1))  # still one row per model and epoch


def test_sqlite_connections_use_wal_and_wait_for_the_lock(db_url: str):
    with get_engine(db_url).connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 5000


@pytest.mark.parametrize("backend", ["postgresql"])
def test_postgresql_plans_each_query_for_its_values(db_url: str):
    """No prepared statements: PostgreSQL would turn a repeated query into a generic plan, and
    the review queue's candidate query took over a second at 1M predictions with one."""
    with get_engine(db_url).connect() as connection:
        assert connection.connection.driver_connection.prepare_threshold is None
        for _ in range(8):  # more runs than psycopg's default threshold of 5
            connection.execute(text("SELECT count(*) FROM images WHERE id > :id"), {"id": 1})
        assert connection.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar() == 0


@pytest.mark.parametrize("backend", ["postgresql"])
def test_processes_that_start_at_once_migrate_one_after_another(empty_db_url: str):
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE, empty_db_url], cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    assert [start.communicate(timeout=120)[1] for start in starts] == ["", "", ""]
    with get_engine(empty_db_url).connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


@BOTH_BACKENDS
def test_four_writer_processes_lose_nothing(db_url: str):
    with session_scope(db_url) as session:
        session.execute(
            text(
                "INSERT INTO sources (name, kind, root, role, created_at, report) "
                "VALUES ('s', 'folders', '/x', 'train', '2026-01-01', '{}')"
            )
        )
        session.execute(
            text(
                "INSERT INTO images (source_id, path, name, width, height, extra) "
                "VALUES (1, 'a.png', 'a', 1, 1, '{}')"
            )
        )
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, f"r{n}"], cwd=ROOT) for n in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    with session_scope(db_url) as session:
        counts = dict(session.execute(select(Review.reviewer, func.count()).group_by(Review.reviewer)).all())
    assert counts == {f"r{n}": 100 for n in range(4)}


def test_reads_take_no_write_lock_and_writes_take_it_up_front(db_url: str):
    writer = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    started = time.monotonic()
    with read_scope(db_url) as session:
        assert session.scalar(select(func.count(Review.id))) == 0
    assert sources_frame(db_url).empty  # what the pages poll reads the same way
    assert time.monotonic() - started < 1  # no wait for the busy timeout (5 s)

    def write() -> None:  # a session that only reads first still queues as a writer
        with session_scope(db_url) as session:
            session.scalar(select(func.count(Review.id)))

    queued = threading.Thread(target=write)
    queued.start()
    queued.join(0.5)
    assert queued.is_alive()
    writer.execute("COMMIT")
    queued.join(5)
    assert not queued.is_alive()
    writer.close()


@pytest.mark.parametrize("backend", ["postgresql"])
def test_import_inference_job_upsert_and_review_on_postgresql(workspace, tiny_data: Path):
    from db.users import LOCAL
    from engine.data.datasets import Sample
    from engine.data.sources import import_source
    from engine.model.infer import store_predictions
    from engine.model.predictor import Predictions
    from engine.runtime import jobs

    db = workspace.db_url
    assert db.startswith("postgresql+psycopg://")
    first = import_source(db, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    again = import_source(db, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    assert (first.added, again.added, again.already) == (8, 0, 8)
    checkpoint = tiny_checkpoint(workspace.weights / "tiny.pth")
    job_id = jobs.start_job(
        workspace,
        "infer",
        "engine.model.infer",
        ["--checkpoint", str(checkpoint), "--source", "pool", "--workers", "0"],
        user=LOCAL,
    )
    job = wait_for_job(workspace, job_id, lambda j: j.status not in jobs.ACTIVE)
    assert (job.status, job.progress) == ("done", 1.0), jobs.log_tail(job.log_path)
    assert job.heartbeat_at is not None and job.account == LOCAL.name

    with read_scope(db) as session:
        run_id, image_id = session.execute(
            select(Prediction.run_id, Prediction.image_id).order_by(Prediction.id)
        ).first()
        assert session.scalar(select(func.count(Prediction.id))) == 8
    sure = Predictions(indices=[0], probs=np.array([[0.01, 0.97, 0.01, 0.01]]))
    store_predictions(db, run_id, [Sample("x", None, "x", image_id)], sure)  # the upsert
    with read_scope(db) as session:
        assert session.scalar(select(func.count(Prediction.id))) == 8
        assert session.scalar(
            select(Prediction.confidence).where(Prediction.image_id == image_id)
        ) == pytest.approx(0.97)

    candidate = claim_next(db, "ana", QueueFilter(run_id, threshold=0.9))
    assert candidate.image_id == image_id
    decide(db, "ana", image_id, run_id, "accept", seen=candidate.seen)
    with read_scope(db) as session:
        assert session.execute(select(Review.image_id, Review.grade)).all() == [(image_id, 1)]
