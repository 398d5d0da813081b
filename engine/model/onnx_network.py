"""A network on ONNX Runtime, for inference on a CPU: the checkpoint's network exported once to
ONNX, kept in the workspace's cache, and run by onnxruntime. On this machine's CPU it graded
real photographs several times as fast as PyTorch, with the same grades and probabilities
within 2e-6 (bench.inference, README); a GPU keeps PyTorch.

Also the one ONNX export that engine.loop.export_model builds on.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

OPSET = 18  # onnxruntime 1.14 (2023) and later run it
CPU_RUNTIMES = ("onnxruntime", "pytorch")  # the first is the default


def to_onnx(module: nn.Module, size: int, path: Path, input_name: str, output_name: str) -> None:
    """`module` (N×3×size×size images in) as an ONNX graph whose batch size is free."""
    # torch.export fixes a dimension that is 1 in the example, so the example has two images.
    example = torch.zeros(2, 3, size, size)
    torch.onnx.export(
        module.eval(),
        (example,),
        path,
        input_names=[input_name],
        output_names=[output_name],
        opset_version=OPSET,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )


class OnnxNetwork:
    """Called as the network is: preprocessed images (a float tensor, any layout) in, one
    view's logits out."""

    def __init__(self, path: Path, threads: int | None = None):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.path = path
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.float().numpy())
        return torch.from_numpy(self.session.run(["logits"], {"image": batch})[0])


def onnx_path(checkpoint: Path, cache: Path) -> Path:
    """Where the export of `checkpoint` is kept: named by the file's path, size and time, so
    that a checkpoint written again is exported again."""
    stat = checkpoint.resolve().stat()
    key = f"{checkpoint.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|opset {OPSET}"
    return cache / "onnx" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.onnx"


class ExportMismatch(RuntimeError):
    """The exported network does not compute what PyTorch computes."""


AGREEMENT = 1e-3  # largest logit difference from PyTorch that an export may show on its check


@torch.no_grad()
def check_export(model: nn.Module, network: "OnnxNetwork", size: int) -> float:
    """The largest logit difference between PyTorch and onnxruntime on two seeded random
    images; ExportMismatch past AGREEMENT."""
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    difference = float((network(images) - model.eval()(images).float()).abs().max())
    if not difference <= AGREEMENT:
        raise ExportMismatch(f"onnxruntime's logits differ from PyTorch's by {difference:.2g}")
    return difference


def onnx_network(model: nn.Module, meta: dict, checkpoint: Path, cache: Path) -> OnnxNetwork:
    """The checkpoint's network on onnxruntime, exported and checked on first use (seconds to
    a minute), then read from `cache`. Processes that export at once each write a file of
    their own and rename it into place, so none reads a half-written one."""
    path = onnx_path(checkpoint, cache)
    if path.is_file():
        return OnnxNetwork(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, part = tempfile.mkstemp(suffix=".onnx.part", dir=path.parent)
    os.close(handle)
    try:
        to_onnx(model, meta["image_size"], Path(part), "image", "logits")
        check_export(model, OnnxNetwork(Path(part)), meta["image_size"])
        os.replace(part, path)
    finally:
        Path(part).unlink(missing_ok=True)
    return OnnxNetwork(path)
