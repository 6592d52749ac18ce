"""Stage 3: Polars features + the GBDT ensemble, from data dir to artifacts, in one entry.

`run_gbdt_stage(data_dir, output_dir, image_oof_dirs, params_path, preset, recipe)` is what
notebooks/03_gbdt calls, and what tuning (through `load_training_frame`), tests and bench reuse:
1. read train-metadata.csv and build the features (utils.tabular.features);
2. join the folds (utils.folds) on isic_id, never by row position;
3. join each image model's OOF on isic_id as img_<model> (the model and its run's config hash
   come from the run's config.json and are recorded per column);
   the `plus` recipe's optional groups (GBDTConfig: site_features and plus_features.OPTIONAL_GROUPS)
   are built here too and recorded in features.json, so the submission kernel builds the same;
4. cross-validate the four members and the soft vote (utils.tabular.cv), or with `blend="nested"`
   weights fitted on the members' OOF (utils.tabular.blend.nested_blend, saved in ensemble.json);
   the report gives the plain score and the reference's filtered one (utils.tabular.cv
   .filtered_report; GBDTConfig.filter_training also trains the folds without those rows);
5. write `<output_dir>/gbdt/` from clean (an earlier run is moved aside): models, ensemble.json,
   features.json (with the recipe, which the submission kernel reads), params.json,
   cv_report.json, oof.csv, importance.csv, plots, and last
   manifest.json (utils.manifest). Every file is written atomically (a temporary name, then
   os.replace), so a killed stage leaves whole files and no manifest, never a cut model file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from utils.folds import with_folds
from utils.io import TRAIN_METADATA, DataDir, coerced_values
from utils.labels import reference_filter_mask
from utils.layout import CV_REPORT_FILE, ENSEMBLE_FILE, FEATURES_FILE, GBDT_DIR, OOF_FILE
from utils.manifest import atomic_output, data_fingerprint, set_aside, write_json, write_manifest
from utils.metric import pauc
from utils.oof import write_oof
from utils.plots import plot_fold_scores, plot_importance, plot_roc
from utils.settings import FOLD_SEED, N_FOLDS, GBDTConfig, resolve
from utils.tabular.blend import member_floors, nested_blend
from utils.tabular.cv import (
    CVResult,
    ablation_table,
    cross_validate,
    cv_report,
    feature_importance,
    filtered_report,
)
from utils.tabular.features import build_features, features_spec, join_image_oofs
from utils.tabular.libraries import (
    ENSEMBLE,
    LIBRARIES,
    META_MEMBER,
    load_params,
    make_members,
    resolve_params,
)
from utils.tabular.plus_features import OPTIONAL_GROUPS, add_optional_features


@dataclass(frozen=True)
class TrainingFrame:
    """Stage 3's training table: features, fold, target and image OOF columns, keyed by isic_id."""

    frame: pl.DataFrame
    meta_features: tuple[str, ...]
    image_sources: dict[str, dict[str, str]]  # image column -> image_model, config_hash, oof sha
    # features derived from the image columns (patient_image), seen by the image members only
    image_derived: tuple[str, ...] = ()
    groups: dict[str, bool] = dataclasses.field(default_factory=dict)  # optional groups built
    # rows the reference's filtered CV leaves out (utils.labels.reference_filtered); None: the
    # metadata has no iddx columns
    filtered: np.ndarray | None = None

    @property
    def image_columns(self) -> tuple[str, ...]:
        return tuple(self.image_sources)

    @property
    def image_features(self) -> tuple[str, ...]:
        """What the image members see besides the metadata: image columns and derived ones."""
        return self.image_columns + self.image_derived

    @property
    def y(self) -> np.ndarray:
        return self.frame["target"].to_numpy().astype(np.int8)

    @property
    def folds(self) -> np.ndarray:
        return self.frame["fold"].to_numpy()

    def describe(self) -> str:
        """Rows, positives, feature count and image columns, in one line."""
        images = list(self.image_columns) or "none (metadata-only run)"
        return (
            f"{self.frame.height:,} rows, {self.y.sum()} positives, "
            f"{len(self.meta_features)} metadata features, image columns: {images}"
        )


# site_features is built inside utils.tabular.features; the rest by the one registry
FEATURE_GROUPS: tuple[str, ...] = ("site_features", *OPTIONAL_GROUPS)


def feature_groups(cfg: GBDTConfig) -> dict[str, bool]:
    """The optional feature groups `cfg` turns on (keyword arguments of load_training_frame)."""
    return {name: bool(getattr(cfg, name)) for name in FEATURE_GROUPS}


def load_training_frame(
    data_dir: str | Path,
    image_oof_dirs: Sequence[str | Path] = (),
    n_folds: int = N_FOLDS,
    fold_seed: int = FOLD_SEED,
    site_features: bool = False,
    threads: int | None = None,
    **groups: bool,
) -> TrainingFrame:
    """Read, build features, join folds and image OOFs on isic_id (the stage 3 recipe), and the
    optional feature groups asked for (`groups`: names of plus_features.OPTIONAL_GROUPS;
    `threads` for the ugly-duckling LOF pool)."""
    train = DataDir(data_dir).train_metadata()
    frame, meta_features = build_features(train, source=data_dir, site_features=site_features)
    folds = with_folds(train, n_folds, fold_seed).select(
        "isic_id", "fold", pl.col("target").cast(pl.Int8)
    )
    frame = frame.join(folds, on="isic_id", how="left", maintain_order="left")
    frame, sources = join_image_oofs(frame, image_oof_dirs)
    # the metadata only: the optional groups never see the label (tests/test_plus_features)
    frame, meta_added, image_added = add_optional_features(
        frame, train.drop("target"), list(sources), threads, **groups
    )
    built = {"site_features": site_features} | {g: bool(groups.get(g)) for g in OPTIONAL_GROUPS}
    built["patient_image"] = bool(image_added)
    filtered = reference_filter_mask(train, frame["isic_id"])
    return TrainingFrame(
        frame, tuple(meta_features + meta_added), sources, tuple(image_added), built, filtered
    )


def training_rows(cfg: GBDTConfig, data: TrainingFrame) -> np.ndarray | None:
    """The rows the fold models train on (`trainable` of tabular.cv.cross_validate): with
    `filter_training` every row but the reference's filtered ones (when the metadata has the
    iddx columns to tell them); None: every row. Stage 2's trials train on the same."""
    if cfg.filter_training and data.filtered is not None:
        return ~data.filtered
    return None


@dataclass(frozen=True)
class GBDTRun:
    """What a stage 3 run produced, for the notebook to show."""

    config: GBDTConfig
    data: TrainingFrame
    params: dict[str, dict[str, Any]]
    result: CVResult
    report: dict[str, Any]
    ablation: pl.DataFrame
    importance: pl.DataFrame
    figures: dict[str, Figure]
    out_dir: Path

    def score_table(self) -> pl.DataFrame:
        """pAUC per member (rows) and fold (columns), with the overall OOF pAUC."""
        overall = self.result.overall_scores()
        table = self.result.fold_scores().pivot(on="fold", index="model", values="pauc")
        return table.with_columns(overall=pl.Series([overall[m] for m in table["model"]]))


def apply_blend(result: CVResult, kind: str, floor: float = 0.0) -> dict[str, Any]:
    """The blend of the members' OOF (GBDTConfig.blend): "equal" keeps the soft vote; "nested"
    replaces the ensemble's OOF by utils.tabular.blend.nested_blend's (each fold scored with weights
    fitted on the other folds: an honest CV) and returns the weights fitted on every row, which
    the submission applies; `floor` (GBDTConfig.blend_floor) is the least weight left to
    lgb_meta. JSON-ready: kind, weights per member, OOF pAUC of both blends."""
    names = list(result.members)
    equal = pauc(result.y, result.oof[ENSEMBLE])
    if kind == "equal" or len(names) < 2:
        weights = {n: 1 / len(names) for n in names}
        return {"kind": "equal", "weights": weights, "equal_pauc": equal, "pauc": equal}
    preds = np.column_stack([result.oof[n] for n in names])
    floors = member_floors(names, META_MEMBER, floor)
    blended = nested_blend(preds, result.y, result.folds, floors=floors)
    result.oof[ENSEMBLE] = blended.oof

    def clean(w: np.ndarray) -> list[float]:  # steps of 0.05 leave float dust (1e-17)
        return [round(float(v), 9) for v in w]

    return {
        "kind": kind,
        "weights": dict(zip(names, clean(blended.weights), strict=True)),
        "fold_weights": {str(k): clean(w) for k, w in blended.fold_weights.items()},
        "equal_pauc": equal,
        "pauc": blended.pauc,
    }


def save_artifacts(
    out_dir: str | Path,
    result: CVResult,
    ids: pl.DataFrame,
    features: Mapping[str, Any],
    params: Mapping[str, Any],
    report: Mapping[str, Any],
    weights: Mapping[str, float] | None = None,
    recipe: str | None = None,
) -> Path:
    """Write models/, ensemble.json (members, the recipe and, when fitted, blend weights),
    features.json, params.json, cv_report.json and oof.csv, each file atomically (the manifest
    comes after, from run_gbdt_stage)."""
    out = Path(out_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    members = {}
    for name, member in result.members.items():
        library = LIBRARIES[member.library]
        files = []
        for model, (fold, seed) in zip(result.models[name], result.model_keys[name], strict=True):
            rel = f"models/{name}_fold{fold}_seed{seed}.{library.suffix}"
            with atomic_output(out / rel) as tmp:
                library.save(model, tmp)
            files.append(rel)
        members[name] = {
            "library": member.library,
            "features": list(member.features),
            "models": files,
        }
    ensemble: dict[str, Any] = {"members": members}
    if recipe is not None:
        ensemble["recipe"] = recipe
    if weights is not None:
        ensemble["weights"] = {name: float(w) for name, w in weights.items()}
    write_json(out / ENSEMBLE_FILE, ensemble)
    write_json(out / FEATURES_FILE, features)
    write_json(out / "params.json", params)
    write_json(out / CV_REPORT_FILE, report)
    oof = ids.select("isic_id", "patient_id").with_columns(
        fold=pl.Series(result.folds),
        target=pl.Series(result.y),
        pred=pl.Series(result.oof[ENSEMBLE]),
    )
    with atomic_output(out / OOF_FILE) as tmp:
        write_oof(oof, tmp)
    return out


def stage_figures(data: TrainingFrame, result: CVResult, importance: pl.DataFrame) -> dict:
    """ROC of the ensemble, members and image columns; feature importance; fold scores."""
    scores = {ENSEMBLE: result.oof[ENSEMBLE], **{m: result.oof[m] for m in result.members}}
    scores |= {c: data.frame[c].to_numpy() for c in data.image_columns}
    return {
        "roc": plot_roc(result.y, scores).figure,
        "importance": plot_importance(importance, top_n=30).figure,
        "fold_scores": plot_fold_scores(result.fold_scores()).figure,
    }


def run_gbdt_stage(
    data_dir: str | Path,
    output_dir: str | Path,
    image_oof_dirs: Sequence[str | Path] = (),
    params_path: str | Path | None = None,
    preset: str = "demo",
    recipe: str = "paper",
    **overrides: Any,
) -> GBDTRun:
    """Stage 3 entry: features, folds and image OOFs, CV of every member, artifacts + manifest.

    `overrides` are GBDTConfig fields (seeds, threads, n_folds, ...); None keeps the preset's.
    """
    cfg = resolve(preset, recipe, gbdt=overrides).gbdt
    data = load_training_frame(
        data_dir,
        image_oof_dirs,
        cfg.n_folds,
        cfg.fold_seed,
        threads=cfg.threads,
        **feature_groups(cfg),
    )
    tuned = load_params(params_path) if params_path else None
    params = resolve_params(cfg, tuned)
    members = make_members(data.meta_features, data.image_features, params)
    trainable = training_rows(cfg, data)
    result = cross_validate(
        data.frame,
        data.y,
        data.folds,
        members,
        cfg.seeds,
        cfg.sampling,
        cfg.threads,
        trainable=trainable,
    )
    blend = apply_blend(result, cfg.blend, cfg.blend_floor)
    ablation = ablation_table(result, {c: data.frame[c].to_numpy() for c in data.image_columns})
    report = cv_report(result, ablation, data.image_columns) | {
        "recipe": cfg.recipe,
        "blend": blend,
        "filtered": filtered_report(result, data.filtered, trainable is not None),
        "coerced_values": coerced_values(DataDir(data_dir).path(TRAIN_METADATA)),
    }
    importance = feature_importance(result)
    out = Path(output_dir) / GBDT_DIR
    set_aside(out)  # a GBDT run is never resumed: start clean
    spec = features_spec(data.meta_features, data.image_sources, data.groups, data.image_derived)
    # the recipe travels with the artifacts: the submission kernel reads it here, never from a
    # parameter of its own that could disagree
    spec = {**spec, "recipe": cfg.recipe}
    save_artifacts(
        out, result, data.frame, spec, params, report, blend["weights"], recipe=cfg.recipe
    )
    with atomic_output(out / "importance.csv") as tmp:
        importance.write_csv(tmp)
    figures = stage_figures(data, result, importance)
    for name, fig in figures.items():
        with atomic_output(out / f"{name}.png") as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    config = {
        "gbdt": dataclasses.asdict(cfg),
        "params": params,
        "params_file": tuned,
        "image_sources": data.image_sources,
        "data": data_fingerprint(data.frame),  # rows, positives, hash of (isic_id, fold, target)
    }
    write_manifest(out, config, {"stage": "gbdt"})
    return GBDTRun(cfg, data, params, result, report, ablation, importance, figures, out)
