"""Jobs: separate processes with progress, cancel through the database from any host, dead-job
detection, one per kind."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from conftest import BOTH_BACKENDS, TINY_TRAIN, job_row, wait_for_job
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from streamlit.testing.v1 import AppTest

from db.schema import Job, Run, utcnow
from db.session import get_engine, migrate, read_scope, session_scope
from db.users import LOCAL
from engine.data.datasets import folder_samples
from engine.data.sources import import_source
from engine.runtime import jobs
from engine.training.train import JobHooks
from engine.training.trainer import RunPaths, TrainConfig, Trainer


def test_demo_job_runs_to_done_and_fills_the_workspace(workspace):
    job_id = jobs.start_job(
        workspace,
        "demo",
        "engine.loop.demo",
        ["--train", "8", "--test", "4", "--val", "8", "--size", "96"],
        user=LOCAL,
    )
    job = wait_for_job(workspace, job_id, lambda j: j.status not in jobs.ACTIVE)
    assert job.status == "done" and job.progress == 1.0, jobs.log_tail(job.log_path)
    assert "demo high-quality validation: 8 listed, 8 imported" in jobs.log_tail(job.log_path)


def test_a_second_job_of_the_same_kind_is_refused(workspace):
    args = ["--train", "400", "--size", "256"]
    first = jobs.start_job(workspace, "demo", "engine.loop.demo", args, user=LOCAL)
    try:
        with pytest.raises(jobs.JobRefused, match=f"#{first}"):
            jobs.start_job(workspace, "demo", "engine.loop.demo", args, user=LOCAL)
    finally:
        jobs.cancel_job(workspace.db_url, first, user=LOCAL)
        wait_for_job(workspace, first, lambda j: j.status not in jobs.ACTIVE)


@BOTH_BACKENDS
def test_two_admins_starting_one_kind_at_the_same_moment_start_one_job(workspace):
    """The other admin's job is written but not yet committed when this one starts: on
    PostgreSQL start_job's check cannot see it, and the database's index refuses the second."""
    written, release = threading.Event(), threading.Event()

    def other_admin() -> None:
        with session_scope(workspace.db_url) as session:
            session.add(Job(kind="demo", status="running", pid=os.getpid(), heartbeat_at=utcnow()))
            session.flush()
            written.set()
            release.wait(10)

    other = threading.Thread(target=other_admin)
    other.start()
    assert written.wait(10)
    threading.Timer(1.0, release.set).start()
    try:
        with pytest.raises(jobs.JobRefused, match="demo job"):
            jobs.start_job(workspace, "demo", "engine.loop.demo", ["--train", "8"], user=LOCAL)
    finally:
        release.set()
        other.join()
    with read_scope(workspace.db_url) as session:
        assert session.scalars(select(Job.kind)).all() == ["demo"]


def test_the_migration_ends_all_but_the_newest_unfinished_job_of_a_kind(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    migrate(url, "0006")
    with get_engine(url).begin() as connection:
        for kind in ("train", "train", "train", "infer"):
            connection.execute(
                text(
                    "INSERT INTO jobs (kind, status, params, progress, message, "
                    "created_at) VALUES (:kind, 'running', '{}', 0, '', "
                    "CURRENT_TIMESTAMP)"
                ),
                {"kind": kind},
            )
    migrate(url)
    with read_scope(url) as session:
        assert session.execute(select(Job.id, Job.status).order_by(Job.id)).all() == [
            (1, "failed"),
            (2, "failed"),
            (3, "running"),
            (4, "running"),
        ]


def test_cancel_stops_training_between_batches(workspace, tiny_data):
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "train")
    import_source(workspace.db_url, "folders", tiny_data / "validation", "validation")
    job_id = jobs.start_job(
        workspace,
        "train",
        "engine.training.train",
        [*TINY_TRAIN, "--from-db", "--epochs", "200", "--batch-size", "4", "--workers", "1", "--name", "c"],
        user=LOCAL,
    )
    wait_for_job(workspace, job_id, lambda j: j.progress > 0)
    jobs.cancel_job(workspace.db_url, job_id, user=LOCAL)
    job = wait_for_job(workspace, job_id, lambda j: j.status not in jobs.ACTIVE, timeout=60)
    assert job.status == "cancelled" and job.error is None
    with session_scope(workspace.db_url) as session:
        assert session.scalar(select(Run.status).where(Run.name == "c")) == "cancelled"


def test_a_cancel_while_the_job_starts_is_recorded_as_cancelled(workspace):
    job_id = jobs.start_job(
        workspace, "demo", "engine.loop.demo", ["--train", "400", "--size", "256"], user=LOCAL
    )
    # its process is still starting: no reporter yet
    jobs.cancel_job(workspace.db_url, job_id, user=LOCAL)
    jobs._children[(workspace.db_url, job_id)].wait(timeout=60)
    jobs.mark_dead_jobs(workspace.db_url)
    job = job_row(workspace, job_id)
    assert job.status == "cancelled" and job.error is None, jobs.log_tail(job.log_path)


@BOTH_BACKENDS
def test_a_cancel_from_another_host_reaches_the_job_through_the_database(workspace, monkeypatch):
    monkeypatch.setenv("DR_HOST", "a")
    job_id = jobs.start_job(
        workspace, "demo", "engine.loop.demo", ["--train", "400", "--size", "256"], user=LOCAL
    )
    job = wait_for_job(workspace, job_id, lambda j: j.status == "running")
    assert job.host == "a"
    monkeypatch.setenv("DR_HOST", "b")  # Cancel clicked on another machine
    signals = []
    monkeypatch.setattr(jobs.os, "killpg", lambda *args: signals.append(args))
    jobs.cancel_job(workspace.db_url, job_id, user=LOCAL)
    assert job_row(workspace, job_id).cancel_requested_at is not None
    job = wait_for_job(workspace, job_id, lambda j: j.status not in jobs.ACTIVE, timeout=60)
    assert job.status == "cancelled" and job.error is None, jobs.log_tail(job.log_path)
    assert signals == []  # the pid means nothing on this machine: the job read the request


@BOTH_BACKENDS
def test_a_job_busy_between_progress_reports_takes_up_a_cancel_request(workspace, monkeypatch):
    monkeypatch.setattr(jobs.signal, "signal", lambda *args: None)  # pytest keeps its SIGTERM
    with session_scope(workspace.db_url) as session:
        session.add(job := Job(kind="demo", host="a"))
    steps = 0
    with jobs.JobReporter(workspace.db_url, job.id) as reporter:
        jobs.cancel_job(workspace.db_url, job.id, user=LOCAL)
        while steps < 100:  # a step that reports no progress, for 5 s
            reporter.check_cancel()
            steps += 1
            time.sleep(0.05)
    assert steps < 100 and job_row(workspace, job.id).status == "cancelled"


def job_status(db_url: str, job_id: int) -> None:
    """A page that shows one job's status."""
    from db.schema import Job
    from db.session import read_scope
    from views.common import job_status_ui

    with read_scope(db_url) as session:
        job_status_ui(session.get(Job, job_id))


def test_the_page_says_that_a_cancel_was_requested(workspace):
    with session_scope(workspace.db_url) as session:
        session.add(job := Job(kind="train", status="running", host="a", heartbeat_at=utcnow()))
    jobs.cancel_job(workspace.db_url, job.id, user=LOCAL)
    page = AppTest.from_function(job_status, args=(workspace.db_url, job.id), default_timeout=60).run()
    assert not page.exception, page.exception
    assert [info.value for info in page.info] == [
        f"Cancel requested: train job #{job.id} stops at its next batch."
    ]


def test_a_job_cancelled_before_its_reporter_starts_stops_at_its_first_check(workspace, monkeypatch):
    monkeypatch.setattr(jobs.signal, "signal", lambda *args: None)  # pytest keeps its SIGTERM
    with session_scope(workspace.db_url) as session:
        session.add(job := Job(kind="demo", status="cancelled"))
    steps = []
    with jobs.JobReporter(workspace.db_url, job.id) as reporter:
        reporter.check_cancel()
        steps.append("worked")
    assert not steps and job_row(workspace, job.id).status == "cancelled"


def test_validation_and_calibration_stop_on_a_cancel(workspace, tiny_data):
    samples = folder_samples(tiny_data / "validation")
    config = TrainConfig(model="test_efficientnet", img_size=64, eval_size=64, pretrained=False, workers=0)
    reporter = jobs.JobReporter(workspace.db_url, None)
    trainer = Trainer(config, samples, samples, RunPaths.under(workspace, "c"), None, JobHooks(reporter))
    assert len(trainer.evaluate(samples, 2)[2]) == len(samples)
    reporter.cancelled = True  # what SIGTERM does
    with pytest.raises(jobs.JobCancelled):
        trainer.evaluate(samples, 2)  # what validation and calibration run


def test_a_killed_job_is_found_dead(workspace):
    job_id = jobs.start_job(
        workspace, "demo", "engine.loop.demo", ["--train", "400", "--size", "256"], user=LOCAL
    )
    job = wait_for_job(workspace, job_id, lambda j: j.status == "running")
    os.killpg(job.pid, signal.SIGKILL)  # no chance to say anything
    job = wait_for_job(workspace, job_id, lambda j: j.status != "running", timeout=30)
    assert job.status == "failed" and "without reporting" in job.error


def test_a_stale_heartbeat_marks_a_foreign_job_failed(workspace):
    with session_scope(workspace.db_url) as session:
        fresh = Job(kind="train", status="running", heartbeat_at=utcnow())
        stale = Job(kind="infer", status="running", heartbeat_at=utcnow() - timedelta(minutes=5))
        session.add_all([fresh, stale])
    assert jobs.mark_dead_jobs(workspace.db_url) == [stale.id]
    assert job_row(workspace, fresh.id).status == "running"


def job_process(job_id: int) -> subprocess.Popen:
    """A process on this machine with the command line of job `job_id`'s, not started by
    start_job in this process (another server process's, or a stranger's)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "print('up', flush=True); import time; time.sleep(60)",
            "--job-id",
            str(job_id),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "up\n"  # past exec, with its command line
    return process


def set_pids(workspace, pids: dict[int, int]) -> None:
    with session_scope(workspace.db_url) as session:
        for job_id, pid in pids.items():
            session.get(Job, job_id).pid = pid


def test_a_live_process_is_never_marked_dead_however_old_its_heartbeat(workspace):
    with session_scope(workspace.db_url) as session:
        job = Job(kind="train", status="running", heartbeat_at=utcnow() - timedelta(minutes=5))
        reused = Job(
            kind="infer",
            status="running",
            pid=os.getpid(),  # a pid used again since
            heartbeat_at=utcnow() - timedelta(minutes=5),
        )
        session.add_all([job, reused])
    process = job_process(job.id)
    try:
        set_pids(workspace, {job.id: process.pid})
        assert jobs.mark_dead_jobs(workspace.db_url) == [reused.id]
        assert job_row(workspace, job.id).status == "running"
    finally:
        process.kill()
        process.communicate()
    assert jobs.mark_dead_jobs(workspace.db_url) == [job.id]


@BOTH_BACKENDS
def test_a_job_of_another_host_is_judged_by_its_heartbeat_alone(workspace, monkeypatch):
    monkeypatch.setenv("DR_HOST", "b")
    with session_scope(workspace.db_url) as session:
        jobs_by_host = {
            host: Job(kind=f"k{host}", status="running", host=host, heartbeat_at=utcnow())
            for host in ("a", "b", None)
        }
        session.add_all(jobs_by_host.values())
    ids = {host: job.id for host, job in jobs_by_host.items()}
    # Each id's command line runs here; for host a's job that is a stranger that happens to
    # have its pid (host a's own counter) and its id (a workspace of this machine, say).
    processes = [job_process(job_id) for job_id in ids.values()]
    try:
        set_pids(workspace, {job_id: p.pid for job_id, p in zip(ids.values(), processes, strict=True)})
        assert jobs.mark_dead_jobs(workspace.db_url) == []  # fresh heartbeats
        later = utcnow() + timedelta(minutes=5)  # every heartbeat stale
        # NULL: a job from before hosts were recorded, of this host as it always was
        assert jobs.mark_dead_jobs(workspace.db_url, later) == [ids["a"]]
    finally:
        for process in processes:
            process.kill()
            process.communicate()


def test_a_locked_database_does_not_stop_the_heartbeat(workspace, monkeypatch):
    monkeypatch.setattr(jobs, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(jobs.signal, "signal", lambda *args: None)  # pytest keeps its SIGTERM
    with session_scope(workspace.db_url) as session:
        session.add(job := Job(kind="demo"))
    failures = []
    update = jobs.JobReporter._update

    def busy_once(self, **values):
        if not failures:  # the first beat finds the database busy
            failures.append(values)
            raise OperationalError("UPDATE jobs", {}, sqlite3.OperationalError("database is locked"))
        update(self, **values)

    monkeypatch.setattr(jobs.JobReporter, "_update", busy_once)
    with jobs.JobReporter(workspace.db_url, job.id):
        first = job_row(workspace, job.id).heartbeat_at
        deadline = time.monotonic() + 10
        while job_row(workspace, job.id).heartbeat_at == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures and job_row(workspace, job.id).heartbeat_at > first


def test_a_run_outside_a_job_gives_back_the_callers_sigterm_handler(workspace):
    """engine.training.train and engine.model.infer run in a test's own process too: once they end, SIGTERM
    is the caller's again."""
    before = signal.getsignal(signal.SIGTERM)
    with jobs.JobReporter(workspace.db_url, None) as job:
        assert signal.getsignal(signal.SIGTERM) == job._on_sigterm
    assert signal.getsignal(signal.SIGTERM) is before
