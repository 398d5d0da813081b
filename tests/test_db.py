"""Schema, migrations and concurrent writers on SQLite."""

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import func, inspect, select, text

from conftest import ROOT
from db.queries import sources_frame
from db.schema import Base, Review
from db.session import get_engine, migrate, read_scope, session_scope

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
