"""Dataset page: class balance per source and role, the sources and their import reports,
and a gallery of photographs beside their preprocessed versions."""

import plotly.express as px
import streamlit as st

from db.queries import class_counts, image_page, sources_frame
from engine import jobs
from engine.balance import balance_table, imbalance_ratios
from grades import GRADE_NAMES
from views.common import get_workspace, image_pair_ui, job_status_ui

PAGE_SIZE = 4
workspace = get_workspace()


@st.fragment(run_every=1)
def demo_progress_ui() -> None:
    jobs.mark_dead_jobs(workspace.db_url)
    job = jobs.latest_job(workspace.db_url, "demo")
    if job is None:
        st.info("No datasets yet. Import one from a terminal, for example "
                "`python -m engine.sources import --kind aptos --path /data/aptos --role train` "
                "(see the README).")
        return
    if job.status == "done":
        st.rerun()  # the whole page, now that there is data
    if job.status in jobs.ACTIVE:
        st.info("Building the demo workspace from synthetic photographs; "
                "the page fills in when it is ready.")
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
        figure = px.bar(part, x="grade", y=value, color="source", barmode="group", text=value,
                        labels={"grade": "grade", value: "images" if value == "count" else "%"})
        st.plotly_chart(figure, key=f"balance_{role}")
        columns = st.columns(len(part["source"].unique()))
        for column, source in zip(columns, part["source"].unique()):
            column.metric(f"{source}: largest / smallest class", f"{ratios[source]:.1f}×")


def sources_ui(sources) -> None:
    st.subheader("Sources")
    shown = sources.drop(columns=["id", "report"])
    st.dataframe(shown, hide_index=True)
    for row in sources.itertuples():
        report = row.report or {}
        problems = report.get("problems", [])
        label = (f"Import report of {row.name}: {report.get('added', 0)} imported, "
                 f"{report.get('already', 0)} already present, {len(problems)} skipped")
        with st.expander(label):
            if not problems:
                st.write("Every listed image was imported.")
            for problem in problems:
                st.write(f"- `{problem['where']}`: {problem['reason']}")


def gallery_ui(sources) -> None:
    st.subheader("Gallery")
    names = dict(zip(sources["name"], sources["id"]))
    left, middle, right = st.columns(3)
    name = left.selectbox("Source", list(names), key="gallery_source")
    grade = middle.selectbox("Grade", [None, 0, 1, 2, 3], key="gallery_grade",
                             format_func=lambda g: "all" if g is None else GRADE_NAMES[g])
    page = right.number_input("Page", min_value=1, value=1, step=1, key="gallery_page")
    rows, total = image_page(workspace.db_url, names[name], grade, PAGE_SIZE,
                             (page - 1) * PAGE_SIZE)
    if not rows:
        st.info(f"{name} has no images{' of this grade' if grade is not None else ''}"
                f"{' on this page' if total else ''}.")
        return
    st.caption(f"{total} images; page {page} of {-(-total // PAGE_SIZE)}")
    for path, image_name, image_grade, label in rows:
        grade_text = "unlabelled" if image_grade is None else f"grade {image_grade} ({label})"
        image_pair_ui(path, f"{image_name} · {grade_text}")


st.title("Dataset")
sources = sources_frame(workspace.db_url)
if sources.empty:
    demo_progress_ui()
else:
    balance_ui()
    sources_ui(sources)
    gallery_ui(sources)
