"""Schema, migrations and concurrent writers on SQLite."""

import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, inspect, select, text

from conftest import ROOT
from db.schema import Base, Review
from db.session import get_engine, migrate, session_scope

WRITER = """
import sys
from db.schema import Image, Review, Source
from db.session import session_scope
url, name = sys.argv[1], sys.argv[2]
for i in range(100):
    with session_scope(url) as session:
        session.add(Review(image_id=1, decision="accept", grade=i % 4, reviewer=name))
"""


def test_migrations_build_the_schema_from_an_empty_database(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'new.sqlite'}"
    migrate(url)
    migrate(url)  # a second start finds nothing to do
    inspector = inspect(get_engine(url))
    assert set(inspector.get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    for table in Base.metadata.tables.values():
        columns = {c["name"] for c in inspector.get_columns(table.name)}
        assert columns == set(table.columns.keys()), table.name
    with get_engine(url).connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 5000
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def test_four_writer_processes_lose_nothing(db_url: str):
    with session_scope(db_url) as session:
        session.execute(text("INSERT INTO sources (name, kind, root, role, created_at, report) "
                             "VALUES ('s', 'folders', '/x', 'train', '2026-01-01', '{}')"))
        session.execute(text("INSERT INTO images (source_id, path, name, width, height, extra) "
                             "VALUES (1, 'a.png', 'a', 1, 1, '{}')"))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, f"r{n}"], cwd=ROOT)
               for n in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    with session_scope(db_url) as session:
        counts = dict(session.execute(
            select(Review.reviewer, func.count()).group_by(Review.reviewer)).all())
    assert counts == {f"r{n}": 100 for n in range(4)}
