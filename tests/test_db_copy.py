"""python -m db.copy: a workspace's SQLite database moved into PostgreSQL, every row of every
table, after which the app goes on there."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_checkpoint
from sqlalchemy import func, select

from db import sign_ins
from db.copy import CopyRefused, copy_database
from db.reviews import QueueFilter, claim_next, decide, set_double_read_share
from db.schema import Account, Base, Epoch, Image, Job, Prediction, Promotion, Review, Run, Source
from db.session import get_engine, read_scope, session_scope
from db.users import TERMINAL
from engine.data.sources import import_source
from engine.model.infer import register_model


@pytest.fixture
def target(postgres):
    """An empty database on the test session's PostgreSQL server."""
    url = postgres.create_database()
    yield url
    get_engine(url).dispose()


def fill(workspace, tiny_data: Path) -> None:
    """Rows in every table, of every column type: JSON, dates, booleans, nulls."""
    db = workspace.db_url
    import_source(db, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    import_source(db, "folders", tiny_data / "validation", "validation", "validation")
    run_id = register_model(
        db,
        tiny_checkpoint(workspace.weights / "tiny.pth"),
        {
            "model_name": "test_efficientnet",
            "image_size": 64,
            "run": "tiny",
            "calibration": {"temperature": 1.5, "bins": [0.1, 0.9]},
        },
    )
    with session_scope(db) as session:
        pool = session.scalars(
            select(Image.id).join(Source).where(Source.name == "pool").order_by(Image.id)
        ).all()
        session.add_all(
            [
                Prediction(
                    run_id=run_id,
                    image_id=image_id,
                    p0=0.91 - i / 100,
                    p1=0.03 + i / 100,
                    p2=0.03,
                    p3=0.03,
                    grade=0,
                    confidence=0.91 - i / 100,
                )
                for i, image_id in enumerate(pool)
            ]
        )
        session.add(
            Epoch(
                run_id=run_id,
                epoch=0,
                lr=0.01,
                train_loss=1.2,
                train_acc=0.5,
                val_loss=1.1,
                val_acc=0.6,
                qwk=0.4,
                precision=[0.5, 0.4, 0.3, 0.2],
                recall=[0.1, 0.2, 0.3, 0.4],
                confusion=[[1, 0], [0, 1]],
                errors=[["a.png", 1, 2]],
            )
        )
        session.add(Job(kind="infer", status="done", params={"source": "pool"}, progress=1.0))
        session.add(Promotion(run_id=run_id, account="admin"))
        session.add(Account(name="ana", role="reviewer", password_hash=None, disabled=True))
    sign_ins.end(db, sign_ins.begin(db, "ana"))  # a sign-in, ended: every column filled
    set_double_read_share(db, 0.25, user=TERMINAL)
    shown = claim_next(db, "ana", QueueFilter(run_id))
    decide(db, "ben", pool[1], run_id, "relabel", 2)
    assert shown.image_id != pool[1]  # ana's claim stays


def rows(db_url: str) -> dict[str, list[tuple]]:
    """Every table's rows in primary-key order."""
    with read_scope(db_url) as session:
        return {
            table.name: [tuple(row) for row in session.execute(select(table).order_by(*table.primary_key))]
            for table in Base.metadata.sorted_tables
        }


def test_copy_moves_every_row_and_the_app_goes_on_there(workspace, tiny_data, target):
    fill(workspace, tiny_data)
    copy = subprocess.run(
        [sys.executable, "-m", "db.copy", "--to", target],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "DR_WORKSPACE": str(workspace.root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert copy.returncode == 0, copy.stderr
    before, after = rows(workspace.db_url), rows(target)
    counts = {name: len(table) for name, table in before.items()}
    assert all(counts.values()), counts  # something to copy in every table
    assert {name: len(table) for name, table in after.items()} == counts
    assert after == before  # every value, JSON, dates and booleans included
    assert f"Copied {sum(counts.values())} rows in {len(counts)} tables" in copy.stdout
    assert "INFO predictions: 8 rows" in copy.stderr

    # The sequences go on after the copied ids: new rows get new ids.
    run_id = after["runs"][0][0]
    review_id = decide(target, "cid", after["predictions"][2][2], run_id, "accept")
    assert review_id == max(row[0] for row in after["reviews"]) + 1
    report = import_source(target, "aptos", tiny_data / "aptos", "train", "train")
    assert report.added > 0
    with read_scope(target) as session:
        assert (
            session.scalar(select(func.min(Image.id)).join(Source).where(Source.name == "train"))
            == max(row[0] for row in after["images"]) + 1
        )
        assert session.scalar(select(func.count(Review.id))) == len(after["reviews"]) + 1
        assert session.scalar(select(Run.calibration)) == {"temperature": 1.5, "bins": [0.1, 0.9]}

    again = subprocess.run(
        [sys.executable, "-m", "db.copy", "--to", target],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "DR_WORKSPACE": str(workspace.root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2
    assert "Nothing copied: " in again.stderr and "holds rows already" in again.stderr


def test_a_copy_that_cannot_finish_leaves_the_target_without_rows(workspace, tiny_data, target, tmp_path):
    with pytest.raises(CopyRefused, match="there is no database at .*missing.sqlite"):
        copy_database(f"sqlite:///{tmp_path / 'missing.sqlite'}", target)
    assert not (tmp_path / "missing.sqlite").exists()
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    with session_scope(workspace.db_url) as session:  # SQLite keeps what PostgreSQL refuses
        session.add(Job(kind="infer", status="failed", params={}, message="x" * 600))
    with pytest.raises(
        CopyRefused,
        match=r"jobs row id 1: message holds 600 characters, "
        r"more than its 500",
    ):
        copy_database(workspace.db_url, target)
    assert {name: len(table) for name, table in rows(target).items() if table} == {}
