"""Real photographs: the engine's training defaults against a plain reference loop, on the
same split, from the same pretrained start, in the same budget of minutes for the model.

    .venv/bin/python -m bench.realdata [--minutes 20] [--seed 0] [--only defaults|reference]
                                       [--train-args "--img-size 384 ..."] [--screen]
                                       [--against bench/out/screen-448.json] [--seeds 5]

../shared/realdata (labels.csv: file, grade 0-4, dataset, group) is split by group, stratified
by grade: 25 % test, then 20 % of the rest for validation (the split `engine.training.train
--data-path` makes). The defaults are what `python -m engine.training.train` does with no options but
`--minutes` (plus --train-args, for trying a change): a validation phase trained on the
training split gives the validation figures, the temperature and the operating point, and
the model is then trained on training and validation images together. The reference loop
trains on training and validation images too, for the same minutes.

--screen compares recipes: the defaults without the final training (--refit false), and
validation figures only; the test split is not read. Without it, every finished recipe is
read once on the test split. Every figure names its split, and comes with a 95 % bootstrap
interval by person (1,000 resamples); differences between the two methods are paired (the
same resamples). The tables are printed and written to bench/out/realdata.json.

--against REPORT sets this recipe beside an earlier one on the same split: the paired
difference of their validation figures (this run minus REPORT's defaults), per dataset, with
its interval. Screens are chosen between this way.

--seeds N measures how much the same training differs from itself: the defaults alone, N
times on the one split of --seed, with training seeds --seed, --seed + 1, … (another head
initialisation, image order and augmentation), and the mean, standard deviation and range
of their QWK and referable AUC per split and dataset; and the same over every pair of runs
with their probabilities averaged, which says how much a two-model ensemble would steady
the figures. `--train-args "--epochs E"` fixes the defaults' epochs instead of fitting them
into the minutes, so that a timing taken under another load cannot change the count from
one run to the next.

The photographs are decoded and cropped once, before any training and outside every budget
(the reference decodes its own outside its budget too), into a cache beside --out that later
runs reuse.
"""

import argparse
import functools
import json
import shlex
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from bench.common import REALDATA
from bench.reference import reference_probs, train_reference
from cli import HelpFormatter, setup_logging
from engine.data.datasets import Sample, labels_csv_samples, read_probabilities, train_val_test_split
from engine.data.preprocess import PreprocessCache, PreprocessConfig, fill_cache
from engine.model.metrics import expected_calibration_error, screening_summary, with_interval
from engine.model.networks import load_checkpoint
from engine.model.predictor import predict
from engine.runtime.workspace import Workspace
from engine.training.refit import VALIDATION, train_model
from engine.training.screening import paired_difference
from engine.training.train import make_config, parse_args
from engine.training.trainer import LogHooks, RunPaths

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "realdata.json"
DATASETS = ("messidor-2", "eyepacs-2015-test")
SOURCES = ("pooled", *DATASETS)


def load_realdata(root: Path) -> tuple[list[Sample], dict[str, str]]:
    """The labelled photographs on the 0-3 scale, and each one's dataset by path."""
    try:
        return labels_csv_samples(root)
    except FileNotFoundError as exc:
        raise SystemExit(f"{exc}: this benchmark needs ../shared/realdata") from None


def per_source(samples: list[Sample], datasets: dict[str, str]) -> dict[str, np.ndarray]:
    which = np.array([datasets.get(s.path, "") for s in samples])
    return {name: np.ones(len(samples), bool) if name == "pooled" else which == name for name in SOURCES}


def figures(probs: np.ndarray, samples: list[Sample], datasets: dict[str, str], threshold: float) -> dict:
    """QWK, referable AUC, sensitivity and specificity at `threshold` (NaN: none), with their
    intervals, and the calibration error, per dataset and pooled."""
    labels = np.array([s.grade for s in samples])
    groups = [s.group for s in samples]
    out = {}
    for name, keep in per_source(samples, datasets).items():
        rows = np.flatnonzero(keep)
        out[name] = {
            **screening_summary(probs[rows], labels[rows], [groups[i] for i in rows], threshold),
            "ece": expected_calibration_error(probs[rows], labels[rows]),
        }
    return out


def differences(
    first: np.ndarray, second: np.ndarray, samples: list[Sample], datasets: dict[str, str]
) -> dict:
    """first - second in QWK and referable AUC per dataset, each with its paired interval."""
    out = {}
    for name, keep in per_source(samples, datasets).items():
        shared = [samples[i] for i in np.flatnonzero(keep)]
        out[name] = paired_difference((shared, first[keep]), (shared, second[keep]))
    return out


def test_probs(checkpoint: Path, test: list[Sample], cache: Path) -> np.ndarray:
    """Calibrated test probabilities of a checkpoint, through the engine's predictor with the
    views it was calibrated with."""
    model, meta = load_checkpoint(checkpoint)
    views = meta["train_config"]["tta"]
    result = predict(
        model, meta, test, torch.device("cpu"), batch_size=16, workers=0, tta=views, cache_root=cache
    )
    assert len(result.indices) == len(test), "every test image must be readable"
    return result.probs


def run_defaults(
    train, val, test, datasets, minutes: float, extra: list[str], seed: int, screen: bool, cache: Path
) -> dict:
    refit = ["--refit", "false"] if screen else []
    options = parse_args(["--data-path", "realdata", "--seed", str(seed), *refit, *extra])
    if options.epochs is None:  # --epochs in --train-args replaces the budget
        options.minutes = minutes
    config = make_config(options)
    with tempfile.TemporaryDirectory() as tmp:
        paths = RunPaths.under(Workspace(Path(tmp)), "defaults")
        started = time.perf_counter()
        result = train_model(config, train, val, paths, cache, LogHooks())
        seconds = time.perf_counter() - started
        print(f"  {config.epochs} epochs, {seconds / 60:.1f} min", flush=True)
        checked = paths.phase(VALIDATION) if config.refit and config.folds == 1 else paths
        val_samples, val_probs = read_probabilities(checked.validation)
        threshold = result.calibration["screening"]["threshold"]
        out = {
            "config": vars(config),
            "train_args": extra,
            "seconds": seconds,
            "epochs": config.epochs,
            "temperature": result.calibration["temperature"],
            "threshold": threshold,
            "validation": figures(val_probs, val_samples, datasets, threshold),
            "validation_images": [s.path for s in val_samples],
            "validation_probs": val_probs.tolist(),
        }
        if not screen:
            probs = test_probs(result.best_checkpoint, test, cache)
            out |= {"test": figures(probs, test, datasets, threshold), "test_probs": probs.tolist()}
    return out


def earlier_validation(path: Path, val: list[Sample]) -> np.ndarray:
    """The validation probabilities of REPORT's defaults, in the order of `val`; REPORT must come
    from the same split."""
    try:
        earlier = json.loads(path.read_text())["defaults"]
        same_split = set(earlier["validation_images"]) == {s.path for s in val}
        probs = in_order(earlier, val) if same_split else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--against {path}: not a bench.realdata report of the defaults ({exc})") from None
    if probs is None:
        raise SystemExit(
            f"--against {path}: its validation images are not this split's (run with its --seed and --data)"
        )
    return probs


def in_order(result: dict, val: list[Sample]) -> np.ndarray:
    """This run's validation probabilities in the order of `val`."""
    by_path = dict(zip(result["validation_images"], result["validation_probs"], strict=True))
    return np.array([by_path[s.path] for s in val])


def run_reference(train, val, test, datasets, minutes: float, config, seed: int) -> dict:
    """The reference learns from training and validation images alike (it validates nothing),
    and is read on the test split at 1 and at 8 test-time views."""
    started = time.perf_counter()
    model = config.model
    net = train_reference(model, train + val, minutes, seed=seed, pretrained=config.pretrained)
    seconds = time.perf_counter() - started
    out = {"model": model, "seconds": seconds}
    for views in (1, 8):
        probs = reference_probs(net, model, test, views)
        out[f"test_{views}_views"] = figures(probs, test, datasets, float("nan"))
        out[f"test_probs_{views}_views"] = probs.tolist()
    return out


SPREAD = ("qwk", "referable_auc")


def spread(results: dict, val: list[Sample], test: list[Sample], datasets: dict[str, str]) -> dict:
    """Mean, standard deviation (n - 1) and range over the runs of each figure in SPREAD, per
    split and dataset; from three runs on, the same over every pair of runs with their
    probabilities averaged (two-model ensembles)."""
    out: dict = {}
    for split, samples in (("validation", val), ("test", test)):
        runs = [result for result in results.values() if split in result]
        if len(runs) > 1:
            out[split] = summaries([r[split] for r in runs])
        if len(runs) > 2:  # two runs make one pair, which has no spread
            probs = [
                in_order(r, samples) if split == "validation" else np.array(r["test_probs"]) for r in runs
            ]
            pairs = [figures((a + b) / 2, samples, datasets, float("nan")) for a, b in combinations(probs, 2)]
            out[f"{split}, two runs averaged"] = summaries(pairs)
    return out


def summaries(runs: list[dict]) -> dict:
    return {
        source: {name: summary([r[source][name]["value"] for r in runs]) for name in SPREAD}
        for source in SOURCES
    }


def summary(values: list[float]) -> dict:
    array = np.array(values, np.float64)
    return {
        "runs": len(array),
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def spread_table(found: dict) -> str:
    lines = [
        "| split | dataset | runs (pairs) | QWK: mean, SD (range) | referable AUC: mean, SD (range) |",
        "|---" * 5 + "|",
    ]
    for split, by_source in found.items():
        for source, figures in by_source.items():
            cells = [
                f"{f['mean']:.3f}, SD {f['sd']:.3f} ({f['min']:.3f}-{f['max']:.3f})" for f in figures.values()
            ]
            lines.append(f"| {split} | {source} | {figures['qwk']['runs']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def rows(results: dict) -> list[tuple[str, str, dict]]:
    """(method, split, figures per source) for every table row there is."""
    out = []
    for method, result in results.items():
        for split in ("validation", "test", "test_1_views", "test_8_views"):
            if split in result:
                label = split.replace("_views", " views").replace("_", ", ")
                out.append((method, label, result[split]))
    return out


def markdown(results: dict, paired: dict | None) -> str:
    keys = ("qwk", "referable_auc", "sensitivity", "specificity")
    lines = [
        "| method | split | dataset | images | QWK [95 %] | referable AUC | sensitivity | "
        "specificity | ECE |",
        "|---" * 9 + "|",
    ]
    for method, split, by_source in rows(results):
        for source in SOURCES:
            row = by_source[source]
            lines.append(
                f"| {method} | {split} | {source} | {row['images']} | "
                + " | ".join(with_interval(row.get(k)) for k in keys)
                + f" | {row['ece']:.3f} |"
            )
    if paired:
        lines += ["", difference_table("test split, defaults - reference (8 views)", paired)]
    return "\n".join(lines)


def difference_table(title: str, paired: dict) -> str:
    lines = [f"| {title} | dataset | QWK [95 %] | referable AUC [95 %] |", "|---|---|---|---|"]
    for source in SOURCES:
        lines.append(
            f"| difference | {source} | {with_interval(paired[source]['qwk'], '+.3f')} | "
            f"{with_interval(paired[source]['referable_auc'], '+.3f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.realdata", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REALDATA, help="default: %(default)s")
    parser.add_argument(
        "--minutes",
        type=float,
        default=20.0,
        help="training budget of each model; the defaults' unless --train-args fixes --epochs "
        "(default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split and training seed (default: %(default)s)")
    parser.add_argument("--only", choices=("defaults", "reference"), help="one method alone")
    parser.add_argument("--train-args", default="", help="extra engine.training.train options")
    parser.add_argument(
        "--screen",
        action="store_true",
        help="validation figures of the defaults alone; the test split unread",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train the defaults alone this many times, with training seeds --seed, --seed + 1, …, "
        "and report the spread of their figures (default: %(default)s)",
    )
    parser.add_argument(
        "--against",
        type=Path,
        help="an earlier report (--out) on the same split: the paired difference on validation, "
        "this run's defaults minus its",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be 1 or more, got {args.seeds}")
    if args.seeds > 1 and args.only == "reference":
        parser.error("--seeds trains the defaults alone")
    if args.against and (args.seeds > 1 or args.only == "reference"):
        parser.error("--against compares one run of the defaults")
    setup_logging()

    samples, datasets = load_realdata(args.data)
    train, val, test = train_val_test_split(samples, args.seed)
    print(f"split by group: {len(train)} train, {len(val)} validation, {len(test)} test images", flush=True)
    earlier = earlier_validation(args.against, val) if args.against else None
    extra = shlex.split(args.train_args)
    options = parse_args(["--data-path", "realdata", *extra])
    config = make_config(options)
    cache = args.out.parent / "cache"
    if args.only != "reference":
        print("decoding the photographs once, outside every budget", flush=True)
        prep = PreprocessConfig.from_dict(config.preprocess)
        fill_cache([Path(s.path) for s in samples], prep, PreprocessCache(cache))
    seeds = range(args.seed, args.seed + args.seeds)
    runs = {
        f"defaults, seed {seed}" if args.seeds > 1 else "defaults": functools.partial(
            run_defaults, train, val, test, datasets, args.minutes, extra, seed, args.screen, cache
        )
        for seed in seeds
    }
    if args.seeds == 1 and not args.screen:
        runs["reference"] = functools.partial(
            run_reference, train, val, test, datasets, args.minutes, config, args.seed
        )
    budget = f"{options.epochs} epochs" if options.epochs else f"{args.minutes:g} min"
    wanted = [name for name in runs if not args.only or name.startswith(args.only)]
    results: dict = {}
    paired = against = None
    for method in wanted:
        print(
            f"{method}, {budget} ({' '.join(extra) or 'as they are'}):"
            if method.startswith("defaults")
            else f"{method} loop, {args.minutes:g} min:",
            flush=True,
        )
        results[method] = runs[method]()
        if {"defaults", "reference"} <= results.keys():
            paired = differences(
                np.array(results["defaults"]["test_probs"]),
                np.array(results["reference"]["test_probs_8_views"]),
                test,
                datasets,
            )
        if earlier is not None and method == "defaults":
            against = differences(in_order(results["defaults"], val), earlier, val, datasets)
        found = spread(results, val, test, datasets)
        write(
            args.out,
            {
                "split": {
                    "train": len(train),
                    "validation": len(val),
                    "test": len(test),
                    "seed": args.seed,
                    "test_images": [s.path for s in test],
                },
                "minutes": args.minutes,
                "screen": args.screen,
                **results,
                "defaults_minus_reference": paired,
                "against": {"report": str(args.against), "validation_difference": against}
                if args.against
                else None,
                "spread": found,
            },
        )
    print(markdown(results, paired))
    if against:
        print()
        print(difference_table(f"validation split, this run - {args.against}", against))
    if args.seeds > 1:
        print()
        print(spread_table(found))
    print(f"written to {args.out}")
    return 0


def write(path: Path, report: dict) -> None:
    """After each method, so that a long run cut short keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
