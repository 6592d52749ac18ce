"""One command for the whole chain: synthetic data (no data dir), every stage notebook, submission.

    python -m utils.pipeline [--data-dir DIR] [--work-dir DIR] [--preset demo|full]
                             [--recipe paper] [--tune] [--seed S] [--rows N] [--force]

Work dir layout: data/ (generated data), artifacts/<model>/, artifacts/tuning/, artifacts/gbdt/,
executed/ (executed notebooks + one <stage>.done.json stamp per finished stage), submission.csv.
Every stage reads its settings from utils.settings (preset x recipe); the pipeline passes names
and paths only, so a notebook run alone and the pipeline run the same sizes.
A stage is skipped when its outputs exist and its stamp holds the same parameters; once one stage
runs, every later stage runs too (its inputs changed). A stage that runs on other settings or
data moves its earlier outputs aside (`<folder>/../.previous/`); `--force` does so for every
stage, so nothing is resumed or mixed in.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.manifest import set_aside
from utils.settings import IMAGE_MODELS, PRESETS, RECIPES, SyntheticConfig, resolve

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DATA_FILES = ("train-metadata.csv", "train-image.hdf5", "test-metadata.csv", "test-image.hdf5")


class PipelineError(RuntimeError):
    """The pipeline cannot start or a stage failed (message says which and where)."""


@dataclass(frozen=True)
class Run:
    """One pipeline invocation: where data and outputs live, the preset and recipe (every stage
    reads its settings from utils.settings; the pipeline passes only names and paths)."""

    data_dir: Path
    work_dir: Path
    preset: str
    sizes: SyntheticConfig  # of the generated data dir
    recipe: str = "paper"
    seed: int = 0
    generate: bool = False
    tune: bool = False

    @property
    def artifacts(self) -> Path:
        """Folder of every stage's artifacts (the submission kernel's artifacts_dir)."""
        return self.work_dir / "artifacts"

    @property
    def executed(self) -> Path:
        """Folder of executed notebooks and stage stamps."""
        return self.work_dir / "executed"


@dataclass(frozen=True)
class Stage:
    """One step: a notebook run with papermill (or `action` for a Python step) and its outputs."""

    name: str
    notebook: str
    parameters: Callable[[Run], dict[str, Any]]
    outputs: Callable[[Run], list[Path]]  # a name may hold a glob pattern (fold*.pt)
    enabled: Callable[[Run], bool] = lambda run: True
    action: Callable[[dict[str, Any]], None] | None = None
    folder: Callable[[Run], Path] | None = None  # what the stage owns; set aside when forced


def _given(**values: Any) -> dict[str, Any]:
    """Parameters without the None ones (None keeps the notebook's default)."""
    return {k: v for k, v in values.items() if v is not None}


def _generate_data(params: dict[str, Any]) -> None:
    """Write the synthetic data dir (utils.synthetic.generate) in place of an earlier one."""
    from utils.synthetic import generate

    set_aside(Path(params["out_dir"]))
    generate(**params)


def _data_parameters(run: Run) -> dict[str, Any]:
    """Arguments of utils.synthetic.generate for this run."""
    s = run.sizes
    return _given(
        out_dir=str(run.data_dir),
        rows=s.rows,
        seed=run.seed,
        image_size=s.image_size,
        patients=s.patients,
        positive_rate=s.positive_rate,
        test_rows=s.test_rows,
        truth_path=str(run.work_dir / "synthetic-truth.csv"),
    )


def _image_stage(model: str) -> Stage:
    """Stage 1 for one image model."""
    return Stage(
        name=f"image_{model}",
        notebook=f"01_image_{model}.ipynb",
        parameters=lambda run: _given(**_common(run, run.artifacts)),
        outputs=lambda run: [
            run.artifacts / model / name
            for name in ("oof.csv", "config.json", "fold*.pt", "manifest.json")
        ],
        folder=lambda run: run.artifacts / model,
    )


def _common(run: Run, output_dir: Path) -> dict[str, Any]:
    """The parameters every stage notebook takes."""
    return {
        "data_dir": str(run.data_dir),
        "output_dir": str(output_dir),
        "preset": run.preset,
        "recipe": run.recipe,
    }


def _image_oof_dirs(run: Run) -> list[str]:
    """The four image models' artifact folders."""
    return [str(run.artifacts / model) for model in IMAGE_MODELS]


def _best_params(run: Run) -> Path:
    """Where stage 2 writes its best parameters."""
    return run.artifacts / "tuning" / "best_params.json"


STAGES: list[Stage] = [
    Stage(
        name="synthetic_data",
        notebook="",
        parameters=_data_parameters,
        outputs=lambda run: [run.data_dir / name for name in DATA_FILES],
        enabled=lambda run: run.generate,
        action=_generate_data,
        folder=lambda run: run.data_dir,
    ),
    *[_image_stage(model) for model in IMAGE_MODELS],
    Stage(
        name="tune_gbdt",
        notebook="02_tune_gbdt.ipynb",
        parameters=lambda run: _given(
            **_common(run, run.artifacts), image_oof_dirs=_image_oof_dirs(run)
        ),
        outputs=lambda run: [_best_params(run), run.artifacts / "tuning" / "manifest.json"],
        enabled=lambda run: run.tune,
        folder=lambda run: run.artifacts / "tuning",
    ),
    Stage(
        name="gbdt",
        notebook="03_gbdt.ipynb",
        parameters=lambda run: _given(
            **_common(run, run.artifacts),
            image_oof_dirs=_image_oof_dirs(run),
            params_path=str(_best_params(run)) if run.tune else None,
        ),
        outputs=lambda run: [
            run.artifacts / "gbdt" / n for n in ("oof.csv", "cv_report.json", "manifest.json")
        ],
        folder=lambda run: run.artifacts / "gbdt",
    ),
    Stage(
        name="inference",
        notebook="04_inference.ipynb",
        parameters=lambda run: _given(
            **_common(run, run.work_dir), artifacts_dir=str(run.artifacts)
        ),
        outputs=lambda run: [run.work_dir / "submission.csv"],
    ),
]


def _exists(path: Path) -> bool:
    """A path exists (a glob pattern in its name matches at least one file)."""
    return any(path.parent.glob(path.name)) if "*" in path.name else path.exists()


def stamp_path(stage: Stage, run: Run) -> Path:
    """The file recording that `stage` finished, with the parameters it ran with."""
    return run.executed / f"{stage.name}.done.json"


def is_complete(stage: Stage, run: Run) -> bool:
    """Outputs all present and the stamp holds the same parameters as this run's."""
    stamp = stamp_path(stage, run)
    if not stamp.is_file() or not all(_exists(p) for p in stage.outputs(run)):
        return False
    try:
        recorded = json.loads(stamp.read_text())["parameters"]
    except (json.JSONDecodeError, KeyError):
        return False
    return recorded == json.loads(json.dumps(stage.parameters(run)))


def plan(run: Run, stages: list[Stage] = STAGES, force: bool = False) -> list[tuple[Stage, bool]]:
    """(stage, will_run) for every enabled stage; after the first stage that runs, all run."""
    steps, rerun = [], force
    for stage in stages:
        if not stage.enabled(run):
            continue
        rerun = rerun or not is_complete(stage, run)
        steps.append((stage, rerun))
    return steps


@contextlib.contextmanager
def _repo_importable() -> Iterator[None]:
    """Let the notebook kernels (child processes) import utils from this checkout."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), old]))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _execute_notebook(stage: Stage, run: Run, params: dict[str, Any], notebooks_dir: Path) -> None:
    """Run one stage notebook with papermill; PipelineError with the error and executed path."""
    import papermill as pm

    executed = run.executed / stage.notebook
    try:
        with _repo_importable():
            pm.execute_notebook(
                str(notebooks_dir / stage.notebook),
                str(executed),
                parameters=params,
                kernel_name="python3",
                cwd=str(REPO_ROOT),
                progress_bar=sys.stderr.isatty(),
            )
    except pm.PapermillExecutionError as err:
        raise PipelineError(
            f"stage {stage.name} failed: {err.ename}: {err.evalue}\n  executed notebook: {executed}"
        ) from err
    except Exception as err:  # kernel died, bad notebook JSON, ...: same report
        raise PipelineError(
            f"stage {stage.name} failed: {type(err).__name__}: {err}\n"
            f"  executed notebook: {executed}"
        ) from err


def run_stage(
    stage: Stage, run: Run, notebooks_dir: Path = NOTEBOOKS_DIR, clean: bool = False
) -> None:
    """Run one stage, check it wrote its outputs, then stamp it complete.

    `clean` (--force) first moves the stage's folder aside (or deletes its output files), so the
    stage starts from nothing; without it each stage decides (a stage notebook moves an earlier
    run of other settings or data aside itself, and resumes an interrupted run of the same).
    """
    params = stage.parameters(run)
    stamp = stamp_path(stage, run)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    if clean and stage.folder is not None:
        set_aside(stage.folder(run))
    elif clean:
        for path in stage.outputs(run):
            path.unlink(missing_ok=True)
    if stage.action is not None:
        stage.action(params)
    else:
        _execute_notebook(stage, run, params, notebooks_dir)
    missing = [str(p) for p in stage.outputs(run) if not _exists(p)]
    if missing:
        where = f"\n  executed notebook: {run.executed / stage.notebook}" if stage.notebook else ""
        raise PipelineError(f"stage {stage.name} finished without writing {missing}{where}")
    stamp.write_text(json.dumps({"parameters": params}, indent=2, sort_keys=True))


def check_notebooks(steps: list[tuple[Stage, bool]], notebooks_dir: Path) -> None:
    """Fail before any work when a notebook that must run does not exist."""
    missing = [
        f"{notebooks_dir / s.notebook} (stage {s.name})"
        for s, will_run in steps
        if will_run and s.notebook and not (notebooks_dir / s.notebook).is_file()
    ]
    if missing:
        raise PipelineError("notebook(s) not found:\n  " + "\n  ".join(missing))


def run_pipeline(
    run: Run,
    stages: list[Stage] = STAGES,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run every stage that is not complete, in order; names of the stages that ran."""
    steps = plan(run, stages, force)
    check_notebooks(steps, notebooks_dir)
    ran, start = [], time.perf_counter()
    for i, (stage, will_run) in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {stage.name}"
        if not will_run:
            log(f"{head}: skipped (outputs complete; --force reruns)")
            continue
        log(f"{head}: running {stage.notebook or 'utils.synthetic.generate'} ...")
        t0 = time.perf_counter()
        try:
            run_stage(stage, run, notebooks_dir, clean=force)
        except PipelineError as err:
            raise PipelineError(f"{err}\n  after {time.perf_counter() - t0:.1f}s") from err
        log(f"{head}: done in {time.perf_counter() - t0:.1f}s")
        ran.append(stage.name)
    log(f"pipeline finished in {time.perf_counter() - start:.1f}s; work dir {run.work_dir}")
    return ran


def make_run(
    data_dir: Path | None,
    work_dir: Path,
    preset: str,
    tune: bool = False,
    seed: int = 0,
    rows: int | None = None,
    recipe: str = "paper",
) -> Run:
    """The Run for these options; checks a given data dir holds the Kaggle files."""
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
    return Run(
        data_dir=data_dir or work_dir / "data",
        work_dir=work_dir,
        preset=preset,
        sizes=sizes,
        recipe=recipe,
        seed=seed,
        generate=data_dir is None,
        tune=tune,
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exit 1 with the failing stage's error."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data-dir", type=Path, help="Kaggle-layout data (default: synthetic)")
    parser.add_argument("--work-dir", type=Path, default=Path("work"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--recipe", choices=RECIPES, default="paper")
    parser.add_argument("--tune", action="store_true", help="run 02_tune_gbdt before 03_gbdt")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--rows", type=int, help="synthetic train rows (default: the preset's)")
    parser.add_argument(
        "--force", action="store_true", help="rerun every stage from a clean output folder"
    )
    parser.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        run = make_run(
            args.data_dir, args.work_dir, args.preset, args.tune, args.seed, args.rows, args.recipe
        )
        run_pipeline(run, notebooks_dir=args.notebooks_dir, force=args.force)
    except PipelineError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 1
    print(f"submission: {run.work_dir / 'submission.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
