"""Connections: one Engine per database URL, SQLite tuned for several writer processes;
PostgreSQL (`postgresql+psycopg://...`) for a team that shares one server."""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import cast

from alembic import command
from alembic.config import Config
from sqlalchemy import CursorResult, Engine, UpdateBase, create_engine, event, make_url, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


def workspace_root() -> Path:
    """`DR_WORKSPACE`, or ./workspace."""
    return Path(os.environ.get("DR_WORKSPACE", "workspace")).resolve()


def workspace_sqlite(root: Path) -> str:
    """The URL of the SQLite database inside a workspace."""
    return f"sqlite:///{root / 'dr.sqlite'}"


def database_url(root: Path) -> str:
    """`DR_DATABASE_URL`, or the SQLite database inside the workspace at `root`."""
    return os.environ.get("DR_DATABASE_URL") or workspace_sqlite(root)


READ_ONLY = "dr_read_only"  # an execution option: the session only reads
MIGRATION_LOCK = 20261129  # the key of the PostgreSQL advisory lock that migrations hold


def _tune_sqlite(engine: Engine) -> None:
    # pysqlite opens transactions lazily and as DEFERRED, which lets two writers deadlock
    # on the upgrade to a write lock; take the lock up front instead and wait for it.
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    # Readers need no lock in WAL mode: a plain BEGIN gives them a snapshot without queueing
    # behind writers or making writers queue behind the pages' polling.
    @event.listens_for(engine, "begin")
    def on_begin(connection) -> None:
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


@cache
def get_engine(url: str) -> Engine:
    """The process-wide Engine for `url` (thread-safe; sessions are not, make one per use)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 5, "check_same_thread": False})
        _tune_sqlite(engine)
        return engine
    parsed = make_url(url)
    if parsed.drivername == "postgresql":  # SQLAlchemy's default there, psycopg2, is not installed
        parsed = parsed.set(drivername="postgresql+psycopg")
    # No server-side prepared statements: after a few runs PostgreSQL switches a prepared
    # statement to a generic plan, which took the review queue's candidate query from 40 ms to
    # over a second at 1M predictions (bench.pool --backend postgresql).
    return create_engine(parsed, pool_pre_ping=True, connect_args={"prepare_threshold": None})


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema up to the newest Alembic revision (or to `revision`)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with get_engine(url).begin() as connection:
        if connection.dialect.name == "postgresql":
            # Processes that start at once migrate in turn (BEGIN IMMEDIATE does it on SQLite).
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def upsert_insert(session: Session) -> Callable[..., sqlite.Insert | postgresql.Insert]:
    """The INSERT construct with ON CONFLICT of the session's database (SQLite, PostgreSQL)."""
    inserts: dict[str, Callable[..., sqlite.Insert | postgresql.Insert]] = {
        "sqlite": sqlite.insert,
        "postgresql": postgresql.insert,
    }
    return inserts[session.get_bind().dialect.name]


def rows_changed(session: Session, statement: UpdateBase) -> int:
    """How many rows an UPDATE or DELETE without RETURNING changed."""
    # Session.execute is typed to return a Result; for such a statement it is a CursorResult, which
    # has the count (the cast is SQLAlchemy's advice: github.com/sqlalchemy/sqlalchemy/issues/12913).
    return cast(CursorResult, session.execute(statement)).rowcount


@cache
def _factory(url: str, read_only: bool) -> sessionmaker[Session]:
    engine = get_engine(url)
    if read_only and engine.dialect.name == "postgresql":
        # One snapshot for the whole session, as on SQLite; READ COMMITTED takes one per statement.
        engine = engine.execution_options(isolation_level="REPEATABLE READ")
    elif read_only:
        engine = engine.execution_options(**{READ_ONLY: True})
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A Session that writes: commits on success, rolls back on error. On SQLite it takes the
    write lock up front (BEGIN IMMEDIATE), so that its reads and writes cannot interleave with
    another writer's. On PostgreSQL writers run side by side (READ COMMITTED): a write that must
    not interleave with another's locks the rows it checks first (SELECT ... FOR UPDATE, as
    db.reviews does)."""
    with _factory(url, False).begin() as session:
        yield session


@contextmanager
def read_scope(url: str) -> Iterator[Session]:
    """A Session that only reads: a plain deferred transaction, one consistent snapshot
    (REPEATABLE READ on PostgreSQL), no write lock on SQLite. Nothing written in it is kept."""
    with _factory(url, True)() as session:
        yield session
