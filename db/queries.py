"""Read queries the pages share; each opens its own short session."""

import pandas as pd
from sqlalchemy import Select, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from db.schema import Image, Review, Source
from db.session import read_scope


def sources_frame(db_url: str) -> pd.DataFrame:
    """One row per source with its image count and last import report."""
    with read_scope(db_url) as session:
        rows = session.execute(
            select(
                Source.id,
                Source.name,
                Source.kind,
                Source.role,
                Source.root,
                Source.created_at,
                Source.report,
                func.count(Image.id).label("images"),
            )
            .outerjoin(Image)
            .group_by(Source.id)
            .order_by(Source.id)
        ).all()
    return pd.DataFrame(rows, columns=["id", "name", "kind", "role", "root", "imported", "report", "images"])


def class_counts(db_url: str) -> pd.DataFrame:
    """Labelled images per source, role and grade."""
    with read_scope(db_url) as session:
        rows = session.execute(
            select(Source.name, Source.role, Image.grade, func.count(Image.id))
            .join(Image)
            .where(Image.grade.is_not(None))
            .group_by(Source.id, Image.grade)
            .order_by(Source.id, Image.grade)
        ).all()
    return pd.DataFrame(rows, columns=["source", "role", "grade", "count"])


def image_page(
    db_url: str, source_id: int, grade: int | None, limit: int, offset: int
) -> tuple[list[tuple[str, str, int | None, str | None]], int]:
    """(absolute path, name, grade, original label) for one page of a source, and the total."""
    where = [Image.source_id == source_id]
    if grade is not None:
        where.append(Image.grade == grade)
    with read_scope(db_url) as session:
        total = session.execute(select(func.count(Image.id)).where(*where)).scalar_one()
        rows = session.execute(
            select(Source.root, Image.path, Image.name, Image.grade, Image.original_label)
            .join(Source)
            .where(*where)
            .order_by(Image.id)
            .limit(limit)
            .offset(offset)
        ).all()
    return [(f"{root}/{path}", name, g, label) for root, path, name, g, label in rows], total


def unused_name(session: Session, column: InstrumentedAttribute[str], base: str) -> str:
    """`base`, or `base-2`, `base-3`... whichever `column` (a unique name) does not hold yet."""
    taken = set(session.scalars(select(column)))
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def latest_reviews() -> Select[int, str, int | None]:
    """The current decision of every reviewed image: its newest review row."""
    newest = select(func.max(Review.id)).group_by(Review.image_id)
    return select(Review.image_id, Review.decision, Review.grade).where(Review.id.in_(newest))


def live_reads(image_id: int | None = None):
    """Each reviewer's current read of each image (of `image_id` only, if given: its rows
    alone are read, by their index): their newest accept, reject, correction or undo of it,
    unless that is an undo. Adjudications are no reads."""
    newest = select(func.max(Review.id)).where(Review.decision != "adjudicate")
    if image_id is not None:
        newest = newest.where(Review.image_id == image_id)
    newest = newest.group_by(Review.image_id, Review.reviewer)
    return select(
        Review.id, Review.image_id, Review.run_id, Review.reviewer, Review.decision, Review.grade
    ).where(Review.id.in_(newest), Review.decision != "undo")


def open_conflicts():
    """Images whose reviewers' current reads differ (two grades, or a grade and a reject) and
    that no adjudication settled since the newest of them."""
    reads = live_reads().subquery()
    adjudicated = (
        select(Review.image_id, func.max(Review.id).label("id"))
        .where(Review.decision == "adjudicate")
        .group_by(Review.image_id)
        .subquery()
    )
    return (
        select(reads.c.image_id)
        .outerjoin(adjudicated, adjudicated.c.image_id == reads.c.image_id)
        .group_by(reads.c.image_id)
        .having(
            func.count(func.distinct(func.coalesce(reads.c.grade, -1))) > 1,
            func.max(reads.c.id) > func.coalesce(func.max(adjudicated.c.id), 0),
        )
    )


def _group(extra: dict | None) -> str | None:
    """The person an image belongs to, as its importer recorded it."""
    group = (extra or {}).get("group")
    return None if group is None else str(group)


def labelled_images(db_url: str, role: str) -> list[tuple[int, str, str, int, str | None]]:
    """(image id, absolute path, name, grade, group) of the expert-labelled images of a role."""
    with read_scope(db_url) as session:
        rows = session.execute(
            select(Image.id, Source.root, Image.path, Image.name, Image.grade, Image.extra)
            .join(Source)
            .where(Source.role == role, Image.grade.is_not(None))
            .order_by(Image.id)
        ).all()
    return [(i, f"{root}/{path}", name, grade, _group(extra)) for i, root, path, name, grade, extra in rows]


CURATED_COLUMNS = [
    "image_id",
    "image",
    "source",
    "path",
    "group",
    "grade",
    "expert_grade",
    "origin",
    "reviewer",
    "time",
]


def curated_set(db_url: str) -> pd.DataFrame:
    """What a `--from-db` run trains on, one row per image: expert labels of the train sources
    plus images whose current decision is an accept, a correction or an adjudicated grade,
    unless two reads disagree and wait for adjudication. An expert's grade always stands: no
    decision reaches an expert-labelled image (decide refuses one; older data may hold one),
    and validation images never count, so the yardstick stays clean."""
    image = select(Image.id, Image.name, Source.name, Source.root, Image.path, Image.extra).join(Source)
    latest = latest_reviews().add_columns(Review.reviewer, Review.created_at).subquery()
    with read_scope(db_url) as session:
        expert = session.execute(
            image.add_columns(Image.grade, Image.grade).where(
                Source.role == "train", Image.grade.is_not(None)
            )
        ).all()
        pseudo = session.execute(
            image.add_columns(latest.c.grade, Image.grade, latest.c.reviewer, latest.c.created_at)
            .join(latest, latest.c.image_id == Image.id)
            .where(
                latest.c.decision.in_(("accept", "relabel", "adjudicate")),
                latest.c.grade.is_not(None),
                Image.grade.is_(None),
                Source.role != "validation",
                Image.id.not_in(open_conflicts()),
            )
        ).all()
    rows = {row[0]: (*row, "expert", None, None) for row in expert}
    rows |= {row[0]: (*row[:8], "pseudo", *row[8:]) for row in pseudo}
    table = pd.DataFrame(
        [rows[i] for i in sorted(rows)],
        columns=[
            "image_id",
            "image",
            "source",
            "root",
            "rel",
            "extra",
            "grade",
            "expert_grade",
            "origin",
            "reviewer",
            "time",
        ],
    )
    table.insert(3, "path", table.pop("root") + "/" + table.pop("rel"))
    table.insert(4, "group", table.pop("extra").map(_group))
    return table.astype({"expert_grade": "Int64"})[CURATED_COLUMNS]
