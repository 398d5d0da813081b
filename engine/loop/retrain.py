"""What the Retrain page computes: the curated set's make-up, the training job's arguments
from the form's settings, and the table that compares runs. Plain data in, plain data out."""

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from engine.data.balance import every_grade
from engine.model.networks import LITE_PACKAGES
from engine.runtime.distributed import local_processes
from engine.training.train import make_config, parse_args, run_name_problem
from grades import GRADE_NAMES, GRADES

# The model list of the form; any other timm name can be typed in.
MODELS = (*LITE_PACKAGES, "tf_efficientnetv2_s", "tf_efficientnetv2_m", "efficientnetv2_rw_t")


# On a CPU the form proposes a few epochs, so that the demo workspace retrains in minutes;
# the CLI's own default there is a 20-minute budget, which real photographs need.
CPU_FORM_EPOCHS = 5


def default_settings(device: torch.device | str) -> dict[str, Any]:
    """The form's defaults: the training CLI's own for the device, but fewer epochs on a CPU;
    every GPU of the machine (one process each, under torchrun)."""
    config = make_config(parse_args(["--from-db", "--device", str(device)]))
    return {
        "name": "",
        "model": config.model,
        "img_size": config.img_size,
        "epochs": CPU_FORM_EPOCHS if config.minutes else config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "lrf": config.lrf,
        "optimizer": config.optimizer,
        "balance": config.balance,
        "loss": config.loss,
        "enhance": config.preprocess["enhance"],
        "tta": config.tta,
        "select": config.select,
        "augment": config.augment,
        "refit": config.refit,
        "folds": config.folds,
        "progressive": config.progressive,
        "pretrained": True,
        "weights": "",
        "processes": local_processes(torch.device(device)),
    }


def settings_problem(settings: dict[str, Any], taken: set[str]) -> str | None:
    """Why these settings cannot start a run, as a sentence; None when they can."""
    problem = run_name_problem(settings["name"])
    if problem:
        return f"{problem[0].upper()}{problem[1:]}."
    if settings["name"] in taken:
        return (
            f"A run named {settings['name']!r} exists already; choose another name "
            "(or leave it empty for the date and time)."
        )
    weights = settings["weights"].strip()
    if settings["pretrained"] and weights and not Path(weights).is_file():
        return f"The pretrained weights file {weights} does not exist."
    if not settings["model"].strip():
        return "Choose a model."
    processes = settings.get("processes", 1)
    if settings["batch_size"] % processes:
        return (
            f"A batch of {settings['batch_size']} does not split evenly over {processes} "
            f"GPUs: choose a multiple of {processes}."
        )
    return None


def train_job_args(settings: dict[str, Any]) -> list[str]:
    """The `python -m engine.training.train` arguments that train on the curated set with `settings`."""
    args = [
        "--from-db",
        "--name",
        settings["name"],
        "--model",
        settings["model"].strip(),
        "--img-size",
        str(settings["img_size"]),
        "--epochs",
        str(settings["epochs"]),
        "--batch-size",
        str(settings["batch_size"]),
        "--lr",
        str(settings["lr"]),
        "--lrf",
        str(settings["lrf"]),
        "--optimizer",
        settings["optimizer"],
        "--balance",
        settings["balance"],
        "--loss",
        settings["loss"],
        "--enhance",
        str(settings["enhance"]).lower(),
        "--tta",
        str(settings["tta"]),
        "--select",
        settings["select"],
        "--augment",
        settings["augment"],
        "--progressive",
        str(settings["progressive"]).lower(),
        "--refit",
        str(settings["refit"]).lower(),
        "--folds",
        str(settings["folds"]),
        "--pretrained",
        str(settings["pretrained"]).lower(),
    ]
    weights = settings["weights"].strip()
    if settings["pretrained"] and weights:
        args += ["--weights", weights]
    return args


def curated_counts(curated: pd.DataFrame) -> pd.DataFrame:
    """(source, origin, grade, count) for every grade of every contributor of the curated set."""
    groups = curated.groupby(["source", "origin", "grade"]).size().rename("count").reset_index()
    return every_grade(groups, ["source", "origin"])


def original_counts(curated: pd.DataFrame) -> list[int]:
    """Images per grade of the original labelled set: the experts' grades, before any review."""
    expert = curated["expert_grade"].dropna().astype(int)
    return [int((expert == g).sum()) for g in GRADES]


def contribution_table(counts: pd.DataFrame) -> pd.DataFrame:
    """What each source adds: one row per source and origin, one column per grade, a total."""
    table = counts.pivot_table(
        index=["source", "origin"], columns="grade", values="count", aggfunc="sum", fill_value=0
    )
    table = table.rename(columns=GRADE_NAMES)
    table["total"] = table.sum(axis=1)
    return table.reset_index().rename_axis(columns=None)


def _pretrained_text(value: Any) -> str | None:
    if value is True:
        return "ImageNet (offline)"
    if value is False:
        return "none"
    return Path(value).name if value else None


def _size_text(config: dict, run_size: int) -> str:
    train, evaluate = config.get("img_size", run_size), config.get("eval_size", run_size)
    return str(train) if train == evaluate else f"{train} → {evaluate}"


def _scheduler_text(config: dict) -> str | None:
    if "warmup_epochs" not in config:
        return None
    return f"warm-up {config['warmup_epochs']:g} ep + cosine"


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs as the comparison table shows them, newest first (db.runs.runs_frame rows)."""
    rows = []
    for run in runs.itertuples():
        config = run.config or {}
        counts = config.get("train_counts")
        rows.append(
            {
                "run": run.name,
                "model": run.model,
                "image size": _size_text(config, run.img_size),
                "train per grade": " / ".join(map(str, counts)) if counts else None,
                "train images": sum(counts) if counts else None,
                "epochs": f"{run.epochs_done}/{config['epochs']}" if "epochs" in config else None,
                "batch size": config.get("batch_size"),
                "lr": config.get("lr"),
                "lrf": config.get("lrf"),
                "optimizer": config.get("optimizer"),
                "scheduler": _scheduler_text(config),
                "balance": config.get("balance"),
                "pretrained": _pretrained_text(config.get("pretrained")),
                "best val QWK": run.best_qwk,
                "val accuracy": run.best_acc,
                "best epoch": run.best_epoch,
                "date": run.created_at.strftime("%Y-%m-%d %H:%M"),
                "status": run.status,
            }
        )
    return pd.DataFrame(rows)
