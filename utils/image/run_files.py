"""The files of an image training run beside its fold checkpoints, and the run's identity.

`<output_dir>/<model_name>/config.json` holds the resolved config, folds, data fingerprint and
`config_hash` (run_record: the run's identity, settings that change the output only, never the
recipe). At the end of each session finish_run writes `history.csv` and, once every fold is
finished, `oof.csv` (every training row exactly once, utils.oof format) and, last,
`manifest.json` (utils.manifest); while folds remain, `progress.json` names the finished and the
remaining ones for the next session.

Rerun: other settings or data (another `config_hash`), or `force`, move the old run dir aside
(`<output_dir>/.previous/<model_name>`) and train from scratch (start_run). `resume_from=`
copies the folds of an earlier output of the same run first (copy_earlier_run), so one model's
folds can be split over several Kaggle sessions.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from utils.layout import (
    CONFIG_FILE,
    HISTORY_FILE,
    MANIFEST_FILE,
    OOF_FILE,
    PROGRESS_FILE,
    fold_file,
)
from utils.manifest import (
    atomic_output,
    config_hash,
    data_fingerprint,
    set_aside,
    write_json,
    write_manifest,
)
from utils.oof import write_oof
from utils.settings import TRAIN_IDENTITY_FREE, ImageConfig


def run_record(cfg: ImageConfig, frame: pl.DataFrame, folds_source: str) -> dict:
    """What config.json and the manifest record: config, folds, data fingerprint and the hash
    of all three without the TRAIN_IDENTITY_FREE settings (the run's identity, which stage 3
    records): what changes stage 1's output, so another recipe or preset name reuses the run."""
    record = {
        "config": dataclasses.asdict(cfg),
        "folds": {"n_folds": cfg.n_folds, "seed": cfg.seed, "source": folds_source},
        "data": data_fingerprint(frame, "label"),  # resume must see the same data
    }
    identity = json.loads(json.dumps(record))
    for key in TRAIN_IDENTITY_FREE:
        identity["config"].pop(key, None)
    return {**record, "config_hash": config_hash(identity)}


def copy_earlier_run(earlier: Path, run_dir: Path, record: dict) -> list[str]:
    """Copy an earlier output of this same run (same config_hash) into `run_dir`: each finished
    fold{k}.pt, and for an unfinished fold its fold{k}.last.pt and fold{k}.best.pt, so a new
    session (e.g. a Kaggle kernel reading its own earlier output) keeps finished folds and
    continues the unfinished one. A fold `run_dir` already holds is left alone."""
    path = earlier / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"resume_from: no {CONFIG_FILE} in {earlier}")
    old = json.loads(path.read_text()).get("config_hash")
    if old != record["config_hash"]:
        raise ValueError(
            f"resume_from: {earlier} holds another run (config_hash {old}, this run "
            f"{record['config_hash']}): other settings or data, so its folds cannot continue"
        )
    copied = []
    for k in range(record["folds"]["n_folds"]):
        if any((run_dir / f"fold{k}{end}").exists() for end in (".pt", ".last.pt")):
            continue
        ends = (".pt",) if (earlier / f"fold{k}.pt").is_file() else (".last.pt", ".best.pt")
        for name in [f"fold{k}{end}" for end in ends if (earlier / f"fold{k}{end}").is_file()]:
            shutil.copyfile(earlier / name, run_dir / name)
            copied.append(name)
    print(f"resume_from {earlier}: copied {copied or 'nothing'}")
    return copied


def start_run(run_dir: Path, record: dict, force: bool, resume_from: str | Path | None) -> None:
    """The run dir's set-up, done once (one process, or rank 0 / the launching parent): another
    run there (or `force`) is moved aside, never resumed or mixed in; the same run resumes. Then
    the folds of `resume_from` are copied in."""
    path = run_dir / CONFIG_FILE
    if run_dir.is_dir():
        old = json.loads(path.read_text()).get("config_hash") if path.is_file() else None
        if force or old != record["config_hash"]:
            set_aside(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MANIFEST_FILE).unlink(missing_ok=True)  # written again once the run is complete
    write_json(path, record)
    if resume_from is not None:
        copy_earlier_run(Path(resume_from) / run_dir.name, run_dir, record)


def finish_run(
    cfg: ImageConfig,
    frame: pl.DataFrame,
    run_dir: Path,
    record: dict,
    parts: list[pl.DataFrame],
    history: list[dict],
    over_budget: Sequence[int] = (),
) -> pl.DataFrame:
    """history.csv, and once every fold is finished oof.csv and the manifest; the OOF rows.
    While folds remain, progress.json names the finished and the remaining ones (and those the
    time budget left out) for the session that continues the run."""
    with atomic_output(run_dir / HISTORY_FILE) as tmp:
        pl.DataFrame(history).write_csv(tmp)
    empty = pl.DataFrame(schema={"isic_id": pl.String, "pred": pl.Float64})
    preds = pl.concat([empty, *parts])  # the time budget may leave no fold done
    oof = (
        frame.filter(pl.col("isic_id").is_in(preds["isic_id"].implode()))
        .select("isic_id", "patient_id", "fold", "target")
        .join(preds, on="isic_id", how="left")
    )
    remaining = [k for k in range(cfg.n_folds) if not (run_dir / fold_file(k)).is_file()]
    if remaining:
        why = f" ({list(over_budget)} left out by the time budget)" if over_budget else ""
        print(
            f"{cfg.model_name}: fold(s) {remaining} of {cfg.n_folds} remain{why}; oof.csv and "
            f"the manifest are written once every fold is finished (next: folds={remaining} "
            f"with resume_from this output)"
        )
        finished = sorted(set(range(cfg.n_folds)) - set(remaining))
        progress = {"finished": finished, "remaining": remaining, "over_budget": list(over_budget)}
        write_json(run_dir / PROGRESS_FILE, progress)
        return oof.sort("isic_id")
    (run_dir / PROGRESS_FILE).unlink(missing_ok=True)
    write_oof(oof, run_dir / OOF_FILE)
    write_manifest(run_dir, record, {"stage": "image", "model": cfg.model_name})
    return oof.sort("isic_id")
