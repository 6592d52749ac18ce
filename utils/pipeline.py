"""One command for the whole chain: synthetic data (no data dir), every stage notebook, submission.

    python -m utils.pipeline [--data-dir DIR] [--work-dir DIR] [--preset demo|full]
                             [--recipe paper] [--tune] [--seed S] [--rows N] [--force]
                             [--weights-dir DIR]

Work dir layout: data/ (generated data) and data-truth.csv (its true probabilities),
artifacts/<model>/, artifacts/tuning/, artifacts/gbdt/, executed/ (executed notebooks + one
<stage>.done.json stamp per finished stage), submission.csv and submission_report.json.
Every stage reads its settings from utils.settings (preset x recipe); the pipeline passes names
and paths only, so a notebook run alone and the pipeline run the same sizes. The recipe goes to
stages 2 and 3 only: no recipe changes an image model, so `--recipe plus` after a `paper` run
skips the image stages and reruns tuning, GBDT and submission (the submission kernel reads the
recipe stage 3 recorded with its artifacts).
A stage is skipped when its outputs exist, its stamp holds the same parameters and its outputs
are still the files it wrote (the stamp records their sha256: a stage run by hand into the work
dir is detected and rerun); once one stage runs, every later stage runs too (its inputs changed).
A stage that runs on other settings or data moves its earlier outputs aside
(`<folder>/../.previous/`); `--force` does so for every stage, so nothing is resumed or mixed in.
While a stage runs, its printed lines (folds, epochs, scores) are echoed with the stage's name,
and a heartbeat line every 30 s says how long it has run. The run ends with a results block.
One run per work dir: a second run stops at once naming the first's pid and start time
(utils.run_guard). Ctrl-C (SIGINT) or SIGTERM shuts the running stage's kernel down, leaves that
stage unstamped, prints one line naming it and the command that resumes, and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shlex
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from utils.cli import RawDefaultsHelpFormatter
from utils.layout import CV_REPORT_FILE, GBDT_DIR, REPORT_FILE, SUBMISSION_FILE
from utils.manifest import read_json_object
from utils.pipeline_runner import exists, run_stages
from utils.pipeline_stages import DATA_FILES, NOTEBOOKS_DIR, STAGES, PipelineError, Run, Stage
from utils.run_guard import Stopped, WorkDirBusy, stop_on_signals, work_dir_lock
from utils.settings import IMAGE_MODELS, PRESETS, RECIPES, resolve

_say = functools.partial(print, flush=True)  # a log file or CI sees each line as it happens


def run_pipeline(
    run: Run,
    stages: list[Stage] = STAGES,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    force: bool = False,
    log: Callable[[str], None] = _say,
) -> list[str]:
    """Run every stage that is not complete, in order, then log the results block; names of the
    stages that ran. Holds the work dir's lock throughout (WorkDirBusy when another run has it);
    SIGINT / SIGTERM stop it with Stopped, its `stage` the stage that was stopped, unstamped."""
    with work_dir_lock(run.work_dir), stop_on_signals():
        ran = run_stages(run, stages, notebooks_dir, force, log)
        log(results_block(run))
        return ran


PAUC_SCALE = (
    "pAUC = area under the ROC above 80% TPR (the competition metric): 0 to 0.2, higher is "
    "better; a random ranking scores about 0.02"
)


def best_achievable(run: Run) -> float | None:
    """pAUC of the synthetic data's true probabilities, utils.synthetic's `<data dir>-truth.csv`
    (None for real data or no truth file)."""
    import polars as pl

    from utils.synthetic import best_pauc, default_truth_path

    path = default_truth_path(run.data_dir)
    return best_pauc(pl.read_csv(path)) if run.generate and path.is_file() else None


def results_block(run: Run) -> str:
    """What the run found: the pAUC scale, the best achievable score (synthetic data), OOF pAUC
    per GBDT member and the ensemble, the ablation's image-only and metadata-only rows, and
    where the submission, reports, plots and executed notebooks are."""
    gbdt = run.artifacts / GBDT_DIR
    report = read_json_object(gbdt / CV_REPORT_FILE)
    lines = ["=" * 34 + " RESULTS " + "=" * 34, *textwrap.wrap(PAUC_SCALE + ".", 77)]
    best = best_achievable(run)
    if best is not None:
        lines.append(f"best achievable on this synthetic data (its true probabilities): {best:.4f}")
    scores = {name: s["overall"] for name, s in report.get("scores", {}).items()}
    ablation = {
        row["setting"]: row["pauc"]
        for row in report.get("ablation", [])
        if row["setting"].startswith(("image-only", "metadata-only"))
    }
    width = max(map(len, [*scores, *ablation, ""]))
    if scores:
        lines.append("out-of-fold pAUC per GBDT member and the soft-vote ensemble (stage 3):")
        lines += [f"  {name:<{width}s}  {value:.4f}" for name, value in scores.items()]
    filtered = report.get("filtered") or {}
    if filtered.get("available") and "ensemble" in filtered.get("scores", {}):
        value = filtered["scores"]["ensemble"]["overall"]
        lines.append(f"  {'ensemble, filtered':<{width}s}  {value:.4f}")
        note = (
            f"(filtered: the reference's CV score, without the {filtered['rows_left_out']} "
            f"target-0 rows with iddx_1 Indeterminate or an iddx_2; trained {filtered['training']})"
        )
        lines += textwrap.wrap(note, 77, initial_indent="  ", subsequent_indent="  ")
    if ablation:
        lines.append("ablation (paper Table 4):")
        lines += [f"  {name:<{width}s}  {value:.4f}" for name, value in ablation.items()]
    if run.preset == "demo":
        lines += textwrap.wrap(
            "demo preset: the image models train 1 epoch from random weights on 32 px crops, so "
            "they score near random (about 0.02) on purpose, to keep the run short; the metadata "
            "GBDTs carry the score. `--preset full --weights-dir DIR` trains them for real.",
            77,
        )
    where = [
        ("submission", run.work_dir / SUBMISSION_FILE),
        ("submission report", run.work_dir / REPORT_FILE),
        ("GBDT report", gbdt / CV_REPORT_FILE),
        ("plots", gbdt / "*.png"),
        ("executed notebooks (tables, plots)", run.executed / "*.ipynb"),
    ]
    lines += [f"{label}: {path}" for label, path in where if exists(path)]
    return "\n".join(lines + ["=" * 77])


def make_run(
    data_dir: Path | None,
    work_dir: Path,
    preset: str,
    tune: bool = False,
    seed: int = 0,
    rows: int | None = None,
    recipe: str = "paper",
    weights_dir: Path | None = None,
) -> Run:
    """The Run for these options; checks a given data dir holds the Kaggle files and a given
    weights dir the `<backbone>.pth` file of every image model."""
    if preset not in PRESETS:
        raise PipelineError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if recipe not in RECIPES:
        raise PipelineError(f"unknown recipe {recipe!r}; choose from {list(RECIPES)}")
    sizes = resolve(preset, recipe).data
    if rows is not None:
        if data_dir is not None:
            raise PipelineError("--rows sizes generated data; it cannot apply to --data-dir")
        sizes = dataclasses.replace(sizes, rows=rows)
    work_dir = work_dir.resolve()
    if data_dir is not None:
        data_dir = data_dir.resolve()
        missing = [name for name in DATA_FILES if not (data_dir / name).is_file()]
        if missing:
            raise PipelineError(f"--data-dir {data_dir} lacks {missing} (Kaggle layout expected)")
    if weights_dir is not None:
        weights_dir = weights_dir.resolve()
        wanted = sorted({f"{spec.backbone}.pth" for spec in IMAGE_MODELS.values()})
        missing = [name for name in wanted if not (weights_dir / name).is_file()]
        if missing:
            raise PipelineError(f"--weights-dir {weights_dir} lacks {missing}")
    return Run(
        data_dir=data_dir or work_dir / "data",
        work_dir=work_dir,
        preset=preset,
        sizes=sizes,
        recipe=recipe,
        seed=seed,
        generate=data_dir is None,
        tune=tune,
        weights_dir=weights_dir,
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exit 1 with the failing stage's error."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.pipeline",
        description=__doc__,
        formatter_class=RawDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data-dir", type=Path, help="Kaggle-layout data dir; none: generate synthetic data"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("work"), help="everything goes here")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="sizes")
    parser.add_argument("--recipe", choices=RECIPES, default="paper", help="method variant")
    parser.add_argument("--tune", action="store_true", help="run 02_tune_gbdt before 03_gbdt")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--rows", type=int, help="synthetic train rows; none: the preset's")
    parser.add_argument(
        "--weights-dir",
        type=Path,
        help="folder of pretrained <backbone>.pth files (utils.kaggle.build weights), passed to "
        "each image stage as weights_path; none: random init",
    )
    parser.add_argument(
        "--force", action="store_true", help="rerun every stage from a clean output folder"
    )
    parser.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)
    options = vars(parser.parse_args(argv))  # make_run's arguments, but for the last two
    force, notebooks_dir = options.pop("force"), options.pop("notebooks_dir")
    try:
        run_pipeline(make_run(**options), notebooks_dir=notebooks_dir, force=force)
    except (PipelineError, WorkDirBusy) as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 1
    except Stopped as stop:
        print(stopped_message(stop, argv if argv is not None else sys.argv[1:]), file=sys.stderr)
        return stop.exit_code
    return 0


def stopped_message(stop: Stopped, argv: list[str]) -> str:
    """One line: what the signal stopped and the command that resumes from there."""
    where = f"stage {stop.stage}" if getattr(stop, "stage", None) else "the pipeline"
    command = shlex.join(["python", "-m", "utils.pipeline", *argv])
    return (
        f"STOPPED by {stop.name}: {where} stopped and not marked done; `{command}` resumes from it"
    )


if __name__ == "__main__":
    sys.exit(main())
