"""Dataset page: importing a source (a folder under the data roots, or an uploaded zip) as
a background job, class balance per source and role, the sources and their import reports,
and a gallery of photographs beside their preprocessed versions."""

from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from db.queries import class_counts, image_page, sources_frame
from db.users import NotAllowed
from engine.data.balance import balance_table, imbalance_ratios
from engine.data.sources import KIND_ROLES, KINDS, data_roots, folder_choices
from engine.data.upload import MAX_FILES, MAX_UNPACKED_BYTES, UnsafeUpload, unpack_zip
from engine.runtime import jobs
from engine.runtime.markdown import literal
from grades import GRADE_NAMES
from views.common import cancel_ui, current_user, get_workspace, image_pair_ui, job_status_ui

PAGE_SIZE = 4
KIND_NAMES = {
    "aptos": "APTOS 2019 (train.csv, test.csv, train_images/, test_images/)",
    "messidor": "Messidor (annotation CSV or spreadsheets beside the images)",
    "folders": "Class folders 0/ 1/ 2/ 3/",
    "unlabelled": "Unlabelled images (any folder)",
}
workspace = get_workspace()


@st.fragment(run_every=1)
def demo_progress_ui() -> None:
    jobs.mark_dead_jobs(workspace.db_url)
    job = jobs.latest_job(workspace.db_url, "demo")
    if job is None:
        st.info(
            "No datasets yet. Import one above, or from a terminal, for example "
            "`python -m engine.data.sources import --kind aptos --path /data/aptos --role train` "
            "(see the README)."
        )
        return
    if job.status == "done":
        st.rerun()  # the whole page, now that there is data
    if job.status in jobs.ACTIVE:
        st.info("Building the demo workspace from synthetic photographs; the page fills in when it is ready.")
    job_status_ui(job)


def balance_ui() -> None:
    counts = class_counts(workspace.db_url)
    if counts.empty:
        st.info("No labelled images yet: the sources hold only unlabelled pools.")
        return
    table = balance_table(counts)
    table["grade"] = table["grade"].map(GRADE_NAMES)
    ratios = imbalance_ratios(table)
    as_percent = st.toggle("Show percentages", key="balance_percent")
    value = "percent" if as_percent else "count"
    for role, part in table.groupby("role", sort=False):
        st.subheader(f"{role.capitalize()} sources")
        figure = px.bar(
            part,
            x="grade",
            y=value,
            color="source",
            barmode="group",
            text=value,
            labels={"grade": "grade", value: "images" if value == "count" else "%"},
        )
        st.plotly_chart(figure, key=f"balance_{role}")
        columns = st.columns(len(part["source"].unique()))
        for column, source in zip(columns, part["source"].unique(), strict=True):
            column.metric(f"{literal(source)}: largest / smallest class", f"{ratios[source]:.1f}×")


def report_summary(name: str, report: dict) -> str:
    return (
        f"{literal(name)}: {report.get('added', 0)} imported, "
        f"{report.get('already', 0)} already present, "
        f"{len(report.get('problems', []))} skipped"
    )


def problems_ui(report: dict) -> None:
    problems = report.get("problems", [])
    if not problems:
        st.write("Every listed image was imported.")
    for problem in problems:
        st.write(f"- {literal(problem['where'])}: {literal(problem['reason'])}")


def sources_ui(sources: pd.DataFrame) -> None:
    st.subheader("Sources")
    shown = sources.drop(columns=["id", "report"])
    st.dataframe(shown, hide_index=True)
    for row in sources.itertuples():
        with st.expander(f"Import report of {report_summary(row.name, row.report or {})}"):
            problems_ui(row.report or {})


def start_import(kind: str, role: str, name: str, folder: Path) -> None:
    args = [
        "import",
        "--kind",
        kind,
        "--path",
        str(folder),
        "--role",
        role,
        *([f"--name={name}"] if name else []),
    ]  # a name may start with '-'
    params = {"kind": kind, "role": role, "root": str(folder.resolve())}
    try:
        jobs.start_job(workspace, "import", "engine.data.sources", args, params, user=current_user())
    except (jobs.JobRefused, NotAllowed) as exc:
        st.warning(f"Import not started: {literal(exc)}.")
        return
    st.rerun()  # the page, now with the job's progress


def server_folder_ui() -> Path | None:
    """A folder chosen from those under the data roots; never a typed path."""
    roots = data_roots(workspace)
    st.caption(
        "Folders under the data roots "
        + ", ".join(f"`{root}`" for root in roots)
        + "; an administrator names others with "
        "`python -m engine.data.sources roots --set DIR ...`."
    )
    choices = [str(folder) for folder in folder_choices(roots)]
    if not choices:
        st.info("No folders under the data roots yet: copy a dataset there, or upload a zip.")
        return None
    return Path(st.selectbox("Folder", choices, key="import_folder"))


def unpacked_upload_ui() -> Path | None:
    """The uploaded zip unpacked into the workspace, or None (with the reason shown)."""
    uploads = workspace.datasets / "uploads"
    upload = st.file_uploader(
        "Zip of the images with their CSV",
        type="zip",
        key="import_upload",
        help=f"Unpacked into `{uploads}`. At most {MAX_FILES} files "
        f"and {MAX_UNPACKED_BYTES / 1024**3:.0f} GB unpacked; larger sets go under a data "
        "root and are chosen as a folder.",
    )
    if upload is None or not st.button("Import", key="import_upload_start", type="primary"):
        return None
    try:
        with st.spinner(f"Unpacking {literal(upload.name)}…"):
            return unpack_zip(upload, upload.name, uploads, db_url=workspace.db_url, user=current_user())
    except (UnsafeUpload, NotAllowed) as exc:
        st.error(f"{literal(upload.name)} was not imported: {literal(exc)}.")
        return None


def import_form_ui() -> None:
    left, middle, right = st.columns(3)
    kind = left.selectbox("Kind", KINDS, format_func=lambda k: KIND_NAMES.get(k, k), key="import_kind")
    # One role widget per kind: each kind offers its own roles.
    role = middle.selectbox(
        "Role",
        KIND_ROLES[kind],
        key=f"import_role_{kind}",
        help="Training and validation images carry grades (APTOS: train.csv); an unlabelled "
        "pool (APTOS: test.csv) is predicted and reviewed. One folder cannot be both "
        "training and validation.",
    )
    name = right.text_input("Name (optional)", key="import_name", placeholder="folder-role").strip()
    origin = st.radio("From", ("a folder on the server", "an upload"), horizontal=True, key="import_origin")
    if origin == "an upload":
        folder = unpacked_upload_ui()
    else:
        folder = server_folder_ui()
        if folder is not None and not st.button("Import", key="import_start", type="primary"):
            folder = None
    if folder is not None:
        start_import(kind, role, name, folder)


@st.fragment(run_every=1)
def import_progress_ui() -> None:
    jobs.mark_dead_jobs(workspace.db_url)
    job = jobs.latest_job(workspace.db_url, "import")
    if job is None or job.status not in jobs.ACTIVE:
        st.rerun()  # the whole page, so that the report and the new images show
    job_status_ui(job)
    cancel_ui(job, "Cancel", "cancel_import")


def import_outcome_ui(job, sources: pd.DataFrame) -> None:
    """The last import's report, or why it did not finish."""
    if job.status != "done":
        job_status_ui(job)
        return
    source = sources[
        (sources["kind"] == job.params["kind"])
        & (sources["root"] == job.params["root"])
        & (sources["role"] == job.params["role"])
    ]
    if source.empty:  # removed since
        return
    row = source.iloc[0]
    st.success(f"Import #{job.id} finished. {report_summary(row['name'], row['report'])}")
    problems_ui(row["report"])


def import_ui(sources: pd.DataFrame) -> None:
    job = jobs.latest_job(workspace.db_url, "import")
    with st.expander("Import a source", expanded=sources.empty or job is not None):
        if job is not None and job.status in jobs.ACTIVE:
            import_progress_ui()
        elif job is not None:
            import_outcome_ui(job, sources)
        import_form_ui()  # shown meanwhile too, so that its choices stay for the next import


def gallery_ui(sources) -> None:
    st.subheader("Gallery")
    names = dict(zip(sources["name"], sources["id"], strict=True))
    left, middle, right = st.columns(3)
    name = left.selectbox("Source", list(names), key="gallery_source")
    grade = middle.selectbox(
        "Grade",
        [None, 0, 1, 2, 3],
        key="gallery_grade",
        format_func=lambda g: "all" if g is None else GRADE_NAMES[g],
    )
    page = right.number_input("Page", min_value=1, value=1, step=1, key="gallery_page")
    rows, total = image_page(workspace.db_url, names[name], grade, PAGE_SIZE, (page - 1) * PAGE_SIZE)
    if not rows:
        st.info(
            f"{literal(name)} has no images{' of this grade' if grade is not None else ''}"
            f"{' on this page' if total else ''}."
        )
        return
    st.caption(f"{total} images; page {page} of {-(-total // PAGE_SIZE)}")
    for path, image_name, image_grade, label in rows:
        grade_text = "unlabelled" if image_grade is None else f"grade {image_grade} ({label})"
        image_pair_ui(path, f"{image_name} · {grade_text}")


st.title("Dataset")
sources = sources_frame(workspace.db_url)
if current_user().is_admin:
    import_ui(sources)
if sources.empty:
    demo_progress_ui()
else:
    balance_ui()
    sources_ui(sources)
    gallery_ui(sources)
