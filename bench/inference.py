"""Inference throughput, as ratios measured in one run on this machine, and where a cold run
spends its time.

    .venv/bin/python -m bench.inference [--images 64] [--size 1440] [--format jpg]
                                        [--batch-size 8] [--workers N] [--device cuda]

(a) The steps of a cold read of one photograph, in ms (median over the photographs): decode,
    find the eye, crop and resize, enhancement, mask; after a whole decode and after the
    reduced JPEG decode that the pipeline makes; beside the forward per image.
(b) End-to-end images/s (decode, crop, enhance, resize, forward) over pure forward images/s
    on ready tensors of the same model, batch size and threads, with a cold and a warm
    preprocessing cache, and cold with every JPEG decoded whole (the pipeline before reduced
    decoding); the loader alone, cold, against the forward (what keeps a GPU fed).
(c) Warm end-to-end over a one-image-at-a-time loop like the seed's predict.py (PIL open,
    resize, normalise, forward one image).
Synthetic photographs `--size` px high (1440: 2.2-3.0 Mpx), written as JPEG (quality 95) or PNG.

    .venv/bin/python -m bench.inference --cpu-runtimes [--photos 24] [--checkpoint FILE]

(d) What could run the network on a CPU, side by side on real photographs (../shared/realdata,
    preprocessed once, 8 test-time views, batch --batch-size): PyTorch as inference ran it
    before (channels_last), PyTorch on contiguous tensors, torch.compile, onnxruntime in fp32
    (what engine.model.infer now uses on a CPU) and onnxruntime in int8 (static QDQ, per channel,
    calibrated on 8 other photographs; dynamic). Each: images/s, its ratio to the first row,
    the share of photographs with the first row's grade, and the largest probability
    difference. PyTorch's dynamic int8 quantises only the Linear head of a convolutional
    network, so it has no row. The model: --checkpoint, else the CPU default with its
    ImageNet weights and a new head.
"""

import argparse
import copy
import csv
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

import engine.data.preprocess as pp
from bench.common import REALDATA, photographs, rate, read_bgr
from cli import HelpFormatter, setup_logging
from engine.data.datasets import Sample, create_loader, default_workers
from engine.data.images import load_rgb
from engine.data.preprocess import PreprocessConfig, decode_for, find_field, preprocess
from engine.model.networks import create_model, default_model, load_checkpoint, model_mean_std, pick_device
from engine.model.onnx_network import OnnxNetwork, to_onnx
from engine.model.predictor import calibrated, dataset_for, mean_probability_logits, predict, view_logits


def as_jpeg(samples: list[Sample], quality: int = 95) -> list[Sample]:
    """The same photographs as JPEG files beside the PNGs, which are removed."""
    out = []
    for sample in samples:
        png = Path(sample.path)
        jpeg = png.with_suffix(".jpg")
        cv2.imwrite(str(jpeg), read_bgr(png), [cv2.IMWRITE_JPEG_QUALITY, quality])
        png.unlink()
        out.append(Sample(str(jpeg), None, sample.name))
    return out


def best_ms(work: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def steps_ms(img, size: int) -> dict[str, float]:
    """Each step of preprocess() on one decoded photograph, from the pipeline run with one
    more step switched on at a time."""
    crop = best_ms(lambda: preprocess(img, PreprocessConfig(size, enhance=False, mask=False)))
    enhanced = best_ms(lambda: preprocess(img, PreprocessConfig(size, mask=False)))
    masked = best_ms(lambda: preprocess(img, PreprocessConfig(size)))
    field = best_ms(lambda: find_field(img))
    return {
        "find the eye": field,
        "crop + resize": crop - field,
        "enhancement": enhanced - crop,
        "mask": masked - enhanced,
    }


def cold_read(paths: list[Path], size: int) -> tuple[dict[str, dict[str, float]], float]:
    """Median ms of each step of a cold read, after a whole and after a reduced decode; and the
    median reduction factor."""
    cfg = PreprocessConfig(size)
    times: dict[str, dict[str, list[float]]] = {"whole": {}, "reduced": {}}
    factors = []
    for path in paths:
        whole, reduced = load_rgb(path), decode_for(path, cfg)
        factors.append(whole.shape[0] / reduced.shape[0])
        decodes = {
            "whole": best_ms(partial(load_rgb, path)),
            "reduced": best_ms(partial(decode_for, path, cfg)),
        }
        for kind, img in (("whole", whole), ("reduced", reduced)):
            for step, ms in {"decode": decodes[kind], **steps_ms(img, size)}.items():
                times[kind].setdefault(step, []).append(ms)
    medians = {
        kind: {step: statistics.median(v) for step, v in steps.items()} for kind, steps in times.items()
    }
    return medians, statistics.median(factors)


@contextmanager
def whole_decoding() -> Iterator[None]:
    """The pipeline as it was before reduced decoding: every JPEG decoded whole. (Loader
    workers fork from this process and see the same setting.)"""
    margin, pp.DECODE_MARGIN = pp.DECODE_MARGIN, float(2**20)
    try:
        yield
    finally:
        pp.DECODE_MARGIN = margin


def pure_forward(model: torch.nn.Module, size: int, batch: int, batches: int, device: torch.device) -> float:
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        model(images)  # warm-up: first call allocates

        def run(_repeat: int) -> None:
            for _ in range(batches):
                model(images)
            if cuda:
                torch.cuda.synchronize()

        return rate(batch * batches, run)


def loader_rate(
    meta: dict,
    samples: list[Sample],
    cache: Callable[[int], Path],
    batch: int,
    workers: int,
    device: torch.device,
) -> float:
    """Images/s that the loader alone delivers to `device` from a cold cache."""

    def run(repeat: int) -> None:
        loader = create_loader(dataset_for(meta, samples, cache(repeat)), batch, workers, device)
        for images, *_ in loader:
            images.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return rate(len(samples), run)


def one_at_a_time(
    model: torch.nn.Module, paths: list[str], size: int, mean, std, device: torch.device
) -> float:
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])

    def run(_repeat: int) -> None:
        with torch.no_grad():
            for path in paths:
                image = transform(Image.open(path).convert("RGB")).unsqueeze(0).to(device)
                torch.softmax(model(image), dim=1).cpu()

    return rate(len(paths), run)


def print_cold_read(steps: dict[str, dict[str, float]], factor: float, forward_ms: float, count: int) -> None:
    print(
        f"cold read of one photograph, ms (median of {count})   whole decode   "
        f"reduced decode (1/{factor:.0f})"
    )
    for step in steps["whole"]:
        print(f"  {step:44} {steps['whole'][step]:8.1f} {steps['reduced'][step]:14.1f}")
    totals = {kind: sum(v.values()) for kind, v in steps.items()}
    print(f"  {'total':44} {totals['whole']:8.1f} {totals['reduced']:14.1f}")
    print(f"  {'forward, per image':44} {forward_ms:8.1f} {forward_ms:14.1f}")


def real_photographs(count: int, skip: int = 0) -> list[Sample]:
    """`count` of ../shared/realdata's photographs, both datasets in turn, after `skip`."""
    with open(REALDATA / "labels.csv", newline="") as file:
        rows = sorted(csv.DictReader(file), key=lambda row: (row["dataset"], row["file"]))
    by_dataset = [
        [row for row in rows if row["dataset"] == name] for name in sorted({row["dataset"] for row in rows})
    ]
    # In turn until the smaller dataset runs out (180 against 1320 photographs).
    chosen = [row for group in zip(*by_dataset, strict=False) for row in group][skip : skip + count]
    return [Sample(str(REALDATA / row["file"]), None, row["file"]) for row in chosen]


def preprocessed(meta: dict, samples: list[Sample]) -> torch.Tensor:
    dataset = dataset_for(meta, samples, None)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@torch.no_grad()
def graded(network: Callable, meta: dict, images: torch.Tensor, batch: int) -> np.ndarray:
    """Calibrated probabilities with 8 views, as predict_batches computes them."""
    return np.concatenate(
        [
            calibrated(mean_probability_logits(torch.stack(view_logits(network, chunk, 8), 1)), meta).numpy()
            for chunk in images.split(batch)
        ]
    )


def int8_network(fp32: Path, calibration: torch.Tensor, static: bool) -> OnnxNetwork:
    """onnxruntime's int8 quantisation of the exported network."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ready, out = fp32.with_suffix(".pre.onnx"), fp32.with_suffix(f".int8{static:d}.onnx")
    quant_pre_process(str(fp32), str(ready))
    if not static:
        quantize_dynamic(str(ready), str(out), weight_type=QuantType.QInt8)
        return OnnxNetwork(out)

    class Photographs(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": image[None].numpy()} for image in calibration])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(ready),
        str(out),
        Photographs(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return OnnxNetwork(out)


def cpu_runtimes(
    model: torch.nn.Module,
    meta: dict,
    images: torch.Tensor,
    calibration: torch.Tensor,
    batch: int,
    folder: Path,
) -> None:
    """Section (d), printed row by row as each finishes."""
    before = model.to(memory_format=torch.channels_last).eval()
    contiguous = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    fp32 = folder / "model.onnx"
    to_onnx(contiguous, meta["image_size"], fp32, "image", "logits")
    candidates: dict[str, Callable[[], Callable]] = {
        "PyTorch, channels_last (inference before)": lambda: (
            lambda x: before(x.contiguous(memory_format=torch.channels_last))
        ),
        "PyTorch, contiguous tensors": lambda: contiguous,
        "PyTorch, torch.compile (channels_last)": lambda: compiled(before, images[:batch]),
        "onnxruntime, fp32 (engine.model.infer on a CPU)": lambda: OnnxNetwork(fp32),
        "onnxruntime, int8 static": lambda: int8_network(fp32, calibration, static=True),
        "onnxruntime, int8 dynamic": lambda: int8_network(fp32, calibration, static=False),
    }
    print(f"{len(images)} real photographs, 8 views, batch {batch}, {torch.get_num_threads()} threads")
    print(f"  {'runtime':44} {'images/s':>9} {'ratio':>6} {'same grade':>11} {'max |dp|':>9}")
    reference: np.ndarray | None = None
    first_rate = 0.0
    for name, make in candidates.items():
        started = time.perf_counter()
        network = make()
        graded(network, meta, images[:batch], batch)  # warm-up (and compilation)
        ready = time.perf_counter() - started
        started = time.perf_counter()
        probs = graded(network, meta, images, batch)
        speed = len(images) / (time.perf_counter() - started)
        if reference is None:
            reference, first_rate = probs, speed
        same = float((probs.argmax(1) == reference.argmax(1)).mean())
        print(
            f"  {name:44} {speed:9.2f} {speed / first_rate:6.2f} {same:11.3f} "
            f"{np.abs(probs - reference).max():9.1e}   (ready in {ready:.0f} s)",
            flush=True,
        )


def compiled(model: torch.nn.Module, example: torch.Tensor) -> Callable:
    network = torch.compile(model)
    return lambda x: network(x.contiguous(memory_format=torch.channels_last))


def runtimes_main(args: argparse.Namespace) -> None:
    if args.checkpoint:
        model, meta = load_checkpoint(args.checkpoint)
    else:
        name, _, size = default_model("cpu")
        mean, std = model_mean_std(name)
        torch.manual_seed(0)
        model = create_model(name, pretrained=True)
        meta = {
            "preprocess": PreprocessConfig(size=size).to_dict(),
            "mean": mean,
            "std": std,
            "image_size": size,
            "temperature": 1.0,
        }
    print(f"{meta.get('model_name', 'the CPU default')} at {meta['image_size']} px")
    images = preprocessed(meta, real_photographs(args.photos))
    calibration = preprocessed(meta, real_photographs(8, skip=args.photos))
    with tempfile.TemporaryDirectory() as folder:
        cpu_runtimes(model.eval(), meta, images, calibration, args.batch_size, Path(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="synthetic photographs (a-c)")
    parser.add_argument("--size", type=int, default=1440, help="photograph height in pixels")
    parser.add_argument(
        "--format", choices=("jpg", "png"), default="jpg", help="file format of the synthetic photographs"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward")
    parser.add_argument("--workers", type=int, default=default_workers(), help="loader worker processes")
    parser.add_argument("--device", help="default: cuda if present, else cpu")
    parser.add_argument(
        "--cpu-runtimes", action="store_true", help="section (d) alone: CPU runtimes on real photographs"
    )
    parser.add_argument("--photos", type=int, default=24, help="real photographs that (d) times")
    parser.add_argument(
        "--checkpoint", type=Path, help="(d)'s model (default: the CPU default with ImageNet weights)"
    )
    args = parser.parse_args()
    setup_logging()
    if args.cpu_runtimes:
        return runtimes_main(args)

    device = pick_device(args.device)
    name, _, size = default_model(device)
    mean, std = model_mean_std(name)
    model = create_model(name).eval().to(device).to(memory_format=torch.channels_last)
    meta = {
        "preprocess": PreprocessConfig(size=size).to_dict(),
        "mean": mean,
        "std": std,
        "image_size": size,
        "temperature": 1.0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        samples = photographs(Path(tmp) / "data", args.images, args.size)
        if args.format == "jpg":
            samples = as_jpeg(samples)
        paths = [Path(s.path) for s in samples]
        megapixels = sorted(h * w / 1e6 for h, w in (load_rgb(p).shape[:2] for p in paths))

        def end_to_end(cache: Path) -> None:
            predict(model, meta, samples, device, args.batch_size, args.workers, cache_root=cache)

        forward = pure_forward(model, size, args.batch_size, max(2, args.images // args.batch_size), device)
        steps, factor = cold_read(paths, size)
        single = one_at_a_time(model, [s.path for s in samples], size, mean, std, device)
        cold = rate(len(samples), lambda repeat: end_to_end(Path(tmp) / f"cache{repeat}"))
        warm = rate(len(samples), lambda _repeat: end_to_end(Path(tmp) / "cache0"))
        with whole_decoding():
            cold_whole = rate(len(samples), lambda repeat: end_to_end(Path(tmp) / f"whole{repeat}"))
        loader = loader_rate(
            meta, samples, lambda repeat: Path(tmp) / f"loader{repeat}", args.batch_size, args.workers, device
        )
    print(
        f"{name} at {size}px on {device.type}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, {args.workers} loader workers, {args.images} "
        f"{args.format.upper()} photographs {args.size}px high "
        f"({megapixels[0]:.1f}-{megapixels[-1]:.1f} Mpx)"
    )
    print_cold_read(steps, factor, 1000 / forward, len(paths))
    print(f"pure forward               {forward:7.1f} images/s")
    print(f"end-to-end, cold           {cold:7.1f} images/s   ratio to forward {cold / forward:.2f}")
    print(
        f"end-to-end, cold, whole    {cold_whole:7.1f} images/s   ratio to forward "
        f"{cold_whole / forward:.2f}   (every JPEG decoded whole)"
    )
    print(f"end-to-end, warm           {warm:7.1f} images/s   ratio to forward {warm / forward:.2f}")
    print(f"loader alone, cold         {loader:7.1f} images/s   ratio to forward {loader / forward:.2f}")
    print(f"one image at a time        {single:7.1f} images/s   warm end-to-end is {warm / single:.1f}x")


if __name__ == "__main__":
    main()
