"""The workspace folder: database, imported datasets, caches, runs and logs in one place."""

from dataclasses import dataclass
from pathlib import Path

from db.session import database_url, workspace_root


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def from_env(cls) -> "Workspace":
        """`DR_WORKSPACE`, or ./workspace."""
        return cls(workspace_root())

    @property
    def db_url(self) -> str:
        """`DR_DATABASE_URL`, or SQLite inside the workspace."""
        return database_url(self.root)

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def estimate_info(self) -> Path:
        return self.root / "estimate_info"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def weights(self) -> Path:
        return self.root / "weights"
