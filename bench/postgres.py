"""A throwaway PostgreSQL server for the tests and the benchmarks: `initdb` into a temporary
folder, `pg_ctl` on a free localhost port; the tests start one per session and make one
database per test.

initdb refuses to run as root, so when run as root the server runs as the `postgres` account
that Debian's package creates. Without PostgreSQL (or psycopg) Server.start raises Unavailable.
"""

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy import NullPool, create_engine, text

from db.session import get_engine, migrate

SERVICE_ACCOUNT = "postgres"


def _bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or in Debian's /usr/lib/postgresql/<major>/bin."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    installed = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[-3])
    )
    return Path(installed[-1]).parent if installed else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Unavailable(RuntimeError):
    """No server can start here; the message says what is missing."""


class Server:
    """A PostgreSQL cluster in a temporary folder, started on `port` until stop()."""

    def __init__(self, bin_dir: Path, folder: Path, port: int, account: str | None):
        self.bin_dir, self.folder, self.port, self.account = bin_dir, folder, port, account
        self._names = itertools.count(1)
        self._template: str | None = None

    @classmethod
    def start(cls) -> "Server":
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise Unavailable("PostgreSQL is not installed (no initdb; apt-get install postgresql)")
        try:
            import psycopg  # noqa: F401  (the driver the URLs name)
        except ImportError as error:
            raise Unavailable("psycopg is not installed (pip install -r requirements.txt)") from error
        account = SERVICE_ACCOUNT if os.geteuid() == 0 else None
        folder = Path(tempfile.mkdtemp(prefix="dr-postgres-"))
        if account is not None:
            try:
                user = pwd.getpwnam(account)
            except KeyError:
                raise Unavailable(f"running as root and there is no {account!r} account for initdb") from None
            os.chown(folder, user.pw_uid, user.pw_gid)
        server = cls(bin_dir, folder, _free_port(), account)
        server._run(
            "initdb", "-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"
        )
        # A throwaway cluster: durability off, which makes commits cheap.
        options = (
            f"-p {server.port} -k {folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        server._run(
            "pg_ctl",
            "-D",
            str(folder / "data"),
            "-l",
            str(folder / "server.log"),
            "-o",
            options,
            "-w",
            "start",
        )
        return server

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin_dir / program), *args]
        if self.account is not None:
            command = ["runuser", "-u", self.account, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            log = self.folder / "server.log"
            raise RuntimeError(
                f"{program} failed ({done.returncode}): {done.stderr}"
                + (log.read_text() if log.is_file() else "")
            )

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, template: str = "template1") -> str:
        """A new, empty (or `template`'s copy of a) database; its URL."""
        name = f"test_{next(self._names)}"
        admin = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
        return self.url(name)

    def migrated_database(self) -> str:
        """A new database at the newest migration (a copy of a template migrated once)."""
        if self._template is None:
            url = self.create_database()
            migrate(url)
            get_engine(url).dispose()  # a template must have no connections
            self._template = url.rsplit("/", 1)[1]
        return self.create_database(self._template)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
