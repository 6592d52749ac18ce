"""The GBDT ensemble: four members, sampling inside folds, cross-validation, soft vote, artifacts.

Members (`GBDT_MODELS`): `lgb_meta` (LightGBM on metadata features only) and `lgb`, `cat`, `xgb`
(LightGBM, CatBoost, XGBoost on metadata + image OOF columns; with no image columns they use
the metadata features too). The ensemble score is the mean of the members' probabilities, each
member's being the mean over its fold models and seeds (soft voting).

Params JSON (written by the tuning stage, read by `load_params`):
    {"lgb": {...}, "cat": {...}, "xgb": {...}, "lgb_meta": {...}}
Every key is optional; each object holds keyword arguments of the library's scikit-learn
estimator (LGBMClassifier, CatBoostClassifier, XGBClassifier) and updates `DEFAULT_PARAMS` key
by key (after the binning settings of `SPEED_PARAMS`). `lgb_meta` uses the resolved "lgb" params
unless "lgb_meta" is given. The seed
(`random_state`) and thread count are set per run and override the file.

Speed: LightGBM bins each member's rows once and fits every fold on rows of that binned data
(`bin_member`, `Library.bin_all` / `fit_rows`; `bin_once=False` bins per fold as before); CatBoost
and XGBoost bin per fold (binning all 401,059 rows once costs them more than it saves).

Sampling: RandomOverSampler(0.003) then RandomUnderSampler(0.01) on the training rows of each
fold only. A step whose ratio (positives / negatives) is already reached is skipped, and the
fold's note in `CVResult.sampling` says so (tiny or test data with many positives).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl
import xgboost as xgb
from catboost import CatBoostClassifier
from imblearn.over_sampling import RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler
from tqdm.auto import tqdm

from utils.metric import pauc
from utils.oof import write_oof

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "lgb": {
        "objective": "binary",
        "verbosity": -1,
        "n_estimators": 200,
        "learning_rate": 0.0323,
        "max_depth": 4,
        "num_leaves": 103,
        "min_data_in_leaf": 85,
        "colsample_bytree": 0.833,
        "colsample_bynode": 0.403,
        "bagging_fraction": 0.774,
        "bagging_freq": 4,
        "lambda_l1": 0.0876,
        "lambda_l2": 0.00397,
        "scale_pos_weight": 2.798,
    },
    "cat": {
        "loss_function": "Logloss",
        "iterations": 200,
        "learning_rate": 0.0694,
        "depth": 7,
        "l2_leaf_reg": 6.22,
        "subsample": 0.625,
        "min_data_in_leaf": 24,
        "scale_pos_weight": 2.615,
        "verbose": False,
        "allow_writing_files": False,
    },
    "xgb": {
        "n_estimators": 100,  # XGBClassifier's default, which the published setup kept
        "tree_method": "hist",
        "learning_rate": 0.0850,
        "max_depth": 6,
        "subsample": 0.601,
        "colsample_bytree": 0.844,
        "colsample_bylevel": 0.548,
        "colsample_bynode": 0.993,
        "lambda": 8.88,
        "alpha": 0.678,
        "scale_pos_weight": 3.294,
    },
}

# Binning only (no published hyper-parameter changes): fewer histogram bins than the libraries'
# defaults (CatBoost 254 borders, XGBoost 256 bins). Measured on 401,059 synthetic rows (5-fold
# OOF pAUC, seed 0; docs/benchmarks.md): CatBoost 0.1641 -> 0.1665 with 19% less CPU, XGBoost
# 0.1645 -> 0.1676 with 12% less; seed-to-seed spread about 0.001-0.002. LightGBM's training
# time hardly depends on max_bin, so it keeps 255. A params JSON can set other values.
SPEED_PARAMS: dict[str, dict[str, Any]] = {
    "lgb": {},
    "cat": {"border_count": 128},
    "xgb": {"max_bin": 128},
}

# "demo": fewer trees for CPU smoke runs; "full": the published settings.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {"lgb": {"n_estimators": 60}, "cat": {"iterations": 60}, "xgb": {"n_estimators": 40}},
    "full": {},
}

ENSEMBLE = "ensemble"
META_MEMBER = "lgb_meta"


@dataclass(frozen=True)
class Library:
    """How one GBDT library fits, predicts, saves, loads and ranks features.

    `bin_all` and `fit_rows` (optional, together): bin every row of a member's matrix once,
    then fit each fold on rows of that binned data (rows may repeat) instead of binning anew.
    """

    fit: Callable[[np.ndarray, np.ndarray, dict], Any]
    predict: Callable[[Any, np.ndarray, int], np.ndarray]
    save: Callable[[Any, Path], None]
    load: Callable[[Path], Any]
    importance: Callable[[Any, int], np.ndarray]
    suffix: str
    bin_all: Callable[[np.ndarray, np.ndarray, dict], Any] | None = None
    fit_rows: Callable[[Any, np.ndarray, dict], Any] | None = None


def _fit_lgb(x: np.ndarray, y: np.ndarray, params: dict) -> lgb.Booster:
    return lgb.LGBMClassifier(**params).fit(x, y).booster_


def _lgb_train_params(params: dict) -> tuple[dict, int]:
    """LGBMClassifier keyword arguments as lgb.train params and rounds (the same model)."""
    params = dict(params)
    return params, params.pop("n_estimators", 100)


def _bin_lgb(x: np.ndarray, y: np.ndarray, params: dict) -> lgb.Dataset:
    return lgb.Dataset(x, y, params=_lgb_train_params(params)[0]).construct()


def _fit_lgb_rows(binned: lgb.Dataset, rows: np.ndarray, params: dict) -> lgb.Booster:
    core, rounds = _lgb_train_params(params)
    return lgb.train(core, binned.subset(rows, params=core), num_boost_round=rounds)


def _fit_cat(x: np.ndarray, y: np.ndarray, params: dict) -> CatBoostClassifier:
    return CatBoostClassifier(**params).fit(x, y)


def _fit_xgb(x: np.ndarray, y: np.ndarray, params: dict) -> xgb.Booster:
    return xgb.XGBClassifier(**params).fit(x, y).get_booster()


def _xgb_importance(booster: xgb.Booster, n: int) -> np.ndarray:
    gain = booster.get_score(importance_type="gain")
    return np.array([gain.get(f"f{i}", 0.0) for i in range(n)])


def _load_xgb(path: Path) -> xgb.Booster:
    booster = xgb.Booster()
    booster.load_model(path)
    return booster


def _predict_xgb(booster: xgb.Booster, x: np.ndarray, threads: int) -> np.ndarray:
    booster.set_param({"nthread": threads})
    return booster.inplace_predict(x)


LIBRARIES: dict[str, Library] = {
    "lgb": Library(
        fit=_fit_lgb,
        predict=lambda m, x, threads: m.predict(x, num_threads=threads),
        save=lambda m, p: m.save_model(p),
        load=lambda p: lgb.Booster(model_file=p),
        importance=lambda m, n: m.feature_importance("gain"),
        suffix="txt",
        bin_all=_bin_lgb,
        fit_rows=_fit_lgb_rows,
    ),
    "cat": Library(
        fit=_fit_cat,
        predict=lambda m, x, threads: m.predict_proba(x, thread_count=threads)[:, 1],
        save=lambda m, p: m.save_model(str(p)),
        load=lambda p: CatBoostClassifier().load_model(str(p)),
        importance=lambda m, n: m.get_feature_importance(),
        suffix="cbm",
    ),
    "xgb": Library(
        fit=_fit_xgb,
        predict=_predict_xgb,
        save=lambda m, p: m.save_model(p),
        load=_load_xgb,
        importance=_xgb_importance,
        suffix="ubj",
    ),
}
THREAD_PARAM = {"lgb": "n_jobs", "cat": "thread_count", "xgb": "n_jobs"}

# member -> (library, sees the image OOF columns)
GBDT_MODELS: dict[str, tuple[str, bool]] = {
    META_MEMBER: ("lgb", False),
    "lgb": ("lgb", True),
    "cat": ("cat", True),
    "xgb": ("xgb", True),
}


@dataclass(frozen=True)
class Member:
    """One ensemble member: a library, its params and the feature columns it reads."""

    name: str
    library: str
    params: Mapping[str, Any]
    features: tuple[str, ...]


@dataclass(frozen=True)
class Sampling:
    """Minority/majority ratios after over- then under-sampling; None skips a step."""

    over: float | None = 0.003
    under: float | None = 0.01


def load_params(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a params JSON ({"lgb": {...}, "cat": {...}, "xgb": {...}}), checking its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    data = json.loads(path.read_text())
    allowed = set(DEFAULT_PARAMS) | {META_MEMBER}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected an object of objects like {{'lgb': {{...}}}}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown member(s) {unknown}; allowed {sorted(allowed)}")
    return data


def resolve_params(
    overrides: Mapping[str, Mapping[str, Any]] | None = None, preset: str = "full"
) -> dict[str, dict[str, Any]]:
    """Params per member: DEFAULT_PARAMS, SPEED_PARAMS, the preset, then `overrides` (a JSON)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    overrides = overrides or {}
    by_library = {
        lib: {
            **params,
            **SPEED_PARAMS[lib],
            **PRESETS[preset].get(lib, {}),
            **overrides.get(lib, {}),
        }
        for lib, params in DEFAULT_PARAMS.items()
    }
    resolved = {name: dict(by_library[lib]) for name, (lib, _) in GBDT_MODELS.items()}
    resolved[META_MEMBER].update(overrides.get(META_MEMBER, {}))
    return resolved


def make_members(
    meta_features: Sequence[str],
    image_columns: Sequence[str],
    params: Mapping[str, Mapping[str, Any]],
    names: Sequence[str] = tuple(GBDT_MODELS),
) -> dict[str, Member]:
    """The members `names` of GBDT_MODELS with their feature lists and params."""
    members = {}
    for name in names:
        library, uses_images = GBDT_MODELS[name]
        features = tuple(meta_features) + (tuple(image_columns) if uses_images else ())
        members[name] = Member(name, library, dict(params[name]), features)
    return members


def sample_indices(
    rows: np.ndarray, y: np.ndarray, seed: int, sampling: Sampling = Sampling()
) -> tuple[np.ndarray, str]:
    """Over- then under-sample the row indices `rows` (labels y[rows]); returns rows and a note."""
    labels = y[rows]
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError(f"sample_indices: training rows hold one class only ({n_pos} positives)")
    notes = []
    steps = (
        ("over", sampling.over, RandomOverSampler),
        ("under", sampling.under, RandomUnderSampler),
    )
    for step, ratio, sampler in steps:
        if ratio is None:
            continue
        n_pos = int(labels.sum())
        n_neg = labels.size - n_pos
        # imbalanced-learn raises when the ratio is already reached (after its int rounding)
        reached = int(n_neg * ratio) <= n_pos if step == "over" else int(n_pos / ratio) >= n_neg
        if reached:
            notes.append(f"{step}-sampling skipped (ratio {n_pos / n_neg:.4f} >= {ratio})")
            continue
        rows, labels = sampler(sampling_strategy=ratio, random_state=seed).fit_resample(
            rows[:, None], labels
        )
        rows = rows[:, 0]
    n_pos = int(labels.sum())
    notes.append(f"{n_pos} pos / {labels.size - n_pos} neg")
    return rows, "; ".join(notes)


@dataclass(frozen=True)
class FoldResult:
    """One fitted fold model with its validation predictions and pAUC."""

    member: str
    fold: int
    seed: int
    valid_rows: np.ndarray
    pred: np.ndarray
    score: float
    model: Any
    note: str


def _fold_pauc(y: np.ndarray, pred: np.ndarray) -> float:
    """pAUC, or NaN when the fold holds one class only."""
    return pauc(y, pred) if 0 < y.sum() < y.size else float("nan")


def member_matrix(frame: pl.DataFrame, member: Member) -> np.ndarray:
    """The float32 feature matrix of `member` (raises naming the missing columns)."""
    missing = [f for f in member.features if f not in frame.columns]
    if missing:
        raise KeyError(f"member {member.name!r}: feature column(s) missing {missing[:10]}")
    # C order: each fold copies whole rows out of it
    return np.ascontiguousarray(frame.select(member.features).to_numpy(), dtype=np.float32)


def bin_member(x: np.ndarray, y: np.ndarray, member: Member, threads: int | None = None) -> Any:
    """The library's binned data of every row of `x`, shared by all folds; None if it has none.

    Binning looks at feature values only (never at labels), so binning the validation rows
    with the training rows leaks no target; it saves re-binning the training rows per fold.
    """
    library = LIBRARIES[member.library]
    if library.bin_all is None or library.fit_rows is None:
        return None
    threads = threads or os.cpu_count() or 1
    return library.bin_all(x, y, {**member.params, THREAD_PARAM[member.library]: threads})


def train_fold(
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    fold: int,
    member: Member,
    seed: int = 0,
    sampling: Sampling = Sampling(),
    threads: int | None = None,
    binned: Any = None,
) -> FoldResult:
    """Fit `member` on the sampled rows outside `fold` and score it on the rows of `fold`.

    `binned` (from `bin_member(x, y, member)`) fits on those rows of the shared binned data.
    """
    library = LIBRARIES[member.library]
    threads = threads or os.cpu_count() or 1
    train_rows, note = sample_indices(np.flatnonzero(folds != fold), y, seed, sampling)
    valid_rows = np.flatnonzero(folds == fold)
    params = {**member.params, "random_state": seed, THREAD_PARAM[member.library]: threads}
    if binned is not None:
        model = library.fit_rows(binned, train_rows, params)
    else:
        model = library.fit(x[train_rows], y[train_rows], params)
    pred = np.asarray(library.predict(model, x[valid_rows], threads), dtype=np.float64)
    score = _fold_pauc(y[valid_rows], pred)
    return FoldResult(member.name, fold, seed, valid_rows, pred, score, model, note)


def iter_cv(
    frame: pl.DataFrame,
    y: np.ndarray,
    folds: np.ndarray,
    members: Mapping[str, Member],
    seeds: Sequence[int] = (0,),
    sampling: Sampling = Sampling(),
    threads: int | None = None,
    bin_once: bool = True,
) -> Iterator[FoldResult]:
    """Yield one FoldResult per member x seed x fold (for pruning, report each score).

    `bin_once` bins each member's rows once for all its folds where the library can
    (`bin_member`); False bins every fold's training rows anew.
    """
    y = np.asarray(y, dtype=np.int8)
    folds = np.asarray(folds)
    for member in members.values():
        x = member_matrix(frame, member)
        binned = bin_member(x, y, member, threads) if bin_once else None
        for seed in seeds:
            for fold in np.unique(folds):
                yield train_fold(x, y, folds, int(fold), member, seed, sampling, threads, binned)
        del x, binned


@dataclass
class CVResult:
    """OOF predictions, per-fold scores and fitted models of a cross-validation."""

    y: np.ndarray
    folds: np.ndarray
    members: dict[str, Member]
    seeds: tuple[int, ...]
    oof: dict[str, np.ndarray] = field(default_factory=dict)
    models: dict[str, list[Any]] = field(default_factory=dict)
    model_keys: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    sampling: list[str] = field(default_factory=list)

    def fold_scores(self) -> pl.DataFrame:
        """pAUC per member (and ensemble) and fold, of the seed-averaged predictions."""
        rows = []
        for name, pred in self.oof.items():
            for fold in np.unique(self.folds):
                mask = self.folds == fold
                rows.append(
                    {"model": name, "fold": int(fold), "pauc": _fold_pauc(self.y[mask], pred[mask])}
                )
        return pl.DataFrame(rows)

    def overall_scores(self) -> dict[str, float]:
        """pAUC of each member's and the ensemble's OOF over all rows."""
        return {name: pauc(self.y, pred) for name, pred in self.oof.items()}


def cross_validate(
    frame: pl.DataFrame,
    y: np.ndarray,
    folds: np.ndarray,
    members: Mapping[str, Member],
    seeds: Sequence[int] = (0,),
    sampling: Sampling = Sampling(),
    threads: int | None = None,
    on_fold: Callable[[FoldResult], None] | None = None,
    bin_once: bool = True,
) -> CVResult:
    """Fit every member x seed x fold; OOF per member (seed mean) and the soft-vote ensemble."""
    y = np.asarray(y, dtype=np.int8)
    folds = np.asarray(folds)
    result = CVResult(y, folds, dict(members), tuple(seeds))
    sums = {name: np.zeros(len(y)) for name in members}
    total = len(members) * len(seeds) * len(np.unique(folds))
    for fr in tqdm(
        iter_cv(frame, y, folds, members, seeds, sampling, threads, bin_once),
        total=total,
        desc="GBDT CV",
    ):
        sums[fr.member][fr.valid_rows] += fr.pred
        result.models.setdefault(fr.member, []).append(fr.model)
        result.model_keys.setdefault(fr.member, []).append((fr.fold, fr.seed))
        result.sampling.append(f"{fr.member} fold {fr.fold} seed {fr.seed}: {fr.note}")
        if on_fold is not None:
            on_fold(fr)
    result.oof = {name: s / len(seeds) for name, s in sums.items()}
    result.oof[ENSEMBLE] = np.mean([result.oof[name] for name in members], axis=0)
    return result


def feature_importance(result: CVResult) -> pl.DataFrame:
    """Gain importance per member and feature, normalised to sum 1 and averaged over fold models."""
    frames = []
    for name, member in result.members.items():
        library = LIBRARIES[member.library]
        imps = [library.importance(m, len(member.features)) for m in result.models[name]]
        imps = [np.asarray(i, dtype=float) / max(float(np.sum(i)), 1e-12) for i in imps]
        frames.append(
            pl.DataFrame(
                {"member": name, "feature": member.features, "importance": np.mean(imps, axis=0)}
            )
        )
    return pl.concat(frames)


def ablation_table(result: CVResult, image_scores: Mapping[str, np.ndarray]) -> pl.DataFrame:
    """Paper Table 4: image-only (mean of image OOFs), metadata-only (lgb_meta), full ensemble."""
    rows = []
    if image_scores:
        rows += [
            {"setting": f"image-only: {k}", "pauc": pauc(result.y, v)}
            for k, v in image_scores.items()
        ]
        mean_image = np.mean(list(image_scores.values()), axis=0)
        rows.append(
            {"setting": "image-only: mean of image models", "pauc": pauc(result.y, mean_image)}
        )
    if META_MEMBER in result.oof:
        rows.append(
            {
                "setting": f"metadata-only: {META_MEMBER}",
                "pauc": pauc(result.y, result.oof[META_MEMBER]),
            }
        )
    full = "full: soft vote of members" if image_scores else "metadata-only: soft vote of members"
    rows.append({"setting": full, "pauc": pauc(result.y, result.oof[ENSEMBLE])})
    return pl.DataFrame(rows)


def cv_report(result: CVResult, ablation: pl.DataFrame, image_columns: Sequence[str]) -> dict:
    """JSON-ready report: per-fold and overall pAUC per member and ensemble, ablation, sampling."""
    folds = result.fold_scores()
    overall = result.overall_scores()
    return {
        "metadata_only": not image_columns,
        "image_columns": list(image_columns),
        "seeds": list(result.seeds),
        "rows": int(result.y.size),
        "positives": int(result.y.sum()),
        "scores": {
            name: {
                "overall": overall[name],
                "folds": folds.filter(pl.col("model") == name)["pauc"].to_list(),
            }
            for name in result.oof
        },
        "ablation": ablation.to_dicts(),
        "sampling": result.sampling,
    }


def save_artifacts(
    out_dir: str | Path,
    result: CVResult,
    ids: pl.DataFrame,
    features: Mapping[str, Any],
    params: Mapping[str, Any],
    report: Mapping[str, Any],
) -> Path:
    """Write models/, ensemble.json, features.json, params.json, cv_report.json and oof.csv."""
    out = Path(out_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, member in result.members.items():
        library = LIBRARIES[member.library]
        files = []
        for model, (fold, seed) in zip(result.models[name], result.model_keys[name], strict=True):
            rel = f"models/{name}_fold{fold}_seed{seed}.{library.suffix}"
            library.save(model, out / rel)
            files.append(rel)
        manifest[name] = {
            "library": member.library,
            "features": list(member.features),
            "models": files,
        }
    _write_json(out / "ensemble.json", {"members": manifest})
    _write_json(out / "features.json", features)
    _write_json(out / "params.json", params)
    _write_json(out / "cv_report.json", report)
    oof = ids.select("isic_id", "patient_id").with_columns(
        fold=pl.Series(result.folds),
        target=pl.Series(result.y),
        pred=pl.Series(result.oof[ENSEMBLE]),
    )
    write_oof(oof, out / "oof.csv")
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=True))


@dataclass(frozen=True)
class GBDTEnsemble:
    """Fitted members loaded from a gbdt artifact dir, for inference."""

    features: dict[str, tuple[str, ...]]
    libraries: dict[str, str]
    models: dict[str, list[Any]]
    image_columns: tuple[str, ...]

    @classmethod
    def load(cls, gbdt_dir: str | Path) -> GBDTEnsemble:
        """Load every fold/seed model listed in `<gbdt_dir>/ensemble.json`."""
        gbdt_dir = Path(gbdt_dir)
        manifest = json.loads((gbdt_dir / "ensemble.json").read_text())["members"]
        info = json.loads((gbdt_dir / "features.json").read_text())
        models = {
            name: [LIBRARIES[m["library"]].load(gbdt_dir / f) for f in m["models"]]
            for name, m in manifest.items()
        }
        return cls(
            features={name: tuple(m["features"]) for name, m in manifest.items()},
            libraries={name: m["library"] for name, m in manifest.items()},
            models=models,
            image_columns=tuple(info["image_columns"]),
        )

    def image_missing(self, frame: pl.DataFrame) -> np.ndarray:
        """True for rows whose image columns hold a null or NaN (they get the metadata score)."""
        if not self.image_columns:
            return np.zeros(frame.height, dtype=bool)
        x = frame.select(self.image_columns).to_numpy().astype(np.float64)
        return np.isnan(x).any(axis=1)

    def predict(self, frame: pl.DataFrame, threads: int | None = None) -> dict[str, np.ndarray]:
        """Probability per member (mean over fold models) and the soft-vote "ensemble".

        Rows with a missing image column get the lgb_meta score as their ensemble score.
        To score metadata only, add the image columns as nulls.
        """
        threads = threads or os.cpu_count() or 1
        preds = {}
        for name, features in self.features.items():
            library = LIBRARIES[self.libraries[name]]
            member = Member(name, self.libraries[name], {}, features)
            x = member_matrix(frame, member)
            preds[name] = np.mean(
                [library.predict(m, x, threads) for m in self.models[name]], axis=0
            )
        blend = np.mean(list(preds.values()), axis=0)
        if META_MEMBER in preds:
            blend = np.where(self.image_missing(frame), preds[META_MEMBER], blend)
        preds[ENSEMBLE] = blend
        return preds
