"""A model that leaves the app: ONNX and safetensors exports of a tiny trained run, model.json
beside them, the model card, and the refusals. (The default model on onnxruntime against
PyTorch on real photographs: test_onnx_network.)"""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from conftest import ROOT, TINY_TRAIN, tiny_checkpoint
from safetensors.torch import load_file
from sqlalchemy import select

from db.queries import labelled_images
from db.runs import referable_threshold, run_calibration, run_config
from db.schema import Run, Source
from db.session import migrate, read_scope, session_scope
from engine.data.datasets import Sample
from engine.data.sources import import_source
from engine.loop import export_model
from engine.loop.export_model import ExportRefused, export_run, main
from engine.model.infer import register_model
from engine.model.networks import load_checkpoint
from engine.model.predictor import dataset_for, model_views, predict, tta_logits, view_logits
from engine.runtime.markdown import literal
from engine.runtime.workspace import Workspace
from engine.training.model_card import DataRow, RunUnusable, figure, model_card, run_facts, write_model_card

SECTIONS = [
    "## Intended use",
    "## Training data",
    "## Validation figures",
    "## Calibration",
    "## Operating point",
    "## Input and preprocessing",
    "## Training",
    "## Software",
    "## Known limits",
]


def trained_workspace(tiny_data: Path, folder: Path, name: str, *options: str) -> Workspace:
    """A workspace with one run, `name`, trained from the database as the app trains: one
    epoch, 8 test-time views, the defaults' validation phase and final model unless
    `options` say otherwise."""
    workspace = Workspace(folder / "ws")
    workspace.root.mkdir()
    migrate(workspace.db_url)
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "train")
    import_source(workspace.db_url, "folders", tiny_data / "validation", "validation")
    env = {"PATH": "/usr/bin:/bin", "DR_WORKSPACE": str(workspace.root), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.training.train",
            "--from-db",
            "--epochs",
            "1",
            "--name",
            name,
            *TINY_TRAIN,
            *options,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return workspace


@pytest.fixture(scope="module")
def workspace(tiny_data, tmp_path_factory) -> Workspace:
    return trained_workspace(tiny_data, tmp_path_factory.mktemp("export"), "tiny")


@pytest.fixture(scope="module")
def tiny(workspace) -> Run:
    with read_scope(workspace.db_url) as session:
        return session.scalar(select(Run).where(Run.name == "tiny"))


@pytest.fixture(scope="module")
def onnx_export(workspace):
    out = workspace.root.parent / "onnx"
    export_run(workspace.db_url, "tiny", "onnx", out)
    return out


@pytest.fixture(scope="module")
def safetensors_export(workspace, tiny):
    out = workspace.root.parent / "safetensors"
    export_run(workspace.db_url, tiny.id, "safetensors", out)  # a run by its id
    return out


def validation_samples(workspace: Workspace) -> list[Sample]:
    return [
        Sample(path, grade, name, i, group)
        for i, path, name, grade, group in labelled_images(workspace.db_url, "validation")
    ]


def preprocessed(meta: dict, samples: list[Sample]) -> torch.Tensor:
    """The images as the app feeds them to the network."""
    dataset = dataset_for(meta, samples, None)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def app_predictions(workspace: Workspace, checkpoint: str | Path) -> np.ndarray:
    """What the app's inference stores for the validation images."""
    model, meta = load_checkpoint(checkpoint)
    return predict(
        model,
        meta,
        validation_samples(workspace),
        torch.device("cpu"),
        batch_size=8,
        workers=0,
        tta=model_views(meta),
    ).probs


def test_onnx_gives_the_probabilities_and_grades_that_the_app_stores(workspace, tiny, onnx_export):
    model, meta = load_checkpoint(tiny.checkpoint)
    samples = validation_samples(workspace)
    images = preprocessed(meta, samples)
    session = onnxruntime.InferenceSession(
        str(onnx_export / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    # Batches of any size: one image, a few, the rest.
    got = np.concatenate(
        [
            session.run(["probabilities"], {"image": batch.numpy()})[0]
            for batch in (images[:1], images[1:4], images[4:])
        ]
    )
    want = app_predictions(workspace, tiny.checkpoint)
    assert model_views(meta) == 8 and got.shape == want.shape == (len(samples), 4)
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()
    check = json.loads((onnx_export / "model.json").read_text())["check"]
    assert check["passed"] and check["grades_agree"] and check["max_abs_difference"] <= 1e-4
    assert check["images"] == 16 and check["inputs"] == "validation photographs of the run"


def test_safetensors_holds_the_checkpoints_weights_and_model_json_rebuilds_the_model(
    workspace, tiny, safetensors_export
):
    model, meta = load_checkpoint(tiny.checkpoint)
    weights = load_file(str(safetensors_export / "model.safetensors"))
    state = model.state_dict()
    assert weights.keys() == state.keys()
    assert all(weights[k].dtype == v.dtype and torch.equal(weights[k], v) for k, v in state.items())
    # Outside the app: timm, the weights, and what model.json says, nothing else.
    about = json.loads((safetensors_export / "model.json").read_text())
    arch, views = about["architecture"], about["test_time_views"]
    assert about["output"]["kind"] == "logits" and not views["in_graph"]
    rebuilt = timm.create_model(arch["timm_model"], num_classes=arch["num_classes"], **arch["model_args"])
    rebuilt.load_state_dict(weights)
    images = preprocessed(meta, validation_samples(workspace))
    with torch.no_grad():
        logits = tta_logits(rebuilt.eval(), images, views["count"])
    probs = torch.softmax(logits / about["temperature"], -1).numpy()
    assert np.abs(probs - app_predictions(workspace, tiny.checkpoint)).max() <= 1e-5


def test_a_run_by_folds_exports_every_model_and_model_json_says_how_to_average_them(tiny_data, tmp_path):
    workspace = trained_workspace(tiny_data, tmp_path, "folds", "--folds", "2")
    onnx = export_run(workspace.db_url, "folds", "onnx", tmp_path / "onnx")
    assert onnx["check"]["passed"] and onnx["architecture"]["members"] == 2
    about = export_run(workspace.db_url, "folds", "safetensors", tmp_path / "st")
    weights = load_file(str(tmp_path / "st" / "model.safetensors"))
    arch, views = about["architecture"], about["test_time_views"]
    assert "members and views" in views["combine"] and "'members.<i>.'" in about["output"]["meaning"]
    checkpoint = run_facts(workspace.db_url, "folds").checkpoint
    _, meta = load_checkpoint(checkpoint)
    images = preprocessed(meta, validation_samples(workspace))
    view_probs = []
    for i in range(arch["members"]):
        member = timm.create_model(arch["timm_model"], num_classes=arch["num_classes"], **arch["model_args"])
        prefix = f"members.{i}."
        member.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
        with torch.no_grad():
            view_probs += [torch.softmax(v, -1) for v in view_logits(member.eval(), images, views["count"])]
    probs = torch.softmax(torch.log(torch.stack(view_probs).mean(0)) / about["temperature"], -1).numpy()
    assert np.abs(probs - app_predictions(workspace, checkpoint)).max() <= 1e-5
    card = (tmp_path / "st" / "MODEL_CARD.md").read_text()
    assert "`--folds 2`" in card and "out of fold" in card and "refit" not in card


def test_model_json_says_how_to_feed_the_model_and_read_its_output(workspace, tiny, onnx_export):
    about = json.loads((onnx_export / "model.json").read_text())
    config = run_config(workspace.db_url, tiny.id)
    _, meta = load_checkpoint(tiny.checkpoint)
    assert about["format"] == "onnx" and about["files"]["weights"] == "model.onnx"
    assert about["run"] == {"id": tiny.id, "name": "tiny", "checkpoint": tiny.checkpoint}
    assert about["input"]["shape"] == ["batch", 3, 64, 64]
    assert about["input"]["mean"] == list(meta["mean"]) and about["input"]["std"] == list(meta["std"])
    assert about["preprocessing"]["settings"] == config["preprocess"]
    assert len(about["preprocessing"]["steps"]) == 6  # decode, crop, resize, enhance, mask, scale
    assert about["test_time_views"]["count"] == config["tta"] == 8
    assert about["test_time_views"]["in_graph"]
    assert about["temperature"] == run_calibration(workspace.db_url, tiny.id)["temperature"]
    assert about["operating_point"]["threshold"] == referable_threshold(workspace.db_url, tiny.id)
    assert [c["name"] for c in about["classes"]] == ["no DR", "mild", "moderate", "severe / proliferative"]
    assert about["output"]["kind"] == "probabilities"
    assert about["exported"]["opset"] == 18 and about["exported"]["versions"]["torch"]
    session = onnxruntime.InferenceSession(
        str(onnx_export / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (given,), (taken,) = session.get_inputs(), session.get_outputs()
    assert (given.name, given.shape) == (about["input"]["name"], about["input"]["shape"])
    assert (taken.name, taken.shape) == (about["output"]["name"], about["output"]["shape"])


def test_the_model_card_holds_its_sections_and_the_runs_figures(workspace, tiny, onnx_export):
    card = (onnx_export / "MODEL_CARD.md").read_text()
    assert [section in card for section in SECTIONS] == [True] * len(SECTIONS)
    assert "not a medical device" in card
    calibration = run_calibration(workspace.db_url, tiny.id)
    screening = calibration["screening"]
    config = run_config(workspace.db_url, tiny.id)
    with read_scope(workspace.db_url) as session:
        sources = dict(session.execute(select(Source.role, Source.name)).all())
    counts = config["train_counts"]
    assert (
        f"| {literal(sources['train'])} | training | {sum(counts)} | "
        + " | ".join(map(str, counts))
        + " | 0 |"
    ) in card
    assert f"| {literal(sources['validation'])} | validation | 16 | 4 | 4 | 4 | 4 | 0 |" in card
    for name in ("qwk", "referable_auc", "sensitivity", "specificity"):
        assert figure(screening[name]) in card
    assert f"**{screening['threshold']:.4f}**" in card
    assert f"T = {calibration['temperature']:.3f}" in card
    assert f"| {calibration['ece_before']:.4f} | {calibration['ece_after']:.4f} |" in card
    assert "Device `cpu`" in card and "minutes from start to finish" in card
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert f"commit {head}" in card and f"torch {torch.__version__.split('+')[0]}" in card
    assert "refit" in card  # the final model learned the validation images: said so
    # The same card beside the run's checkpoint, for a run that is not exported.
    beside = write_model_card(workspace.db_url, "tiny")
    assert beside == Path(tiny.checkpoint).parent / "MODEL_CARD.md"
    assert beside.read_text() == card


def test_names_that_people_wrote_show_as_written_in_the_card(workspace):
    """The card escapes them: they make no emphasis, table cell, HTML or math of their own."""
    facts = replace(
        run_facts(workspace.db_url, "tiny"),
        name="v2_*final*",
        data=[DataRow("clinic | <b>2024</b> $5", "training", [1, 2, 3, 4], 0)],
    )
    card = model_card(facts)
    assert card.startswith("# Model card: v2\\_\\*final\\*\n")
    assert "| clinic \\| \\<b\\>2024\\<\\/b\\> \\$5 | training | 10 | 1 | 2 | 3 | 4 | 0 |" in card


def test_unknown_runs_runs_without_a_checkpoint_and_bad_folders_are_refused_in_words(workspace, tmp_path):
    with session_scope(workspace.db_url) as session:
        session.add_all(
            [
                Run(name="still-training", model_name="test_efficientnet", img_size=64, status="running"),
                Run(
                    name="moved",
                    model_name="test_efficientnet",
                    img_size=64,
                    status="done",
                    checkpoint=str(tmp_path / "gone" / "best.pth"),
                ),
            ]
        )
    out = tmp_path / "out"
    refusals = [
        ("nope", out, RunUnusable, "no run named or numbered 'nope' (runs: tiny, "),
        ("still-training", out, RunUnusable, "has no checkpoint (status: running)"),
        ("moved", out, RunUnusable, "best.pth is not there"),
        ("tiny", tmp_path / "a-file", ExportRefused, "is a file"),
        ("tiny", tmp_path / "full", ExportRefused, "holds files already"),
    ]
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    for run, folder, error, words in refusals:
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
            export_run(workspace.db_url, run, "onnx", folder)
    with pytest.raises(ExportRefused, match="choose onnx or safetensors"):
        export_run(workspace.db_url, "tiny", "tflite", out)
    assert not out.exists() and (tmp_path / "full" / "mine.txt").read_text() == "x"


def test_the_command_exports_by_name_and_says_why_not(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DR_WORKSPACE", str(workspace.root))
    monkeypatch.delenv("DR_DATABASE_URL", raising=False)
    out = tmp_path / "st"
    assert main(["tiny", "--format", "safetensors", "--out", str(out)]) == 0
    assert "tensors read back identical" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.json", "MODEL_CARD.md"}
    assert main(["missing", "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "ERROR no run named or numbered 'missing'" in capsys.readouterr().err


def test_a_model_validated_elsewhere_exports_with_what_its_checkpoint_says(workspace, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "elsewhere" / "best.pth", temperature=1.5)
    run_id = register_model(workspace.db_url, checkpoint, load_checkpoint(checkpoint)[1])
    steps = []
    about = export_run(
        workspace.db_url,
        run_id,
        "onnx",
        tmp_path / "out",
        check_images=4,
        progress=lambda fraction, message: steps.append((fraction, message)),
    )
    assert about["temperature"] == 1.5 and about["test_time_views"]["count"] == 1
    assert about["operating_point"] is None
    assert about["check"]["passed"] and about["check"]["inputs"].startswith("random tensors")
    assert steps == [
        (0.0, "exporting run best as onnx"),  # named after its file
        (0.6, f"checking on 4 {about['check']['inputs']}"),
        (1.0, f"done: {tmp_path / 'out'}"),
    ]
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "None: the run was never validated in this app." in card
    assert "Not recorded: no samples.csv beside the checkpoint." in card
    assert "minutes not recorded" in card


def test_an_onnx_file_that_disagrees_with_pytorch_is_not_kept(workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(export_model, "TOLERANCE", -1.0)  # no difference is small enough
    with pytest.raises(ExportRefused, match="does not reproduce the run's"):
        export_run(workspace.db_url, "tiny", "onnx", tmp_path / "out", check_images=2)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy
