"""Training throughput: the real loop over a minimal one, as a ratio measured in one run.

    .venv/bin/python -m bench.training [--images 96] [--batch-size 16]

The real loop reads through the warm preprocessing cache, augments, and steps the optimizer
with the lr schedule; the minimal loop runs forward, backward and step on ready tensors of
the same model, batch size and threads. A budget of minutes (`--minutes`, the CPU default)
fixes the epochs from a timing of a few batches; the last line says how far a real epoch's
speed is from it.
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import rate
from cli import HelpFormatter, setup_logging
from engine.data.datasets import default_workers, folder_samples
from engine.data.synth import write_dataset
from engine.model.networks import create_model, default_model
from engine.runtime.workspace import Workspace
from engine.training.trainer import RunPaths, TrainConfig, Trainer


def minimal(name: str, size: int, batch: int, steps: int) -> float:
    model = create_model(name).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 4, (batch,))

    def run(_repeat: int) -> None:
        for _ in range(steps):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return rate(batch * steps, run)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.training", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--images", type=int, default=96, help="synthetic photographs to train on")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--workers", type=int, default=default_workers(), help="loader worker processes")
    args = parser.parse_args()
    setup_logging()

    name, size, _ = default_model(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp), seed=2, n_train=0, n_test=0, n_val=args.images, n_messidor=0)
        samples = folder_samples(Path(tmp) / "validation")
        config = TrainConfig(
            model=name,
            img_size=size,
            eval_size=size,
            epochs=4,
            batch_size=args.batch_size,
            pretrained=False,
            workers=args.workers,
        )
        trainer = Trainer(
            config, samples, samples[:8], RunPaths.under(Workspace(Path(tmp)), "bench"), Path(tmp) / "cache"
        )
        trainer.train_epoch(0)  # fills the cache
        real = rate(len(samples), lambda repeat: trainer.train_epoch(repeat + 1))
        timed = 1 / trainer.seconds_per_image()[0]  # what a budget of minutes counts on
    steps = len(samples) // args.batch_size
    bare = minimal(name, size, args.batch_size, steps)
    print(
        f"{name} at {size}px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"{args.workers} loader workers, {len(samples)} images"
    )
    print(f"minimal forward+backward  {bare:6.1f} images/s")
    print(f"training loop, warm cache {real:6.1f} images/s   ratio {real / bare:.2f}")
    print(f"a budget's timing         {timed:6.1f} images/s   training loop / it {real / timed:.2f}")


if __name__ == "__main__":
    main()
