"""GBDT library adapters and ensemble members: how LightGBM, CatBoost and XGBoost fit, predict,
save, load and rank features, which member reads which columns, and their params.

Members (`GBDT_MODELS`): `lgb_meta` (LightGBM on metadata features only) and `lgb`, `cat`, `xgb`
(LightGBM, CatBoost, XGBoost on metadata + image OOF columns; with no image columns they use
the metadata features too).

Params JSON (written by the tuning stage, read by `load_params`):
    {"lgb": {...}, "cat": {...}, "xgb": {...}, "lgb_meta": {...}}
Every key is optional; each object holds keyword arguments of the library's scikit-learn
estimator (LGBMClassifier, CatBoostClassifier, XGBClassifier) and updates the recipe's published
params (utils.settings.GBDT_PARAMS) key by key, after the recipe's binning settings
(GBDT_BINNING: the libraries' defaults in `paper`) and the preset's rounds. `lgb_meta` uses the
resolved "lgb" params unless "lgb_meta" is given. The seed (`random_state`) and thread count are
set per run and override the file.

Speed: LightGBM bins each member's rows once and fits every fold on rows of that binned data
(`Library.bin_all` / `fit_rows`); CatBoost and XGBoost bin per fold (binning all 401,059 rows
once costs them more than it saves).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl
import xgboost as xgb
from catboost import CatBoostClassifier

from utils.settings import GBDT_BINNING, GBDT_PARAMS, GBDTConfig

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


def _lgb_train_params(params: dict) -> tuple[dict, int]:
    """LGBMClassifier keyword arguments as lgb.train params and rounds (the same model)."""
    params = dict(params)
    return params, params.pop("n_estimators", 100)


def _bin_lgb(x: np.ndarray, y: np.ndarray, params: dict) -> lgb.Dataset:
    return lgb.Dataset(x, y, params=_lgb_train_params(params)[0]).construct()


def _fit_lgb_rows(binned: lgb.Dataset, rows: np.ndarray, params: dict) -> lgb.Booster:
    core, rounds = _lgb_train_params(params)
    return lgb.train(core, binned.subset(rows, params=core), num_boost_round=rounds)


def _xgb_importance(booster: xgb.Booster, n: int) -> np.ndarray:
    gain = booster.get_score(importance_type="gain")
    return np.array([gain.get(f"f{i}", 0.0) for i in range(n)])


def _predict_xgb(booster: xgb.Booster, x: np.ndarray, threads: int) -> np.ndarray:
    booster.set_param({"nthread": threads})
    return booster.inplace_predict(x)


LIBRARIES: dict[str, Library] = {
    "lgb": Library(
        fit=lambda x, y, params: lgb.LGBMClassifier(**params).fit(x, y).booster_,
        predict=lambda m, x, threads: m.predict(x, num_threads=threads),
        save=lambda m, p: m.save_model(p),
        load=lambda p: lgb.Booster(model_file=p),
        importance=lambda m, n: m.feature_importance("gain"),
        suffix="txt",
        bin_all=_bin_lgb,
        fit_rows=_fit_lgb_rows,
    ),
    "cat": Library(
        fit=lambda x, y, params: CatBoostClassifier(**params).fit(x, y),
        predict=lambda m, x, threads: m.predict_proba(x, thread_count=threads)[:, 1],
        save=lambda m, p: m.save_model(str(p)),
        load=lambda p: CatBoostClassifier().load_model(str(p)),
        importance=lambda m, n: m.get_feature_importance(),
        suffix="cbm",
    ),
    "xgb": Library(
        fit=lambda x, y, params: xgb.XGBClassifier(**params).fit(x, y).get_booster(),
        predict=_predict_xgb,
        save=lambda m, p: m.save_model(p),
        load=lambda p: xgb.Booster(model_file=p),
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


def load_params(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a params JSON ({"lgb": {...}, "cat": {...}, "xgb": {...}}), checking its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected an object of objects like {{'lgb': {{...}}}}")
    unknown = sorted(set(data) - set(GBDT_MODELS))
    if unknown:
        raise ValueError(f"{path}: unknown member(s) {unknown}; allowed {sorted(GBDT_MODELS)}")
    return data


def resolve_params(
    cfg: GBDTConfig, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Params per member: the recipe's published params, its binning settings, the preset's
    rounds (cfg.rounds), then `overrides` (a params JSON); "lgb_meta" starts from "lgb"."""
    overrides = overrides or {}
    by_library = {
        lib: {
            **params,
            **GBDT_BINNING[cfg.recipe][lib],
            **cfg.rounds.get(lib, {}),
            **overrides.get(lib, {}),
        }
        for lib, params in GBDT_PARAMS[cfg.recipe].items()
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


def member_matrix(frame: pl.DataFrame, member: Member) -> np.ndarray:
    """The float32 feature matrix of `member` (raises naming the missing columns)."""
    missing = [f for f in member.features if f not in frame.columns]
    if missing:
        raise KeyError(f"member {member.name!r}: feature column(s) missing {missing[:10]}")
    # C order: each fold copies whole rows out of it
    return np.ascontiguousarray(frame.select(member.features).to_numpy(), dtype=np.float32)
