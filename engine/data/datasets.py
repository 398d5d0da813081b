"""Samples, datasets and loaders: what training and inference read, with augmentation.

Images come through the preprocessing cache, so the second epoch or a second inference
decodes nothing; a file that cannot be read is reported and skipped, never fatal.
"""

import csv
import hashlib
import os
import random
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from engine.data.groups import group_from_name
from engine.data.images import IMAGE_SUFFIXES, ImageError
from engine.data.preprocess import PreprocessCache, PreprocessConfig, load_preprocessed
from grades import GRADES, from_aptos


@dataclass(frozen=True)
class Sample:
    path: str  # absolute
    grade: int | None = None
    name: str = ""
    image_id: int | None = None  # the database row, when the sample came from there
    group: str | None = None  # one person's images share a group; splits never cut one


def folder_samples(root: Path) -> list[Sample]:
    """Class folders 0/ 1/ 2/ 3/ (the seed's --data-path layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    samples = [
        Sample(str(file), grade, file.stem, group=group_from_name(file.stem))
        for grade in GRADES
        for file in sorted((root / str(grade)).glob("**/*"))
        if file.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise FileNotFoundError(f"{root}: no images in class folders 0/ 1/ 2/ 3/")
    return samples


def labels_csv_samples(root: Path) -> tuple[list[Sample], dict[str, str]]:
    """A folder with labels.csv (file, grade 0-4 on the APTOS scale, dataset, group: the layout
    of ../shared/realdata): its photographs on the 0-3 scale, and each one's dataset by path."""
    root = Path(root)
    labels = root / "labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"{labels} not found")
    with open(labels, newline="") as file:
        rows = list(csv.DictReader(file))
    samples = []
    for line, row in enumerate(rows, start=2):
        if row.get("grade", "").strip() not in ("0", "1", "2", "3", "4") or not row.get("file"):
            raise ValueError(
                f"{labels} line {line}: needs a file and a grade 0-4, got "
                f"{row.get('file')!r} and {row.get('grade')!r}"
            )
        samples.append(
            Sample(
                str(root / row["file"]),
                from_aptos(int(row["grade"])),
                Path(row["file"]).stem,
                group=row.get("group") or None,
            )
        )
    return samples, {str(root / row["file"]): row.get("dataset", "") for row in rows}


def stratified_split(
    samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """About `val_fraction` of every grade to validation, reproducibly for a seed, keeping each
    group (one person's eyes) on one side. A group counts under its highest grade; a sample
    without a group is a group of its own."""
    groups: dict[str, list[Sample]] = {}
    for n, sample in enumerate(samples):
        groups.setdefault(sample.group if sample.group is not None else f"\0{n}", []).append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for grade in GRADES:
        members = [g for g in groups.values() if max(s.grade or 0 for s in g) == grade]
        rng.shuffle(members)
        wanted, taken = round(sum(map(len, members)) * val_fraction), 0
        for group in members:
            # A group goes to validation while that brings the count no farther from the target.
            if taken < wanted and abs(taken + len(group) - wanted) <= abs(taken - wanted):
                val += group
                taken += len(group)
            else:
                train += group
    return train, val


def person_folds(samples: Sequence[Sample], folds: int, seed: int = 0) -> list[int]:
    """A fold (0 .. folds-1) per sample, reproducibly for a seed: each group (one person's
    eyes) in one fold, and each grade spread evenly over the folds (a group counts under its
    highest grade; a sample without a group is a group of its own)."""
    groups: dict[str, list[int]] = {}
    for n, sample in enumerate(samples):
        groups.setdefault(sample.group if sample.group is not None else f"\0{n}", []).append(n)
    rng = random.Random(seed)
    fold_of = [0] * len(samples)
    for grade in GRADES:
        members = [g for g in groups.values() if max(samples[n].grade or 0 for n in g) == grade]
        rng.shuffle(members)
        filled = [0] * folds
        for group in sorted(members, key=len, reverse=True):  # large groups first: even folds
            fold = filled.index(min(filled))
            filled[fold] += len(group)
            for n in group:
                fold_of[n] = fold
    return fold_of


def person_halves(samples: Sequence[Sample], seed: int) -> np.ndarray:
    """0/1 per sample: two halves, stratified by grade, that keep each person whole; for
    figures judged on one half with what was fitted on the other."""
    _, second = stratified_split(samples, 0.5, seed)
    paths = {s.path for s in second}
    return np.array([s.path in paths for s in samples], int)


def train_val_test_split(
    samples: Sequence[Sample], seed: int = 0, test_share: float = 0.25, val_share: float = 0.2
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """A held-out test split, then validation out of the rest, each stratified by grade and
    kept whole by group: the same images for a seed wherever a measurement needs them."""
    rest, test = stratified_split(samples, test_share, seed)
    train, val = stratified_split(rest, val_share, seed)
    assert not shared_groups(rest, test) and not shared_groups(train, val)
    return train, val, test


def shared_groups(train: Sequence[Sample], val: Sequence[Sample]) -> set[str]:
    """Groups with images on both sides of a split (none, when the split kept them whole)."""
    return {s.group for s in train if s.group} & {s.group for s in val if s.group}


def same_content(samples: Sequence[Sample], others: Sequence[Sample]) -> set[str]:
    """Paths of `samples` whose file holds the same bytes as a file of `others` (a copy under
    another name). Only files of equal size are hashed, so this reads few bytes."""

    def size(sample: Sample) -> int:
        return os.stat(sample.path).st_size if os.path.isfile(sample.path) else -1

    def digest(path: str) -> str:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "blake2b").hexdigest()

    other_sizes = {size(o) for o in others} - {-1}
    candidates = [s for s in samples if size(s) in other_sizes]
    wanted = {size(s) for s in candidates}
    hashes = {digest(o.path) for o in others if size(o) in wanted}
    return {s.path for s in candidates if digest(s.path) in hashes}


MANIFEST_COLUMNS = ["split", "path", "grade", "name", "image_id", "group"]


def write_manifest(path: Path, train: Sequence[Sample], val: Sequence[Sample]) -> None:
    """Exactly which images and labels a run learns from and is judged on, as CSV."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(MANIFEST_COLUMNS)
        for split, samples in (("train", train), ("validation", val)):
            for s in samples:
                writer.writerow([split, s.path, s.grade, s.name, s.image_id, s.group])


def read_manifest(path: Path) -> tuple[list[Sample], list[Sample]]:
    """The (train, validation) samples `write_manifest` wrote."""
    out: dict[str, list[Sample]] = {"train": [], "validation": []}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            out[row["split"]].append(
                Sample(
                    row["path"],
                    int(row["grade"]),
                    row["name"],
                    int(row["image_id"]) if row["image_id"] else None,
                    row["group"] or None,
                )
            )
    return out["train"], out["validation"]


PROBABILITY_COLUMNS = ["path", "grade", "group", "p0", "p1", "p2", "p3"]


def write_probabilities(path: Path, samples: Sequence[Sample], probs: np.ndarray) -> None:
    """A model's class probabilities for labelled images, one row each, as CSV."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(PROBABILITY_COLUMNS)
        for sample, row in zip(samples, probs, strict=True):
            writer.writerow([sample.path, sample.grade, sample.group or "", *(f"{p:.6g}" for p in row)])


def read_probabilities(path: Path) -> tuple[list[Sample], np.ndarray]:
    """The samples and probabilities `write_probabilities` wrote."""
    samples, probs = [], []
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            samples.append(
                Sample(row["path"], int(row["grade"]), Path(row["path"]).stem, group=row["group"] or None)
            )
            probs.append([float(row[f"p{k}"]) for k in range(4)])
    return samples, np.array(probs, np.float64).reshape(-1, 4)


def class_counts(samples: Sequence[Sample]) -> list[int]:
    counts = Counter(s.grade for s in samples)
    return [counts.get(g, 0) for g in GRADES]


def class_weights(samples: Sequence[Sample], power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency weights raised to `power` (0.5: square root), mean 1 over the classes
    present."""
    counts = torch.tensor(class_counts(samples), dtype=torch.float)
    weights = torch.where(counts > 0, counts.sum() / counts.clamp(min=1), torch.zeros(())) ** power
    return weights / weights[counts > 0].mean()


class RandomRot90(torch.nn.Module):
    """A quarter turn 0-3 times: with a mirror, every symmetry of the square, at no cost."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, int(torch.randint(4, ())), dims=(-2, -1))


AUGMENTATIONS = ("light", "strong", "none")


def augmentation(size: int, magnitude: int, strength: str = "strong") -> T.Compose:
    """Fundus photographs have no up or left: flips and rotations are free. "light" stops
    there (quarter turns and a mirror); "strong" turns by any angle and varies scale, colour
    and blur mildly, as between cameras; "none" only resizes (runs that must compare step by
    step). `magnitude` > 0 adds RandAugment."""
    if strength == "none":
        steps = [T.Resize(size, antialias=True)]
    elif strength == "light":
        steps = [T.Resize(size, antialias=True), T.RandomHorizontalFlip(), RandomRot90()]
    else:
        steps = [
            T.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.95, 1.05), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.RandomRotation(180),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.02),
            T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 1.0))], p=0.2),
        ]
    if magnitude > 0:
        steps.append(T.RandAugment(num_ops=2, magnitude=magnitude))
    return T.Compose(steps)


class FundusDataset(Dataset):
    """Preprocessed, optionally augmented images as normalised CHW float tensors.

    An item is (image, label, index), with label -1 when unknown; an unreadable file gives
    (None, message, index) and `collate` drops it, so a corrupt image never stops a run.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        prep: PreprocessConfig,
        mean: Sequence[float],
        std: Sequence[float],
        cache_root: Path | None = None,
        size: int | None = None,
        augment: str | None = None,
        magnitude: int = 0,
    ):
        self.samples = list(samples)
        self.prep = prep
        self.cache = PreprocessCache(cache_root) if cache_root else None
        self.size = size or prep.size
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255
        self.transform = augmentation(self.size, magnitude, augment) if augment else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            pixels = load_preprocessed(Path(sample.path), self.prep, self.cache)
        except ImageError as exc:
            return None, str(exc), index
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        if self.transform is not None:
            image = self.transform(image)
        elif image.shape[-1] != self.size:
            image = T.functional.resize(image, [self.size, self.size], antialias=True)
        image = (image.float() - self.mean) / self.std
        return image, -1 if sample.grade is None else sample.grade, index


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """Stack the readable items; return the unreadable ones as (index, reason)."""
    good = [item for item in batch if item[0] is not None]
    failed = [(index, reason) for image, reason, index in batch if image is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), failed
    images, labels, indices = zip(*good, strict=True)
    return torch.stack(images), torch.tensor(labels), torch.tensor(indices), failed


def default_workers() -> int:
    """Loader processes of one training or inference process. With a GPU the cores have only
    decoding to do: all but one, shared among this machine's processes (torchrun's
    LOCAL_WORLD_SIZE), up to 16 each. On a CPU the model's own threads need the cores: none on
    a 2-core machine, where a warm cache leaves little to load (bench/inference.py)."""
    cores = os.cpu_count() or 2
    if torch.cuda.is_available():
        return max(1, min(16, (cores - 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return max(0, min(4, cores // 2 - 1))


def _ignore_sigterm(_worker: int) -> None:
    # Cancelling a job signals its whole process group; the workers must leave the stop to
    # the main process, which finishes the batch and records "cancelled".
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class SizedSampler(Protocol):
    """A sampler that knows how many draws it makes, as torch's samplers do (their base class
    does not promise it)."""

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...


class RankShare(Sampler[int]):
    """Rank `rank`'s share of `sampler`'s draws, which every rank makes alike (same seed):
    every `world`-th draw, so that the ranks' batches together are the batch one process
    would take. The draws are padded with their own start to a multiple of `world`, so that
    every rank takes as many steps."""

    def __init__(self, sampler: SizedSampler, rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world

    def __iter__(self) -> Iterator[int]:
        draws = list(self.sampler)
        draws += (draws * self.world)[: -len(draws) % self.world]
        return iter(draws[self.rank :: self.world])

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.world)


def create_loader(
    dataset: FundusDataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    shuffle: bool = False,
    balanced: bool = False,
    seed: int = 0,
    share: tuple[int, int] = (0, 1),
) -> DataLoader:
    """A DataLoader with pinned memory on CUDA; `balanced` samples every grade equally often.
    `share` = (rank, world size): this rank's share of the draws (RankShare)."""
    draws = torch.Generator().manual_seed(seed)
    sampler: SizedSampler = SequentialSampler(dataset)
    if balanced:
        weights = class_weights(dataset.samples)[[s.grade for s in dataset.samples]]
        sampler = WeightedRandomSampler(weights.tolist(), len(dataset), generator=draws)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=draws)
    rank, world = share
    if world > 1:
        sampler = RankShare(sampler, rank, world)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        # Worker seeds (augmentation) of a rank's own, unlike its draws.
        generator=torch.Generator().manual_seed(seed * 65_537 + rank),
        worker_init_fn=_ignore_sigterm,
    )
