"""Training labels derived from the metadata."""

from __future__ import annotations

import polars as pl

SUSPICIOUS_COLUMNS = ("target", "iddx_1", "iddx_2")


def suspicious_label(df: pl.DataFrame) -> pl.Series:
    """1 where target is 1, or iddx_1 == "Indeterminate", or iddx_2 is not null; else 0 (Int8).

    The method's "suspicious" label: lesions a dermatologist sent for a closer look are treated as
    positives for training, which gives the image model many more positives than target alone.
    """
    missing = [c for c in SUSPICIOUS_COLUMNS if c not in df.columns]
    if missing:
        raise KeyError(f"suspicious_label: metadata lacks column(s) {missing}")
    if df["target"].null_count():
        raise ValueError(f"suspicious_label: {df['target'].null_count()} row(s) have no target")
    label = (
        (pl.col("target") == 1)
        | (pl.col("iddx_1") == "Indeterminate").fill_null(False)
        | pl.col("iddx_2").is_not_null()
    )
    return df.select(label.cast(pl.Int8).alias("suspicious"))["suspicious"]


def with_suspicious(df: pl.DataFrame) -> pl.DataFrame:
    """`df` with an Int8 `suspicious` column."""
    return df.with_columns(suspicious_label(df))
