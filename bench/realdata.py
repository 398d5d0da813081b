"""Real photographs: the engine's training defaults against a plain reference loop, on the
same split, from the same pretrained start, in the same budget of minutes.

    .venv/bin/python -m bench.realdata [--minutes 20] [--seed 0] [--only defaults|reference]
                                       [--train-args "--img-size 384 ..."]

../shared/realdata (labels.csv: file, grade 0-4, dataset, group) is split by group, stratified
by grade: 25 % test, then 20 % of the rest for validation. The defaults are what
`python -m engine.train` does with no options but `--minutes` (plus --train-args, for trying
a change); they use the validation split to pick the checkpoint and fit the temperature. The
reference trains on the training split alone and is calibrated on the validation split.
Every figure is on the test split, per dataset and pooled; the table is printed and written to
bench/out/realdata.json.
"""

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.reference import reference_logits, train_reference
from engine.calibration import fit_temperature
from engine.data import Sample, labels_csv_samples, train_val_test_split
from grades import REVIEW_THRESHOLD
from engine.metrics import (expected_calibration_error, grading_summary,
                            quadratic_weighted_kappa)
from engine.models import load_checkpoint
from engine.predictor import predict
from engine.train import make_config, parse_args
from engine.trainer import PrintHooks, RunPaths, Trainer
from engine.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
OUT = ROOT / "bench" / "out" / "realdata.json"
DATASETS = ("messidor-2", "eyepacs-2015-test")


def load_realdata(root: Path) -> tuple[list[Sample], dict[str, str]]:
    """The labelled photographs on the 0-3 scale, and each one's dataset by path."""
    try:
        return labels_csv_samples(root)
    except FileNotFoundError as exc:
        raise SystemExit(f"{exc}: this benchmark needs ../shared/realdata") from None


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits) / temperature, 1).numpy()


def summaries(logits: np.ndarray, temperature: float, test: list[Sample],
              datasets: dict[str, str]) -> dict:
    """grading_summary per dataset and pooled, on calibrated probabilities, with the ECE the
    uncalibrated ones had beside it."""
    labels = np.array([s.grade for s in test])
    which = np.array([datasets[s.path] for s in test])
    out = {}
    for name in ("pooled", *DATASETS):
        keep = np.ones(len(test), bool) if name == "pooled" else which == name
        probs = softmax(logits[keep], temperature)
        expected = np.rint(probs @ np.arange(probs.shape[1])).astype(int)
        out[name] = {**grading_summary(probs, labels[keep], REVIEW_THRESHOLD),
                     "ece_before": expected_calibration_error(softmax(logits[keep]), labels[keep]),
                     "qwk_expected_grade": quadratic_weighted_kappa(labels[keep], expected)}
    return out


def checkpoint_logits(path: Path, test: list[Sample], cache: Path, tta: bool
                      ) -> tuple[np.ndarray, float]:
    """Test logits of a checkpoint through the engine's predictor, and its temperature."""
    model, meta = load_checkpoint(path)
    probs = predict(model, {**meta, "temperature": 1.0}, test, torch.device("cpu"),
                    batch_size=16, workers=0, tta=tta, cache_root=cache).probs
    return np.log(np.clip(probs, 1e-12, None)), float(meta.get("temperature", 1.0))


def run_defaults(train, val, test, datasets, minutes: float, extra: list[str], seed: int) -> dict:
    args = parse_args(["--data-path", "realdata", "--minutes", str(minutes), "--seed",
                       str(seed), *extra])
    config = make_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace(Path(tmp))
        paths = RunPaths.under(workspace, "defaults")
        started = time.perf_counter()
        trainer = Trainer(config, train, val, paths, workspace.cache, PrintHooks())
        result = trainer.fit()
        seconds = time.perf_counter() - started
        best = max(result.epochs, key=lambda r: r['qwk'])['epoch']
        print(f"  {config.epochs} epochs in {seconds / 60:.1f} min; best epoch {best}", flush=True)
        # best.pth holds the last epoch unless --select best chose an earlier one
        kept_last = config.select == "last" or best == result.epochs[-1]["epoch"]
        results = {}
        for which in ("best",) if kept_last else ("best", "last"):
            logits, temperature = checkpoint_logits(getattr(paths, which), test, workspace.cache,
                                                    config.tta)
            if which == "last":  # the trainer calibrates best.pth only
                val_logits, _ = checkpoint_logits(paths.last, val, workspace.cache, config.tta)
                temperature = fit_temperature(torch.as_tensor(val_logits),
                                              torch.tensor([s.grade for s in val]))
            results[which] = {"temperature": temperature, "test_logits": logits.tolist(),
                              **summaries(logits, temperature, test, datasets)}
    return {"config": vars(config), "train_args": extra, "seconds": seconds, **results}


def run_reference(train, val, test, datasets, minutes: float, model: str, seed: int) -> dict:
    started = time.perf_counter()
    net = train_reference(model, train, minutes, seed=seed)
    seconds = time.perf_counter() - started
    val_logits = reference_logits(net, model, val)
    temperature = fit_temperature(torch.as_tensor(val_logits), torch.tensor([s.grade for s in val]))
    logits = reference_logits(net, model, test)
    return {"model": model, "seconds": seconds,
            "last": {"temperature": temperature, "test_logits": logits.tolist(),
                     **summaries(logits, temperature, test, datasets)}}


COLUMNS = (("qwk", "QWK", "{:.3f}"), ("qwk_expected_grade", "QWK E[g]", "{:.3f}"),
           ("accuracy", "acc", "{:.3f}"),
           ("referable_auc", "ref. AUC", "{:.3f}"), ("sens_at_90_spec", "sens@90spec", "{:.3f}"),
           ("ece_before", "ECE raw", "{:.3f}"), ("ece", "ECE T", "{:.3f}"))


def table(results: dict) -> str:
    head = f"{'method':<22}{'dataset':<19}{'n':>5}" + "".join(f"{c[1]:>12}" for c in COLUMNS)
    lines = [head + f"{'>=0.70 (right)':>16}", "-" * (len(head) + 16)]
    for method, result in results.items():
        for which in ("best", "last"):
            if which not in result:
                continue
            label = f"{method} ({which})" if method == "defaults" else method
            for dataset in ("pooled", *DATASETS):
                row = result[which][dataset]
                cells = "".join(f"{fmt.format(row[key]):>12}" for key, _, fmt in COLUMNS)
                lines.append(f"{label:<22}{dataset:<19}{row['images']:>5}{cells}"
                             f"{row['confident']:>9} ({row['confident_right']})")
        lines.append(f"{'':<22}{result['seconds'] / 60:.1f} min of training, temperature "
                     f"{result[next(iter(w for w in ('best', 'last') if w in result))]['temperature']:.2f}")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The kept checkpoint of each method as the README's table."""
    lines = ["| method | dataset | images | " + " | ".join(c[1] for c in COLUMNS)
             + " | at >= 0.70 (right) | minutes |", "|---" * (len(COLUMNS) + 5) + "|"]
    for method, result in results.items():
        which = "best" if "best" in result else "last"
        for dataset in ("pooled", *DATASETS):
            row = result[which][dataset]
            cells = " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS)
            lines.append(f"| {method} | {dataset} | {row['images']} | {cells} | "
                         f"{row['confident']} ({row['confident_right']}) | "
                         f"{result['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realdata", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REALDATA)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget of each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("defaults", "reference"))
    parser.add_argument("--train-args", default="", help="extra engine.train options")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())

    samples, datasets = load_realdata(args.data)
    train, val, test = train_val_test_split(samples, args.seed)
    print(f"split by group: {len(train)} train, {len(val)} validation, {len(test)} test images",
          flush=True)
    extra = shlex.split(args.train_args)
    model = make_config(parse_args(["--data-path", "realdata", *extra])).model
    runs = {"defaults": lambda: run_defaults(train, val, test, datasets, args.minutes, extra,
                                             args.seed),
            "reference": lambda: run_reference(train, val, test, datasets, args.minutes, model,
                                               args.seed)}
    results = {}
    for method, run in runs.items():
        if args.only in (None, method):
            print(f"{method} ({' '.join(extra) or 'as they are'}), {args.minutes:g} min:"
                  if method == "defaults" else f"{method} loop, {args.minutes:g} min:", flush=True)
            results[method] = run()
            write(args.out, {"split": {"train": len(train), "validation": len(val),
                                       "test": len(test), "seed": args.seed,
                                       "test_images": [s.path for s in test]},
                             "minutes": args.minutes, **results})
    print(table(results))
    print(markdown(results))
    print(f"written to {args.out}")
    return 0


def write(path: Path, report: dict) -> None:
    """After each method, so that a long run cut short keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
