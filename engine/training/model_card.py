"""A run as a model card: what the model is for, what it learned from, how well it did on
validation (with intervals), its calibration and operating point, how it takes its input,
where and how long it trained, and what it is not validated for.

    python -m engine.training.model_card RUN        (a run's name or id; writes MODEL_CARD.md beside
                                            its checkpoint)

engine.loop.export_model writes the same card into every export.
"""

import argparse
import contextlib
import importlib.metadata
import json
import logging
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from sqlalchemy import select

from cli import HelpFormatter, setup_logging
from db.runs import best_epoch, run_calibration
from db.schema import Image, Run, Source
from db.session import migrate, read_scope
from engine.data.datasets import read_manifest
from engine.model.predictor import TTA_VIEWS, model_views
from engine.runtime.markdown import literal
from engine.runtime.workspace import Workspace
from engine.training.refit import VALIDATION
from grades import GRADE_NAMES, GRADES, REVIEW_THRESHOLD

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CARD = "MODEL_CARD.md"
MANIFEST = "samples.csv"  # trainer.RunPaths.manifest
# Backslash before ASCII punctuation: CommonMark shows the mark as it is, and Streamlit's own
# markdown ($ math, :colour[...], :emoji:) starts at one of them too. Spared, so that names and
# paths stay legible in the file: - . , / which mark nothing inside a line, and a name in the
# card never starts one.
PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "opencv-python-headless",
    "safetensors",
    "onnx",
    "onnxscript",
    "onnxruntime",
)


class RunUnusable(ValueError):
    """The run cannot be described or exported (unknown, or without a checkpoint); the
    message says why."""


@dataclass
class DataRow:
    """The images of one source on one side of the run's split."""

    source: str
    split: str  # training or validation
    grades: list[int]  # images per grade 0-3
    reviewed: int  # of them, pseudo-labels that a reviewer accepted or corrected


@dataclass
class RunFacts:
    """Everything the card and an export say about a run, read once."""

    id: int
    name: str
    checkpoint: Path
    meta: dict  # the checkpoint's: model, sizes, normalisation, preprocessing, temperature
    config: dict  # what the run recorded: TrainConfig's fields (or an import's record)
    calibration: dict  # temperature, ECE, the operating point ("screening"); {} if never validated
    best: dict | None  # the kept epoch's validation figures (db.runs.best_epoch)
    data: list[DataRow]  # empty when the run recorded no samples (a model imported from a file)
    started: datetime
    finished: datetime | None

    @property
    def views(self) -> int:
        return model_views(self.meta)

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))

    @property
    def screening(self) -> dict:
        """The operating point as the database holds it (an admin may have chosen another
        since training); {} for a run without one."""
        return self.calibration.get("screening") or {}

    @property
    def imported(self) -> bool:
        return "imported_from" in self.config


def find_run(db_url: str, run: str | int) -> Run:
    """The run named `run`, or numbered so; `RunUnusable` naming the runs there are."""
    with read_scope(db_url) as session:
        found = session.scalar(select(Run).where(Run.name == str(run)))
        if found is None and str(run).isdigit():
            found = session.get(Run, int(run))
        if found is None:
            names = ", ".join(session.scalars(select(Run.name).order_by(Run.id))) or "none yet"
            raise RunUnusable(f"no run named or numbered {run!r} (runs: {names})")
        return found


def run_facts(db_url: str, run: str | int) -> RunFacts:
    """The facts of the run named or numbered `run`; `RunUnusable` for an unknown run and for
    one without a readable checkpoint (still training, failed, or its file gone)."""
    row = find_run(db_url, run)
    if row.checkpoint is None:
        raise RunUnusable(f"run {row.name} has no checkpoint (status: {row.status})")
    checkpoint = Path(row.checkpoint)
    if not checkpoint.is_file():
        raise RunUnusable(f"run {row.name}: its checkpoint {checkpoint} is not there")
    try:  # mmap: only the meta is read here, not the weights
        meta = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["meta"]
    except Exception as exc:  # zip, pickle and key errors each raise their own
        raise RunUnusable(f"run {row.name}: {checkpoint} cannot be read ({exc})") from None
    if not isinstance(meta, dict) or "model_name" not in meta:
        raise RunUnusable(f"run {row.name}: {checkpoint} is not a checkpoint of this app")
    return RunFacts(
        row.id,
        row.name,
        checkpoint,
        meta,
        row.config or {},
        run_calibration(db_url, row.id),
        best_epoch(db_url, row.id),
        training_data(db_url, checkpoint),
        row.created_at,
        row.finished_at,
    )


def manifest_file(checkpoint: Path) -> Path | None:
    """The run's samples.csv that holds its split: its validation phase's when the model was
    refitted on every image (engine.training.refit), else its own; None for an imported model."""
    for path in (checkpoint.parent / VALIDATION / MANIFEST, checkpoint.parent / MANIFEST):
        if path.is_file():
            return path
    return None


def training_data(db_url: str, checkpoint: Path) -> list[DataRow]:
    """The run's images per source and side of its split: sources by the database for the
    images it holds, else (class folders given on the command line) the folder above the
    grade folders."""
    manifest = manifest_file(checkpoint)
    if manifest is None:
        return []
    train, val = read_manifest(manifest)
    ids = [s.image_id for s in train + val if s.image_id is not None]
    known: dict[int, tuple[str, bool]] = {}
    with read_scope(db_url) as session:
        for start in range(0, len(ids), 500):  # under every database's limit of parameters
            known.update(
                (i, (name, ungraded))
                for i, name, ungraded in session.execute(
                    select(Image.id, Source.name, Image.grade.is_(None))
                    .join(Source)
                    .where(Image.id.in_(ids[start : start + 500]))
                )
            )
    rows: dict[tuple[str, str], DataRow] = {}
    for split, samples in (("training", train), ("validation", val)):
        for s in samples:
            # An image without an expert grade reached training through a review.
            folder = (str(Path(s.path).parent.parent), False)
            source, reviewed = folder if s.image_id is None else known.get(s.image_id, folder)
            row = rows.setdefault((source, split), DataRow(source, split, [0] * len(GRADES), 0))
            assert s.grade is not None  # read_manifest gives every sample its grade
            row.grades[s.grade] += 1
            row.reviewed += reviewed
    return list(rows.values())


def software() -> dict:
    """The versions of the libraries installed now and the code's commit."""
    versions = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {"versions": versions, "commit": commit()}


def commit() -> str:
    """The repository's commit, marked when the working tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{head} with uncommitted changes" if changed else head


# -- words shared by the card and the export's JSON ---------------------------------------------


def preprocess_steps(meta: dict) -> list[str]:
    """How a photograph becomes the model's input, step by step."""
    prep, size = meta["preprocess"], meta["image_size"]
    steps = ["decode the photograph as RGB (8 bits per channel)"]
    if prep.get("crop", True):
        steps.append(
            "crop to the square around the round eye field (found by its brightness "
            "above the black background), padding with black where the field is cut"
        )
    elif prep.get("center_crop"):
        steps.append("scale the shorter side to the size and keep the centre square")
    steps.append(
        f"resize to {prep['size']}×{prep['size']} px (area interpolation when "
        "shrinking, bilinear when enlarging)"
    )
    if prep.get("enhance", True):
        steps.append(
            "Ben Graham's local contrast enhancement: 4 × image − 4 × Gaussian blur "
            "(sigma = radius / 30) + 128"
        )
    if prep.get("mask", True):
        steps.append("set everything outside a circle of 0.9 × the field's radius to grey 128")
    if prep["size"] != size:
        steps.append(f"resize to {size}×{size} px (antialiased)")
    steps.append(
        f"scale to 0-1 (÷ 255), subtract mean {fmt_list(meta['mean'])} and divide by "
        f"std {fmt_list(meta['std'])} per channel; NCHW float32"
    )
    return steps


def views_text(views: int) -> str:
    if views == 1:
        return "one view (the image as it is)"
    return (
        f"{views} views ({'; '.join(TTA_VIEWS[views])}), combined as the mean of their softmax probabilities"
    )


def fmt_list(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def figure(entry: dict | None) -> str:
    """A figure with its 95 % interval: 0.812 [0.760, 0.850]."""
    if not entry:
        return "–"
    low, high = entry["interval"]
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


# -- the card -----------------------------------------------------------------------------------


def model_card(facts: RunFacts, environment: dict | None = None) -> str:
    """The model card of a run, as Markdown; `environment`: software() (read now if None)."""
    environment = environment or software()
    sections = [
        f"# Model card: {literal(facts.name)}",
        f"Run {facts.id} of the DR grading app: `{facts.meta['model_name']}` grading colour "
        f"fundus photographs on the Messidor scale 0-3 ({', '.join(GRADE_NAMES.values())}).",
        _intended_use(),
        _data(facts),
        _metrics(facts),
        _calibration(facts),
        _operating_point(facts),
        _preprocessing(facts),
        _training(facts),
        _software(environment),
        _limits(facts),
    ]
    return "\n\n".join(sections) + "\n"


def _intended_use() -> str:
    return (
        "## Intended use\n\n"
        "Research, and curating labels: the model proposes grades that people review, "
        "accept or correct before they train anything. It is **not a medical device**: it "
        "has not been cleared or validated for diagnosis, screening or treatment decisions, "
        "and no grade it gives replaces an ophthalmologist's or a trained grader's."
    )


def _data(facts: RunFacts) -> str:
    head = "## Training data\n\n"
    if not facts.data:
        origin = f" (imported from {literal(facts.config['imported_from'])})" if facts.imported else ""
        return head + f"Not recorded: no samples.csv beside the checkpoint{origin}."
    refit, folds = facts.config.get("refit"), facts.config.get("folds", 1)
    if folds > 1:
        said = (
            f"The images by source, with images per grade. The run's {folds} models learned "
            f"from them by folds by person (`--folds {folds}`): each image trained {folds - 1} "
            "of the models and was graded by the one that did not learn it, and those "
            "out-of-fold grades are the validation figures below."
        )
    else:
        said = (
            "The split by source, with images per grade. The validation images are the yardstick below; "
            + (
                "the run's final model then learned from the training and validation "
                "images together (`--refit`), so no held-out figures exist for it."
                if refit
                else "the model did not learn from them."
            )
        )
    lines = [
        head + said,
        "",
        "| source | split | images | "
        + " | ".join(f"grade {g}" for g in GRADES)
        + " | reviewed pseudo-labels |",
        "|---|---|---|" + "---|" * len(GRADES) + "---|",
    ]
    for row in facts.data:
        lines.append(
            f"| {literal(row.source)} | {row.split} | {sum(row.grades)} | "
            + " | ".join(str(n) for n in row.grades)
            + f" | {row.reviewed} |"
        )
    totals: Counter[str] = Counter()
    for row in facts.data:
        totals[row.split] += sum(row.grades)
    lines += [
        "",
        f"In all: {totals['training']} images in {folds} folds. A person's images (patient ids, "
        "or both eyes of an exam) are all in one fold."
        if folds > 1
        else f"In all: {totals['training']} training and {totals['validation']} validation "
        "images. People (patient ids, or both eyes of an exam) are never on both sides.",
    ]
    return "\n".join(lines)


def _metrics(facts: RunFacts) -> str:
    head = "## Validation figures\n\n"
    screening = facts.screening
    if not screening and not facts.best:
        return head + "None: the run was never validated in this app."
    folds = facts.config.get("folds", 1)
    whose = (
        f"each graded by the one of the run's {folds} models that did not learn it (out of "
        "fold; the run's model averages all of them)"
        if folds > 1
        else "the validation phase's model (trained on the training split alone; the final "
        "model took its temperature and operating point)"
        if facts.config.get("refit")
        else "the run's model"
    )
    lines = [
        head + f"On the validation images, of {whose}. Intervals are 95 % bootstrap "
        "intervals over people (1,000 resamples); sensitivity and specificity are "
        "cross-fitted: each half of the people judged at the point chosen on the other."
    ]
    if screening:
        lines += [
            "",
            "| figure | value [95 %] |",
            "|---|---|",
            f"| images | {screening['images']} |",
            f"| quadratic weighted kappa | {figure(screening.get('qwk'))} |",
            f"| referable DR (grade ≥ 2) AUC | {figure(screening.get('referable_auc'))} |",
            f"| sensitivity at the operating point | {figure(screening.get('sensitivity'))} |",
            f"| specificity at the operating point | {figure(screening.get('specificity'))} |",
        ]
    if facts.best:
        best = facts.best
        lines += [
            "",
            f"Kept epoch {best['epoch']}: QWK {best['qwk']:.3f}, accuracy "
            f"{best['val_acc']:.3f} (on at most 2 views, as each epoch validates).",
            "",
            "| grade | precision | recall |",
            "|---|---|---|",
        ]
        lines += [
            f"| {GRADE_NAMES[g]} | {p:.3f} | {r:.3f} |"
            for g, p, r in zip(GRADES, best["precision"], best["recall"], strict=True)
        ]
    return "\n".join(lines)


def _calibration(facts: RunFacts) -> str:
    head = "## Calibration\n\n"
    cal = facts.calibration
    if "ece_before" not in cal:
        return head + (
            f"Temperature {facts.temperature:.3f}; not fitted in this app (no "
            "validation here), so the probabilities are the network's own."
        )
    lines = [
        head + f"Temperature scaling: the logits are divided by T = {facts.temperature:.3f}, "
        f"fitted on the {cal['images']} validation images (judged cross-fitted: each half "
        "calibrated with the T of the other)."
    ]
    if cal.get("bounded"):
        lines.append(
            "**T reached its bound (0.25 or 4)**: the validation set is too small or "
            "the model had not learned; treat the probabilities with care."
        )
    lines += [
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| expected calibration error | {cal['ece_before']:.4f} | {cal['ece_after']:.4f} |",
        f"| negative log-likelihood | {cal['nll_before']:.4f} | {cal['nll_after']:.4f} |",
    ]
    if "confident" in cal:
        threshold, confident = cal.get("threshold", REVIEW_THRESHOLD), cal["confident"]
        right = (
            f", {cal['confident_right']} of them right ({cal['confident_right'] / confident:.1%})"
            if confident
            else ""
        )
        lines += [
            "",
            f"At a confidence of {threshold:.2f} or more (the review threshold): "
            f"{confident} of {cal['images']} validation images{right}.",
        ]
    return "\n".join(lines)


def _operating_point(facts: RunFacts) -> str:
    head = "## Operating point\n\n"
    screening = facts.screening
    if not screening:
        return head + "None chosen: the run has no validation probabilities in this app."
    return head + (
        f"Referable DR (grade 2 or above: refer to an ophthalmologist) when P(grade 2) + "
        f"P(grade 3) ≥ **{screening['threshold']:.4f}**, on the calibrated probabilities "
        f"averaged over the test-time views. Chosen on the validation probabilities as the "
        f"most specific threshold that keeps a sensitivity of "
        f"{screening.get('target_sensitivity', float('nan')):.0%}: sensitivity "
        f"{figure(screening.get('sensitivity'))}, specificity "
        f"{figure(screening.get('specificity'))} (cross-fitted, 95 % intervals by person)."
    )


def _preprocessing(facts: RunFacts) -> str:
    meta = facts.meta
    steps = "\n".join(f"{n}. {step}" for n, step in enumerate(preprocess_steps(meta), 1))
    return (
        "## Input and preprocessing\n\n"
        f"One colour fundus photograph, {meta['image_size']}×{meta['image_size']} px at "
        f"the network (settings `{json.dumps(meta['preprocess'])}`):\n\n{steps}\n\n"
        f"Test-time views: {views_text(facts.views)}. The class probabilities are "
        f"softmax(log(mean of the views' probabilities) / {facts.temperature:.4f}); the "
        "grade is the most probable class."
    )


def _training(facts: RunFacts) -> str:
    config = facts.config
    if facts.imported:
        return (
            "## Training\n\n"
            f"Trained outside this app; imported from {literal(config['imported_from'])} on "
            f"{facts.started:%Y-%m-%d %H:%M} UTC."
        )
    # A run trained --from-db has its row from start to finish; one trained from class
    # folders got its row when first used, so its times say nothing of the training.
    took = (
        f"{(facts.finished - facts.started).total_seconds() / 60:.1f} minutes from start "
        "to finish (preparing the images, every phase and the calibration), started "
        f"{facts.started:%Y-%m-%d %H:%M} UTC"
        if "train_counts" in config and facts.finished
        else "minutes not recorded (trained outside the database, registered when first used)"
    )
    budget = f", a budget of {config['minutes']:g} minutes" if config.get("minutes") else ""
    precision = "bfloat16 autocast" if config.get("bf16") or "cuda" in config.get("device", "") else "float32"
    recipe = ", ".join(
        f"{key} {config[key]}"
        for key in (
            "optimizer",
            "lr",
            "batch_size",
            "balance",
            "loss",
            "augment",
            "freeze_stages",
            "select",
            "seed",
        )
        if key in config
    )
    return (
        "## Training\n\n"
        f"Device `{config.get('device', 'not recorded')}`, {precision}; epochs: "
        f"{config.get('epochs', '?')} at {config.get('img_size', '?')} px{budget}; "
        f"{took}. Recipe: {recipe}. Start: {_start(config.get('pretrained'))}."
    )


def _start(pretrained: bool | str | None) -> str:
    if pretrained is True:
        return "ImageNet weights (found offline)"
    return f"the weight file {literal(pretrained)}" if pretrained else "random weights"


def _software(environment: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in environment["versions"].items())
    return (
        "## Software\n\n"
        f"When this card was written: {versions}; commit {environment['commit']}. The run "
        "itself does not record the versions it trained with."
    )


def _limits(facts: RunFacts) -> str:
    device = facts.config.get("device")
    where = (
        "this one trained on a CPU too"
        if device == "cpu"
        else f"this one trained on `{device}`, where no real-photograph figures have been measured"
        if device
        else "where this one trained is not recorded"
    )
    limits = [
        "Validated on CPU-trained models only: the recipe's defaults were chosen on models "
        f"trained on a CPU (bench.realdata); {where}.",
        "The figures above come from this run's validation images and no others: photographs "
        "of other cameras, populations or image quality may fare worse.",
        "Grades are Messidor's 0-3: grade 3 merges ICDR severe and proliferative DR, and many "
        "microaneurysms or haemorrhages alone make a 3. Macular edema is not graded, and image "
        "quality is not judged: an ungradable photograph still gets a grade.",
        "The ONNX export is checked against PyTorch in float32 on a CPU (onnxruntime's CPU "
        "provider); other providers and half precision are not checked.",
    ]
    if facts.config.get("folds", 1) > 1:
        limits.append(
            "The temperature and operating point were fitted on the out-of-fold grades of the "
            "single models; the run's model averages their probabilities, which are then a "
            "little less extreme than one model's."
        )
    elif facts.config.get("refit"):
        limits.append(
            "The temperature and operating point were fitted on the validation "
            "phase's model and carried over to the final model, which learned more "
            "images: on real photographs such a point flagged more images than "
            "intended (README, 'Real photographs: the benchmark')."
        )
    if facts.imported or not facts.screening:
        limits.append(
            "No validation in this app: no figures, temperature or operating point "
            "of its own until it is judged here."
        )
    return "## Known limits\n\n" + "\n".join(f"- {limit}" for limit in limits)


def write_model_card(
    db_url: str, run: str | int, folder: Path | None = None, facts: RunFacts | None = None
) -> Path:
    """Write the run's MODEL_CARD.md into `folder` (default: beside its checkpoint); its path.
    `facts`: those of `run`, when the caller has read them already."""
    facts = facts or run_facts(db_url, run)
    path = Path(folder or facts.checkpoint.parent) / CARD
    path.write_text(model_card(facts))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.training.model_card", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("run", help="the run's name or id")
    args = parser.parse_args(argv)
    setup_logging()
    workspace = Workspace.from_env()
    migrate(workspace.db_url)
    try:
        print(write_model_card(workspace.db_url, args.run))
    except RunUnusable as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
