"""Candidate features of the `plus` recipe: patient-relative image scores and
"ugly duckling" outlier features. Each is a pure function of the rows it is given and never
reads a label, so the same call serves training (image OOF columns) and the submission kernel
(fold-mean test scores): train and test patients are disjoint, so a patient's statistics only
ever come from that patient's own rows.

- `patient_image_features(frame, image_columns)`: for each image score column, within
  `patient_id`, the z-score (`<col>_patient_z`; std 0 or one lesion: 0), the ratio to the
  patient mean (`<col>_patient_ratio`; mean 0: null) and the percentile rank
  (`<col>_patient_rank` = (rank - 1) / (n - 1) in [0, 1], ties averaged; one lesion: 0.5); and
  per row the mean / std (population) / min / max across the image columns (`image_row_*`;
  null when any image score of the row is null).
- `ugly_duckling_features(metadata)`: per-patient LocalOutlierFactor on the key colour / shape /
  size descriptors (`UGLY_DUCKLING_DESCRIPTORS`), standardised within the patient after filling
  a missing value with the patient's median (`ud_lof`; a patient with fewer than
  n_neighbors + 1 lesions gets `LOF_NEUTRAL` = 1.0, the LOF of a point as dense as its
  neighbours); |z| within patient x `tbp_lv_location` per descriptor (`<d>_loc_absz`; std 0 or
  one lesion: 0; a missing value stays null) and the count of descriptors with |z| > 2
  (`ud_loc_outlier_count`).
- `patient_lof_features(metadata)`: the LOF alone (GBDTConfig.patient_lof), the 1st place's
  per-patient outlier score (ilyanovo/isic-2024, notebooks/top-model.ipynb, `get_lof_score`:
  LocalOutlierFactor per patient on standardised key descriptors).
- `add_optional_features`: the one registry (`OPTIONAL_GROUPS`) of these groups and
  utils.tabular.location_features', for stage 3 and the submission kernel alike.

Sources on the real data: the patient-relative image score is the 1st place's (top-model.ipynb:
each image OOF divided by the patient's mean, `oof_eva_score_m`); the within patient x location
|z| and outlier count are the 2nd place's (uchiyama33/isic-2024-2nd-place,
src/isic_utils/feature_engineering.py, `ugly_duckling_processing`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from functools import reduce
from typing import Any

import numpy as np
import polars as pl
from joblib import Parallel, delayed
from sklearn.neighbors import LocalOutlierFactor

from utils.tabular.features import PATIENT_KEY, _finite
from utils.tabular.location_features import (
    LOCATION_KEY,
    OUTLIER_Z,
    location_norm_features,
    location_outlier_features,
    zscore,
)

ROW_STATS = ("mean", "std", "min", "max")
PATIENT_IMAGE_SUFFIXES = ("_patient_z", "_patient_ratio", "_patient_rank")

UGLY_DUCKLING_DESCRIPTORS: tuple[str, ...] = tuple(
    """clin_size_long_diam_mm tbp_lv_areaMM2 tbp_lv_perimeterMM tbp_lv_minorAxisMM
    tbp_lv_area_perim_ratio tbp_lv_eccentricity tbp_lv_norm_border tbp_lv_L tbp_lv_H
    tbp_lv_deltaLBnorm tbp_lv_norm_color tbp_lv_color_std_mean""".split()  # noqa: SIM905
)
LOF_NEIGHBORS = 20
LOF_NEUTRAL = 1.0  # LOF of a lesion as dense as its neighbours: "not an outlier"
LOF_COLUMN = "ud_lof"
OUTLIER_COUNT_COLUMN = "ud_loc_outlier_count"
LOF_BATCH_ROWS = 20_000  # patients per pool task: about this many lesions (few, large tasks)

c = pl.col


def _check_columns(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise KeyError naming the columns of `columns` that `frame` lacks."""
    missing = [col for col in columns if col not in frame.columns]
    if missing:
        raise KeyError(f"{what}: column(s) {missing} missing from the frame")


def patient_image_feature_names(image_columns: Sequence[str]) -> list[str]:
    """Names `patient_image_features` adds for `image_columns`, in its order."""
    per_column = [f"{col}{suffix}" for col in image_columns for suffix in PATIENT_IMAGE_SUFFIXES]
    return per_column + [f"image_row_{stat}" for stat in ROW_STATS]


def _patient_image_exprs(col: str) -> list[pl.Expr]:
    """z-score, ratio to the patient mean and percentile rank of one score within the patient."""
    x = _finite(c(col).cast(pl.Float64))
    mean = x.mean().over(PATIENT_KEY)
    count = x.count().over(PATIENT_KEY)
    rank = (x.rank("average").over(PATIENT_KEY) - 1) / (count - 1)
    return [
        zscore(x, PATIENT_KEY).alias(f"{col}_patient_z"),
        pl.when(mean != 0).then(x / mean).alias(f"{col}_patient_ratio"),
        pl.when(x.is_null())
        .then(None)
        .when(count > 1)
        .then(rank)
        .otherwise(0.5)
        # rank's own name would clash; alias last
        .alias(f"{col}_patient_rank"),
    ]


def _row_stat_exprs(image_columns: Sequence[str]) -> list[pl.Expr]:
    """Mean, population std, min and max across the image columns of each row."""
    xs = [_finite(c(col).cast(pl.Float64)) for col in image_columns]
    any_null = reduce(lambda a, b: a | b, [x.is_null() for x in xs])
    mean = reduce(lambda a, b: a + b, xs) / len(xs)
    var = reduce(lambda a, b: a + b, [(x - mean) ** 2 for x in xs]) / len(xs)
    stats = {
        "mean": mean,
        "std": var.sqrt(),
        "min": pl.min_horizontal(xs),
        "max": pl.max_horizontal(xs),
    }
    return [
        pl.when(any_null).then(None).otherwise(e).alias(f"image_row_{k}") for k, e in stats.items()
    ]


def patient_image_features(frame: pl.DataFrame, image_columns: Sequence[str]) -> pl.DataFrame:
    """`frame` plus the patient-relative and per-row features of its image score columns."""
    if not image_columns:
        return frame
    _check_columns(frame, [PATIENT_KEY, *image_columns], "patient_image_features")
    exprs = [e for col in image_columns for e in _patient_image_exprs(col)]
    added = frame.lazy().with_columns(exprs + _row_stat_exprs(image_columns))
    names = patient_image_feature_names(image_columns)
    return added.with_columns(c(n).cast(pl.Float32) for n in names).collect()


def ugly_duckling_feature_names(
    descriptors: Sequence[str] = UGLY_DUCKLING_DESCRIPTORS,
) -> list[str]:
    """Names of the feature columns `ugly_duckling_features` returns, in its order."""
    return [LOF_COLUMN, *(f"{d}_loc_absz" for d in descriptors), OUTLIER_COUNT_COLUMN]


def _patient_lof(z: np.ndarray, n_neighbors: int) -> np.ndarray:
    """LOF (>= about 1; larger: more of an outlier) of each lesion among one patient's lesions."""
    if len(z) < n_neighbors + 1:
        return np.full(len(z), LOF_NEUTRAL)
    lof = LocalOutlierFactor(n_neighbors=n_neighbors)
    with warnings.catch_warnings():
        # identical lesions (e.g. rows filled with the same medians) only make sklearn warn;
        # their LOF stays finite (it guards the density with 1e-10)
        warnings.simplefilter("ignore", UserWarning)
        lof.fit(z)
    return -lof.negative_outlier_factor_


def _lof_batch(z: np.ndarray, bounds: np.ndarray, n_neighbors: int) -> np.ndarray:
    """LOF of consecutive patients' rows of `z`, patient i being rows bounds[i]:bounds[i + 1]."""
    return np.concatenate(
        [_patient_lof(z[a:b], n_neighbors) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    )


def _batches(bounds: np.ndarray, batch_rows: int) -> list[np.ndarray]:
    """Patient bounds cut into runs of whole patients of about `batch_rows` rows each."""
    cuts = np.searchsorted(bounds, np.arange(batch_rows, bounds[-1], batch_rows))
    edges = np.unique(np.concatenate([[0], cuts, [len(bounds) - 1]]))
    return [bounds[a : b + 1] for a, b in zip(edges[:-1], edges[1:], strict=True)]


def patient_lof(
    z: np.ndarray, patients: np.ndarray, n_neighbors: int = LOF_NEIGHBORS, n_jobs: int | None = None
) -> np.ndarray:
    """LOF of each row of `z` among the rows of the same patient, computed per patient in a pool."""
    order = np.argsort(patients, kind="stable")
    sorted_patients = patients[order]
    starts = np.flatnonzero(np.r_[True, sorted_patients[1:] != sorted_patients[:-1]])
    bounds = np.r_[starts, len(order)]
    zs = z[order]
    jobs = [(zs[b[0] : b[-1]], b - b[0]) for b in _batches(bounds, LOF_BATCH_ROWS)]
    n_jobs = n_jobs or os.cpu_count() or 1
    if n_jobs == 1 or len(jobs) == 1:
        parts = [_lof_batch(zb, bb, n_neighbors) for zb, bb in jobs]
    else:
        parts = Parallel(n_jobs=n_jobs)(delayed(_lof_batch)(zb, bb, n_neighbors) for zb, bb in jobs)
    lof = np.empty(len(order))
    lof[order] = np.concatenate(parts) if parts else np.empty(0)
    return lof


def ugly_duckling_features(
    metadata: pl.DataFrame,
    descriptors: Sequence[str] = UGLY_DUCKLING_DESCRIPTORS,
    n_neighbors: int = LOF_NEIGHBORS,
    n_jobs: int | None = None,
) -> pl.DataFrame:
    """isic_id plus the ugly-duckling features (Float32), in the rows' order of `metadata`."""
    _check_columns(
        metadata, ["isic_id", PATIENT_KEY, LOCATION_KEY, *descriptors], "ugly_duckling_features"
    )
    raw = [_finite(c(d).cast(pl.Float64)).alias(d) for d in descriptors]
    location = [PATIENT_KEY, c(LOCATION_KEY).fill_null("<null>").alias("_location")]
    code = c(PATIENT_KEY).rank("dense").alias("_patient_code")
    base = metadata.lazy().select("isic_id", *location, code, *raw)
    # a missing value takes the patient's median (all missing: z is 0 below); two steps, as
    # Polars 1.35 allows no window expression inside another
    filled = [c(d).fill_null(c(d).median().over(PATIENT_KEY)).alias(f"_z_{d}") for d in descriptors]
    standardised = [
        zscore(c(f"_z_{d}"), PATIENT_KEY).fill_null(0.0).alias(f"_z_{d}") for d in descriptors
    ]
    loc_z = [
        zscore(c(d), [PATIENT_KEY, "_location"]).abs().alias(f"{d}_loc_absz") for d in descriptors
    ]
    table = base.with_columns(filled).with_columns(standardised + loc_z).collect()
    z = table.select(f"_z_{d}" for d in descriptors).to_numpy().astype(np.float64)
    lof = patient_lof(z, table["_patient_code"].to_numpy(), n_neighbors, n_jobs)
    count = pl.sum_horizontal(
        (c(f"{d}_loc_absz") > OUTLIER_Z).fill_null(False) for d in descriptors
    )
    names = ugly_duckling_feature_names(descriptors)
    return table.with_columns(pl.Series(LOF_COLUMN, lof), count.alias(OUTLIER_COUNT_COLUMN)).select(
        "isic_id", *(c(n).cast(pl.Float32) for n in names)
    )


def patient_lof_features(metadata: pl.DataFrame, n_jobs: int | None = None) -> pl.DataFrame:
    """isic_id plus the per-patient LOF alone (`ud_lof`, as in `ugly_duckling_features`)."""
    return ugly_duckling_features(metadata, n_jobs=n_jobs).select("isic_id", LOF_COLUMN)


def join_new(frame: pl.DataFrame, table: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """`frame` with the columns of `table` (keyed by isic_id) it lacks, and their names."""
    new = [n for n in table.columns if n != "isic_id" and n not in frame.columns]
    joined = frame.join(
        table.select("isic_id", *new), on="isic_id", how="left", maintain_order="left"
    )
    return joined, new


def _build_ugly_duckling(frame, metadata, image_columns, threads):
    return join_new(frame, ugly_duckling_features(metadata, n_jobs=threads))


def _build_patient_lof(frame, metadata, image_columns, threads):
    return join_new(frame, patient_lof_features(metadata, n_jobs=threads))


def _build_location_norm(frame, metadata, image_columns, threads):
    return location_norm_features(frame, metadata)


def _build_location_outliers(frame, metadata, image_columns, threads):
    return location_outlier_features(frame, metadata)


def _build_patient_image(frame, metadata, image_columns, threads):
    if not image_columns:
        return frame, []
    return patient_image_features(frame, image_columns), patient_image_feature_names(image_columns)


# The optional feature groups built after utils.tabular.features (GBDTConfig fields of the same
# names), in the order they are built: (who sees the features, builder). "meta": every member;
# "image": the image members only. Stage 3 and the submission kernel both go through
# `add_optional_features`, so a group added here is built the same on both sides.
OPTIONAL_GROUPS: dict[str, tuple[str, Any]] = {
    "ugly_duckling": ("meta", _build_ugly_duckling),
    "patient_lof": ("meta", _build_patient_lof),
    "location_norm": ("meta", _build_location_norm),
    "location_outliers": ("meta", _build_location_outliers),
    "patient_image": ("image", _build_patient_image),
}


def add_optional_features(
    frame: pl.DataFrame,
    metadata: pl.DataFrame,
    image_columns: Sequence[str],
    threads: int | None = None,
    **groups: bool,
) -> tuple[pl.DataFrame, list[str], list[str]]:
    """`frame` (features + image columns, keyed by isic_id) with the optional groups switched on
    in `groups` (names of OPTIONAL_GROUPS) built from `metadata`; the names added (metadata,
    image-derived). A name one group shares with an earlier one (same formula) is built once."""
    unknown = sorted(set(groups) - set(OPTIONAL_GROUPS))
    if unknown:
        raise ValueError(
            f"unknown optional feature group(s) {unknown}; known: {list(OPTIONAL_GROUPS)}"
        )
    added: dict[str, list[str]] = {"meta": [], "image": []}
    for name, (kind, build) in OPTIONAL_GROUPS.items():
        if groups.get(name):
            frame, names = build(frame, metadata, list(image_columns), threads)
            added[kind] += names
    return frame, added["meta"], added["image"]
