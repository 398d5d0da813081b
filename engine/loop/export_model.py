"""A run's model for use outside the app: the weights, model.json beside them (everything
needed to feed the model and read its output) and MODEL_CARD.md, in a folder of their own.

    python -m engine.loop.export_model RUN --format onnx|safetensors --out DIR [--check-images N]

RUN is a run's name or id in the workspace's database. The Retrain page starts this as a job
(--job-id), into the workspace's export/<run>-<format> folder.

onnx: model.onnx takes the preprocessed batch ("image", N×3×S×S float32, normalised) and gives
"probabilities" (N×4): the test-time views the run was calibrated with, their averaging and
the temperature are inside the graph, so its output is what the app's inference stores, and
the run's operating point applies to it as it is. The export runs the file on onnxruntime
against PyTorch on N of the run's validation photographs (random tensors when none is readable
here) and keeps nothing if a probability differs by more than 1e-4 or a grade differs.

safetensors: model.safetensors is the timm model's state dict, which gives one view's logits;
model.json says how to rebuild the model and apply the views and the temperature.
"""

import argparse
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from torch import nn

from cli import HelpFormatter, setup_logging
from db.schema import Job
from db.session import migrate, read_scope
from engine.data.datasets import read_probabilities
from engine.model.networks import load_checkpoint
from engine.model.onnx_network import OPSET, to_onnx
from engine.model.predictor import (
    TTA_VIEWS,
    calibrated,
    dataset_for,
    mean_probability_logits,
    model_views,
    tta_logits,
    view_logits,
)
from engine.runtime.jobs import JobReporter
from engine.runtime.workspace import Workspace
from engine.training.model_card import (
    CARD,
    RunFacts,
    RunUnusable,
    model_card,
    preprocess_steps,
    run_facts,
    software,
    views_text,
)
from engine.training.screening import validation_file
from grades import GRADE_NAMES

log = logging.getLogger(__name__)

KIND = "export"  # the jobs table's kind of an export started by the app
WEIGHTS = {"onnx": "model.onnx", "safetensors": "model.safetensors"}
DESCRIPTION = "model.json"
INPUT, OUTPUT = "image", "probabilities"
TOLERANCE = 1e-4  # largest difference of a probability between onnxruntime and PyTorch
CHECK_IMAGES = 16
CHECK_BATCH = 4  # images per run of the check: 8 views of 4 images at 448 px fit any machine


class ExportRefused(ValueError):
    """The export cannot be made as asked; the message says why."""


class Graded(nn.Module):
    """The network with the app's test-time views and temperature: preprocessed images in,
    the calibrated class probabilities that inference stores (engine.model.predictor) out."""

    def __init__(self, model: nn.Module, views: int, temperature: float):
        super().__init__()
        self.model, self.views, self.temperature = model, views, temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # view_logits with the identity for a network gives the views themselves, in its order;
        # they go through the network as one batch, so the graph holds one copy of it.
        views = torch.cat(view_logits(lambda view: view, images, self.views))
        logits = self.model(views).reshape(self.views, images.shape[0], -1).transpose(0, 1)
        return torch.softmax(mean_probability_logits(logits) / self.temperature, dim=-1)


def write_onnx(model: nn.Module, meta: dict, path: Path) -> None:
    """The model with the checkpoint's views and temperature as an ONNX graph (batch size free)."""
    graded = Graded(model, model_views(meta), float(meta.get("temperature", 1.0)))
    to_onnx(graded, meta["image_size"], path, INPUT, OUTPUT)


@torch.no_grad()
def app_probabilities(model: nn.Module, meta: dict, images: torch.Tensor) -> np.ndarray:
    """What the app's inference stores for these preprocessed images, computed as
    predict_batches does (which turns the model to channels_last too)."""
    model = model.to(memory_format=torch.channels_last)
    images = images.to(memory_format=torch.channels_last)
    return calibrated(tta_logits(model, images, model_views(meta)), meta).numpy()


def check_onnx(path: Path, model: nn.Module, meta: dict, images: torch.Tensor) -> dict:
    """The ONNX file's probabilities on onnxruntime (CPU, float32) against the app's PyTorch
    ones for the same preprocessed `images`: the largest difference, and whether every
    grade (the most probable class) is the same."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_batches, want_batches = [], []
    for batch in images.split(CHECK_BATCH):
        got_batches.append(session.run([OUTPUT], {INPUT: batch.numpy()})[0])
        want_batches.append(app_probabilities(model, meta, batch))
    got, want = np.concatenate(got_batches), np.concatenate(want_batches)
    difference = float(np.abs(got - want).max())
    grades_agree = bool((got.argmax(1) == want.argmax(1)).all())
    return {
        "images": len(images),
        "max_abs_difference": difference,
        "grades_agree": grades_agree,
        "passed": grades_agree and difference <= TOLERANCE,
        "tolerance": TOLERANCE,
        "runtime": f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, float32",
    }


def check_inputs(facts: RunFacts, count: int) -> tuple[torch.Tensor, str]:
    """`count` of the run's validation photographs, preprocessed as the app does, and what
    they are; seeded random tensors when none is readable here (an imported model, another
    machine)."""
    path = validation_file(facts.checkpoint)
    samples = read_probabilities(path)[0] if path else []
    dataset = dataset_for(facts.meta, samples, None)
    images = []
    for index in range(len(dataset)):
        image = dataset[index][0]  # None for a photograph that cannot be read here
        if image is not None:
            images.append(image)
        if len(images) == count:
            return torch.stack(images), "validation photographs of the run"
    if images:
        return torch.stack(images), "validation photographs of the run (all it has here)"
    size = facts.meta["image_size"]
    noise = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    return noise, "random tensors (none of the run's validation photographs is readable here)"


def write_safetensors(model: nn.Module, path: Path) -> dict:
    """The model's state dict as safetensors, read back and compared tensor by tensor."""
    state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    back = load_file(str(path))
    identical = back.keys() == state.keys() and all(
        back[key].dtype == tensor.dtype and torch.equal(back[key], tensor) for key, tensor in state.items()
    )
    return {"tensors": len(state), "identical": identical, "passed": identical}


def description(facts: RunFacts, fmt: str, check: dict | None, environment: dict) -> dict:
    """model.json: what a program outside the app needs to feed the model and read it."""
    meta, size, views = facts.meta, facts.meta["image_size"], facts.views
    members = meta.get("members", 1)
    in_graph = fmt == "onnx"
    screening = facts.screening
    if in_graph:
        output = {
            "name": OUTPUT,
            "shape": ["batch", len(meta["classes"])],
            "kind": "probabilities",
            "meaning": "calibrated class probabilities: the test-time views and the "
            "temperature are applied inside the graph",
        }
    elif members > 1:
        output = {
            "kind": "logits",
            "shape": ["batch", len(meta["classes"])],
            "meaning": f"{members} models, the weights of model i under 'members.<i>.': each "
            "one's logits come from timm.create_model(architecture.timm_model, num_classes, "
            "**model_args) with its weights; apply the test-time views and the temperature as "
            "test_time_views says",
        }
    else:
        output = {
            "kind": "logits",
            "shape": ["batch", len(meta["classes"])],
            "meaning": "one view's logits of timm.create_model(architecture.timm_model, "
            "num_classes, **model_args) with these weights; apply the "
            "test-time views and the temperature as test_time_views says",
        }
    return {
        "format": fmt,
        "files": {"weights": WEIGHTS[fmt], "card": CARD},
        "run": {"id": facts.id, "name": facts.name, "checkpoint": str(facts.checkpoint)},
        "architecture": {
            "timm_model": meta["model_name"],
            "model_args": meta.get("model_args", {}),
            "num_classes": len(meta["classes"]),
            "members": members,
        },
        "classes": [
            {"index": i, "grade": grade, "name": GRADE_NAMES[grade].split(" · ", 1)[-1]}
            for i, grade in enumerate(meta["classes"])
        ],
        "input": {
            "name": INPUT if in_graph else None,
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW, RGB",
            "size": size,
            "mean": meta["mean"],
            "std": meta["std"],
            "normalisation": "pixel / 255, then (x - mean) / std per channel",
        },
        "preprocessing": {
            "settings": meta["preprocess"],
            "steps": preprocess_steps(meta),
            "reference": "engine/data/preprocess.py (preprocess_file) and "
            "engine/data/datasets.py (FundusDataset) of the app",
        },
        "test_time_views": {
            "count": views,
            "views": list(TTA_VIEWS[views]),
            "in_graph": in_graph,
            "how": "8 views: x rotated by k quarter turns, torch.rot90(x, k, dims=(2, 3)) "
            "for k = 0-3, each followed by its mirror x.flip(3); 2 views: x and "
            "x.flip(3); the average does not depend on the order",
            "combine": f"{views_text(views)}: p = softmax(log(mean over "
            f"{'members and ' if members > 1 else ''}views of softmax(logits)) / temperature)",
        },
        "temperature": facts.temperature,
        "output": output,
        "grade": "the class of the highest probability",
        "operating_point": {
            "referable": "grade 2 or above (refer to an ophthalmologist)",
            "score": "P(grade 2) + P(grade 3) of the calibrated, view-averaged probabilities",
            "threshold": screening["threshold"],
            "target_sensitivity": screening.get("target_sensitivity"),
            "validation_images": screening.get("images"),
            "sensitivity": screening.get("sensitivity"),
            "specificity": screening.get("specificity"),
        }
        if screening
        else None,
        "exported": {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "opset": OPSET if in_graph else None,
            **environment,
        },
        "check": check,
    }


def prepare_folder(out: Path) -> None:
    """`ExportRefused` unless `out` is a folder to be made or an empty one."""
    if out.exists() and not out.is_dir():
        raise ExportRefused(f"{out} is a file; --out names the folder the export makes")
    if out.is_dir() and any(out.iterdir()):
        raise ExportRefused(f"{out} holds files already; an export needs a new or empty folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportRefused(f"cannot make {out}: {exc}") from None


def export_run(
    db_url: str,
    run: str | int,
    fmt: str,
    out: Path,
    check_images: int = CHECK_IMAGES,
    progress: Callable[[float, str], None] = lambda fraction, message: None,
) -> dict:
    """Export the run named or numbered `run` as `fmt` (onnx or safetensors) into the new
    folder `out`, with model.json and MODEL_CARD.md; model.json's content. Nothing is left in
    `out` when it fails: `RunUnusable` or `ExportRefused` say why. `check_images`: how many
    photographs the ONNX check runs (0: none); `progress(fraction, message)` hears each step."""
    if fmt not in WEIGHTS:
        raise ExportRefused(f"format {fmt!r}: choose {' or '.join(WEIGHTS)}")
    out = Path(out)
    prepare_folder(out)
    facts = run_facts(db_url, run)
    progress(0.0, f"exporting run {facts.name} as {fmt}")
    model, meta = load_checkpoint(facts.checkpoint)
    # Built beside `out` and renamed into place: a failed export leaves no half of one.
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    staging.chmod(0o755)  # mkdtemp makes a private folder; an export is for sharing
    try:
        weights = staging / WEIGHTS[fmt]
        if fmt == "onnx":
            write_onnx(model, meta, weights)
            check = None
            if check_images > 0:
                images, inputs = check_inputs(facts, check_images)
                progress(0.6, f"checking on {len(images)} {inputs}")
                check = {**check_onnx(weights, model, meta, images), "inputs": inputs}
        else:
            check = write_safetensors(model, weights)
        if check and not check["passed"]:
            raise ExportRefused(f"the exported {fmt} model does not reproduce the run's: {check}")
        environment = software()
        text = description(facts, fmt, check, environment)
        (staging / DESCRIPTION).write_text(json.dumps(text, indent=2, ensure_ascii=False))
        (staging / CARD).write_text(model_card(facts, environment))
        if out.is_dir():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(1.0, f"done: {out}")
    return text


def check_line(about: dict) -> str:
    """What the check of an export (model.json's content `about`) found, in words."""
    check = about["check"]
    if check is None:
        return "not checked"
    if about["format"] == "onnx":
        return (
            f"onnxruntime against PyTorch on {check['images']} {check['inputs']}: largest "
            f"probability difference {check['max_abs_difference']:.1e}, the same grades"
        )
    return f"{check['tensors']} tensors read back identical"


def export_folder(workspace: Workspace, run_name: str, fmt: str) -> Path:
    """A new folder for an export that the app starts: export/<run>-<format> in the
    workspace, the time added when an earlier export holds that name (it is kept)."""
    # A run imported from a file is named after it: keep the name to one safe folder name.
    stem = re.sub(r"[^\w.-]", "_", run_name, flags=re.ASCII).lstrip(".") or "run"
    folder = workspace.root / "export" / f"{stem}-{fmt}"
    if folder.exists():
        folder = folder.with_name(f"{folder.name}-{datetime.now():%Y%m%d-%H%M%S}")
    return folder


def latest_export(db_url: str, run_id: int) -> Job | None:
    """The newest export job of the run (the app records the run in the job's params)."""
    with read_scope(db_url) as session:
        exports = session.scalars(select(Job).where(Job.kind == KIND).order_by(Job.id.desc()))
        return next((job for job in exports if job.params.get("run") == run_id), None)


def zipped(folder: Path) -> bytes:
    """The export folder as a zip archive, its files under the folder's name."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{folder.name}/{path.name}")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.loop.export_model", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("run", help="the run's name or id")
    parser.add_argument(
        "--format",
        choices=tuple(WEIGHTS),
        required=True,
        help="onnx: the graph with views and temperature; safetensors: the weights",
    )
    parser.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    parser.add_argument(
        "--check-images",
        type=int,
        default=CHECK_IMAGES,
        help="validation photographs to run ONNX against PyTorch on (0: none)",
    )
    parser.add_argument("--job-id", type=int, help="report to this job row (set by the app)")
    args = parser.parse_args(argv)
    setup_logging()
    workspace = Workspace.from_env()
    migrate(workspace.db_url)
    try:
        with JobReporter(workspace.db_url, args.job_id) as job:
            # A few steps, each recorded: none is dropped as too soon after the last.
            text = export_run(
                workspace.db_url,
                args.run,
                args.format,
                args.out,
                args.check_images,
                partial(job.progress, force=True),
            )
            print(
                f"run {text['run']['name']} exported to {args.out}: "
                f"{text['files']['weights']}, {DESCRIPTION}, {CARD}; {check_line(text)}"
            )
    except (RunUnusable, ExportRefused) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
