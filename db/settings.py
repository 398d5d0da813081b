"""Settings every user of the workspace shares, one JSON value per key in the settings table."""

from typing import Any

from sqlalchemy import select

from db.schema import Setting
from db.session import read_scope, session_scope, upsert_insert


def read_setting(db_url: str, key: str) -> dict[str, Any] | None:
    """The stored value of `key`; None when it was never set."""
    with read_scope(db_url) as session:
        return session.scalar(select(Setting.value).where(Setting.key == key))


def write_setting(db_url: str, key: str, value: dict[str, Any]) -> None:
    with session_scope(db_url) as session:
        insert = upsert_insert(session)(Setting).values(key=key, value=value)
        session.execute(
            insert.on_conflict_do_update(index_elements=["key"], set_={"value": insert.excluded.value})
        )
