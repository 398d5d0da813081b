"""Copy a workspace's database into another one, typically its SQLite file into the
PostgreSQL server that a team shares:

    python -m db.copy --to postgresql+psycopg://dr@db-host/dr [--from sqlite:///path/dr.sqlite]

Without --from, the source is the SQLite file of the workspace that DR_WORKSPACE names
(./workspace by default). Both databases are first brought to the newest migration (as any
start of the app would), then every table's rows go over in dependency order, in one
transaction on the target, and PostgreSQL's id sequences are set past the copied ids. A target
that holds rows already is refused, so nothing is copied twice; a copy that fails leaves the
target without rows.
"""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import Table, func, literal, make_url, select
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from cli import HelpFormatter, setup_logging
from db.schema import Base
from db.session import migrate, read_scope, session_scope, workspace_root, workspace_sqlite

log = logging.getLogger(__name__)

BATCH = 5000  # rows read and written at a time


class CopyRefused(Exception):
    """The copy cannot start or go on; the message says why, in words."""


def default_source() -> str:
    """The SQLite database of the workspace that DR_WORKSPACE names (./workspace by default)."""
    return workspace_sqlite(workspace_root())


def shown(url: str) -> str:
    """A URL as messages may show it: without its password."""
    return make_url(url).render_as_string(hide_password=True)


def _check_source(source: str, target: str) -> None:
    parsed = make_url(source)
    if parsed == make_url(target):
        raise CopyRefused("the source and the target are the same database")
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        raise CopyRefused(f"there is no database at {parsed.database}")


def _row(table: Table, row: dict) -> str:
    return f"{table.name} row " + ", ".join(f"{c.name} {row[c.name]}" for c in table.primary_key)


def _check_lengths(table: Table, rows: Sequence[dict]) -> None:
    """SQLite keeps strings longer than their column's length, PostgreSQL refuses them."""
    limits = {c.name: length for c in table.columns if (length := getattr(c.type, "length", None))}
    for row in rows:
        for name, length in limits.items():
            value = row[name]
            if value is not None and len(value) > length:
                raise CopyRefused(
                    f"{_row(table, row)}: {name} holds {len(value)} characters, more than its {length}"
                )


def _fill(source: Session, target: Session, table: Table, progress: Callable[[str, int], None]) -> int:
    copied = 0
    rows = source.execute(select(table), execution_options={"yield_per": BATCH})
    for batch in rows.partitions():
        values = [row._asdict() for row in batch]
        _check_lengths(table, values)
        try:
            target.execute(table.insert(), values)
        except IntegrityError as error:  # e.g. a row whose parent is gone: the server says which
            raise CopyRefused(f"{table.name}: {error.orig}") from error
        copied += len(values)
        progress(table.name, copied)
    return copied


def _reset_sequences(target: Session, tables: Sequence[Table]) -> None:
    """Set each PostgreSQL id sequence past the copied ids (SQLite takes max(id) + 1 itself)."""
    if target.get_bind().dialect.name != "postgresql":
        return
    for table in tables:
        if (column := table.autoincrement_column) is not None:
            following = select(func.coalesce(func.max(column), 0) + 1).scalar_subquery()
            target.execute(
                select(func.setval(func.pg_get_serial_sequence(table.name, column.name), following, False))
            )


def copy_database(
    source: str, target: str, progress: Callable[[str, int], None] = lambda table, rows: None
) -> dict[str, int]:
    """Copy every row of `source` into `target`, which must hold none; the rows per table.
    `progress(table, rows copied so far)` is called after each batch."""
    _check_source(source, target)
    migrate(source)
    migrate(target)
    tables = Base.metadata.sorted_tables  # parents before the tables that refer to them
    with read_scope(source) as reading, session_scope(target) as writing:
        filled = [
            table.name
            for table in tables
            if writing.scalar(select(literal(1)).select_from(table).limit(1)) is not None
        ]
        if filled:
            raise CopyRefused(
                f"{shown(target)} holds rows already (in {', '.join(filled)}); copy into an empty database"
            )
        counts = {table.name: _fill(reading, writing, table, progress) for table in tables}
        _reset_sequences(writing, tables)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m db.copy", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="the target database, e.g. postgresql+psycopg://dr@db-host/dr",
    )
    parser.add_argument(
        "--from",
        dest="source",
        default=default_source(),
        metavar="URL",
        help="the source database (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        counts = copy_database(args.source, args.to, lambda table, rows: log.info("%s: %d rows", table, rows))
    except CopyRefused as error:
        log.error("Nothing copied: %s.", error)
        return 2
    except (ArgumentError, OperationalError) as error:  # a malformed URL, a server not reached
        log.error("Nothing copied: %s", getattr(error, "orig", None) or error)
        return 2
    print(
        f"Copied {sum(counts.values())} rows in {len(counts)} tables from {shown(args.source)} "
        f"to {shown(args.to)}. Point the app and its jobs at it with "
        f"DR_DATABASE_URL={shown(args.to)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
