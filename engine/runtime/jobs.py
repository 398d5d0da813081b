"""Background jobs: separate processes that report progress, heartbeat and outcome to the db.

The app starts a job with `start_job`; the job process wraps its work in `JobReporter`.
A click in the browser can interrupt a Streamlit script run, never a job.
Several app instances, on several machines, may share one database: a job's pid means
something only on its own host, so a cancel travels through the database.
"""

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from contextlib import ExitStack
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from tqdm import tqdm

from cli import terminal_bar
from db.schema import JOB_ACTIVE as ACTIVE
from db.schema import Job, Run, utcnow
from db.session import read_scope, rows_changed, session_scope
from db.users import User, require_admin
from engine.runtime.distributed import rank
from engine.runtime.workspace import Workspace

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]
HEARTBEAT_S = 5.0
CANCEL_POLL_S = 0.5  # how often a job looks for a cancel request: a read, no lock
STALE_AFTER = timedelta(seconds=30)
_children: dict[tuple[str, int], subprocess.Popen] = {}  # (db, job id) -> process we started


class JobRefused(Exception):
    """A job of the same kind is already running."""


class JobCancelled(Exception):
    """Raised inside a job between steps once it was cancelled (SIGTERM or a request)."""


def this_host() -> str:
    """This machine's name in the jobs table: `DR_HOST`, else the host name. App instances
    that share a database need distinct names (DR_HOST where their host names clash)."""
    return os.environ.get("DR_HOST") or socket.gethostname()


def start_job(
    workspace: Workspace,
    kind: str,
    module: str,
    args: list[str] | None = None,
    params: dict | None = None,
    processes: int = 1,
    *,
    user: User,
) -> int:
    """Launch `python -m module ... --job-id N` in its own session, under torchrun when it
    takes several `processes`, recorded as started by `user`; return the job id. Only an
    admin starts jobs (db.users.NotAllowed otherwise)."""
    require_admin(workspace.db_url, user, f"start a {kind} job")
    mark_dead_jobs(workspace.db_url)
    workspace.logs.mkdir(parents=True, exist_ok=True)
    try:
        with session_scope(workspace.db_url) as session:
            running = session.scalar(select(Job).where(Job.kind == kind, Job.status.in_(ACTIVE)))
            if running is not None:
                raise JobRefused(
                    f"another {kind} job (#{running.id}) is already running; wait for it or cancel it first"
                )
            job = Job(kind=kind, params=params or {}, account=user.name, host=this_host())
            session.add(job)
            session.flush()
            job.log_path = str(workspace.logs / f"{kind}-{job.id}.log")
            job_id, log_path = job.id, job.log_path
    except IntegrityError:  # ux_jobs_active_kind: one started in the same moment won
        raise JobRefused(
            f"another {kind} job started at the same moment; wait for it or cancel it first"
        ) from None
    launcher = (
        [sys.executable, "-m"]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
        ]
    )
    command = [*launcher, module, *(args or []), "--job-id", str(job_id)]
    env = {**os.environ, "DR_WORKSPACE": str(workspace.root), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())  # what ran, for whoever reads the log
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=PROJECT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _children[(workspace.db_url, job_id)] = process
    with session_scope(workspace.db_url) as session:
        session.get_one(Job, job_id).pid = process.pid
    return job_id


def cancel_job(db_url: str, job_id: int, *, user: User | None) -> None:
    """Ask the job to stop, for `user`, an admin, or db.users.TERMINAL (NotAllowed otherwise),
    from any machine that shares the database: the request is written to the job's row. A
    running job reads it within CANCEL_POLL_S, finishes the current batch and records
    'cancelled'; a job still queued is recorded as cancelled here, and its process stops at
    its first check.
    No signal is sent from here, even on the job's own host: the job signals its own processes
    once it reads the request (see JobReporter), and a second SIGTERM would cut short
    torchrun's shutdown of its ranks."""
    require_admin(db_url, user, "cancel a job")
    now = utcnow()
    with session_scope(db_url) as session:
        session.execute(
            update(Job)
            .where(  # the first request's time is kept
                Job.id == job_id, Job.status.in_(ACTIVE), Job.cancel_requested_at.is_(None)
            )
            .values(cancel_requested_at=now)
        )
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(status="cancelled", message="cancelled", finished_at=now)
        )


def log_tail(path: str | None, lines: int = 20) -> str:
    if not path or not Path(path).is_file():
        return ""
    with open(path, "rb") as log:
        log.seek(0, os.SEEK_END)
        log.seek(max(0, log.tell() - 20_000))
        return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])


def _runs_here(pid: int, job_id: int) -> bool:
    """Whether process `pid` on this machine is job `job_id`'s, and not a later process that
    got the same number; Linux's /proc tells, elsewhere this is never known to be true."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return any(argv[i : i + 2] == ["--job-id", str(job_id)] for i in range(len(argv) - 1))


def _is_dead(db_url: str, job: Job, now: datetime) -> bool:
    """The process we started has exited; or, for any other, the heartbeat went stale while
    no process of the job runs here (a busy database can delay a heartbeat, not end a job).
    A job of another host is judged by its heartbeat alone: its pid names no process here.
    Jobs from before hosts were recorded (host NULL) count as this host's."""
    child = _children.get((db_url, job.id))
    if child is not None:
        return child.poll() is not None
    stale = now - (job.heartbeat_at or job.created_at) > STALE_AFTER
    here = job.host in (None, this_host())
    return stale and not (here and job.pid is not None and _runs_here(job.pid, job.id))


def mark_dead_jobs(db_url: str, now: datetime | None = None) -> list[int]:
    """Mark failed every active job whose process is gone (see _is_dead)."""
    now = now or utcnow()
    with read_scope(db_url) as session:  # the pages call this every few seconds: no lock
        dead = [
            job.id
            for job in session.scalars(select(Job).where(Job.status.in_(ACTIVE)))
            if _is_dead(db_url, job, now)
        ]
    if dead:
        with session_scope(db_url) as session:
            session.execute(
                update(Job)
                .where(Job.id.in_(dead), Job.status.in_(ACTIVE))
                .values(
                    status="failed",
                    finished_at=now,
                    error="the job's process stopped without reporting an outcome",
                )
            )
    return dead


def active_jobs(db_url: str) -> list[Job]:
    mark_dead_jobs(db_url)
    with read_scope(db_url) as session:
        return list(session.scalars(select(Job).where(Job.status.in_(ACTIVE)).order_by(Job.id)))


def latest_job(db_url: str, kind: str) -> Job | None:
    with read_scope(db_url) as session:
        return session.scalar(select(Job).where(Job.kind == kind).order_by(Job.id.desc()))


class JobReporter:
    """Inside a job process: progress, heartbeat, cancellation and the final status.

    with JobReporter(db_url, job_id) as job:
        for step in work:
            job.check_cancel()
            job.progress(done / total, "message")
    """

    def __init__(self, db_url: str, job_id: int | None):
        self.db_url, self.job_id = db_url, job_id
        self.cancelled = False
        self._stop = threading.Event()
        self._last_write = 0.0
        self._bar: tqdm | None = None
        self._closing = ExitStack()

    def __enter__(self) -> "JobReporter":
        self._handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        if self.job_id is None and rank() == 0:  # by hand: a bar, if stderr is a terminal
            self._bar = self._closing.enter_context(terminal_bar())
        if self.job_id is not None:
            if not self._mark_running():
                self._take_cancel()  # while the process was starting: stop at the first check
            threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        self._stop.set()
        if self.job_id is None:  # nothing to record: the caller's handler again (a test's)
            if self._bar is not None and exc is None:
                self._bar.update(self._bar.total - self._bar.n)
            self._closing.close()
            signal.signal(signal.SIGTERM, self._handler)
            return False
        if exc is None:
            self._update(status="done", progress=1.0, finished_at=utcnow())
        elif isinstance(exc, JobCancelled) or self.cancelled:
            # After a cancel, whatever stopped the job first (another rank that stopped and
            # broke a collective, say) is the cancel.
            self._update(status="cancelled", message="cancelled", finished_at=utcnow())
            return True
        else:
            traceback.print_exception(kind, exc, tb)  # into the job's log
            self._update(status="failed", error=f"{type(exc).__name__}: {exc}", finished_at=utcnow())
        return False

    def _mark_running(self) -> bool:
        """queued -> running; False if the job was cancelled before its process got here."""
        with session_scope(self.db_url) as session:
            queued = update(Job).where(Job.id == self.job_id, Job.status == "queued")
            return rows_changed(session, queued.values(status="running", heartbeat_at=utcnow())) == 1

    def _on_sigterm(self, _signum, _frame) -> None:
        self.cancelled = True

    def _take_cancel(self) -> None:
        """Act on a cancel found in the database. The flag stops this process at its next
        check. Under torchrun (the recorded pid is torchrun's, not ours) only this rank reads
        the database, so SIGTERM goes to the process group that start_job began and torchrun
        stops every rank. A job that runs alone sends no signal: it would reach its DataLoader
        workers, whose death would fail the job."""
        if self.cancelled:
            return
        assert self.job_id is not None  # only a job's process gets here
        with read_scope(self.db_url) as session:
            pid = session.get_one(Job, self.job_id).pid
        if pid is not None and pid != os.getpid() and _runs_here(pid, self.job_id):
            os.killpg(pid, signal.SIGTERM)  # before the flag, which can end this rank first
        self.cancelled = True

    def _cancel_requested(self) -> bool:
        with read_scope(self.db_url) as session:
            return session.scalar(select(Job.cancel_requested_at).where(Job.id == self.job_id)) is not None

    def check_cancel(self) -> None:
        if self.cancelled:
            raise JobCancelled()

    def due(self) -> bool:
        """Whether progress reported now would be shown, in a job's row or on a terminal's bar:
        at most twice a second."""
        shown = self.job_id is not None or self._bar is not None
        return shown and time.monotonic() - self._last_write >= 0.5

    def progress(self, fraction: float, message: str = "", force: bool = False) -> None:
        """Record progress (at most twice a second unless forced) and honour a cancel."""
        self.check_cancel()
        if not (force or self.due()):
            return
        self._last_write = time.monotonic()
        fraction = min(max(fraction, 0.0), 1.0)
        if self._bar is not None:
            self._bar.set_description_str(message, refresh=False)
            self._bar.update(fraction - self._bar.n)
        if self.job_id is not None:
            self._update(progress=fraction, message=message[:500], heartbeat_at=utcnow())

    def attach_run(self, run_id: int) -> None:
        """The job works on `run_id`; a training job's account becomes the run's."""
        if self.job_id is None:
            return
        with session_scope(self.db_url) as session:
            job = session.get_one(Job, self.job_id)
            job.run_id = run_id
            if job.kind == "train":
                session.get_one(Run, run_id).account = job.account

    def _watch(self) -> None:
        """The heartbeat, and a cancel requested in the database taken up as SIGTERM is: the
        job stops at its next check, busy between progress reports or not."""
        beat = time.monotonic()
        while not self._stop.wait(CANCEL_POLL_S):
            try:
                if time.monotonic() - beat >= HEARTBEAT_S:
                    self._update(heartbeat_at=utcnow())
                    beat = time.monotonic()
                if not self.cancelled and self._cancel_requested():
                    self._take_cancel()
            except OperationalError as exc:  # e.g. "database is locked": try again soon
                log.warning("database not reached: %s", exc.orig)

    def _update(self, **values) -> None:
        with session_scope(self.db_url) as session:
            job = session.get(Job, self.job_id)
            for key, value in values.items():
                setattr(job, key, value)
