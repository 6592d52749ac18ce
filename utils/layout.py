"""Every file and folder name of the artifacts, in one place: the stages write them, the pipeline,
the Kaggle build and the submission kernel find them by these names.

    <artifacts>/<image model>/   oof.csv, history.csv, config.json, fold{k}.pt, manifest.json,
                                 progress.json (a run stopped by its time budget)
    <artifacts>/tuning/          optuna.sqlite3, setup.json, best_params.json, manifest.json
    <artifacts>/gbdt/            ensemble.json, features.json, cv_report.json, oof.csv, ...
    <output>/                    submission.csv, submission_report.json
    <output>/<dataset>/          external_metrics.json, predictions.csv (stage 5)
    <output>/                    ablation.json, ablation.md (the ablation, 06_ablation)
"""

from __future__ import annotations

MANIFEST_FILE = "manifest.json"  # in every artifact folder
PREVIOUS_DIR = ".previous"  # where an earlier run's folder is set aside

# stage 1, one folder per image model
OOF_FILE = "oof.csv"
HISTORY_FILE = "history.csv"
CONFIG_FILE = "config.json"
PROGRESS_FILE = "progress.json"  # only while folds remain: finished, remaining, over budget

# stage 2
TUNING_DIR = "tuning"
STORAGE_FILE = "optuna.sqlite3"
BEST_PARAMS_FILE = "best_params.json"
SETUP_FILE = "setup.json"

# stage 3
GBDT_DIR = "gbdt"
ENSEMBLE_FILE = "ensemble.json"
FEATURES_FILE = "features.json"
CV_REPORT_FILE = "cv_report.json"

# stage 4
SUBMISSION_FILE = "submission.csv"
REPORT_FILE = "submission_report.json"

# stage 5
METRICS_FILE = "external_metrics.json"

# the ablation of the plus candidates (notebooks/06_ablation), in its output folder
ABLATION_FILE = "ablation.json"
ABLATION_TABLE_FILE = "ablation.md"
PREDICTIONS_FILE = "predictions.csv"


def fold_file(k: int | str, kind: str = "") -> str:
    """A fold checkpoint of stage 1: `fold{k}.pt` (final), or `fold{k}.last.pt` /
    `fold{k}.best.pt` (kind "last" / "best": the unfinished fold's resume and best epoch); k "*"
    gives the glob pattern of every fold."""
    return f"fold{k}.{kind}.pt" if kind else f"fold{k}.pt"
