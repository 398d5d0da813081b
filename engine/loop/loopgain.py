"""The loop gain: does reviewing the model's confident predictions make a better model than
taking them unreviewed, and which queue order gets the most out of each decision?

    python -m engine.loop.loopgain [--data DIR | --synthetic N] [--minutes 5 | --epochs N]
                              [--rounds 2] [--labelled-share 0.3] [--decisions 100]
                              [--error-rate 0.05] [--order [confidence random flip]] [--seed 0]
                              [--threshold 0.7] [--train-args "--img-size 384 ..."] [--out FILE]
                              [--repeats 3]

The labelled set (--data: a folder with labels.csv as ../shared/realdata, an APTOS folder with
train.csv, or class folders 0/ 1/ 2/ 3/; --synthetic: APTOS-style photographs drawn for the
run; by default ../shared/realdata when present, else synthetic photographs) is split by group
and grade as bench.realdata splits it: a held-out test split, a validation split (each run's
checkpoint and temperature), and of the rest a labelled share; the other images are the pool,
their grades hidden.

A baseline trains on the labelled share. Then, each round, the arm's current model predicts what
is left of the pool (with flip TTA), the arm labels some of it and the model retrains, from the
same pretrained start, on the labelled share and every label given so far. The arms:
- curated, every candidate: a simulated reviewer decides every candidate at or above the
  threshold, as reviewers who work through the app's queue do, from the hidden truth: accepts a
  right grade and corrects a wrong one, but with probability --error-rate slips instead (accepts
  the wrong grade, or moves a right one to a neighbouring grade);
- curated, one per --order: the same reviewer decides only the first --decisions candidates in
  that queue order, which measures what each order gets out of a limited budget;
- pseudo: every candidate at or above the threshold taken as predicted, unreviewed;
- oracle: every pool image with its true grade, in one training (--no-oracle skips it).
Every training is the engine's (`python -m engine.training.train` with --train-args), in --minutes or
for --epochs.
Every model is judged on the test split: QWK and referable-DR AUC. The rows go to --out after
every training, so a run cut short keeps what it measured; at the end the table and the QWK each
curated arm gained per 100 decisions, against random order, are printed and written there too.

--repeats N measures every arm N times, each time with the next seed (another split, another
training). The curated arm that decides every candidate is then compared with the baseline
and with the unreviewed pseudo-labels on the same test images, per dataset and pooled: the
mean difference over the repeats in QWK and referable AUC, with a 95 % interval that draws the
repeats and then the people of each (engine.training.screening.repeated_difference).
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from cli import HelpFormatter, setup_logging
from engine.data.datasets import (
    Sample,
    class_counts,
    folder_samples,
    labels_csv_samples,
    stratified_split,
    train_val_test_split,
)
from engine.data.sources import ImportStopped, list_source
from engine.data.synth import write_dataset
from engine.loop.queue_order import ORDERS, queue_order
from engine.model.metrics import grading_summary, with_interval
from engine.model.networks import WeightsMismatch, load_checkpoint
from engine.model.predictor import Predictions, default_batch_size, model_views, predict
from engine.runtime.workspace import Workspace
from engine.training.refit import train_model
from engine.training.screening import Judged, repeated_difference
from engine.training.train import make_config, parse_args
from engine.training.trainer import LogHooks, RunPaths, TrainingStopped
from grades import GRADES, REVIEW_THRESHOLD

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
REALDATA = ROOT.parent / "shared" / "realdata"
OUT = ROOT / "bench" / "out" / "loopgain.json"
SYNTHETIC_IMAGES = 480
MINUTES = 5.0  # each training's budget by default
METRICS = ("qwk", "referable_auc", "accuracy", "sens_at_90_spec", "ece")
EVERY = "all"  # the curated arm that decides every candidate, beside the budgeted orders
# The differences --repeats reports: (first arm, second arm), each at its last round.
COMPARED = {
    "curated − baseline": (f"curated-{EVERY}", "baseline"),
    "curated − unreviewed": (f"curated-{EVERY}", "pseudo"),
}

Fitted = tuple[torch.nn.Module, dict]  # a trained model and its checkpoint's meta


class Label(NamedTuple):
    sample: Sample  # its grade is the truth
    grade: int  # the grade given
    predicted: int | None  # the model's, where a model proposed it


# A round's new labels, the decisions they took and the candidates there were.
Labeller = Callable[[list[Sample], Predictions, int], tuple[list[Label], int, int]]


class UnusableData(Exception):
    """The labelled set cannot be read or split; the message says why."""


@dataclasses.dataclass(frozen=True)
class LoopSplit:
    labelled: list[Sample]
    pool: list[Sample]  # their grades are the hidden truth the simulated reviewer knows
    val: list[Sample]
    test: list[Sample]


def loop_split(samples: list[Sample], labelled_share: float, seed: int) -> LoopSplit:
    """bench.realdata's test and validation splits; the rest into labelled share and pool."""
    train, val, test = train_val_test_split(samples, seed)
    pool, labelled = stratified_split(train, labelled_share, seed)
    return LoopSplit(labelled, pool, val, test)


def labelled_set(
    data: Path | None, synthetic: int | None, scratch: Path, seed: int
) -> tuple[list[Sample], dict[str, str], Path]:
    """The labelled photographs of --data, or `synthetic` ones drawn into `scratch`, or of the
    default; each one's dataset by path (where labels.csv names it); the folder they are in."""
    if data is None and synthetic is None and (REALDATA / "labels.csv").is_file():
        data = REALDATA
    if data is None:
        images = synthetic or SYNTHETIC_IMAGES
        log.info("drawing %d synthetic photographs", images)
        write_dataset(scratch / "synthetic", seed, n_train=images, n_test=0, n_val=0, n_messidor=0)
        data = scratch / "synthetic" / "aptos"
    if (data / "labels.csv").is_file():
        try:
            return *labels_csv_samples(data), data
        except ValueError as exc:  # a row without a grade 0-4, named in the message
            raise UnusableData(str(exc)) from None
    if (data / "train.csv").is_file():
        root, entries, problems = list_source("aptos", data, "train")
        for problem in problems:
            log.warning("skipped %s", problem)
        samples = [Sample(str(root / e.path), e.grade, e.name, group=e.extra.get("group")) for e in entries]
        return samples, {}, data
    return folder_samples(data), {}, data


@dataclasses.dataclass(frozen=True)
class SimulatedReviewer:
    """Decides from the truth: accepts a right grade and corrects a wrong one, except that with
    probability `error_rate` it slips: accepts the wrong grade, or moves a right one to a
    neighbouring grade. Its draws depend on the image and the seed alone, so that two queue
    orders that reach the same image get the same decision on it."""

    error_rate: float
    seed: int = 0

    def _draw(self, image: str, what: str) -> float:
        """A number in [0, 1) fixed by the seed, the image and what it decides."""
        digest = hashlib.blake2b(f"{self.seed}:{what}:{image}".encode(), digest_size=8).digest()
        return int.from_bytes(digest) / 2**64

    def decide(self, image: str, predicted: int, truth: int) -> tuple[str, int]:
        """(accept or relabel, the grade the image gets)."""
        slip = self._draw(image, "slip") < self.error_rate
        if predicted != truth:
            return ("accept", predicted) if slip else ("relabel", truth)
        if not slip:
            return "accept", truth
        neighbours = [g for g in (truth - 1, truth + 1) if g in GRADES]
        return "relabel", neighbours[int(self._draw(image, "grade") * len(neighbours))]


def candidates(preds: Predictions, threshold: float) -> np.ndarray:
    """Positions in `preds` of the predictions at or above the threshold."""
    return np.flatnonzero(preds.probs.max(1) >= threshold)


def reviewed(
    order: str, budget: int | None, reviewer: SimulatedReviewer, threshold: float, seed: int
) -> Labeller:
    """The curated arm's round: the reviewer decides the first `budget` candidates in `order`,
    or every candidate with no budget."""

    def label(left: list[Sample], preds: Predictions, round_: int):
        found = candidates(preds, threshold)
        queue = found[queue_order(order, preds.probs[found], preds.views[found], seed * 1000 + round_)][
            :budget
        ]
        labels = []
        for k in queue:
            sample, predicted = left[preds.indices[k]], int(preds.grades[k])
            _, grade = reviewer.decide(sample.path, predicted, sample.grade)
            labels.append(Label(sample, grade, predicted))
        return labels, len(queue), len(found)

    return label


def unreviewed(threshold: float) -> Labeller:
    """The pseudo-label arm's round: every candidate as predicted, no decision."""

    def label(left: list[Sample], preds: Predictions, round_: int):
        found = candidates(preds, threshold)
        grades = preds.grades[found].tolist()
        labels = [Label(left[preds.indices[k]], g, g) for k, g in zip(found, grades, strict=True)]
        return labels, 0, len(found)

    return label


class Lab:
    """Trains and judges the models of one split in one scratch workspace."""

    def __init__(
        self,
        split: LoopSplit,
        train_args: list[str],
        budget: list[str],
        seed: int,
        threshold: float,
        scratch: Path,
    ):
        """`budget`: the engine.training.train options that size each training (--minutes or --epochs)."""
        self.split, self.threshold = split, threshold
        self.config = make_config(
            parse_args(["--data-path", "loopgain", *budget, "--seed", str(seed), *train_args])
        )
        self.device = torch.device(self.config.device)
        self.workspace = Workspace(scratch / "workspace")
        self.judged: dict[str, Judged] = {}  # each arm's latest model on the test split

    def train(self, name: str, samples: list[Sample]) -> Fitted:
        budget = f"{self.config.minutes:g} min" if self.config.minutes else f"epochs: {self.config.epochs}"
        log.info("%s: training on %d images %s, %s", name, len(samples), class_counts(samples), budget)
        paths = RunPaths.under(self.workspace, f"seed{self.config.seed}-{name}")
        config = dataclasses.replace(self.config)  # training fixes its epochs for the budget
        train_model(config, samples, self.split.val, paths, self.workspace.cache, LogHooks())
        return load_checkpoint(paths.best, self.device)

    def predict(self, fitted: Fitted, samples: list[Sample]) -> Predictions:
        """With the test-time views the model was calibrated with (at least the mirror image,
        which the flip order compares), as the app predicts a pool."""
        model, meta = fitted
        return predict(
            model,
            meta,
            samples,
            self.device,
            default_batch_size(self.device),
            self.config.workers,
            max(model_views(meta), 2),
            self.workspace.cache,
        )

    def judge(self, arm: str, fitted: Fitted) -> dict:
        """The model's figures on the test split; its probabilities are kept as the arm's."""
        preds = self.predict(fitted, self.split.test)
        tested = [self.split.test[i] for i in preds.indices]
        self.judged[arm] = (tested, preds.probs)
        summary = grading_summary(preds.probs, np.array([s.grade for s in tested]), self.threshold)
        return {key: summary[key] for key in METRICS}

    def row(
        self, arm: str, round_: int, fitted: Fitted, given: list[Label], decisions: int, found: int
    ) -> dict:
        row = {
            "round": round_,
            "candidates": found,
            "decisions": decisions,
            "pool_labels": len(given),
            "label_errors": sum(label.grade != label.sample.grade for label in given),
            # where a decision changed the model's grade: what review adds
            "corrections": sum(label.predicted not in (None, label.grade) for label in given),
            "train_images": len(self.split.labelled) + len(given),
            "epochs": fitted[1]["train_config"]["epochs"],
            **self.judge(arm, fitted),
        }
        log.info(
            "  round %d: test QWK %.3f, referable AUC %.3f, %d decisions",
            round_,
            row["qwk"],
            row["referable_auc"],
            decisions,
        )
        return row

    def run_arm(
        self,
        name: str,
        labeller: Labeller,
        baseline: Fitted,
        baseline_row: dict,
        first: Predictions,
        rounds: int,
        rows: list[dict],
        save: Callable[[], None],
    ) -> None:
        """Rounds of: the current model predicts what is left of the pool, `labeller` labels
        some of it, the model retrains on the labelled share and every label so far. `first` holds
        the baseline's predictions of the whole pool, the same for every arm."""
        fitted, preds, decisions, row = baseline, first, 0, baseline_row
        self.judged[name] = self.judged["baseline"]  # until the arm trains a model of its own
        given: list[Label] = []
        for round_ in range(1, rounds + 1):
            done = {label.sample.path for label in given}
            left = [s for s in self.split.pool if s.path not in done]
            if round_ > 1:
                preds = self.predict(fitted, left)
            labels, spent, found = labeller(left, preds, round_)
            if labels:
                given, decisions = given + labels, decisions + spent
                # In path order: arms that gave the same labels train alike, whatever their queue.
                fitted = self.train(
                    f"{name}-r{round_}",
                    self.split.labelled
                    + [
                        dataclasses.replace(label.sample, grade=label.grade)
                        for label in sorted(given, key=lambda label: label.sample.path)
                    ],
                )
                row = self.row(name, round_, fitted, given, decisions, found)
            else:  # the same images and labels would train the same model again
                log.info("%s-r%d: no new labels; the model stays", name, round_)
                row = {**row, "round": round_, "candidates": found}
            rows.append(row)
            save()


def measure(lab: Lab, args: argparse.Namespace, report: dict, save: Callable[[], None]) -> None:
    """Every arm into report["arms"], saving after every training."""
    split, arms, seed = lab.split, report["arms"], lab.config.seed
    baseline = lab.train("baseline", split.labelled)
    arms["baseline"] = [lab.row("baseline", 0, baseline, [], 0, 0)]
    save()
    first = lab.predict(baseline, split.pool)
    arms["curated"] = {}
    reviewer = SimulatedReviewer(args.error_rate, seed)
    # Deciding every candidate, the queue order changes nothing: the default one serves.
    budgets = {EVERY: (ORDERS[0], None), **{order: (order, args.decisions) for order in args.order}}
    for key, (order, budget) in budgets.items():
        lab.run_arm(
            f"curated-{key}",
            reviewed(order, budget, reviewer, args.threshold, seed),
            baseline,
            arms["baseline"][0],
            first,
            args.rounds,
            arms["curated"].setdefault(key, []),
            save,
        )
    arms["pseudo"] = []
    lab.run_arm(
        "pseudo",
        unreviewed(args.threshold),
        baseline,
        arms["baseline"][0],
        first,
        args.rounds,
        arms["pseudo"],
        save,
    )
    if args.oracle:
        oracle = lab.train("oracle", split.labelled + split.pool)
        truth = []
        for s in split.pool:
            assert s.grade is not None  # the pool is labelled photographs, their grades hidden
            truth.append(Label(s, s.grade, None))
        arms["oracle"] = [lab.row("oracle", 1, oracle, truth, len(split.pool), len(split.pool))]
    report["gains"] = gains(arms)
    save()


def gains(arms: dict) -> dict:
    """Per curated arm, at its last round: test QWK over the baseline, per 100 decisions, that
    less random order's, and over the unreviewed pseudo-labels' last round."""
    base, pseudo = arms["baseline"][0]["qwk"], arms["pseudo"][-1]["qwk"]
    out = {}
    for order, rows in arms["curated"].items():
        last = rows[-1]
        per_100 = 100 * (last["qwk"] - base) / last["decisions"] if last["decisions"] else math.nan
        out[order] = {
            "decisions": last["decisions"],
            "qwk": last["qwk"],
            "over_baseline": last["qwk"] - base,
            "per_100_decisions": per_100,
            "over_pseudo": last["qwk"] - pseudo,
        }
    for figures in out.values():
        figures["per_100_over_random"] = (
            figures["per_100_decisions"] - out["random"]["per_100_decisions"] if "random" in out else math.nan
        )
    return out


def differences(judged: list[dict[str, Judged]], datasets: dict[str, str]) -> dict:
    """COMPARED's differences on the test split, pooled and per dataset, over the repeats."""
    sources = sorted({datasets[s.path] for run in judged for s in run["baseline"][0] if s.path in datasets})

    def only(arm: Judged, source: str) -> Judged:
        keep = [n for n, s in enumerate(arm[0]) if source == "pooled" or datasets.get(s.path) == source]
        return [arm[0][n] for n in keep], arm[1][keep]

    return {
        compared: {
            source: repeated_difference([(only(run[a], source), only(run[b], source)) for run in judged])
            for source in ("pooled", *sources)
        }
        for compared, (a, b) in COMPARED.items()
    }


def named_arm(key: str) -> str:
    return "every candidate" if key == EVERY else f"{key} order"


def table(arms: dict) -> str:
    """Every round of every arm, as a Markdown table."""
    lines = [
        "| arm | round | candidates | decisions | corrections | pool labels (wrong) "
        "| training images | epochs | test QWK | referable AUC |",
        "|---" * 10 + "|",
    ]
    named = [
        ("baseline", arms.get("baseline", [])),
        *((f"curated, {named_arm(key)}", rows) for key, rows in arms.get("curated", {}).items()),
        ("pseudo-labels, unreviewed", arms.get("pseudo", [])),
        ("oracle", arms.get("oracle", [])),
    ]
    for name, rows in named:
        for r in rows:
            lines.append(
                f"| {name} | {r['round']} | {r['candidates']} | {r['decisions']} | "
                f"{r['corrections']} | {r['pool_labels']} ({r['label_errors']}) | "
                f"{r['train_images']} | "
                f"{r['epochs']} | {r['qwk']:.3f} | {r['referable_auc']:.3f} |"
            )
    return "\n".join(lines)


def gains_table(gained: dict) -> str:
    lines = [
        "| curated | decisions | test QWK | over baseline | per 100 decisions "
        "| per 100, over random | over unreviewed |",
        "|---" * 7 + "|",
    ]
    for key, g in gained.items():
        lines.append(
            f"| {named_arm(key)} | {g['decisions']} | {g['qwk']:.3f} | "
            f"{g['over_baseline']:+.3f} | {g['per_100_decisions']:+.4f} | "
            f"{g['per_100_over_random']:+.4f} | {g['over_pseudo']:+.3f} |"
        )
    return "\n".join(lines)


def differences_table(found: dict) -> str:
    lines = [
        "| test split, paired | dataset | repeats | images | QWK [95 %] | referable AUC [95 %] |",
        "|---" * 6 + "|",
    ]
    for compared, by_source in found.items():
        for source, d in by_source.items():
            lines.append(
                f"| {compared} | {source} | {d['repeats']} | {d['images']} | "
                f"{with_interval(d['qwk'], '+.3f')} | {with_interval(d['referable_auc'], '+.3f')} |"
            )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine.loop.loopgain", description=__doc__, formatter_class=HelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data",
        type=Path,
        help="labelled set (default: ../shared/realdata "
        f"when present, else {SYNTHETIC_IMAGES} synthetic photographs)",
    )
    source.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="draw N synthetic APTOS-style photographs as the labelled set",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help=f"budget of each training (default: {MINUTES:g})")
    budget.add_argument("--epochs", type=int, help="epochs of each training instead of a budget of minutes")
    parser.add_argument("--rounds", type=int, default=2, help="review and retrain rounds")
    parser.add_argument(
        "--labelled-share",
        type=float,
        default=0.3,
        help="share of the training images labelled from the start",
    )
    parser.add_argument("--decisions", type=int, default=100, help="decisions per round of each --order arm")
    parser.add_argument(
        "--error-rate", type=float, default=0.05, help="how often the simulated reviewer decides wrongly"
    )
    parser.add_argument(
        "--order",
        nargs="*",
        choices=ORDERS,
        default=["confidence", "random", "flip"],
        help="queue orders to compare on --decisions (none: only the arm that decides every candidate)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=REVIEW_THRESHOLD,
        help="confidence that makes a prediction a review candidate",
    )
    parser.add_argument(
        "--oracle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the oracle arm (a training per repeat; the differences do not use it)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure every arm this many times, with seeds --seed, --seed + 1, …, "
        "and report the paired differences over them",
    )
    parser.add_argument("--train-args", default="", help="extra engine.training.train options")
    parser.add_argument("--out", type=Path, default=OUT, help="the report (JSON)")
    args = parser.parse_args(argv)
    for name, value, low, high in (
        ("--labelled-share", args.labelled_share, 0, 1),
        ("--error-rate", args.error_rate, 0, 1),
        ("--threshold", args.threshold, 0, 1),
    ):
        if not low <= value <= high:
            parser.error(f"{name} must be between {low} and {high}, got {value}")
    for name, value in (
        ("--minutes", args.minutes),
        ("--epochs", args.epochs),
        ("--rounds", args.rounds),
        ("--decisions", args.decisions),
        ("--synthetic", args.synthetic),
        ("--repeats", args.repeats),
    ):
        if value is not None and value <= 0:
            parser.error(f"{name} must be above 0, got {value}")
    args.order = list(dict.fromkeys(args.order))
    if args.epochs is None and args.minutes is None:
        args.minutes = MINUTES
    return args


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


def run(args: argparse.Namespace, scratch: Path) -> dict:
    samples, datasets, data = labelled_set(args.data, args.synthetic, scratch, args.seed)
    report: dict[str, Any] = {"data": str(data), "options": vars(args), "runs": []}
    started = time.perf_counter()

    def save() -> None:
        report["seconds"] = time.perf_counter() - started
        write(args.out, report)

    budget = ["--epochs", str(args.epochs)] if args.epochs else ["--minutes", str(args.minutes)]
    judged = []
    for seed in range(args.seed, args.seed + args.repeats):
        split = split_of(samples, data, args.labelled_share, seed)
        lab = Lab(split, shlex.split(args.train_args), budget, seed, args.threshold, scratch)
        report["runs"].append(
            {"seed": seed, "split": sizes_of(split), "config": dataclasses.asdict(lab.config), "arms": {}}
        )
        measure(lab, args, report["runs"][-1], save)
        judged.append(lab.judged)
        report["differences"] = differences(judged, datasets)
        save()
    return report


def sizes_of(split: LoopSplit) -> dict[str, int]:
    return {part: len(getattr(split, part)) for part in ("labelled", "pool", "val", "test")}


def split_of(samples: list[Sample], data: Path, labelled_share: float, seed: int) -> LoopSplit:
    split = loop_split(samples, labelled_share, seed)
    sizes = sizes_of(split)
    if not all(sizes.values()):
        raise UnusableData(
            f"{data}: {len(samples)} images are too few to split into "
            f"{', '.join(f'{n} {part}' for part, n in sizes.items())}"
        )
    log.info(
        "%s, seed %d: split by group into %s",
        data,
        seed,
        ", ".join(f"{n} {part} {class_counts(getattr(split, part))}" for part, n in sizes.items()),
    )
    return split


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="loopgain-") as scratch:
            report = run(args, Path(scratch))
    except (FileNotFoundError, ImportStopped, UnusableData, WeightsMismatch) as exc:
        log.error("%s", exc)
        return 2
    except TrainingStopped as exc:
        log.error("stopped: %s", exc)
        return 1
    for measured in report["runs"]:
        print(f"seed {measured['seed']}:")
        print(table(measured["arms"]))
        print()
        print("QWK gained per 100 decisions (last round):")
        print(gains_table(measured["gains"]))
        print()
    print(differences_table(report["differences"]))
    print(f"{report['seconds'] / 60:.1f} min; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
