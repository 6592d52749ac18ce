"""The one fold assignment every stage uses: StratifiedGroupKFold by patient."""

from __future__ import annotations

import numpy as np
import polars as pl
from sklearn.model_selection import StratifiedGroupKFold

N_FOLDS = 5
SEED = 42


def assign_folds(
    df: pl.DataFrame, n_splits: int = N_FOLDS, seed: int = SEED, target: str = "target"
) -> np.ndarray:
    """Fold number (0..n_splits-1) per row of `df`, grouped by patient_id, stratified by `target`.

    Rows are taken in isic_id order so the assignment does not depend on the file's row order.
    """
    for col in ("isic_id", "patient_id", target):
        if col not in df.columns:
            raise KeyError(f"assign_folds: column {col!r} is missing")
    order = np.argsort(df["isic_id"].to_numpy(), kind="stable")
    y = df[target].to_numpy()[order]
    groups = df["patient_id"].to_numpy()[order]
    n_pos_patients = len(set(groups[y == 1]))
    if n_pos_patients < n_splits:
        raise ValueError(
            f"assign_folds: {n_pos_patients} patient(s) with positives cannot fill {n_splits} "
            "folds; use fewer folds or more data"
        )
    splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
    folds = np.empty(len(df), dtype=np.int8)
    for k, (_, valid) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
        folds[order[valid]] = k
    return folds


def with_folds(df: pl.DataFrame, n_splits: int = N_FOLDS, seed: int = SEED) -> pl.DataFrame:
    """`df` with an Int8 `fold` column from assign_folds."""
    return df.with_columns(pl.Series("fold", assign_folds(df, n_splits, seed), dtype=pl.Int8))


def check_folds_agree(ours: pl.DataFrame, theirs: pl.DataFrame, what: str) -> None:
    """Raise ValueError unless every isic_id of `ours` has the same fold in `theirs`."""
    joined = ours.select("isic_id", "fold").join(
        theirs.select("isic_id", pl.col("fold").alias("their_fold")), on="isic_id", how="left"
    )
    missing = joined.filter(pl.col("their_fold").is_null())["isic_id"]
    if len(missing):
        raise ValueError(
            f"{what}: {len(missing)} isic_id(s) missing, e.g. {missing.head(3).to_list()}"
        )
    differ = joined.filter(pl.col("fold") != pl.col("their_fold"))["isic_id"]
    if len(differ):
        raise ValueError(
            f"{what}: folds disagree for {len(differ)} isic_id(s), e.g. "
            f"{differ.head(3).to_list()}; it used other folds (seed or n_splits) and would leak"
        )
