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
import contextlib
import dataclasses
import json
import os
import resource
import shlex
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.cli import RawDefaultsHelpFormatter, format_duration
from utils.layout import (
    BEST_PARAMS_FILE,
    CONFIG_FILE,
    CV_REPORT_FILE,
    GBDT_DIR,
    MANIFEST_FILE,
    OOF_FILE,
    REPORT_FILE,
    SUBMISSION_FILE,
    TUNING_DIR,
    fold_file,
)
from utils.manifest import file_sha256, set_aside
from utils.run_guard import (
    Stopped,
    WorkDirBusy,
    run_stoppable,
    shut_down_kernels,
    stop_on_signals,
    tracked_kernel_manager,
    work_dir_lock,
)
from utils.settings import IMAGE_MODELS, N_FOLDS, PRESETS, RECIPES, SyntheticConfig, resolve

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DATA_FILES = ("train-metadata.csv", "train-image.hdf5", "test-metadata.csv", "test-image.hdf5")
HEARTBEAT_S = 30.0  # a stage that prints nothing for this long gets a "still running" line
DURATIONS_FILE = "durations.json"  # seconds each stage took last time (for the heartbeat)
# Kernel start-up noise a user cannot act on: ipykernel 7's "running over TCP without
# encryption" (the kernel listens on localhost only), and tqdm.auto's "IProgress not found"
# (imported by timm's huggingface_hub; the bars are text bars either way), and the ERROR line
# "KeyboardInterrupt caught in kernel." that jupyter_client's shutdown causes: it interrupts the
# kernel before asking it to shut down, and a kernel still handling a message logs that.
KERNEL_ARGUMENTS = [
    "--IPKernelApp.log_level=ERROR",
    "--IPKernelApp.exec_lines=import warnings; "
    "warnings.filterwarnings('ignore', message='IProgress not found'); "
    "get_ipython().kernel.log.addFilter("
    "lambda r: 'KeyboardInterrupt caught in kernel' not in r.getMessage())",
]


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
    weights_dir: Path | None = None  # <backbone>.pth files, one per image stage's weights_path

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
    generate(**params, require_positive_patients=N_FOLDS)


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
    )


def truth_path(run: Run) -> Path | None:
    """The generated data's true probabilities (utils.synthetic's `<data dir>-truth.csv`)."""
    from utils.synthetic import default_truth_path

    return default_truth_path(run.data_dir) if run.generate else None


def _weights_path(run: Run, model: str) -> str | None:
    """`<weights_dir>/<backbone>.pth` for an image model, or None (random init)."""
    if run.weights_dir is None:
        return None
    return str(run.weights_dir / f"{IMAGE_MODELS[model].backbone}.pth")


def _image_stage(model: str) -> Stage:
    """Stage 1 for one image model: no recipe among its parameters, since no recipe changes
    stage 1 (ImageConfig's identity leaves it out too), so switching it reuses every image run."""
    return Stage(
        name=f"image_{model}",
        notebook=f"01_image_{model}.ipynb",
        parameters=lambda run: _given(
            **_common(run, run.artifacts, recipe=False), weights_path=_weights_path(run, model)
        ),
        outputs=lambda run: [
            run.artifacts / model / name
            for name in (OOF_FILE, CONFIG_FILE, fold_file("*"), MANIFEST_FILE)
        ],
        folder=lambda run: run.artifacts / model,
    )


def _common(run: Run, output_dir: Path, recipe: bool = True) -> dict[str, Any]:
    """The parameters every stage notebook takes; the recipe only where it changes the output."""
    common = {"data_dir": str(run.data_dir), "output_dir": str(output_dir), "preset": run.preset}
    return {**common, "recipe": run.recipe} if recipe else common


def _image_oof_dirs(run: Run) -> list[str]:
    """The four image models' artifact folders."""
    return [str(run.artifacts / model) for model in IMAGE_MODELS]


def _best_params(run: Run) -> Path:
    """Where stage 2 writes its best parameters."""
    return run.artifacts / TUNING_DIR / BEST_PARAMS_FILE


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
        outputs=lambda run: [_best_params(run), run.artifacts / TUNING_DIR / MANIFEST_FILE],
        enabled=lambda run: run.tune,
        folder=lambda run: run.artifacts / TUNING_DIR,
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
            run.artifacts / GBDT_DIR / n for n in (OOF_FILE, CV_REPORT_FILE, MANIFEST_FILE)
        ],
        folder=lambda run: run.artifacts / GBDT_DIR,
    ),
    Stage(
        name="inference",
        notebook="04_inference.ipynb",
        # the recipe comes from the GBDT artifacts (gbdt/features.json), never a parameter
        parameters=lambda run: _given(
            **_common(run, run.work_dir, recipe=False), artifacts_dir=str(run.artifacts)
        ),
        outputs=lambda run: [run.work_dir / SUBMISSION_FILE],
    ),
]
STAGE_WORDS = {  # what the stage line says runs
    "synthetic_data": "utils.synthetic.generate",
}


def _exists(path: Path) -> bool:
    """A path exists (a glob pattern in its name matches at least one file)."""
    return any(path.parent.glob(path.name)) if "*" in path.name else path.exists()


def stamp_path(stage: Stage, run: Run) -> Path:
    """The file recording that `stage` finished, with the parameters it ran with."""
    return run.executed / f"{stage.name}.done.json"


def output_hashes(stage: Stage, run: Run) -> dict[str, str]:
    """sha256 of each output file named without a pattern (a folder's manifest.json changes
    whenever anything writes that folder again, so fold*.pt need no hash of their own)."""
    return {str(p): file_sha256(p) for p in stage.outputs(run) if "*" not in p.name and p.is_file()}


def why_incomplete(stage: Stage, run: Run) -> str | None:
    """Why `stage` must run (None when it is complete): an output missing, no stamp, other
    parameters, or outputs that are not the files this pipeline's run wrote."""
    missing = [p.name for p in stage.outputs(run) if not _exists(p)]
    if len(missing) == len(stage.outputs(run)):
        return "not run yet"
    if missing:
        return f"output(s) missing: {missing}"
    stamp = stamp_path(stage, run)
    if not stamp.is_file():
        return "never finished in this work dir"
    try:
        record = json.loads(stamp.read_text())
        recorded, hashes = record["parameters"], record["outputs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"unreadable stamp {stamp.name}"
    if recorded != json.loads(json.dumps(stage.parameters(run))):
        return "other parameters than last time"
    changed = [Path(p).name for p, h in output_hashes(stage, run).items() if hashes.get(p) != h]
    if changed:
        return f"{changed} changed since the pipeline wrote them (a run by hand?)"
    return None


def is_complete(stage: Stage, run: Run) -> bool:
    """Outputs all present, written by this pipeline's last run of the stage, which had the same
    parameters as this run's."""
    return why_incomplete(stage, run) is None


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


class StageOutput:
    """File-like sink for a stage kernel's stdout: each complete line goes to `log` behind the
    stage's name, as it is printed (papermill's stdout_file), whether or not stdout is a TTY."""

    def __init__(self, log: Callable[[str], None], prefix: str):
        self.log, self.prefix, self.pending = log, prefix, ""
        self.last = time.monotonic()

    def write(self, text: str) -> int:
        self.pending += text.replace("\r", "\n")
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.log(f"{self.prefix} {line.rstrip()}")
                self.last = time.monotonic()
        return len(text)

    def flush(self) -> None:
        """Lines are passed on as they complete; nothing is held back but a partial line."""


@contextlib.contextmanager
def heartbeat(
    log: Callable[[str], None],
    head: str,
    output: StageOutput,
    previous_s: float | None = None,
    every_s: float = HEARTBEAT_S,
) -> Iterator[None]:
    """While the block runs, log `head: still running, <elapsed>` after every `every_s` seconds
    in which the stage printed nothing (with the last run's duration when known)."""
    start, stop = time.monotonic(), threading.Event()

    def beat() -> None:
        while not stop.wait(min(every_s, 5.0)):
            now = time.monotonic()
            if now - output.last >= every_s:
                last = f" (last run took {format_duration(previous_s)})" if previous_s else ""
                log(f"{head}: still running, {format_duration(now - start)} elapsed{last}")
                output.last = now

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _execute_notebook(
    stage: Stage,
    run: Run,
    params: dict[str, Any],
    notebooks_dir: Path,
    output: StageOutput | None = None,
) -> None:
    """Run one stage notebook with papermill, its printed lines to `output`; PipelineError with
    the error and executed path."""
    import papermill as pm

    executed = run.executed / stage.notebook
    kernels: list = []  # the kernel manager papermill makes, so a signal can shut it down
    try:
        with _repo_importable():
            run_stoppable(
                lambda: pm.execute_notebook(
                    str(notebooks_dir / stage.notebook),
                    str(executed),
                    parameters=params,
                    kernel_name="python3",
                    cwd=str(REPO_ROOT),
                    progress_bar=False,
                    stdout_file=output,
                    extra_arguments=KERNEL_ARGUMENTS,
                    kernel_manager_class=tracked_kernel_manager(kernels),
                ),
                on_stop=lambda: shut_down_kernels(kernels),
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
    stage: Stage,
    run: Run,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    clean: bool = False,
    output: StageOutput | None = None,
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
        _execute_notebook(stage, run, params, notebooks_dir, output)
    missing = [str(p) for p in stage.outputs(run) if not _exists(p)]
    if missing:
        where = f"\n  executed notebook: {run.executed / stage.notebook}" if stage.notebook else ""
        raise PipelineError(f"stage {stage.name} finished without writing {missing}{where}")
    record = {"parameters": params, "outputs": output_hashes(stage, run)}
    stamp.write_text(json.dumps(record, indent=2, sort_keys=True))


def check_notebooks(steps: list[tuple[Stage, bool]], notebooks_dir: Path) -> None:
    """Fail before any work when a notebook that must run does not exist."""
    missing = [
        f"{notebooks_dir / s.notebook} (stage {s.name})"
        for s, will_run in steps
        if will_run and s.notebook and not (notebooks_dir / s.notebook).is_file()
    ]
    if missing:
        raise PipelineError("notebook(s) not found:\n  " + "\n  ".join(missing))


def _say(message: str) -> None:
    """print, flushed at once (a log file or CI sees each line as it happens)."""
    print(message, flush=True)


def cpu_seconds() -> float:
    """User + sys CPU seconds of this process and its finished children (the stage kernels): on
    an idle machine with enough cores, what wall time approaches; unlike wall time, other
    processes' load hardly changes it."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def durations(run: Run) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of each stage's last run in this work dir."""
    try:
        found = json.loads((run.executed / DURATIONS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in found.items() if isinstance(v, dict) and "wall_s" in v}


def _record_duration(run: Run, name: str, wall_s: float, cpu_s: float) -> None:
    record = durations(run) | {name: {"wall_s": round(wall_s, 1), "cpu_s": round(cpu_s, 1)}}
    (run.executed / DURATIONS_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))


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
        return _run_stages(run, stages, notebooks_dir, force, log)


def _run_stages(
    run: Run,
    stages: list[Stage],
    notebooks_dir: Path,
    force: bool,
    log: Callable[[str], None],
) -> list[str]:
    steps = plan(run, stages, force)
    check_notebooks(steps, notebooks_dir)
    ran, start, cpu = [], time.perf_counter(), cpu_seconds()
    for i, (stage, will_run) in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {stage.name}"
        if not will_run:
            log(f"{head}: skipped (outputs complete; --force reruns)")
            continue
        why = "forced" if force else why_incomplete(stage, run) or "an earlier stage ran"
        log(f"{head}: running {stage.notebook or STAGE_WORDS[stage.name]} ({why}) ...")
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        output = StageOutput(log, f"  {stage.name} |")
        previous = durations(run).get(stage.name, {}).get("wall_s")
        try:
            with heartbeat(log, head, output, previous):
                run_stage(stage, run, notebooks_dir, clean=force, output=output)
        except PipelineError as err:
            raise PipelineError(f"{err}\n  after {time.perf_counter() - t0:.1f}s") from err
        except Stopped as stop:
            stop.stage = stage.name
            raise
        wall_s, cpu_s = time.perf_counter() - t0, cpu_seconds() - cpu0
        _record_duration(run, stage.name, wall_s, cpu_s)
        log(f"{head}: done in {wall_s:.1f}s (CPU {cpu_s:.1f}s)")
        ran.append(stage.name)
    log(
        f"pipeline finished in {time.perf_counter() - start:.1f}s (CPU {cpu_seconds() - cpu:.1f}s);"
        f" work dir {run.work_dir}"
    )
    log(results_block(run))
    return ran


PAUC_SCALE = (
    "pAUC = area under the ROC above 80% TPR (the competition metric): 0 to 0.2, higher is "
    "better; a random ranking scores about 0.02"
)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def best_achievable(run: Run) -> float | None:
    """pAUC of the synthetic data's true probabilities (None for real data or no truth file)."""
    path = truth_path(run)
    if path is None or not path.is_file():
        return None
    import polars as pl

    from utils.synthetic import best_pauc

    return best_pauc(pl.read_csv(path))


def results_block(run: Run) -> str:
    """What the run found: the pAUC scale, the best achievable score (synthetic data), OOF pAUC
    per GBDT member and the ensemble, the ablation's image-only and metadata-only rows, and
    where the submission, reports, plots and executed notebooks are."""
    gbdt = run.artifacts / GBDT_DIR
    report = _read_json(gbdt / CV_REPORT_FILE) or {}
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
    lines += [f"{label}: {path}" for label, path in where if _exists(path)]
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
    args = parser.parse_args(argv)
    try:
        run = make_run(
            args.data_dir,
            args.work_dir,
            args.preset,
            args.tune,
            args.seed,
            args.rows,
            args.recipe,
            args.weights_dir,
        )
        run_pipeline(run, notebooks_dir=args.notebooks_dir, force=args.force)
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
