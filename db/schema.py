"""The data model: sources, images, runs and their epochs, predictions, reviews, jobs, and the
accounts that act on them."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, MetaData, String, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# Named constraints let Alembic's batch mode drop or alter them later on SQLite.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Source(Base):
    """One imported dataset: a folder of a given kind used in one role."""

    __tablename__ = "sources"
    __table_args__ = (UniqueConstraint("kind", "root", "role", name="uq_sources_kind_root_role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20))  # aptos, messidor, folders, unlabelled
    root: Mapped[str] = mapped_column(String(1000))
    role: Mapped[str] = mapped_column(String(20))  # train, validation, unlabelled
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the last import's report

    images: Mapped[list["Image"]] = relationship(back_populates="source")


class Image(Base):
    """One photograph; `grade` is the label training uses (Messidor 0-3), None when unknown."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("source_id", "path", name="uq_images_source_path"),
        # the few labelled images among a large pool, for the review queue
        Index(
            "ix_images_graded",
            "grade",
            sqlite_where=text("grade IS NOT NULL"),
            postgresql_where=text("grade IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"), index=True)
    path: Mapped[str] = mapped_column(String(1000))  # relative to the source root
    name: Mapped[str] = mapped_column(String(200))  # the dataset's own id (APTOS id_code)
    width: Mapped[int]
    height: Mapped[int]
    grade: Mapped[int | None]
    original_label: Mapped[str | None] = mapped_column(String(50))
    label_origin: Mapped[str | None] = mapped_column(String(20))  # expert, pseudo
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)  # e.g. macular edema risk

    source: Mapped[Source] = relationship(back_populates="images")


class Run(Base):
    """One training run, i.e. one model version."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_name: Mapped[str] = mapped_column(String(100))
    img_size: Mapped[int]
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default="running")
    checkpoint: Mapped[str | None] = mapped_column(String(1000))  # the best checkpoint
    temperature: Mapped[float] = mapped_column(default=1.0)
    calibration: Mapped[dict[str, Any]] = mapped_column(default=dict)
    best_qwk: Mapped[float | None]
    active: Mapped[bool] = mapped_column(default=False)
    account: Mapped[str | None] = mapped_column(String(100))  # who trained it; None: a terminal
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    epochs: Mapped[list["Epoch"]] = relationship(back_populates="run", order_by="Epoch.epoch")


class Epoch(Base):
    __tablename__ = "epochs"
    __table_args__ = (UniqueConstraint("run_id", "fold", "epoch", name="uq_epochs_run_fold_epoch"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    # 0: the run's model; 1..K: the K models of a run trained by folds, whose own figures
    # (out of fold, at its last epoch) are then fold 0's
    fold: Mapped[int] = mapped_column(default=0, server_default="0")
    epoch: Mapped[int]
    lr: Mapped[float]
    train_loss: Mapped[float]
    train_acc: Mapped[float]
    val_loss: Mapped[float]
    val_acc: Mapped[float]
    qwk: Mapped[float]
    precision: Mapped[list[Any]] = mapped_column(default=list)
    recall: Mapped[list[Any]] = mapped_column(default=list)
    confusion: Mapped[list[Any]] = mapped_column(default=list)
    errors: Mapped[list[Any]] = mapped_column(default=list)  # [path, true, predicted] per image

    run: Mapped[Run] = relationship(back_populates="epochs")


class Prediction(Base):
    """A model's four class probabilities for one image (temperature already applied)."""

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("run_id", "image_id", name="uq_predictions_run_image"),
        # Covers the review queue and its progress: no table lookups per candidate.
        Index("ix_predictions_run_confidence_grade", "run_id", "confidence", "grade", "image_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    p0: Mapped[float]
    p1: Mapped[float]
    p2: Mapped[float]
    p3: Mapped[float]
    grade: Mapped[int]
    confidence: Mapped[float]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Review(Base):
    """Append-only: an image's current decision is its latest row."""

    __tablename__ = "reviews"
    __table_args__ = (Index("ix_reviews_image_id_id", "image_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    decision: Mapped[str] = mapped_column(String(20))  # accept, reject, relabel, undo, adjudicate
    grade: Mapped[int | None]
    reviewer: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    seconds: Mapped[float | None]  # how long the card was on screen; None: not measured


class Claim(Base):
    """Which reviewer has an image on screen, so that two reviewers get different images."""

    __tablename__ = "claims"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    reviewer: Mapped[str] = mapped_column(String(100))
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)


class Setting(Base):
    """A setting every reviewer shares, such as the share of double-read candidates."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(default=dict)


JOB_ACTIVE = ("queued", "running")  # the statuses of a job that has not ended
_ACTIVE_JOB = text(f"status IN {JOB_ACTIVE}")


class Job(Base):
    """A background process: demo build, training or inference."""

    __tablename__ = "jobs"
    # At most one unfinished job of a kind, held by the database itself: two admins who
    # start training at the same moment on PostgreSQL both pass start_job's check.
    __table_args__ = (
        Index(
            "ux_jobs_active_kind", "kind", unique=True, sqlite_where=_ACTIVE_JOB, postgresql_where=_ACTIVE_JOB
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    pid: Mapped[int | None]
    progress: Mapped[float] = mapped_column(default=0.0)  # 0..1
    message: Mapped[str] = mapped_column(String(500), default="")
    log_path: Mapped[str | None] = mapped_column(String(1000))
    error: Mapped[str | None]
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    account: Mapped[str | None] = mapped_column(String(100))  # who started it; None: a terminal
    host: Mapped[str | None] = mapped_column(String(255))  # the machine its process runs on
    cancel_requested_at: Mapped[datetime | None]  # Cancel, from any machine; the job obeys it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Promotion(Base):
    """Append-only: which account made which run the active model, and when."""

    __tablename__ = "promotions"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    account: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Account(Base):
    """Who may sign in: a local name with a password hash, or an identity provider's e-mail
    without one. Failed sign-ins are counted here, so that a reload does not lift a lock."""

    __tablename__ = "accounts"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)  # lower case
    role: Mapped[str] = mapped_column(String(20))  # reviewer, admin
    password_hash: Mapped[str | None] = mapped_column(String(200))
    disabled: Mapped[bool] = mapped_column(default=False)
    failures: Mapped[int] = mapped_column(default=0)  # failed sign-ins since the last success
    locked_until: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SignIn(Base):
    """A browser's local sign-in, held by a cookie. Only the token's SHA-256 is stored: the
    database alone signs no one in."""

    __tablename__ = "sign_ins"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.name"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]  # the absolute limit; the idle one counts from last_seen_at
    revoked_at: Mapped[datetime | None]
