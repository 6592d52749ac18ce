"""Training labels derived from the metadata."""

from __future__ import annotations

import numpy as np
import polars as pl

SUSPICIOUS_COLUMNS = ("target", "iddx_1", "iddx_2")


def _check_labels(df: pl.DataFrame, caller: str) -> None:
    """KeyError for a missing SUSPICIOUS_COLUMNS column, ValueError for a row without target."""
    missing = [c for c in SUSPICIOUS_COLUMNS if c not in df.columns]
    if missing:
        raise KeyError(f"{caller}: metadata lacks column(s) {missing}")
    if df["target"].null_count():
        raise ValueError(f"{caller}: {df['target'].null_count()} row(s) have no target")


def suspicious_label(df: pl.DataFrame) -> pl.Series:
    """1 where target is 1, or iddx_1 == "Indeterminate", or iddx_2 is not null; else 0 (Int8).

    The method's "suspicious" label: lesions a dermatologist sent for a closer look are treated as
    positives for training, which gives the image model many more positives than target alone.
    """
    _check_labels(df, "suspicious_label")
    label = (
        (pl.col("target") == 1)
        | (pl.col("iddx_1") == "Indeterminate").fill_null(False)
        | pl.col("iddx_2").is_not_null()
    )
    return df.select(label.cast(pl.Int8).alias("suspicious")).to_series()


def reference_filtered(df: pl.DataFrame) -> pl.Series:
    """True for the rows the reference's tabular CV leaves out (Boolean `reference_filtered`):
    target 0 with iddx_1 == "Indeterminate" or a non-null iddx_2, i.e. benign lesions a
    dermatologist still sent for a closer look (the suspicious label's extra positives).

    The 3rd-place notebook trains its fold models without them and scores its "filtered" CV
    without them; its final refit keeps them. An empty iddx_2 string counts as null, as there
    (it reads the CSV with pandas, which turns "" into NaN).
    """
    _check_labels(df, "reference_filtered")
    iddx_2 = pl.col("iddx_2").cast(pl.String)
    flagged = (pl.col("iddx_1") == "Indeterminate").fill_null(False) | (
        iddx_2.is_not_null() & (iddx_2 != "")
    )
    return df.select(((pl.col("target") == 0) & flagged).alias("reference_filtered")).to_series()


def reference_filter_mask(metadata: pl.DataFrame, isic_ids: pl.Series) -> np.ndarray | None:
    """reference_filtered of `metadata` for `isic_ids` in their order (one bool each; an id
    not in `metadata` is not filtered), or None when `metadata` has no iddx columns (external
    or stripped data: no filtered score)."""
    if any(c not in metadata.columns for c in SUSPICIOUS_COLUMNS):
        return None
    flags = metadata.select("isic_id", reference_filtered(metadata))
    joined = isic_ids.to_frame("isic_id").join(
        flags, on="isic_id", how="left", maintain_order="left"
    )
    return joined["reference_filtered"].fill_null(False).to_numpy()
