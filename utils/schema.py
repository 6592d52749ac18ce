"""Column schema of the ISIC 2024 (SLICE-3D) metadata files, as the real Kaggle files use it.

Category values are matched after trimming and collapsing whitespace and ignoring case
(`normalise_categories`: "MALE", " anterior torso " are the known values), so a harmless
spelling variant is never encoded as an unseen category.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

# The 44 columns of test-metadata.csv, in file order: the text ones are strings, the rest Float64.
_TEXT_COLUMNS = frozenset(
    "isic_id patient_id sex anatom_site_general image_type tbp_tile_type tbp_lv_location "  # noqa: SIM905
    "tbp_lv_location_simple attribution copyright_license".split()
)
TEST_COLUMNS: dict[str, pl.DataType] = {
    name: pl.String if name in _TEXT_COLUMNS else pl.Float64
    for name in """
    isic_id patient_id age_approx sex anatom_site_general clin_size_long_diam_mm image_type
    tbp_tile_type tbp_lv_A tbp_lv_Aext tbp_lv_B tbp_lv_Bext tbp_lv_C tbp_lv_Cext tbp_lv_H
    tbp_lv_Hext tbp_lv_L tbp_lv_Lext tbp_lv_areaMM2 tbp_lv_area_perim_ratio tbp_lv_color_std_mean
    tbp_lv_deltaA tbp_lv_deltaB tbp_lv_deltaL tbp_lv_deltaLB tbp_lv_deltaLBnorm tbp_lv_eccentricity
    tbp_lv_location tbp_lv_location_simple tbp_lv_minorAxisMM tbp_lv_nevi_confidence
    tbp_lv_norm_border tbp_lv_norm_color tbp_lv_perimeterMM tbp_lv_radial_color_std_max
    tbp_lv_stdL tbp_lv_stdLExt tbp_lv_symm_2axis tbp_lv_symm_2axis_angle tbp_lv_x tbp_lv_y tbp_lv_z
    attribution copyright_license
    """.split()  # noqa: SIM905
}

# The 11 columns only train-metadata.csv has (labels and pathology); never model inputs.
TRAIN_ONLY_COLUMNS: dict[str, pl.DataType] = {
    "target": pl.Int8,
    **dict.fromkeys("lesion_id iddx_full iddx_1 iddx_2 iddx_3 iddx_4 iddx_5".split(), pl.String),  # noqa: SIM905
    "mel_mitotic_index": pl.String,
    "mel_thick_mm": pl.Float64,
    "tbp_lv_dnn_lesion_confidence": pl.Float64,
}

# The 55 train columns in the real file's order: target after isic_id, the rest at the end.
TRAIN_COLUMNS: dict[str, pl.DataType] = (
    {"isic_id": pl.String, "target": pl.Int8} | TEST_COLUMNS | TRAIN_ONLY_COLUMNS
)

ID_COLUMNS = ("isic_id", "patient_id")

# Categorical model inputs and the values the real data uses (train plus the public test rows).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "sex": ("female", "male"),
    "anatom_site_general": tuple(
        "anterior torso, head/neck, lower extremity, posterior torso, upper extremity".split(", ")  # noqa: SIM905
    ),
    "tbp_tile_type": ("3D: white", "3D: XP"),
    "tbp_lv_location": tuple(
        "Head & Neck, Left Arm, Left Arm - Lower, Left Arm - Upper, Left Leg, Left Leg - Lower, "  # noqa: SIM905
        "Left Leg - Upper, Right Arm, Right Arm - Lower, Right Arm - Upper, Right Leg, "
        "Right Leg - Lower, Right Leg - Upper, Torso Back, Torso Back Bottom Third, "
        "Torso Back Middle Third, Torso Back Top Third, Torso Front, Torso Front Bottom Half, "
        "Torso Front Top Half, Unknown".split(", ")
    ),
    "tbp_lv_location_simple": tuple(
        "Head & Neck, Left Arm, Left Leg, Right Arm, Right Leg, Torso Back, Torso Front, "  # noqa: SIM905
        "Unknown".split(", ")
    ),
    "attribution": (
        "ACEMID MIA",
        "Department of Dermatology, Hospital Clínic de Barcelona",
        "Department of Dermatology, University of Athens, Andreas Syggros Hospital of Skin "
        "and Venereal Diseases, Alexandra Hospital",
        "FNQH Cairns",
        "Frazer Institute, The University of Queensland, Dermatology Research Centre",
        "Memorial Sloan Kettering Cancer Center",
        "University Hospital of Basel",
        "ViDIR Group, Department of Dermatology, Medical University of Vienna",
    ),
}
NUMERIC_COLUMNS: tuple[str, ...] = tuple(c for c, t in TEST_COLUMNS.items() if t == pl.Float64)
# What utils.tabular.features.build_features reads: a test file needs these, the rest may be absent.
FEATURE_INPUT_COLUMNS: tuple[str, ...] = ID_COLUMNS + tuple(CATEGORIES) + NUMERIC_COLUMNS


SCHEMAS = {"train": TRAIN_COLUMNS, "test": TEST_COLUMNS}


@dataclass(frozen=True)
class ValueRange:
    """The values a numeric column can hold: finite, within [low, high] (`low_open`: > low)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False

    def outside(self, col: str) -> pl.Expr:
        """True where the finite value of `col` lies outside the range."""
        below = pl.col(col) <= self.low if self.low_open else pl.col(col) < self.low
        return below | (pl.col(col) > self.high)

    def __str__(self) -> str:
        low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        return low if math.isinf(self.high) else f"{low} and <= {self.high:g}"


AGE_YEARS = ValueRange(0, 120)
# Sizes are > 0 and, generously, at most a metre (lengths) or a square metre (areas): the real
# data's largest lesion is under 30 mm across, so 1e308 mm is a broken value, not a lesion.
LENGTH_MM = ValueRange(0, 1_000, low_open=True)
AREA_MM2 = ValueRange(0, 1_000_000, low_open=True)
# What a lesion can have; every other numeric column (colours, coordinates, scores) may hold any
# finite value. NaN or inf (text "NaN", "inf", or 1e400, which parses to inf) is never a value.
VALUE_RANGES: dict[str, ValueRange] = {
    "age_approx": AGE_YEARS,
    "clin_size_long_diam_mm": LENGTH_MM,
    "tbp_lv_minorAxisMM": LENGTH_MM,
    "tbp_lv_perimeterMM": LENGTH_MM,
    "tbp_lv_areaMM2": AREA_MM2,
}
NOT_FINITE = "NaN/inf"


def coerce_impossible(df: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, dict[str, int]]]:
    """`df` with every numeric value a lesion cannot have made missing (null): NaN or inf in any
    numeric column, a value outside VALUE_RANGES; and per column how many, by reason. Only those
    cells change: a patient's other rows keep their values."""
    counts: dict[str, dict[str, int]] = {}
    exprs = []
    for col in (c for c in NUMERIC_COLUMNS if c in df.columns and df.schema[c].is_float()):
        value_range = VALUE_RANGES.get(col, ValueRange())
        not_finite = pl.col(col).is_nan() | pl.col(col).is_infinite()
        outside = ~not_finite & value_range.outside(col)
        found = df.select(not_finite.sum().alias("nf"), outside.sum().alias("out")).row(0)
        reasons = {NOT_FINITE: found[0], f"outside {value_range}": found[1]}
        reasons = {why: int(n) for why, n in reasons.items() if n}
        if reasons:
            counts[col] = reasons
            exprs.append(pl.when(not_finite | outside).then(None).otherwise(pl.col(col)).alias(col))
    return (df.with_columns(exprs) if exprs else df), counts


class SchemaError(ValueError):
    """A metadata file does not have the columns or values the pipeline needs."""


def validate_columns(
    columns: Iterable[str], kind: str, source: str | Path, *, allow_extra: bool = False
) -> None:
    """Raise SchemaError naming `source` and the missing (or unexpected) columns for `kind`."""
    expected, present = SCHEMAS[kind], list(columns)
    missing = [c for c in expected if c not in present]
    extra = [] if allow_extra else [c for c in present if c not in expected]
    found = (("missing", missing), ("unexpected", extra))
    problems = [f"{what} column(s) {cols}" for what, cols in found if cols]
    if problems:
        raise SchemaError(f"{source}: {kind} metadata has " + " and ".join(problems))


def validate_frame(df: pl.DataFrame, kind: str, source: str | Path) -> None:
    """Check columns, unique non-null ids, and (train) a 0/1 target without nulls."""
    validate_columns(df.columns, kind, source)
    for col in ID_COLUMNS:
        if nulls := df[col].null_count():
            raise SchemaError(f"{source}: column {col!r} has {nulls} empty value(s)")
    dupes = df.filter(pl.col("isic_id").is_duplicated())["isic_id"].unique().sort()
    if len(dupes):
        raise SchemaError(f"{source}: duplicate isic_id(s) {dupes.head(5).to_list()}")
    if kind == "train":
        bad = df.filter(pl.col("target").is_null() | ~pl.col("target").is_in([0, 1]))
        if len(bad):
            raise SchemaError(
                f"{source}: column 'target' must be 0 or 1; bad rows for isic_id "
                f"{bad['isic_id'].head(5).to_list()}"
            )


def normalise_categories(df: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """`df` with every known category spelled canonically (a value blank after trimming is
    null), and per column how many values were respelled; unknown values are only trimmed."""
    changed = {}
    exprs = []
    for col, values in CATEGORIES.items():
        if col not in df.columns or df.schema[col] != pl.String:
            continue
        lookup = {value.lower(): value for value in values}  # the values are trimmed already
        trimmed = pl.col(col).str.replace_all(r"\s+", " ").str.strip_chars()
        key = trimmed.str.to_lowercase()
        canonical = key.replace_strict(lookup, default=trimmed, return_dtype=pl.String)
        exprs.append(pl.when(trimmed != "").then(canonical).alias(col))
    out = df.with_columns(exprs)
    for col in (e.meta.output_name() for e in exprs):
        differs = df[col].ne_missing(out[col]) & df[col].is_not_null()
        if n := int(differs.sum()):
            changed[col] = n
    return out, changed


def unseen_categories(df: pl.DataFrame) -> dict[str, dict[str, int]]:
    """column -> {value outside CATEGORIES -> rows} (encoded as `<col>__other`)."""
    unseen = {}
    for col, values in CATEGORIES.items():
        if col not in df.columns:
            continue
        other = df.filter(pl.col(col).is_not_null() & ~pl.col(col).is_in(list(values)))[col]
        if len(other):
            counts = other.value_counts(sort=True)
            unseen[col] = dict(zip(counts[col].to_list(), counts["count"].to_list(), strict=True))
    return unseen
