"""Polars feature engineering for the GBDT stage: one function for train and test.

`build_features(df)` turns metadata (train or test; train-only columns are ignored) into a
float32 feature frame keyed by isic_id / patient_id:
- the 34 numeric metadata columns and the 42 derived lesion features of the reference list
  (`DERIVED_FEATURES`; tabular-with-image-submission.ipynb of the 3rd-place code);
- patient context: every numeric feature normalised within the patient (`<f>_patient_norm`),
  `count_per_patient`, the patient's total lesion area and this lesion's share of it; with
  `site_features` (not in the reference; a `plus` candidate) also, for the key lesion
  descriptors (`CONTEXT_FEATURES`), the normalisation within patient x anatomical site
  (`<f>_site_norm`) and the percentile within the patient (`<f>_patient_pct`);
- one-hot categoricals over the fixed lists of utils.schema.CATEGORIES plus `<col>__other` for a
  value outside the list; a null is all zeros. Nothing depends on the train data, so unseen test
  categories are safe and inference needs no fitted encoder.

Missing values, on purpose: NaN and +-inf in the input become null; a division by zero gives
null (never inf); every feature is finite or null, and null becomes NaN in numpy (the GBDTs'
"missing"). A patient with one lesion (or one non-null value) has a null std: the lesion *is*
the patient's typical lesion, so its normalised value is 0 and its percentile 0.5.
"""

from __future__ import annotations

import json
import math
import operator
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from functools import reduce
from pathlib import Path

import polars as pl

from utils.folds import check_folds_agree
from utils.layout import CONFIG_FILE, OOF_FILE
from utils.manifest import file_sha256
from utils.oof import read_oof
from utils.schema import CATEGORIES, NUMERIC_COLUMNS, TRAIN_ONLY_COLUMNS, validate_columns

EPS = 1e-5  # added to a patient's std so a constant feature does not divide by zero
PATIENT_KEY = "patient_id"
SITE_KEY = "anatom_site_general"
IMAGE_PREFIX = "img_"
OTHER = "other"

c = pl.col


def _ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    """num / den, null where den is 0 or null (the public version produced inf here)."""
    return pl.when(den != 0).then(num / den)


def _finite(expr: pl.Expr) -> pl.Expr:
    """expr with NaN and +-inf turned into null (Polars' fill_nan leaves nulls alone)."""
    return pl.when(expr.is_finite()).then(expr)


def _sum(*names: str) -> pl.Expr:
    """c(a) + c(b) + ..., summed left to right."""
    return reduce(operator.add, (c(n) for n in names))


def _squares(*names: str) -> pl.Expr:
    """c(a) ** 2 + c(b) ** 2 + ..., summed left to right."""
    return reduce(operator.add, (c(n) ** 2 for n in names))


DERIVED_FEATURES: dict[str, pl.Expr] = {
    "lesion_size_ratio": _ratio(c("tbp_lv_minorAxisMM"), c("clin_size_long_diam_mm")),
    "lesion_shape_index": _ratio(c("tbp_lv_areaMM2"), c("tbp_lv_perimeterMM") ** 2),
    "hue_contrast": (c("tbp_lv_H") - c("tbp_lv_Hext")).abs(),
    "luminance_contrast": (c("tbp_lv_L") - c("tbp_lv_Lext")).abs(),
    "lesion_color_difference": _squares("tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL").sqrt(),
    "border_complexity": c("tbp_lv_norm_border") + c("tbp_lv_symm_2axis"),
    "color_uniformity": _ratio(c("tbp_lv_color_std_mean"), c("tbp_lv_radial_color_std_max")),
    "position_distance_3d": _squares("tbp_lv_x", "tbp_lv_y", "tbp_lv_z").sqrt(),
    "perimeter_to_area_ratio": _ratio(c("tbp_lv_perimeterMM"), c("tbp_lv_areaMM2")),
    "area_to_perimeter_ratio": _ratio(c("tbp_lv_areaMM2"), c("tbp_lv_perimeterMM")),
    "lesion_visibility_score": c("tbp_lv_deltaLBnorm") + c("tbp_lv_norm_color"),
    "symmetry_border_consistency": c("tbp_lv_symm_2axis") * c("tbp_lv_norm_border"),
    "consistency_symmetry_border": _ratio(
        c("tbp_lv_symm_2axis") * c("tbp_lv_norm_border"),
        c("tbp_lv_symm_2axis") + c("tbp_lv_norm_border"),
    ),
    "color_consistency": _ratio(c("tbp_lv_stdL"), c("tbp_lv_Lext")),
    "consistency_color": _ratio(
        c("tbp_lv_stdL") * c("tbp_lv_Lext"), c("tbp_lv_stdL") + c("tbp_lv_Lext")
    ),
    "size_age_interaction": c("clin_size_long_diam_mm") * c("age_approx"),
    "hue_color_std_interaction": c("tbp_lv_H") * c("tbp_lv_color_std_mean"),
    "lesion_severity_index": _sum("tbp_lv_norm_border", "tbp_lv_norm_color", "tbp_lv_eccentricity")
    / 3,
    "shape_complexity_index": _sum("tbp_lv_norm_border", "tbp_lv_symm_2axis")
    + _ratio(c("tbp_lv_areaMM2"), c("tbp_lv_perimeterMM") ** 2),
    "color_contrast_index": _sum(
        "tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL", "tbp_lv_deltaLBnorm"
    ),
    "log_lesion_area": (c("tbp_lv_areaMM2") + 1).log(),
    "normalized_lesion_size": _ratio(c("clin_size_long_diam_mm"), c("age_approx")),
    "mean_hue_difference": (c("tbp_lv_H") + c("tbp_lv_Hext")) / 2,
    "std_dev_contrast": (_squares("tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL") / 3).sqrt(),
    "color_shape_composite_index": _sum(
        "tbp_lv_color_std_mean", "tbp_lv_area_perim_ratio", "tbp_lv_symm_2axis"
    )
    / 3,
    "lesion_orientation_3d": pl.arctan2(c("tbp_lv_y"), c("tbp_lv_x")),
    "overall_color_difference": _sum("tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL") / 3,
    "symmetry_perimeter_interaction": c("tbp_lv_symm_2axis") * c("tbp_lv_perimeterMM"),
    "comprehensive_lesion_index": _sum(
        "tbp_lv_area_perim_ratio", "tbp_lv_eccentricity", "tbp_lv_norm_color", "tbp_lv_symm_2axis"
    )
    / 4,
    "color_variance_ratio": _ratio(c("tbp_lv_color_std_mean"), c("tbp_lv_stdLExt")),
    "border_color_interaction": c("tbp_lv_norm_border") * c("tbp_lv_norm_color"),
    "border_color_interaction_2": _ratio(
        c("tbp_lv_norm_border") * c("tbp_lv_norm_color"),
        c("tbp_lv_norm_border") + c("tbp_lv_norm_color"),
    ),
    "size_color_contrast_ratio": _ratio(c("clin_size_long_diam_mm"), c("tbp_lv_deltaLBnorm")),
    "age_normalized_nevi_confidence": _ratio(c("tbp_lv_nevi_confidence"), c("age_approx")),
    "age_normalized_nevi_confidence_2": _squares("clin_size_long_diam_mm", "age_approx").sqrt(),
    "color_asymmetry_index": c("tbp_lv_radial_color_std_max") * c("tbp_lv_symm_2axis"),
    "volume_approximation_3d": c("tbp_lv_areaMM2")
    * _squares("tbp_lv_x", "tbp_lv_y", "tbp_lv_z").sqrt(),
    "color_range": (c("tbp_lv_L") - c("tbp_lv_Lext")).abs()
    + (c("tbp_lv_A") - c("tbp_lv_Aext")).abs()
    + (c("tbp_lv_B") - c("tbp_lv_Bext")).abs(),
    "shape_color_consistency": c("tbp_lv_eccentricity") * c("tbp_lv_color_std_mean"),
    "border_length_ratio": _ratio(
        c("tbp_lv_perimeterMM"), 2 * math.pi * (c("tbp_lv_areaMM2") / math.pi).sqrt()
    ),
    "age_size_symmetry_index": c("age_approx")
    * c("clin_size_long_diam_mm")
    * c("tbp_lv_symm_2axis"),
    "index_age_size_symmetry": c("age_approx") * c("tbp_lv_areaMM2") * c("tbp_lv_symm_2axis"),
}

NUMERIC_FEATURES: tuple[str, ...] = NUMERIC_COLUMNS + tuple(DERIVED_FEATURES)

# Lesion descriptors that top teams compared against the patient's other lesions ("ugly duckling").
CONTEXT_FEATURES: tuple[str, ...] = tuple(
    """clin_size_long_diam_mm tbp_lv_areaMM2 tbp_lv_minorAxisMM tbp_lv_L tbp_lv_deltaL
    tbp_lv_deltaLBnorm tbp_lv_color_std_mean tbp_lv_radial_color_std_max tbp_lv_norm_color
    tbp_lv_norm_border tbp_lv_eccentricity tbp_lv_nevi_confidence lesion_color_difference
    luminance_contrast hue_contrast border_complexity""".split()  # noqa: SIM905
)


def _slug(value: str) -> str:
    """ASCII lower-case name fragment safe in LightGBM/XGBoost feature names."""
    ascii_value = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", ascii_value.lower()).strip("_")[:40]


def one_hot_names(categories: dict[str, Sequence[str]] = CATEGORIES) -> dict[str, dict[str, str]]:
    """column -> {category value -> feature name}, plus OTHER -> `<col>__other`."""
    names = {}
    for col, values in categories.items():
        mapping = {**{v: f"{col}__{_slug(v)}" for v in values}, OTHER: f"{col}__{OTHER}"}
        if len(set(mapping.values())) != len(mapping):
            raise ValueError(f"one_hot_names: category names of {col!r} collide after slugging")
        names[col] = mapping
    return names


ONE_HOT = one_hot_names()


def _one_hot_exprs() -> list[pl.Expr]:
    """Indicator columns over the fixed category lists; unseen values set `<col>__other`."""
    exprs = []
    for col, mapping in ONE_HOT.items():
        known = [v for v in mapping if v != OTHER]
        exprs += [(c(col) == v).fill_null(False).alias(mapping[v]) for v in known]
        exprs.append((c(col).is_not_null() & ~c(col).is_in(known)).alias(mapping[OTHER]))
    return exprs


def _patient_norm(name: str, over: str | list[str], suffix: str) -> pl.Expr:
    """(x - group mean) / (group std + EPS); 0 where the group has one value (std is null)."""
    std = c(name).std().over(over).fill_null(0.0)
    norm = (c(name) - c(name).mean().over(over)) / (std + EPS)
    return pl.when(c(name).is_not_null()).then(norm).alias(f"{name}{suffix}")


def _patient_pct(name: str) -> pl.Expr:
    """Centred percentile of x among the patient's non-null values: (rank - 0.5) / count."""
    pct = (c(name).rank("average").over(PATIENT_KEY) - 0.5) / c(name).count().over(PATIENT_KEY)
    return pct.alias(f"{name}_patient_pct")


def _context_exprs(site_features: bool) -> list[pl.Expr]:
    """Patient normalisation and patient totals; with `site_features` also the patient x site
    normalisation and the within-patient percentiles (not in the reference: off in `paper`)."""
    exprs = [_patient_norm(f, PATIENT_KEY, "_patient_norm") for f in NUMERIC_FEATURES]
    if site_features:
        site_group = [PATIENT_KEY, "_site"]
        exprs += [_patient_norm(f, site_group, "_site_norm") for f in CONTEXT_FEATURES]
        exprs += [_patient_pct(f) for f in CONTEXT_FEATURES]
    total_area = c("tbp_lv_areaMM2").sum().over(PATIENT_KEY)
    exprs += [
        pl.len().over(PATIENT_KEY).cast(pl.Float64).alias("count_per_patient"),
        total_area.alias("patient_total_area"),
        _ratio(c("tbp_lv_areaMM2"), total_area).alias("area_share_of_patient"),
    ]
    return exprs


def check_no_train_only(names: Iterable[str]) -> None:
    """Raise ValueError if a train-only column (label or pathology) is among `names`."""
    leaked = [n for n in names if n in TRAIN_ONLY_COLUMNS]
    if leaked:
        raise ValueError(f"train-only column(s) {leaked} must never be features")


def build_features(
    df: pl.DataFrame, source: str | Path = "metadata", site_features: bool = False
) -> tuple[pl.DataFrame, list[str]]:
    """Feature frame (isic_id, patient_id, float32 features) and feature names; train or test.

    `site_features` adds `<f>_site_norm` and `<f>_patient_pct` (GBDTConfig.site_features).
    """
    validate_columns(df.columns, "test", source, allow_extra=True)
    numeric = [_finite(c(n).cast(pl.Float64)).alias(n) for n in NUMERIC_COLUMNS]
    derived = [_finite(e).alias(n) for n, e in DERIVED_FEATURES.items()]
    plan = (
        df.lazy()
        .select("isic_id", PATIENT_KEY, *CATEGORIES, *numeric)
        .with_columns(derived)
        .with_columns(c(SITE_KEY).fill_null("<null>").alias("_site"))
        .with_columns(_finite(e) for e in _context_exprs(site_features))
        .with_columns(_one_hot_exprs())
        .drop("_site", *CATEGORIES)
    )
    names = [n for n in plan.collect_schema().names() if n not in ("isic_id", PATIENT_KEY)]
    check_no_train_only(names)
    # cast inside the query: a Float64 copy of every feature is never materialised (401,059 rows:
    # peak RSS 2.0 -> 1.6 GiB, same output)
    return plan.with_columns(c(n).cast(pl.Float32) for n in names).collect(), names


def image_source(model_dir: str | Path) -> dict[str, str]:
    """What stage 1 recorded about the run in `model_dir` (its config.json): the image model's
    name and the run's config hash, plus the sha256 of its oof.csv."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: an image OOF dir needs the config.json of its run")
    record = json.loads(path.read_text())
    try:
        model, run_hash = record["config"]["model_name"], record["config_hash"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: no model_name / config_hash recorded ({err})") from err
    return {
        "image_model": model,
        "config_hash": run_hash,
        "oof_sha256": file_sha256(path.parent / OOF_FILE),
    }


def join_image_oofs(
    frame: pl.DataFrame, model_dirs: Sequence[str | Path]
) -> tuple[pl.DataFrame, dict[str, dict[str, str]]]:
    """Join each `<dir>/oof.csv` pred by isic_id as column img_<model>, after checking folds.

    The model name and run hash come from the run's config.json, never from the folder name;
    returns the frame and, per image column, that source (image_model, config_hash, oof_sha256).
    `frame` needs isic_id and fold (utils.folds); a missing id or another fold raises ValueError.
    """
    sources: dict[str, dict[str, str]] = {}
    for model_dir in model_dirs:
        path = Path(model_dir) / OOF_FILE
        oof = read_oof(path)
        source = image_source(model_dir)
        name = f"{IMAGE_PREFIX}{source['image_model']}"
        if name in frame.columns or name in sources:
            raise ValueError(f"join_image_oofs: two image models are named {name!r} ({path})")
        check_folds_agree(frame, oof, str(path))
        frame = frame.join(
            oof.select("isic_id", c("pred").cast(pl.Float32).alias(name)),
            on="isic_id",
            how="left",
            maintain_order="left",
        )
        sources[name] = source
    return frame, sources


def features_spec(
    meta_features: Sequence[str],
    image_sources: Mapping[str, Mapping[str, str]],
    groups: Mapping[str, bool] | None = None,
    image_derived: Sequence[str] = (),
) -> dict:
    """What features.json records: the feature lists, each image column's source run (model and
    config hash, which the submission kernel checks), the optional feature groups built
    (`feature_groups`: site_features, ugly_duckling, patient_image; the submission kernel builds
    the same), the image-derived features and the categorical encoding (for the inference
    kernel)."""
    image_columns = list(image_sources)
    return {
        "meta_features": list(meta_features),
        "image_columns": image_columns,
        "image_derived": list(image_derived),
        "image_sources": {k: dict(v) for k, v in image_sources.items()},
        "features": list(meta_features) + image_columns + list(image_derived),
        "feature_groups": dict(groups or {}),
        "patient_epsilon": EPS,
        "categorical_encoding": {
            "scheme": "one-hot over fixed lists; unseen value -> <col>__other; null -> all zeros",
            "columns": {col: dict(mapping) for col, mapping in ONE_HOT.items()},
        },
    }
