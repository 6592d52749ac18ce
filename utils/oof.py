"""Out-of-fold prediction files: one writer and one reader for every stage."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from utils.manifest import atomic_output

OOF_COLUMNS = {
    "isic_id": pl.String,
    "patient_id": pl.String,
    "fold": pl.Int8,
    "target": pl.Int8,
    "pred": pl.Float64,
}


class OOFError(ValueError):
    """An OOF table breaks the format (columns, unique ids, finite predictions)."""


def validate_oof(df: pl.DataFrame, source: str | Path) -> pl.DataFrame:
    """Return `df` cast to the OOF dtypes and column order, or raise OOFError naming `source`."""
    if missing := [c for c in OOF_COLUMNS if c not in df.columns]:
        raise OOFError(f"{source}: OOF is missing column(s) {missing}")
    df = df.select([pl.col(c).cast(t) for c, t in OOF_COLUMNS.items()])
    dupes = df.filter(pl.col("isic_id").is_duplicated())["isic_id"].unique()
    if len(dupes):
        raise OOFError(f"{source}: duplicate isic_id(s) in OOF, e.g. {dupes.head(3).to_list()}")
    for col in OOF_COLUMNS:
        if nulls := df[col].null_count():
            raise OOFError(f"{source}: column {col!r} has {nulls} empty value(s)")
    bad = df.filter(pl.col("pred").is_nan() | pl.col("pred").is_infinite())["isic_id"]
    if len(bad):
        raise OOFError(f"{source}: pred is NaN/inf for isic_id(s) {bad.head(3).to_list()}")
    return df


def write_oof(df: pl.DataFrame, path: str | Path) -> Path:
    """Validate and write an OOF CSV (sorted by isic_id); returns the path."""
    path = Path(path)
    df = validate_oof(df, path).sort("isic_id")
    with atomic_output(path) as tmp:  # a killed stage never leaves a cut oof.csv
        df.write_csv(tmp)
    return path


def read_oof(path: str | Path) -> pl.DataFrame:
    """Read and validate an OOF CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OOF file not found: {path}")
    df = pl.read_csv(path, schema_overrides=OOF_COLUMNS)
    return validate_oof(df, path)
