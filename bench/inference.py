"""Inference throughput, as ratios measured in one run on this machine.

    .venv/bin/python -m bench.inference [--images 64] [--size 1536] [--batch-size 32]

(a) end-to-end images/s (decode, crop, enhance, resize, forward) over pure forward images/s
    on ready tensors of the same model, batch size and threads, with a cold and a warm
    preprocessing cache; (b) warm end-to-end over a one-image-at-a-time loop like the seed's
    predict.py (PIL open, resize, normalise, forward one image).
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image

from bench.common import photographs, rate
from engine.data import default_workers
from engine.models import create_model, default_model, model_mean_std
from engine.predictor import predict
from engine.preprocess import PreprocessConfig


def pure_forward(model: torch.nn.Module, size: int, batch: int, batches: int) -> float:
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(images)  # warm-up: first call allocates

        def run(_repeat: int) -> None:
            for _ in range(batches):
                model(images)
        return rate(batch * batches, run)


def one_at_a_time(model: torch.nn.Module, paths: list[str], size: int, mean, std) -> float:
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])

    def run(_repeat: int) -> None:
        with torch.no_grad():
            for path in paths:
                image = transform(Image.open(path).convert("RGB")).unsqueeze(0)
                torch.softmax(model(image), dim=1)
    return rate(len(paths), run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=1536, help="photograph height in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()

    device = torch.device("cpu")
    name, _, size = default_model(device)
    mean, std = model_mean_std(name)
    model = create_model(name).eval().to(memory_format=torch.channels_last)
    meta = {"preprocess": PreprocessConfig(size=size).to_dict(), "mean": mean, "std": std,
            "image_size": size, "temperature": 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        samples = photographs(Path(tmp) / "data", args.images, args.size)
        def end_to_end(cache: Path) -> None:
            predict(model, meta, samples, device, args.batch_size, args.workers, cache_root=cache)

        forward = pure_forward(model, size, args.batch_size, max(2, args.images // args.batch_size))
        single = one_at_a_time(model, [s.path for s in samples], size, mean, std)
        cold = rate(len(samples), lambda repeat: end_to_end(Path(tmp) / f"cache{repeat}"))
        warm = rate(len(samples), lambda _repeat: end_to_end(Path(tmp) / "cache0"))
    print(f"{name} at {size}px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.workers} loader workers, {args.images} photographs {args.size}px high")
    print(f"pure forward          {forward:7.1f} images/s")
    print(f"end-to-end, cold      {cold:7.1f} images/s   ratio to forward {cold / forward:.2f}")
    print(f"end-to-end, warm      {warm:7.1f} images/s   ratio to forward {warm / forward:.2f}")
    print(f"one image at a time   {single:7.1f} images/s   warm end-to-end is {warm / single:.1f}x")


if __name__ == "__main__":
    main()
