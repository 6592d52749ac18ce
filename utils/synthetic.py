"""Synthetic ISIC 2024 data in the Kaggle layout, with a planted, learnable signal.

`python -m utils.synthetic --out DIR --rows N` writes train-metadata.csv (55 columns),
train-image.hdf5, test-metadata.csv (44 columns, patients disjoint from train),
test-image.hdf5 and sample_submission.csv, shaped like the real files: the same columns,
dtypes, value ranges, categories and NaN patterns, very unequal lesion counts per patient,
~0.1% positives, and the iddx hierarchy / lesion_id / mel_* only where the real data has them.

The malignancy logit has three standardised parts, so each kind of model can be shown to learn:
- `meta_score`: a latent that moves size, colour contrast, eccentricity, nevus confidence, plus age;
- `context_score`: an "ugly duckling" latent that makes a lesion darker and larger than the same
  patient's other lesions; patients differ a lot, so it shows only relative to the patient;
- `image_score`: border raggedness and colour variegation drawn into the JPEG crop; the
  metadata's norm_border / color_std columns only hint at them through heavy noise.
The true probabilities go to a truth CSV outside the data dir (`<out>-truth.csv` by default).

`--structure site_outlier site_rates image_patient` plants, in addition, the structures the top
ISIC 2024 solutions exploit on the real data (utils.synthetic_structure, each with its source);
without it the data are exactly as before.

This module draws the labels and writes the files; utils.synthetic_metadata draws the patients,
lesions and diagnoses, utils.synthetic_images renders the crops.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from utils.cli import DefaultsHelpFormatter
from utils.io import (
    SAMPLE_SUBMISSION,
    TEST_IMAGES,
    TEST_METADATA,
    TRAIN_IMAGES,
    TRAIN_METADATA,
)
from utils.schema import TEST_COLUMNS, TRAIN_COLUMNS
from utils.settings import N_FOLDS
from utils.synthetic_images import image_params, write_images
from utils.synthetic_metadata import (
    TEST_ONLY_ATTRIBUTION,
    TRAIN_ATTRIBUTIONS,
    draw_diagnoses,
    draw_lesions,
    draw_patients,
    lesion_counts,
)
from utils.synthetic_structure import STRUCTURE_STREAM, STRUCTURES, Structure, plant

REAL_ROWS = 401_059
REAL_PATIENTS = 1_042
SIGNAL_WEIGHT = 1.4  # logit weight of each standardised part (best pAUC ~0.17 at full scale)


@dataclass(frozen=True)
class Summary:
    """What `generate` wrote."""

    out_dir: Path
    truth_path: Path
    train_rows: int
    test_rows: int
    train_patients: int
    test_patients: int
    positives: int
    positive_patients: int
    best_pauc: float
    seconds: float
    bytes_on_disk: int

    def __str__(self) -> str:
        return (
            f"{self.out_dir}: train {self.train_rows:,} rows / {self.train_patients:,} patients / "
            f"{self.positives:,} positives ({self.positives / self.train_rows:.3%}) in "
            f"{self.positive_patients:,} patients; "
            f"test {self.test_rows:,} rows / {self.test_patients:,} patients; "
            f"best achievable pAUC {self.best_pauc:.4f}; "
            f"{self.bytes_on_disk / 2**20:.1f} MiB in {self.seconds:.1f} s; "
            f"truth: {self.truth_path}"
        )


def _intercept(score: np.ndarray, rate: float) -> float:
    """Intercept b with mean(sigmoid(b + score)) == rate (bisection)."""
    lo, hi = -40.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        mean = np.mean(1 / (1 + np.exp(-(mid + score))))
        lo, hi = (mid, hi) if mean < rate else (lo, mid)
    return (lo + hi) / 2


def _frame(columns: dict[str, np.ndarray], schema: dict) -> pl.DataFrame:
    """The schema's columns; object arrays go to Polars as lists, None and NaN become nulls
    (empty CSV cells)."""
    series = []
    for name, dtype in schema.items():
        values = columns[name].tolist() if columns[name].dtype == object else columns[name]
        series.append(pl.Series(name, values, dtype=dtype, strict=False, nan_to_null=True))
    return pl.DataFrame(series)


def best_pauc(truth: pl.DataFrame) -> float:
    """pAUC of the true probabilities against the drawn train labels (the achievable ceiling)."""
    from utils.metric import pauc

    train = truth.filter(pl.col("split") == "train")
    return pauc(train["target"].to_numpy(), train["prob"].to_numpy())


class FewPositivesWarning(UserWarning):
    """Fewer patients with a positive lesion than cross-validation folds: some folds get none."""


def default_truth_path(out_dir: str | Path) -> Path:
    """`<out_dir>-truth.csv` beside the data dir (the truth must not be readable as data)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}-truth.csv"


@dataclass(frozen=True)
class _Split:
    """One split's lesions: metadata columns and latent parts (utils.synthetic_metadata)."""

    meta: dict[str, np.ndarray]
    latent: dict[str, np.ndarray]


def generate(
    out_dir: str | Path,
    rows: int = 20_000,
    seed: int = 0,
    image_size: int = 128,
    patients: int | None = None,
    positive_rate: float = 0.001,
    test_rows: int | None = None,
    truth_path: str | Path | None = None,
    workers: int | None = None,
    require_positive_patients: int | None = None,
    structure: Structure | None = None,
) -> Summary:
    """Write a complete synthetic data dir in the Kaggle layout; see the module docstring.

    Fewer patients with a positive lesion than N_FOLDS gives a FewPositivesWarning; with
    `require_positive_patients` it is a ValueError raised before any file is written.
    The steps draw from one generator (structures from their own) in a fixed order, so the same
    arguments give the same files, whatever the number of workers.
    """
    start = time.perf_counter()
    out_dir, truth_path = _checked_paths(rows, positive_rate, out_dir, truth_path)
    patients, test_rows, test_patients = _split_sizes(rows, patients, test_rows)
    workers = workers or min(os.cpu_count() or 1, 8)
    rng = np.random.default_rng(seed)
    train, test = _draw_splits(rng, rows, patients, test_rows, test_patients)
    risk, score = _risk(train, test, seed, structure or Structure())
    # true probabilities, their mean over the train rows (first) positive_rate, and the labels
    prob = 1 / (1 + np.exp(-(_intercept(risk[:rows], positive_rate) + risk)))
    target = (rng.random(prob.size) < prob).astype(np.int8)
    positives, positive_patients = _count_positives(
        train, target[:rows], patients, require_positive_patients
    )
    train.meta["target"] = target[:rows]
    train.meta.update(draw_diagnoses(rng, target[:rows], risk[:rows]))
    _write_metadata(out_dir, train, test)
    truth = _write_truth(truth_path, train, test, prob, target, score)
    for split, name, desc in (
        (train, TRAIN_IMAGES, "train images"),
        (test, TEST_IMAGES, "test images"),
    ):
        params = image_params(split.meta, split.latent, rng, image_size)
        write_images(out_dir / name, split.meta["isic_id"], params, workers, desc)
    return Summary(
        out_dir=out_dir,
        truth_path=truth_path,
        train_rows=rows,
        test_rows=len(test.meta["isic_id"]),
        train_patients=patients,
        test_patients=test_patients,
        positives=positives,
        positive_patients=positive_patients,
        best_pauc=best_pauc(truth) if 0 < positives < rows else float("nan"),
        seconds=time.perf_counter() - start,
        bytes_on_disk=sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file()),
    )


def _checked_paths(
    rows: int, positive_rate: float, out_dir: str | Path, truth_path: str | Path | None
) -> tuple[Path, Path]:
    """The data dir and the truth file's path; ValueError for arguments `generate` refuses."""
    if rows < 2:
        raise ValueError("generate: rows must be at least 2")
    if not 0 < positive_rate < 0.5:
        raise ValueError("generate: positive_rate must be in (0, 0.5)")
    out_dir = Path(out_dir)
    truth_path = Path(truth_path) if truth_path else default_truth_path(out_dir)
    if truth_path.resolve().parent == out_dir.resolve():
        raise ValueError(f"generate: keep the truth file outside the data dir ({truth_path})")
    return out_dir, truth_path


def _split_sizes(rows: int, patients: int | None, test_rows: int | None) -> tuple[int, int, int]:
    """Train patients, test rows and test patients (None: the real data's proportions)."""
    patients = min(patients or max(2, round(REAL_PATIENTS * rows / REAL_ROWS)), rows)
    test_rows = test_rows if test_rows is not None else max(3, rows // 50)
    test_patients = max(1, min(test_rows, round(patients * test_rows / rows)))
    return patients, test_rows, test_patients


def _draw_splits(
    rng: np.random.Generator, rows: int, patients: int, test_rows: int, test_patients: int
) -> tuple[_Split, _Split]:
    """Train and test patients (disjoint; some test patients from an attribution train never
    saw) and their lesions, isic_ids numbered on from one random base."""
    total = patients + test_patients
    pat = draw_patients(rng, total, TRAIN_ATTRIBUTIONS)
    pat["patient_id"] = np.array(
        [f"IP_{k:07d}" for k in rng.choice(10**7, total, replace=False)], dtype=object
    )
    is_test = np.arange(total) >= patients
    cairns = is_test & (rng.random(is_test.size) < 0.3)  # an attribution train never saw
    pat["attribution"][cairns], pat["license"][cairns] = TEST_ONLY_ATTRIBUTION
    train_pat = {k: v[~is_test] for k, v in pat.items()}
    test_pat = {k: v[is_test] for k, v in pat.items()}
    id_base = int(rng.integers(10**5, 10**6))
    train = draw_lesions(rng, train_pat, lesion_counts(rng, rows, patients), id_base)
    test = draw_lesions(rng, test_pat, lesion_counts(rng, test_rows, test_patients), id_base + rows)
    return _Split(*train), _Split(*test)


def _risk(
    train: _Split, test: _Split, seed: int, structure: Structure
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Malignancy logit before the intercept, train rows then test rows, and its parts for the
    truth file. Switched-on structures are planted into the metadata here, from their own
    generator, so the default draws before and after stay the same."""
    score = {
        k: np.concatenate([train.latent[k], test.latent[k]])
        for k in ("meta_score", "context_score", "image_score")
    }
    risk = SIGNAL_WEIGHT * (score["meta_score"] + score["context_score"] + score["image_score"])
    if structure.on:
        structure_rng = np.random.default_rng([seed, STRUCTURE_STREAM])
        planted = [plant(split.meta, structure_rng, structure) for split in (train, test)]
        extra = {k: np.concatenate([planted[0][k], planted[1][k]]) for k in planted[0]}
        risk = risk + SIGNAL_WEIGHT * extra.get("site_score", 0.0) + extra.get("site_rate", 0.0)
        score |= extra
    return risk, score


def _count_positives(
    train: _Split, target: np.ndarray, patients: int, required: int | None
) -> tuple[int, int]:
    """Train positives and patients with one; FewPositivesWarning (ValueError with `required`)
    when fewer patients than folds have one."""
    positives = int(target.sum())
    positive_patients = len(set(train.meta["patient_id"][target == 1]))
    if positive_patients < (required or N_FOLDS):
        message = (
            f"{positive_patients} of {patients} train patient(s) have a positive lesion "
            f"({positives} positive(s)), fewer than the {N_FOLDS} cross-validation folds: a fold "
            "without positives has no pAUC and stage 1/3 fail on it. Raise --rows, --patients or "
            "--positive-rate (e.g. --rows 600 --patients 30 --positive-rate 0.05, the demo sizes)"
        )
        if required:
            raise ValueError(f"generate: {message}")
        warnings.warn(message, FewPositivesWarning, stacklevel=3)  # at generate's caller
    return positives, positive_patients


def _write_metadata(out_dir: Path, train: _Split, test: _Split) -> None:
    """train-metadata.csv, test-metadata.csv and sample_submission.csv into `out_dir`."""
    test_frame = _frame(test.meta, TEST_COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    _frame(train.meta, TRAIN_COLUMNS).write_csv(out_dir / TRAIN_METADATA)
    test_frame.write_csv(out_dir / TEST_METADATA)
    submission = pl.DataFrame({"isic_id": test_frame["isic_id"], "target": 0.3})
    submission.write_csv(out_dir / SAMPLE_SUBMISSION)


def _write_truth(
    path: Path,
    train: _Split,
    test: _Split,
    prob: np.ndarray,
    target: np.ndarray,
    score: dict[str, np.ndarray],
) -> pl.DataFrame:
    """The truth file: every lesion's split, label (-1 in test), true probability and logit
    parts."""
    rows, test_rows = len(train.meta["isic_id"]), len(test.meta["isic_id"])
    truth = pl.DataFrame(
        {
            "isic_id": np.concatenate([train.meta["isic_id"], test.meta["isic_id"]]),
            "split": ["train"] * rows + ["test"] * test_rows,
            "target": np.where(np.arange(prob.size) < rows, target, -1),
            "prob": prob,
            **score,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    truth.write_csv(path)
    return truth


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: refuses (exit 2, nothing written) data with fewer positive
    patients than folds unless --allow-few-positives."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.synthetic",
        description=__doc__.split("\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="data dir to write (Kaggle layout)")
    for flag, kind, default, text in (
        ("--rows", int, 20_000, "train rows (real: 401059)"),
        ("--seed", int, 0, "random seed"),
        ("--image-size", int, 128, "typical crop side in px"),
        ("--patients", int, None, "train patients; none: 1042 x rows / 401059"),
        ("--positive-rate", float, 0.001, "share of positives"),
        ("--test-rows", int, None, "none: rows // 50"),
        ("--truth", Path, None, "none: <out>-truth.csv beside the data dir"),
        ("--workers", int, None, "image-rendering processes; none: CPUs, <= 8"),
    ):
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument(
        "--allow-few-positives",
        action="store_true",
        help=f"write data with fewer positive patients than the {N_FOLDS} folds anyway",
    )
    parser.add_argument(
        "--structure",
        nargs="*",
        default=[],
        choices=STRUCTURES,
        help="optional structures to plant (utils.synthetic_structure); none: the default data",
    )
    args = vars(parser.parse_args(argv))  # the other options are generate's parameters
    out_dir, args["truth_path"] = args.pop("out"), args.pop("truth")
    args["require_positive_patients"] = None if args.pop("allow_few_positives") else N_FOLDS
    args["structure"] = Structure.of(args["structure"])
    try:
        summary = generate(out_dir, **args)
    except ValueError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
