"""Retrain page: the curated training set, a training run started from a form and followed
live, the runs compared epoch by epoch, and the choice of the active model."""

from pathlib import Path

import pandas as pd
import streamlit as st

from db.queries import curated_set
from db.runs import (
    active_run_id,
    best_epoch,
    epochs_frame,
    promote,
    promotions,
    run_calibration,
    run_checkpoint,
    runs_frame,
    validation_size,
)
from db.users import NotAllowed
from engine.data.datasets import AUGMENTATIONS
from engine.loop.import_model import ImportRefused, import_upload
from engine.loop.retrain import (
    MODELS,
    contribution_table,
    curated_counts,
    default_settings,
    original_counts,
    runs_table,
    settings_problem,
    train_job_args,
)
from engine.model.networks import WeightsMismatch, pick_device
from engine.model.predictor import TTA_VIEWS
from engine.model.quality import calibration_lines, clipped_warning
from engine.runtime import jobs
from engine.runtime.markdown import literal
from engine.training.trainer import run_name
from grades import GRADE_NAMES
from views.common import (
    cancel_ui,
    current_user,
    explainer,
    get_workspace,
    image_pair_ui,
    job_status_ui,
    next_step_info,
    reset_on_new_options,
)
from views.curves import confusion_figure, curated_figure, curve_figures, per_class_figure, reliability_figure
from views.model_export import model_export_ui
from views.screening import difference_ui, screening_ui
from views.viewer import grading_viewer

ERRORS_PER_PAGE = 4
# (refit, folds) -> what the choice does with the labelled images
REACH_NAMES = {
    (True, 1): "Validate, then train again on every image",
    (True, 3): "Three models on folds by person, averaged",
    (False, 1): "One model; the validation images only validate it",
}
REACH = list(REACH_NAMES)
OPTIMIZERS, BALANCES = ["sgd", "adamw"], ["loss", "sqrt", "sampler", "none"]
LOSSES, SELECTS = ["ce", "ordinal"], ["last", "best"]
workspace = get_workspace()


def curated_ui(curated: pd.DataFrame, validation: int) -> None:
    st.subheader("Curated training set")
    counts = curated_counts(curated)
    st.plotly_chart(curated_figure(counts, original_counts(curated)), key="curated_chart")
    st.dataframe(contribution_table(counts), hide_index=True)
    st.caption(
        f"{len(curated)} training images, {(curated['origin'] == 'pseudo').sum()} of them "
        f"pseudo-labels that reviewers accepted or corrected; {validation} validation "
        "images judge every run."
    )


def settings_form(defaults: dict) -> dict | None:
    """The training settings, once the form is submitted."""
    models = list(dict.fromkeys([defaults["model"], *MODELS]))
    with st.form("train_settings"):
        name = st.text_input("Run name", placeholder="empty: the date and time", key="train_name")
        left, middle, right = st.columns(3)
        model = left.selectbox(
            "Model",
            models,
            accept_new_options=True,
            key="train_model",
            help="A timm model name; type another to use it.",
        )
        img_size = middle.number_input(
            "Image size", 64, 1024, defaults["img_size"], step=32, key="train_img_size"
        )
        epochs = right.number_input("Epochs", 1, 500, defaults["epochs"], key="train_epochs")
        batch_size = left.number_input("Batch size", 1, 512, defaults["batch_size"], key="train_batch_size")
        lr = middle.number_input(
            "Learning rate", 1e-6, 1.0, defaults["lr"], step=0.001, format="%g", key="train_lr"
        )
        lrf = right.number_input(
            "Final lr factor (lrf)",
            0.0,
            1.0,
            defaults["lrf"],
            step=0.01,
            format="%g",
            key="train_lrf",
            help="One epoch of warm-up, then a cosine from lr to lr × lrf.",
        )
        optimizer = left.radio(
            "Optimizer",
            OPTIMIZERS,
            OPTIMIZERS.index(defaults["optimizer"]),
            horizontal=True,
            key="train_optimizer",
        )
        balance = middle.radio(
            "Class balancing",
            BALANCES,
            BALANCES.index(defaults["balance"]),
            horizontal=True,
            key="train_balance",
            help="loss: inverse-frequency class weights; sqrt: their square "
            "root; sampler: every grade drawn equally often; none.",
        )
        loss = right.radio(
            "Loss",
            LOSSES,
            LOSSES.index(defaults["loss"]),
            horizontal=True,
            key="train_loss",
            help="ordinal: soft targets on the neighbouring "
            "grades, so that a near miss costs less than a far one.",
        )
        select = left.radio(
            "Keep the epoch",
            SELECTS,
            SELECTS.index(defaults["select"]),
            horizontal=True,
            key="train_select",
            help="last: the final epoch, "
            "so that the validation set stays unused until calibration; best: "
            "the highest validation QWK.",
        )
        augment = middle.radio(
            "Augmentation",
            AUGMENTATIONS,
            AUGMENTATIONS.index(defaults["augment"]),
            horizontal=True,
            key="train_augment",
            help="light: mirror and quarter turns; strong: also any angle, scale, colour and blur.",
        )
        enhance = right.toggle(
            "Ben Graham enhancement",
            defaults["enhance"],
            key="train_enhance",
            help="Local contrast: 4 × (image − blur).",
        )
        tta = left.radio(
            "Test-time views",
            list(TTA_VIEWS),
            list(TTA_VIEWS).index(defaults["tta"]),
            horizontal=True,
            key="train_tta",
            help="Calibrate (and predict) on "
            "each image averaged over 1, 2 (its mirror too) or 8 views (the mirrors "
            "of its four quarter turns); epochs validate on at most 2.",
        )
        progressive = middle.toggle(
            "Progressive learning",
            defaults["progressive"],
            key="train_progressive",
            help="EfficientNetV2: image size and regularisation grow over four stages.",
        )
        processes = 1
        if defaults["processes"] > 1:  # several GPUs: one process each, under torchrun
            processes = right.number_input(
                "GPUs",
                1,
                defaults["processes"],
                defaults["processes"],
                key="train_gpus",
                help="The batch is shared among them.",
            )
        refit, folds = st.radio(
            "How the labelled images train and validate",
            REACH,
            REACH.index((defaults["refit"], defaults["folds"])),
            format_func=REACH_NAMES.__getitem__,
            key="train_reach",
            help="Every image reaches the model either way but the last. Validate, then train "
            "again: a model trained without the validation images validates and calibrates "
            "the run, and a second training on all of them, for the same epochs, is the "
            "run's model (about twice the time). Folds: three models, each trained on two "
            "thirds of the images (split by person) and judged on the third it did not see; "
            "the run's model averages them (about the time of the first).",
        )
        pretrained = st.checkbox(
            "Start from pretrained weights", defaults["pretrained"], key="train_pretrained"
        )
        weights = st.text_input(
            "Pretrained weights file",
            key="train_weights",
            placeholder="empty: the model's ImageNet weights found offline",
            help="A local file; read only when starting from pretrained weights.",
        )
        submitted = st.form_submit_button("Start training", key="start_training", type="primary")
    if not submitted:
        return None
    return {
        "name": name.strip() or run_name(),
        "model": model or "",
        "img_size": img_size,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "lrf": lrf,
        "optimizer": optimizer,
        "balance": balance,
        "loss": loss,
        "select": select,
        "enhance": enhance,
        "tta": tta,
        "augment": augment,
        "progressive": progressive,
        "refit": refit,
        "folds": folds,
        "pretrained": pretrained,
        "weights": weights,
        "processes": processes,
    }


def start_ui(taken: set[str]) -> None:
    st.subheader("Train a new model")
    settings = settings_form(default_settings(pick_device()))
    if settings is None:
        return
    problem = settings_problem(settings, taken)
    if problem:
        st.warning(literal(problem))
        return
    try:
        job_id = jobs.start_job(
            workspace,
            "train",
            "engine.training.train",
            train_job_args(settings),
            params=settings,
            processes=settings["processes"],
            user=current_user(),
        )
    except (jobs.JobRefused, NotAllowed) as exc:
        st.warning(f"Training did not start: {literal(exc)}.")
        return
    st.success(f"Training job #{job_id} started: run {literal(settings['name'])}.")


def import_model_ui() -> None:
    """A best_model.pth of the seed's EfficientNetV2 code, uploaded and made a run."""
    with st.expander("Import a model"):
        with st.form("import_model", clear_on_submit=True):
            upload = st.file_uploader(
                "The seed's best_model.pth",
                type=["pth", "pt"],
                key="import_file",
                help="A state dict that the seed's EfficientNetV2-S, -M or -L code trained on the "
                "grades 0-3. It becomes a run with the seed's own evaluation preprocessing "
                "(the centre square, mean = std = 0.5), ready to promote.",
            )
            name = st.text_input(
                "Name of the imported run", placeholder="empty: seed-<date and time>", key="import_name"
            )
            submitted = st.form_submit_button("Import")
        if not submitted:
            return
        if upload is None:
            st.warning("Choose a .pth file to import.")
            return
        try:
            with st.spinner(f"Importing {literal(upload.name)}…"):
                import_upload(workspace, current_user(), upload.name, upload.getvalue(), name.strip() or None)
        except (ImportRefused, WeightsMismatch, NotAllowed) as exc:
            st.error(f"{literal(upload.name)} was not imported: {literal(exc)}")
            return
        st.success(f"{literal(upload.name)} is a run now; promote it below to review its predictions.")


def curves_ui(epochs: pd.DataFrame, prefix: str) -> None:
    columns = st.columns(2)
    for n, figure in enumerate(curve_figures(epochs)):
        columns[n % 2].plotly_chart(figure, key=f"{prefix}_curve_{n}")


@st.fragment(run_every=2)
def training_ui() -> None:
    """The newest training job: progress, cancel, and its curves as epochs finish."""
    jobs.mark_dead_jobs(workspace.db_url)
    job = jobs.latest_job(workspace.db_url, "train")
    if job is None:
        return
    if job.status not in jobs.ACTIVE:
        if st.session_state.pop("watched_job", None) == job.id:
            st.rerun()  # it just ended: the whole page, so that the runs table shows it
        job_status_ui(job)  # a failed run's error and log tail stay until the next run
        return
    st.session_state["watched_job"] = job.id
    st.subheader("Training now")
    job_status_ui(job)
    if cancel_ui(job, "Cancel training", "cancel_training"):
        st.info("Cancelling: the run stops after the current batch.")
    epochs = epochs_frame(workspace.db_url, [job.run_id]) if job.run_id else pd.DataFrame()
    if epochs.empty:
        st.caption("The curves appear when the first epoch ends.")
    else:
        curves_ui(epochs, "live")


def promote_ui(runs: pd.DataFrame) -> None:
    names = {int(i): name for i, name in zip(runs["id"], runs["name"], strict=True)}
    ready = [int(i) for i in runs.loc[(runs["status"] == "done") & runs["checkpoint"].notna(), "id"]]
    if not ready:
        st.info("No finished run with a checkpoint yet: the active model is chosen among those.")
        return
    active = active_run_id(workspace.db_url)
    if current_user().is_admin:
        reset_on_new_options("promote_run", ready, ready[0])  # the newest: the one to promote
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        run_id = left.selectbox("Run to make active", ready, format_func=names.__getitem__, key="promote_run")
        if right.button("Promote", key="promote"):
            try:
                promote(workspace.db_url, run_id, current_user())
                active = run_id
            except (ValueError, NotAllowed) as exc:
                st.error(f"Cannot promote {literal(names[run_id])}: {literal(exc)}.")
    st.markdown(f"Active model: **{literal(names[active])}**" if active in names else "No active model yet.")
    history = promotions(workspace.db_url)
    if history:
        name, account, when = history[-1]
        st.caption(f"Last promotion: {literal(name)}, by {literal(account)}, {when:%Y-%m-%d %H:%M} UTC.")


def errors_ui(errors: list, run_id: int) -> None:
    st.markdown(f"**Misclassified validation images** ({len(errors)})")
    if not errors:
        st.info("Every validation image was graded right at this epoch.")
        return
    page_column, evidence_column = st.columns(2, vertical_alignment="bottom")
    page = page_column.number_input("Page", min_value=1, value=1, step=1, key=f"errors_page_{run_id}")
    evidence = evidence_column.toggle(
        "Grad-CAM of the predicted grade",
        key="errors_evidence",
        help="Where the model saw the grade it gave.",
    )
    model = explainer(run_checkpoint(workspace.db_url, run_id)) if evidence else None
    shown = errors[(page - 1) * ERRORS_PER_PAGE : page * ERRORS_PER_PAGE]
    if not shown:
        st.info(f"No images on this page: there are {-(-len(errors) // ERRORS_PER_PAGE)}.")
    for path, true, predicted in shown:
        image_pair_ui(
            path,
            f"{Path(path).name}: true {GRADE_NAMES[true]} → predicted {GRADE_NAMES[predicted]}",
            explain=(model, predicted) if model else None,
        )
    if shown:
        error_viewer_ui(shown, run_id, evidence)


def error_viewer_ui(shown: list, run_id: int, evidence: bool) -> None:
    """One image of the page at its native pixels, in the views a reviewer has."""
    names = {
        path: f"{Path(path).name}: true {true} → predicted {predicted}" for path, true, predicted in shown
    }
    path = st.selectbox(
        "Look closer", list(names), format_func=names.__getitem__, key=f"errors_viewer_{run_id}"
    )
    predicted = {p: g for p, _, g in shown}[path]
    grading_viewer(path, run_id, predicted if evidence else None, key="errors_viewer")


def calibration_ui(run_id: int) -> None:
    st.markdown("**Calibration**")
    calibration = run_calibration(workspace.db_url, run_id)
    if not calibration:
        st.info(
            "No calibration recorded for this run: it was trained before calibration was "
            "stored, or it is still training."
        )
        return
    st.markdown(" ".join(calibration_lines(calibration)))
    clipped = clipped_warning(calibration)
    if clipped:
        st.warning(clipped)
    before, after = (calibration.get(f"reliability_{when}") or [] for when in ("before", "after"))
    if before or after:
        st.plotly_chart(reliability_figure(before, after), key="reliability")
    else:
        st.caption("No reliability diagram: this run was calibrated before its confidence bins were stored.")


def best_epoch_ui(run_id: int, name: str) -> None:
    best = best_epoch(workspace.db_url, run_id)
    if best is None:
        st.info(f"{literal(name)} has no finished epoch yet.")
        return
    st.markdown(
        f"**{literal(name)}**, best epoch {best['epoch']}: val QWK {best['qwk']:.3f}, "
        f"accuracy {best['val_acc']:.1%}"
    )
    left, right = st.columns(2)
    left.plotly_chart(per_class_figure(best["precision"], best["recall"]), key="per_class")
    right.plotly_chart(confusion_figure(best["confusion"]), key="confusion")
    calibration_ui(run_id)
    screening_ui(run_id)
    errors_ui(best["errors"], run_id)


def compare_ui(runs: pd.DataFrame) -> None:
    trained = runs[runs["epochs_done"] > 0]
    if trained.empty:
        st.info("No run has finished an epoch yet: its curves appear here when one does.")
        return
    names = {int(i): name for i, name in zip(trained["id"], trained["name"], strict=True)}
    reset_on_new_options("compare_runs", list(names), list(names)[:3])
    chosen = st.multiselect("Compare runs", list(names), format_func=names.__getitem__, key="compare_runs")
    if not chosen:
        st.info("Choose one or more runs to compare their curves.")
        return
    curves_ui(epochs_frame(workspace.db_url, chosen), "compare")
    difference_ui(names, chosen)
    run_id = st.selectbox("Best epoch of", chosen, format_func=names.__getitem__, key="inspect_run")
    best_epoch_ui(run_id, names[run_id])


def runs_ui(runs: pd.DataFrame) -> None:
    st.subheader("Runs")
    promote_ui(runs)
    st.dataframe(runs_table(runs), hide_index=True)
    model_export_ui(runs)
    compare_ui(runs)


st.title("Retrain")
if current_user().is_admin:
    import_model_ui()  # before the runs are read, so that an imported run is listed at once
runs = runs_frame(workspace.db_url)
curated = curated_set(workspace.db_url)
validation = validation_size(workspace.db_url)
if curated.empty:
    next_step_info(
        "No labelled data yet: import a labelled training source and a validation "
        "source on the Dataset page, then train here.",
        "No labelled data yet: an admin imports a labelled training source and a validation source.",
    )
else:
    curated_ui(curated, validation)
    if not current_user().is_admin:
        st.caption("An admin starts training runs and promotes models.")
    elif validation:
        start_ui(set(runs["name"]))
    else:
        st.warning(
            "No validation source yet: every run is judged on one, so import a "
            "labelled validation source before training."
        )
training_ui()
if runs.empty:
    next_step_info(
        "No runs yet: start one above; its curves appear here epoch by epoch.",
        "No runs yet: once an admin starts one, its curves appear here epoch by epoch.",
    )
else:
    runs_ui(runs)
