"""Persistence: SQLAlchemy 2.0 schema, connections and Alembic migrations."""
