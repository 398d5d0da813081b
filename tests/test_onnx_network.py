"""CPU inference on onnxruntime: the same probabilities and grades as PyTorch (a tiny model,
and the default model on real photographs), one export per checkpoint, an export that
disagrees never used, and engine.model.infer that falls back to PyTorch in words."""

import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, tiny_checkpoint

from engine.data.datasets import Sample, folder_samples
from engine.data.preprocess import PreprocessConfig
from engine.model import infer
from engine.model import onnx_network as ort_module
from engine.model.networks import (
    CLASSES,
    create_model,
    default_model,
    load_checkpoint,
    model_mean_std,
    save_checkpoint,
)
from engine.model.onnx_network import ExportMismatch, onnx_network, onnx_path
from engine.model.predictor import predict
from engine.runtime.workspace import Workspace
from grades import from_aptos

REALDATA = ROOT.parent / "shared" / "realdata"
CPU = torch.device("cpu")


def side_by_side(model, meta: dict, network, samples: list[Sample]) -> tuple[np.ndarray, ...]:
    """The probabilities that PyTorch and `network` give the samples, with 8 test-time views."""
    return tuple(
        predict(m, meta, samples, CPU, batch_size=4, workers=0, tta=8).probs for m in (model, network)
    )


def test_onnxruntime_gives_pytorchs_probabilities_and_is_exported_once(tiny_data, tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path / "model.pth", temperature=1.5)
    model, meta = load_checkpoint(checkpoint)
    network = onnx_network(model, meta, checkpoint, tmp_path / "cache")
    assert network.path == onnx_path(checkpoint, tmp_path / "cache") and network.path.is_file()
    samples = folder_samples(tiny_data / "validation")
    want, got = side_by_side(model, meta, network, samples)
    assert np.abs(got - want).max() <= 1e-5 and (got.argmax(1) == want.argmax(1)).all()

    def no_export(*_args):
        raise AssertionError("exported again")

    monkeypatch.setattr(ort_module, "to_onnx", no_export)
    assert onnx_network(model, meta, checkpoint, tmp_path / "cache").path == network.path
    os.utime(checkpoint, ns=(1, 1))  # the checkpoint written again: a new export
    with pytest.raises(AssertionError, match="exported again"):
        onnx_network(model, meta, checkpoint, tmp_path / "cache")


def test_an_export_that_disagrees_with_pytorch_is_not_kept(tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path / "model.pth")
    model, meta = load_checkpoint(checkpoint)
    monkeypatch.setattr(ort_module, "AGREEMENT", -1.0)  # no difference is small enough
    with pytest.raises(ExportMismatch, match="differ from PyTorch's by"):
        onnx_network(model, meta, checkpoint, tmp_path / "cache")
    assert list((tmp_path / "cache" / "onnx").iterdir()) == []  # no file, no part of one


def test_infer_grades_on_onnxruntime_and_falls_back_to_pytorch_in_words(
    tiny_data, tmp_path, monkeypatch, capsys
):
    workspace = Workspace(tmp_path / "ws")
    monkeypatch.setenv("DR_WORKSPACE", str(workspace.root))
    workspace.root.mkdir()
    checkpoint = tiny_checkpoint(tmp_path / "model.pth")
    args = [
        "--checkpoint",
        str(checkpoint),
        "--images",
        str(tiny_data / "aptos" / "test_images"),
        "--workers",
        "0",
    ]
    assert infer.main([*args, "--cpu-runtime", "onnxruntime"]) == 0
    assert "INFO onnxruntime grades the images" in capsys.readouterr().err

    def broken(*_args):
        raise ExportMismatch("onnxruntime's logits differ from PyTorch's by 0.5")

    monkeypatch.setattr(infer, "onnx_network", broken)
    assert infer.main([*args, "--cpu-runtime", "onnxruntime", "--redo"]) == 0
    assert (
        "onnxruntime not used, PyTorch grades the images: the export failed (ExportMismatch: "
        "onnxruntime's logits differ from PyTorch's by 0.5)"
    ) in capsys.readouterr().err

    monkeypatch.setenv("DR_CPU_RUNTIME", "tpu")
    with pytest.raises(SystemExit):
        infer.main(args)
    assert "DR_CPU_RUNTIME is one of onnxruntime, pytorch, not 'tpu'" in capsys.readouterr().err


@pytest.mark.skipif(not (REALDATA / "labels.csv").is_file(), reason="../shared/realdata is not here")
def test_onnxruntime_grades_real_photographs_as_pytorch_does_with_the_default_model(tmp_path):
    """The CPU default (EfficientNet-Lite0 at 448 px, ImageNet weights, a new 4-class head)
    with 8 views and a temperature, on 6 real photographs of both datasets."""
    name, _, size = default_model("cpu")
    torch.manual_seed(0)
    mean, std = model_mean_std(name)
    checkpoint = tmp_path / "best.pth"
    save_checkpoint(
        checkpoint,
        create_model(name, pretrained=True),
        {
            "model_name": name,
            "image_size": size,
            "mean": list(mean),
            "std": list(std),
            "temperature": 1.3,
            "preprocess": PreprocessConfig(size=size).to_dict(),
            "train_config": {"tta": 8},
            "classes": CLASSES,
        },
    )
    model, meta = load_checkpoint(checkpoint)
    labels = pd.read_csv(REALDATA / "labels.csv").groupby("dataset").head(3)
    samples = [
        Sample(str(REALDATA / row.file), from_aptos(row.grade), row.file) for row in labels.itertuples()
    ]
    want, got = side_by_side(model, meta, onnx_network(model, meta, checkpoint, tmp_path), samples)
    difference = np.abs(got - want).max()
    print(
        f"\n{name} at {size} px, 8 views, T 1.3, {len(samples)} real photographs: largest "
        f"probability difference {difference:.2e}"
    )
    assert len(got) == 6 and difference <= 1e-4 and (got.argmax(1) == want.argmax(1)).all()
