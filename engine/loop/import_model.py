"""Import a model that the seed's EfficientNetV2 code trained (its `best_model.pth`: a state dict
with keys stem.*, blocks.N.*, head.*) as a run of the workspace, ready to be promoted.

    python -m engine.loop.import_model FILE [--name NAME] [--classes 4] [--eval-size PX]

The run's checkpoint (workspace/weights/<name>/best.pth) holds timm's tf_efficientnetv2_s/m/l
with the seed's symmetric padding and the seed's evaluation preprocessing: the shorter side
scaled to the eval size (S 384, M and L 480) and the centre square kept, no crop to the eye, no
enhancement, mean = std = 0.5. Inference, review and Grad-CAM use it as they use a trained run.
"""

import argparse
import logging
import shutil
import sys
from pathlib import Path

from cli import HelpFormatter, setup_logging
from db.schema import Run
from db.session import migrate, read_scope, session_scope
from db.users import User, require_admin
from engine.data.preprocess import PreprocessConfig
from engine.model.infer import register_model
from engine.model.networks import (
    NUM_CLASSES,
    WeightsMismatch,
    create_model,
    read_weight_file,
    save_checkpoint,
    timm_state_of_seed,
)
from engine.model.seed_weights import (
    SEED_MEAN_STD,
    SEED_MODEL_ARGS,
    SEED_MODELS,
    is_seed_state_dict,
    seed_classes,
    seed_model_name,
)
from engine.runtime.workspace import Workspace
from engine.training.train import run_name_problem, run_taken
from engine.training.trainer import RunPaths, run_name

log = logging.getLogger(__name__)


class ImportRefused(ValueError):
    """The file cannot become a run; the message says why, naming the file."""


def seed_meta(model_name: str, eval_size: int, name: str, file: Path, classes: int) -> dict:
    """Checkpoint meta of a seed model: how the seed's predict.py fed it images."""
    seed_name, train_size, _ = SEED_MODELS[model_name]
    preprocess = PreprocessConfig(size=eval_size, crop=False, enhance=False, mask=False, center_crop=True)
    return {
        "model_name": model_name,
        "model_args": SEED_MODEL_ARGS,
        "image_size": eval_size,
        "train_size": train_size,
        "mean": list(SEED_MEAN_STD),
        "std": list(SEED_MEAN_STD),
        "preprocess": preprocess.to_dict(),
        "classes": list(range(classes)),
        "run": name,
        "train_config": {
            "imported_from": str(file),
            "seed_model": seed_name,
            "img_size": train_size,
            "eval_size": eval_size,
        },
    }


def import_seed_model(
    workspace: Workspace,
    file: Path,
    name: str | None = None,
    classes: int = NUM_CLASSES,
    eval_size: int | None = None,
    account: str | None = None,
) -> int:
    """The id of a new run holding the seed model in `file`, imported by `account` (None: from
    a terminal); `ImportRefused` (or `WeightsMismatch`, naming the first tensor that does not
    line up) says why not."""
    file = Path(file)
    if not file.is_file():
        raise ImportRefused(f"{file}: no such file")
    if classes != NUM_CLASSES:
        raise ImportRefused(f"the app grades {NUM_CLASSES} classes (Messidor 0-3), not {classes}")
    if eval_size is not None and not 32 <= eval_size <= 2048:
        raise ImportRefused(f"image size {eval_size} px is outside 32-2048")
    state = read_weight_file(file)
    if not is_seed_state_dict(state):
        first = next(iter(state), "nothing")
        raise ImportRefused(
            f"{file} is not a state dict of the seed's EfficientNetV2 (keys "
            f"stem.*, blocks.N.*, head.*; it starts with {first})"
        )
    outputs = seed_classes(state)
    if outputs != classes:
        raise ImportRefused(f"{file}: the classifier (head.classifier) has {outputs} outputs, not {classes}")
    model_name = seed_model_name(state)
    mapped = timm_state_of_seed(file, state, model_name)
    name = name or f"seed-{run_name()}"
    check_new_run_name(workspace, name)
    paths = RunPaths.under(workspace, name)
    model = create_model(model_name, num_classes=classes, **SEED_MODEL_ARGS)
    model.load_state_dict(mapped, strict=False)  # all but the BatchNorm counters
    meta = seed_meta(model_name, eval_size or SEED_MODELS[model_name][2], name, file, classes)
    save_checkpoint(paths.best, model, meta)
    run_id = register_model(workspace.db_url, paths.best, meta)
    with session_scope(workspace.db_url) as session:
        session.get_one(Run, run_id).account = account
    return run_id


def check_new_run_name(workspace: Workspace, name: str) -> None:
    """`ImportRefused` unless `name` can name a new run: a folder name no run holds yet."""
    problem = run_name_problem(name)
    if problem:
        raise ImportRefused(problem)
    if run_taken(workspace.db_url, RunPaths.under(workspace, name)):
        raise ImportRefused(f"a run named {name!r} exists already; choose another name")


def import_upload(
    workspace: Workspace, user: User, filename: str, data: bytes, name: str | None = None
) -> int:
    """import_seed_model of a file that `user`, an admin, uploaded from the browser, kept as
    workspace/uploads/<run>/<filename> (and removed again when it is refused)."""
    require_admin(workspace.db_url, user, "import a model")
    name = name or f"seed-{run_name()}"
    check_new_run_name(workspace, name)
    folder = workspace.root / "uploads" / name
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / (Path(filename).name or "upload.pth")
    file.write_bytes(data)
    try:
        return import_seed_model(workspace, file, name, account=user.name)
    except BaseException:
        shutil.rmtree(folder)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.loop.import_model", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("file", type=Path, help="the seed's best_model.pth (a state dict)")
    parser.add_argument("--name", help="run name (default: seed-<date and time>)")
    parser.add_argument(
        "--classes",
        type=int,
        default=NUM_CLASSES,
        help="the classes the model was trained on (the grades 0-3)",
    )
    parser.add_argument(
        "--eval-size", type=int, help="image size (default: the seed's evaluation size, S 384, M and L 480)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    workspace = Workspace.from_env()
    workspace.root.mkdir(parents=True, exist_ok=True)
    migrate(workspace.db_url)
    try:
        run_id = import_seed_model(workspace, args.file, args.name, args.classes, args.eval_size)
    except (ImportRefused, WeightsMismatch) as exc:
        log.error("not imported: %s", exc)
        return 2
    with read_scope(workspace.db_url) as session:
        run = session.get_one(Run, run_id)
        then = " (active)" if run.active else "; promote it on the Retrain page"
        print(
            f"imported {args.file} as run {run.name} ({run.model_name}, {run.img_size} px): "
            f"{run.checkpoint}{then}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
