"""Stage 2: Optuna tuning of the GBDT members on the CV pAUC of stage 3.

Entry: `run_tuning(data_dir, output_dir, image_oof_dirs, preset, recipe)`, settings from
utils.settings (TuneConfig). One study per library kind (`SEARCH_SPACES`: "lgb", "cat", "xgb").
A trial suggests params around the centre (the recipe's published params with the preset's
centres) and scores the stage-3 member of that kind with tabular.cv.iter_cv on stage 3's own
training frame (tabular.gbdt.load_training_frame): the same features, folds, in-fold sampling and
training rows (tabular.gbdt.training_rows: with GBDTConfig.filter_training never the reference's
filtered rows). The objective is the pAUC of the member's OOF over all rows (stage 3's
"overall"); the mean fold pAUC so far is reported after each fold, for a MedianPruner to stop
weak trials early. Trial 0 of a new study is the centre itself: every study holds the score of
the default params.

Storage: `<output_dir>/tuning/optuna.sqlite3`, studies `<kind>-<preset>-<setup hash>`. The hash
covers the data (rows, targets, folds, feature names, image OOF values) and the settings: the
same setup adds trials to the same study (an interrupted run resumes); another setup or `force`
moves the old tuning folder aside and starts clean, so objectives and outputs are never mixed.
The sampler is TPESampler(seed + trials already in the study): deterministic, and a resumed run
does not repeat the first run's random start-up points.

`best_params.json` (next to the database) holds the best trial's params of every kind tuned on
this setup, as utils.tabular.libraries.load_params reads them ({"lgb": {...}, ...}); the tuned
"lgb" params also apply to lgb_meta (resolve_params). Tuned rounds replace the preset's: params
tuned under "demo" carry demo-sized rounds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import optuna
import polars as pl
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from utils.layout import BEST_PARAMS_FILE, MANIFEST_FILE, SETUP_FILE, STORAGE_FILE, TUNING_DIR
from utils.manifest import config_hash, set_aside, write_json, write_manifest
from utils.metric import pauc
from utils.settings import FOLD_SEED, GBDTConfig, TuneConfig, resolve
from utils.tabular.cv import iter_cv
from utils.tabular.gbdt import TrainingFrame, feature_groups, load_training_frame, training_rows
from utils.tabular.libraries import load_params, make_members, resolve_params

DEFAULT_ATTR = "default_params"  # user attr marking trial 0, the centre of the search space

Space = Callable[[optuna.Trial, Mapping[str, Any]], dict[str, Any]]


def _log_float(trial: optuna.Trial, centre: Mapping[str, Any], name: str, factor: float) -> float:
    """Log-uniform in [c / factor, c * factor] around the centre value c."""
    c = float(centre[name])
    return trial.suggest_float(name, c / factor, c * factor, log=True)


def _log_int(trial: optuna.Trial, centre: Mapping[str, Any], name: str, factor: float) -> int:
    """Log-uniform integer in [c / factor, c * factor] (at least 1) around c."""
    c = int(centre[name])
    return trial.suggest_int(name, max(1, round(c / factor)), round(c * factor), log=True)


def _near_int(
    trial: optuna.Trial, centre: Mapping[str, Any], name: str, span: int, low: int = 1
) -> int:
    """Integer in [c - span, c + span] (at least `low`) around c."""
    c = int(centre[name])
    return trial.suggest_int(name, max(low, c - span), c + span)


def _fraction(
    trial: optuna.Trial, centre: Mapping[str, Any], name: str, span: float = 0.25
) -> float:
    """Fraction in [c - span, c + span], clipped to [0.1, 1]."""
    c = float(centre[name])
    return trial.suggest_float(name, max(0.1, c - span), min(1.0, c + span))


def lgb_space(trial: optuna.Trial, centre: Mapping[str, Any]) -> dict[str, Any]:
    """LightGBM: rounds, learning rate, depth, leaves, leaf size, subsampling, L1/L2, pos weight."""
    return {
        "n_estimators": _log_int(trial, centre, "n_estimators", 2),
        "learning_rate": _log_float(trial, centre, "learning_rate", 3),
        "max_depth": _near_int(trial, centre, "max_depth", 2, low=2),
        "num_leaves": _log_int(trial, centre, "num_leaves", 2),
        "min_data_in_leaf": _log_int(trial, centre, "min_data_in_leaf", 3),
        "colsample_bytree": _fraction(trial, centre, "colsample_bytree"),
        "colsample_bynode": _fraction(trial, centre, "colsample_bynode"),
        "bagging_fraction": _fraction(trial, centre, "bagging_fraction"),
        "bagging_freq": _near_int(trial, centre, "bagging_freq", 3),
        "lambda_l1": _log_float(trial, centre, "lambda_l1", 10),
        "lambda_l2": _log_float(trial, centre, "lambda_l2", 10),
        "scale_pos_weight": _log_float(trial, centre, "scale_pos_weight", 2.5),
    }


def cat_space(trial: optuna.Trial, centre: Mapping[str, Any]) -> dict[str, Any]:
    """CatBoost: iterations, learning rate, depth, L2, subsample, pos weight.

    min_data_in_leaf stays at the published value: CatBoost's default symmetric trees ignore it.
    """
    return {
        "iterations": _log_int(trial, centre, "iterations", 2),
        "learning_rate": _log_float(trial, centre, "learning_rate", 3),
        "depth": _near_int(trial, centre, "depth", 2, low=2),
        "l2_leaf_reg": _log_float(trial, centre, "l2_leaf_reg", 4),
        "subsample": _fraction(trial, centre, "subsample"),
        "scale_pos_weight": _log_float(trial, centre, "scale_pos_weight", 2.5),
    }


def xgb_space(trial: optuna.Trial, centre: Mapping[str, Any]) -> dict[str, Any]:
    """XGBoost: rounds, learning rate, depth, row/column subsampling, L2/L1, pos weight."""
    return {
        "n_estimators": _log_int(trial, centre, "n_estimators", 2),
        "learning_rate": _log_float(trial, centre, "learning_rate", 3),
        "max_depth": _near_int(trial, centre, "max_depth", 2, low=2),
        "subsample": _fraction(trial, centre, "subsample"),
        "colsample_bytree": _fraction(trial, centre, "colsample_bytree"),
        "colsample_bylevel": _fraction(trial, centre, "colsample_bylevel"),
        "colsample_bynode": _fraction(trial, centre, "colsample_bynode"),
        "lambda": _log_float(trial, centre, "lambda", 10),
        "alpha": _log_float(trial, centre, "alpha", 10),
        "scale_pos_weight": _log_float(trial, centre, "scale_pos_weight", 2.5),
    }


SEARCH_SPACES: dict[str, Space] = {"lgb": lgb_space, "cat": cat_space, "xgb": xgb_space}


def gbdt_config(config: TuneConfig) -> GBDTConfig:
    """Stage 3's settings (params, sampling, training rows) for the run's preset and recipe."""
    return resolve(config.preset, config.recipe).gbdt


def centre_params(kind: str, config: TuneConfig) -> dict[str, Any]:
    """The params a search space of `kind` is centred on: resolved defaults + preset centres."""
    return {**resolve_params(gbdt_config(config))[kind], **config.centres.get(kind, {})}


def default_trial_params(kind: str, config: TuneConfig) -> dict[str, Any]:
    """The searched params at the centre (enqueued as trial 0 of a new study)."""
    centre = centre_params(kind, config)
    return SEARCH_SPACES[kind](optuna.trial.FixedTrial(centre), centre)


def setup_of(data: TrainingFrame, config: TuneConfig) -> dict[str, Any]:
    """What makes trials comparable: data, features, folds, preset, recipe, sampling, seeds,
    and the training rows when stage 3's filter leaves some out (recorded only then, so the
    studies of a run on every row keep their names)."""
    digest = hashlib.sha1(data.y.tobytes())
    digest.update(np.ascontiguousarray(data.folds).tobytes())
    digest.update(json.dumps([data.meta_features, data.image_features]).encode())
    if data.image_columns:
        digest.update(data.frame.select(data.image_columns).to_numpy().tobytes())
    trainable = training_rows(gbdt_config(config), data)
    filtered = {} if trainable is None else {"training_rows": int(trainable.sum())}
    return {
        "rows": int(data.y.size),
        "positives": int(data.y.sum()),
        "folds": int(np.unique(data.folds).size),
        "features": len(data.meta_features),
        "image_columns": list(data.image_columns),
        "preset": config.preset,
        "recipe": config.recipe,
        "sampler_seed": config.seed,
        "model_seeds": list(config.model_seeds),
        "sampling": asdict(gbdt_config(config).sampling),
        "data_hash": digest.hexdigest()[:12],
        **filtered,
    }


def study_name(kind: str, setup: Mapping[str, Any]) -> str:
    """`<kind>-<preset>-<8 hex of the setup>`: one study per kind and setup."""
    key = hashlib.sha1(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:8]
    return f"{kind}-{setup['preset']}-{key}"


def tuning_dir(output_dir: str | Path) -> Path:
    """`<output_dir>/tuning`, created."""
    path = Path(output_dir) / TUNING_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def storage_url(output_dir: str | Path) -> str:
    """SQLite URL of the study database in `<output_dir>/tuning/`."""
    return f"sqlite:///{(tuning_dir(output_dir) / STORAGE_FILE).resolve()}"


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _default_trials(study: optuna.Study, states: Sequence[TrialState]) -> list[FrozenTrial]:
    """Trials of the centre params (trial 0 of a new study) in one of `states`."""
    trials = study.get_trials(deepcopy=False, states=tuple(states))
    return [t for t in trials if t.user_attrs.get(DEFAULT_ATTR)]


def open_study(kind: str, data: TrainingFrame, config: TuneConfig, storage: str) -> optuna.Study:
    """Create or resume the study of `kind` for this setup; a new one gets the centre as trial 0."""
    setup = setup_of(data, config)
    study = optuna.create_study(
        storage=storage,
        study_name=study_name(kind, setup),
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(config.n_startup_trials, config.n_warmup_steps),
        load_if_exists=True,
    )
    if not study.trials:
        study.set_user_attr("kind", kind)
        study.set_user_attr("setup", setup)
    # a run killed during trial 0 leaves it RUNNING for good: queue the centre again
    if not _default_trials(study, (TrialState.COMPLETE, TrialState.WAITING)):
        study.enqueue_trial(default_trial_params(kind, config), user_attrs={DEFAULT_ATTR: True})
    study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(study.trials))
    return study


def objective(trial: optuna.Trial, kind: str, data: TrainingFrame, config: TuneConfig) -> float:
    """OOF pAUC of the stage-3 member `kind` with the trial's params; mean fold pAUC reported."""
    searched = SEARCH_SPACES[kind](trial, centre_params(kind, config))
    gbdt = gbdt_config(config)
    params = resolve_params(gbdt, {kind: searched})
    members = make_members(data.meta_features, data.image_features, params, names=[kind])
    sums = np.zeros(data.y.size)
    scores: list[float] = []
    results = iter_cv(
        data.frame,
        data.y,
        data.folds,
        members,
        config.model_seeds,
        gbdt.sampling,
        config.threads,
        trainable=training_rows(gbdt, data),
    )
    for step, fold in enumerate(results):
        sums[fold.valid_rows] += fold.pred
        scores.append(fold.score)
        trial.set_user_attr("fold_pauc", scores)
        if not np.isnan(scores).all():  # a fold without positives has no pAUC
            trial.report(float(np.nanmean(scores)), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"mean fold pAUC {np.nanmean(scores):.4f} after {step + 1}")
    return pauc(data.y, sums / len(config.model_seeds))


def tune(
    data: TrainingFrame, config: TuneConfig, output_dir: str | Path
) -> dict[str, optuna.Study]:
    """Tune every kind of `config.kinds` in turn: `config.n_trials` more trials (or until
    `config.timeout`) in its study; the studies by kind."""
    storage = storage_url(output_dir)
    studies = {}
    for kind in config.kinds:
        studies[kind] = open_study(kind, data, config, storage)
        studies[kind].optimize(
            functools.partial(objective, kind=kind, data=data, config=config),
            n_trials=config.n_trials,
            timeout=config.timeout,
            show_progress_bar=True,
        )
    return studies


def tuned_studies(
    data: TrainingFrame, config: TuneConfig, output_dir: str | Path
) -> dict[str, optuna.Study]:
    """Every kind's study of this setup found in the database (tuned now or in earlier runs)."""
    storage = storage_url(output_dir)
    setup = setup_of(data, config)
    names = set(optuna.get_all_study_names(storage))
    return {
        kind: optuna.load_study(study_name=study_name(kind, setup), storage=storage)
        for kind in SEARCH_SPACES
        if study_name(kind, setup) in names
    }


def write_best_params(studies: Mapping[str, optuna.Study], output_dir: str | Path) -> Path:
    """Write `<output_dir>/tuning/best_params.json` (the best trial's params per kind; kinds
    without a completed trial are left out) and check gbdt.load_params reads it."""
    params = {kind: dict(s.best_params) for kind, s in studies.items() if _complete(s)}
    missing = sorted(set(studies) - set(params))
    if missing:
        warnings.warn(
            f"no completed trial for {missing}: best_params.json keeps their defaults",
            stacklevel=2,
        )
    path = tuning_dir(output_dir) / BEST_PARAMS_FILE
    write_json(path, dict(sorted(params.items())))
    load_params(path)
    return path


def _default_value(study: optuna.Study) -> float:
    """Objective value of the centre trial (NaN if it did not complete)."""
    done = _default_trials(study, (TrialState.COMPLETE,))
    return float(done[0].value) if done else math.nan


def summary_table(studies: Mapping[str, optuna.Study]) -> pl.DataFrame:
    """Per kind: trials (complete/pruned), pAUC of the default params, best pAUC and its trial."""
    rows = []
    for kind, study in studies.items():
        states = [t.state for t in study.get_trials(deepcopy=False)]
        complete = _complete(study)
        best = study.best_trial if complete else None
        default = _default_value(study)
        rows.append(
            {
                "kind": kind,
                "study": study.study_name,
                "trials": len(states),
                "complete": len(complete),
                "pruned": states.count(TrialState.PRUNED),
                "default_pauc": default,
                "best_pauc": best.value if best else math.nan,
                "gain": (best.value - default) if best else math.nan,
                "best_trial": best.number if best else None,
            }
        )
    return pl.DataFrame(rows)


def _axes_row(n: int, width: float, height: float) -> tuple[Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, max(n, 1), figsize=(width * max(n, 1), height), squeeze=False)
    return fig, list(axes[0])


def plot_history(studies: Mapping[str, optuna.Study]) -> Figure:
    """One panel per kind: each completed trial's OOF pAUC, the best so far, the default's."""
    fig, axes = _axes_row(len(studies), 4.5, 3.5)
    for ax, (kind, study) in zip(axes, studies.items(), strict=False):
        complete = _complete(study)
        numbers, values = [t.number for t in complete], [float(t.value) for t in complete]
        ax.scatter(numbers, values, s=14, label="trial")
        ax.step(numbers, np.maximum.accumulate(values), where="post", label="best so far")
        default = _default_value(study)
        if not math.isnan(default):
            ax.axhline(default, color="grey", linestyle=":", label="default params")
        ax.set(title=f"{kind}: optimisation history", xlabel="trial", ylabel="OOF pAUC")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def param_importances(study: optuna.Study, seed: int = 0) -> dict[str, float]:
    """fANOVA importance of each searched param; {} with fewer than 2 completed trials."""
    complete = _complete(study)
    if len(complete) < 2 or len({t.value for t in complete}) < 2:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {name: float(v) for name, v in values.items()}


def plot_importances(importances: Mapping[str, Mapping[str, float]]) -> Figure:
    """One panel per kind: horizontal bars of param importance, or a note why there are none."""
    fig, axes = _axes_row(len(importances), 4.5, 4.0)
    for ax, (kind, values) in zip(axes, importances.items(), strict=False):
        ax.set_title(f"{kind}: parameter importance")
        if not values:
            ax.text(0.5, 0.5, "needs >= 2 completed trials\nwith different scores", ha="center")
            ax.set_axis_off()
            continue
        names = list(values)[::-1]
        ax.barh(names, [values[n] for n in names], color="tab:blue")
        ax.set(xlabel="fANOVA importance")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------- entry


@dataclass(frozen=True)
class TuningRun:
    """What a stage 2 run produced, for the notebook to show."""

    config: TuneConfig
    data: TrainingFrame
    studies: dict[str, optuna.Study]  # every kind tuned on this setup, now or in earlier runs
    params_path: Path
    summary: pl.DataFrame
    importances: dict[str, dict[str, float]]
    out_dir: Path


def prepare_tuning_dir(out: Path, setup: Mapping[str, Any], force: bool) -> None:
    """Start clean when forced or when the folder holds studies of another setup (other data,
    image OOFs or settings): those are moved aside. Same setup: the studies go on (resume)."""
    key = config_hash(setup)
    path = out / SETUP_FILE
    old = json.loads(path.read_text()).get("setup_hash") if path.is_file() else None
    if out.is_dir() and (force or old != key):
        set_aside(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    write_json(path, {"setup": setup, "setup_hash": key})


# The full preset's default `timeout` per kind's study: three kinds take at most 9 h of trials,
# leaving 3 h of a 12-hour Kaggle session for loading, features and the best-parameter tables.
# A session Kaggle stops at 12 h loses its whole output, the finished trials included.
FULL_TIMEOUT_S = 3 * 3600.0


def with_time_budget(config: TuneConfig) -> TuneConfig:
    """The config with FULL_TIMEOUT_S per study in the full preset when no timeout is given."""
    if config.preset == "full" and config.timeout is None:
        return replace(config, timeout=FULL_TIMEOUT_S)
    return config


def run_tuning(
    data_dir: str | Path,
    output_dir: str | Path,
    image_oof_dirs: Sequence[str | Path] = (),
    preset: str = "demo",
    recipe: str = "paper",
    force: bool = False,
    **overrides: Any,
) -> TuningRun:
    """Stage 2 entry: stage 3's training frame, the studies, best_params.json, tables, plots and
    the manifest in `<output_dir>/tuning/`. `overrides` are TuneConfig fields (None: preset's)."""
    config = with_time_budget(resolve(preset, recipe, tuning=overrides).tuning)
    gbdt = gbdt_config(config)  # the recipe's feature groups: trials see stage 3's columns
    data = load_training_frame(
        data_dir,
        image_oof_dirs,
        config.n_folds,
        FOLD_SEED,
        threads=config.threads,
        **feature_groups(gbdt),
    )
    setup = setup_of(data, config)
    out = Path(output_dir) / TUNING_DIR
    prepare_tuning_dir(out, setup, force)
    tune(data, config, output_dir)
    studies = tuned_studies(data, config, output_dir)
    params_path = write_best_params(studies, output_dir)
    summary = summary_table(studies)
    summary.write_csv(out / "summary.csv")
    plot_history(studies).savefig(out / "history.png", dpi=100, bbox_inches="tight")
    importances = {kind: param_importances(study, config.seed) for kind, study in studies.items()}
    plot_importances(importances).savefig(out / "importance.png", dpi=100, bbox_inches="tight")
    record = {"tuning": asdict(config), "setup": setup, "image_sources": data.image_sources}
    write_manifest(out, record, {"stage": "tuning"})
    return TuningRun(config, data, studies, params_path, summary, importances, out)
