"""Stage 5: the FusionNetX recipe evaluated on external dermoscopy sets (PH2, HAM10000).

Every variant is cross-validated on one fold assignment (utils.folds, grouped by patient_id,
i.e. by lesion for HAM10000 and by image for PH2) and scored on its out-of-fold predictions:
- `metadata`: the ensemble's metadata-only member (`lgb_meta`, LightGBM) on the dataset's own
  metadata; categorical columns are one-hot encoded over the values present (null: all zeros);
- `image_<model>`: an image model of utils.settings.IMAGE_MODELS trained with the stage 1 loop;
  external sets have no iddx columns, so the "suspicious" models train on the target;
- `fusion_lgb`: LightGBM on metadata + the image OOF columns (`img_<model>`);
- `fusion_soft_vote`: the stage 3 soft vote of lgb_meta, lgb, CatBoost and XGBoost, or under a
  recipe whose blend is "nested" (`plus`) `fusion_nested_blend`, stage 3's fitted weights.
The GBDTs keep the stage 3 params of the recipe, except that `min_data_in_leaf` is capped for
small sets (see `gbdt_params`): the published 85 leaves no split at all on PH2's 160 training
rows. The recipe's stage 3 choices apply as in stage 3 (`stage3_choices`): its blend, and each
optional feature group the external metadata allows (patient-relative image scores need only
patient_id and the image columns); a group that needs ISIC 2024's TBP columns is skipped and
named as such in the metrics file, never dropped silently.

Metrics per variant: accuracy at a stated threshold (0.5 by default; probabilities are not
recalibrated), ROC AUC, average precision and the competition's pAUC above 80% TPR.
`write_metrics` saves them as `<output_dir>/external_metrics.json`, one entry per dataset and
variant with the fold scheme; `paper_table` sets them next to the paper's reported numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from utils.external import (
    EXTERNAL_IMAGES,
    ExternalDataset,
    load_ham10000,
    load_ph2,
    write_layout,
)
from utils.folds import with_folds
from utils.image.train import train_image_model
from utils.layout import METRICS_FILE, PREDICTIONS_FILE
from utils.manifest import set_aside, write_json, write_manifest
from utils.metric import pauc
from utils.settings import ExternalEvalConfig, ImageConfig, image_config, resolve
from utils.tabular.cv import CVResult, cross_validate
from utils.tabular.features import join_image_oofs, one_hot_names
from utils.tabular.gbdt import apply_blend, feature_groups
from utils.tabular.libraries import ENSEMBLE, META_MEMBER, make_members, resolve_params
from utils.tabular.plus_features import patient_image_feature_names, patient_image_features

# FusionNetX paper, external evaluation (accuracy in %, as printed there).
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "HAM10000": {"accuracy": 95.2, "auc": 0.995, "ap": 0.885},
    "PH2": {"accuracy": 95.0, "auc": 0.9844, "ap": 0.9663},
}
MIN_LEAF_ROWS = 20  # a leaf needs at least 1/MIN_LEAF_ROWS of the training rows, or 5 rows
FUSION_MEMBERS = (META_MEMBER, "lgb", "cat", "xgb")
DATASETS = ("PH2", "HAM10000")
HAM_METADATA = "ham10000/HAM10000_metadata.csv"
HAM_IMAGES = "ham10000/images"  # used when present and no ham_image_dir is given
# stage 3's optional feature groups that external metadata allows (the others need ISIC 2024's
# columns: anatomical sites, TBP measurements)
EXTERNAL_GROUPS = ("patient_image",)


# ---------------------------------------------------------------------------------- data


def load_datasets(
    data_dir: str | Path,
    names: Sequence[str] = DATASETS,
    ph2_dir: str | Path | None = None,
    ham_metadata: str | Path | None = None,
    ham_image_dir: str | Path | None = None,
) -> list[ExternalDataset]:
    """The datasets `names`; paths left None default to `<data_dir>/ph2`, `<data_dir>/ham10000`."""
    if unknown := [n for n in names if n not in DATASETS]:
        raise KeyError(f"unknown external dataset(s) {unknown}; known: {list(DATASETS)}")
    data_dir = Path(data_dir)
    if ham_image_dir is None and (data_dir / HAM_IMAGES).is_dir():
        ham_image_dir = data_dir / HAM_IMAGES
    loaders = {
        "PH2": lambda: load_ph2(ph2_dir or data_dir / "ph2"),
        "HAM10000": lambda: load_ham10000(ham_metadata or data_dir / HAM_METADATA, ham_image_dir),
    }
    return [loaders[name]() for name in names]


def dataset_summary(datasets: Sequence[ExternalDataset]) -> pl.DataFrame:
    """Rows, positives, images and metadata columns per dataset."""
    return pl.DataFrame(
        [
            {
                "dataset": d.name,
                "rows": d.frame.height,
                "positives": int(d.frame["target"].sum()),
                "patients": d.frame["patient_id"].n_unique(),
                "images": len(d.image_paths),
                "metadata": ", ".join(d.feature_columns),
            }
            for d in datasets
        ]
    )


# ---------------------------------------------------------------------------------- metrics


def binary_metrics(y_true, y_score, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy (score >= threshold), ROC AUC, average precision and pAUC above 80% TPR."""
    y = np.asarray(y_true, dtype=float).ravel()
    s = np.asarray(y_score, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"binary_metrics: {y.size} labels but {s.size} scores")
    if np.isnan(s).any():
        raise ValueError(f"binary_metrics: {int(np.isnan(s).sum())} score(s) are NaN")
    if not np.isin(y, (0.0, 1.0)).all() or np.unique(y).size < 2:
        raise ValueError("binary_metrics: labels must be 0/1 and hold both classes")
    return {
        "accuracy": float(accuracy_score(y, s >= threshold)),
        "auc": float(roc_auc_score(y, s)),
        "ap": float(average_precision_score(y, s)),
        "pauc": pauc(y, s),
    }


def metric_entry(
    dataset: ExternalDataset,
    variant: str,
    description: str,
    y: np.ndarray,
    score: np.ndarray,
    folds: np.ndarray,
    cfg: ExternalEvalConfig,
) -> dict[str, Any]:
    """One JSON entry: dataset, variant, OOF metrics, per-fold AUC, settings and fold scheme."""
    per_fold = [
        float(roc_auc_score(y[folds == k], score[folds == k]))
        if np.unique(y[folds == k]).size == 2
        else float("nan")
        for k in range(cfg.n_folds)
    ]
    scheme = f"{cfg.n_folds}-fold {dataset.fold_scheme}, seed {cfg.seed} (utils.folds)"
    return {
        "dataset": dataset.name,
        "variant": variant,
        "description": description,
        "rows": int(y.size),
        "positives": int(y.sum()),
        **binary_metrics(y, score, cfg.threshold),
        "fold_auc": per_fold,
        **{name: getattr(cfg, name) for name in ("threshold", "preset", "recipe")},
        "fold_scheme": {"n_folds": cfg.n_folds, "seed": cfg.seed, "description": scheme},
    }


# ---------------------------------------------------------------------------------- variants


def encode_metadata(dataset: ExternalDataset) -> tuple[pl.DataFrame, list[str]]:
    """ids + target + float features: numeric columns as is, categoricals one-hot (null: zeros)."""
    frame = dataset.frame
    names = one_hot_names(
        {c: sorted(frame[c].drop_nulls().unique().to_list()) for c in dataset.categorical_columns}
    )
    one_hot = [
        (pl.col(col) == value).fill_null(False).cast(pl.Float32).alias(name)
        for col, mapping in names.items()
        for value, name in mapping.items()
        if name != f"{col}__other"  # every value present is listed, so "other" stays empty
    ]
    numeric = [pl.col(c).cast(pl.Float32) for c in dataset.numeric_columns]
    encoded = frame.select("isic_id", "patient_id", "target", *numeric, *one_hot)
    return encoded, [c for c in encoded.columns if c not in ("isic_id", "patient_id", "target")]


def gbdt_params(cfg: ExternalEvalConfig, train_rows: int) -> dict[str, dict[str, Any]]:
    """Stage 3 params of the preset, LightGBM's min_data_in_leaf capped for small sets."""
    params = resolve_params(resolve(cfg.preset, cfg.recipe).gbdt)
    cap = max(5, train_rows // MIN_LEAF_ROWS)
    for name in (META_MEMBER, "lgb"):
        params[name]["min_data_in_leaf"] = min(params[name]["min_data_in_leaf"], cap)
    return params


def run_gbdt(
    features: pl.DataFrame,
    meta_columns: Sequence[str],
    image_columns: Sequence[str],
    names: Sequence[str],
    cfg: ExternalEvalConfig,
) -> CVResult:
    """The CV of members `names` (OOF per member and their soft vote) on `features`' folds."""
    folds = features["fold"].to_numpy()
    train_rows = int(np.min([np.sum(folds != k) for k in np.unique(folds)]))
    members = make_members(meta_columns, image_columns, gbdt_params(cfg, train_rows), names)
    y = features["target"].to_numpy()
    return cross_validate(features, y, folds, members, cfg.gbdt_seeds, threads=cfg.threads)


def stage3_choices(cfg: ExternalEvalConfig) -> dict[str, Any]:
    """The recipe's stage 3 choices as stage 5 applies them: blend, feature groups applied and
    those skipped (with why); recorded in the metrics file."""
    gbdt = resolve(cfg.preset, cfg.recipe).gbdt
    wanted = [name for name, on in feature_groups(gbdt).items() if on]
    return {
        "recipe": cfg.recipe,
        "blend": gbdt.blend,
        "feature_groups": [g for g in wanted if g in EXTERNAL_GROUPS],
        "skipped_feature_groups": {
            g: "needs ISIC 2024 metadata columns the external sets lack"
            for g in wanted
            if g not in EXTERNAL_GROUPS
        },
    }


def fusion_variants(
    features: pl.DataFrame,
    meta_columns: Sequence[str],
    image_columns: Sequence[str],
    cfg: ExternalEvalConfig,
) -> dict[str, tuple[str, np.ndarray]]:
    """`fusion_lgb` and the ensemble of the four members, with the recipe's stage 3 choices."""
    choices = stage3_choices(cfg)
    image_features = list(image_columns)
    if "patient_image" in choices["feature_groups"]:
        features = patient_image_features(features, image_columns)
        image_features += patient_image_feature_names(image_columns)
    result = run_gbdt(features, meta_columns, image_features, FUSION_MEMBERS, cfg)
    blend = apply_blend(result, choices["blend"])
    members = "lgb_meta, LightGBM, CatBoost, XGBoost (stage 3)"
    if blend["kind"] == "nested":
        ensemble = ("fusion_nested_blend", f"nested-blend weights of {members}")
    else:
        ensemble = ("fusion_soft_vote", f"soft vote of {members}")
    return {
        "fusion_lgb": ("LightGBM on metadata + image OOFs", result.oof["lgb"]),
        ensemble[0]: (ensemble[1], result.oof[ENSEMBLE]),
    }


def external_image_config(model: str, cfg: ExternalEvalConfig) -> ImageConfig:
    """Stage 1 config of `model` for this evaluation (same folds and seed)."""
    names = ("n_folds", "seed", "epochs", "image_size", "batch_size", "num_workers")
    shared = {name: getattr(cfg, name) for name in names}
    weights = (cfg.weights_path or {}).get(model)
    return image_config(model, cfg.preset, cfg.recipe, weights_path=weights, **shared)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (None: as they are), then restore them."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_image_models(
    dataset: ExternalDataset, folded: pl.DataFrame, cfg: ExternalEvalConfig, run_dir: Path
) -> list[Path]:
    """Train every image model on the dataset's images with the given folds; their run dirs."""
    layout = write_layout(dataset, run_dir / "layout", cfg.max_image_side)
    metadata = folded.select(
        "isic_id", "patient_id", "target", pl.col("target").alias("suspicious"), "fold"
    )
    with torch_threads(cfg.torch_threads):
        for model in cfg.image_models:
            print(f"{dataset.name}: training {model} ({cfg.n_folds} folds)")
            train_image_model(
                external_image_config(model, cfg), metadata, layout / EXTERNAL_IMAGES, run_dir
            )
    return [run_dir / model for model in cfg.image_models]


@dataclass(frozen=True)
class ExternalResult:
    """One dataset's OOF scores per variant (columns of `predictions`) and metric entries."""

    name: str
    predictions: pl.DataFrame  # isic_id, patient_id, fold, target, one column per variant
    entries: list[dict[str, Any]]

    def scores(self) -> dict[str, np.ndarray]:
        """Variant -> OOF scores, for plots."""
        return {e["variant"]: self.predictions[e["variant"]].to_numpy() for e in self.entries}


def evaluate_dataset(
    dataset: ExternalDataset, cfg: ExternalEvalConfig, output_dir: str | Path
) -> ExternalResult:
    """Run every variant the dataset allows on one set of folds; write `predictions.csv`."""
    run_dir = Path(output_dir) / dataset.name
    set_aside(run_dir)  # every variant is evaluated afresh: nothing of another run is mixed in
    run_dir.mkdir(parents=True, exist_ok=True)
    features, meta_columns = encode_metadata(dataset)
    features = with_folds(features, cfg.n_folds, cfg.seed)
    variants: dict[str, tuple[str, np.ndarray]] = {}
    if meta_columns:
        oof = run_gbdt(features, meta_columns, (), (META_MEMBER,), cfg).oof
        variants["metadata"] = (f"LightGBM ({META_MEMBER}) on metadata", oof[META_MEMBER])
    image_columns: list[str] = []
    if not dataset.image_paths:
        print(f"{dataset.name}: no images given, so the metadata model only")
    elif not cfg.image_models:
        print(f"{dataset.name}: image_models is empty, so the metadata model only")
    else:
        model_dirs = run_image_models(dataset, features, cfg, run_dir)
        features, sources = join_image_oofs(features, model_dirs)
        image_columns = list(sources)
        for column, source in sources.items():
            model = source["image_model"]
            variants[f"image_{model}"] = (f"image model {model}", features[column].to_numpy())
    if meta_columns and image_columns:
        variants |= fusion_variants(features, meta_columns, image_columns, cfg)
    if not variants:
        raise ValueError(f"{dataset.name}: neither metadata columns nor images to evaluate")
    y, folds = features["target"].to_numpy(), features["fold"].to_numpy()
    entries = [
        metric_entry(dataset, name, text, y, score.astype(np.float64), folds, cfg)
        for name, (text, score) in variants.items()
    ]
    predictions = features.select("isic_id", "patient_id", "fold", "target").with_columns(
        [pl.Series(name, score, dtype=pl.Float64) for name, (_, score) in variants.items()]
    )
    predictions.write_csv(run_dir / PREDICTIONS_FILE)
    return ExternalResult(dataset.name, predictions, entries)


# ---------------------------------------------------------------------------------- reporting


def write_metrics(
    results: Sequence[ExternalResult], output_dir: str | Path, cfg: ExternalEvalConfig
) -> Path:
    """`<output_dir>/external_metrics.json`: the settings and every dataset x variant entry."""
    record = {
        "settings": dataclasses.asdict(cfg),
        "stage3": stage3_choices(cfg),
        "paper": PAPER_RESULTS,
        "entries": [e for r in results for e in r.entries],
    }
    return write_json(Path(output_dir) / METRICS_FILE, record)


def paper_table(entries: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """The paper's table: per dataset our variants, then the paper's reported row."""
    rows = []
    for dataset in dict.fromkeys(e["dataset"] for e in entries):
        ours = [e for e in entries if e["dataset"] == dataset]
        rows += [
            {
                "dataset": dataset,
                "model": e["variant"],
                "accuracy_%": round(100 * e["accuracy"], 1),
                **{metric: round(e[metric], 4) for metric in ("auc", "ap", "pauc")},
                "folds": e["fold_scheme"]["description"],
            }
            for e in ours
        ]
        if dataset in PAPER_RESULTS:
            paper = PAPER_RESULTS[dataset]
            rows.append(
                {
                    "dataset": dataset,
                    "model": "FusionNetX paper (reported)",
                    "accuracy_%": paper["accuracy"],
                    **{metric: paper.get(metric) for metric in ("auc", "ap", "pauc")},
                    "folds": "as reported",
                }
            )
    return pl.DataFrame(rows, schema_overrides={"pauc": pl.Float64})


def run_external_eval(
    data_dir: str | Path,
    output_dir: str | Path,
    datasets: Sequence[str] = DATASETS,
    ph2_dir: str | Path | None = None,
    ham_metadata: str | Path | None = None,
    ham_image_dir: str | Path | Sequence[str | Path] | None = None,
    preset: str = "demo",
    recipe: str = "paper",
    **overrides: Any,
) -> tuple[ExternalEvalConfig, list[ExternalResult], Path]:
    """Stage 5 entry: settings (utils.settings; `overrides` are ExternalEvalConfig fields, None
    keeps the preset's), every dataset's variants, the metrics file and, last, the manifest."""
    cfg = resolve(preset, recipe, external=overrides).external
    sources = load_datasets(data_dir, datasets, ph2_dir, ham_metadata, ham_image_dir)
    print(dataset_summary(sources))
    results = [evaluate_dataset(dataset, cfg, output_dir) for dataset in sources]
    path = write_metrics(results, output_dir, cfg)
    write_manifest(output_dir, dataclasses.asdict(cfg), {"stage": "external_eval"})
    return cfg, results, path
