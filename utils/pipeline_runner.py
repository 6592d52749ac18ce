"""Running the pipeline's stages (utils.pipeline, whose docstring says when a stage is complete):
which stages must run, one stage's notebook in a kernel with its printed lines echoed and a
heartbeat while it is silent, the stamp that marks it done, and the stages in order with their
durations.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from utils.cli import format_duration
from utils.manifest import file_sha256, read_json_object, set_aside
from utils.pipeline_stages import NOTEBOOKS_DIR, REPO_ROOT, STAGES, PipelineError, Run, Stage
from utils.run_guard import Stopped, run_stoppable, shut_down_kernels, tracked_kernel_manager

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


def exists(path: Path) -> bool:
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
    """Why `stage` must run, in words (None when it is complete)."""
    missing = [p.name for p in stage.outputs(run) if not exists(p)]
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


def plan(run: Run, stages: list[Stage] = STAGES, force: bool = False) -> list[tuple[Stage, bool]]:
    """(stage, will_run) for every enabled stage; after the first stage that runs, all run."""
    steps, rerun = [], force
    for stage in stages:
        if not stage.enabled(run):
            continue
        rerun = rerun or why_incomplete(stage, run) is not None
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
    """Run one stage notebook with papermill, its printed lines to `output`; PipelineError."""
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
    except Exception as err:  # the notebook raised, the kernel died, bad notebook JSON, ...
        if isinstance(err, pm.PapermillExecutionError):
            what = f"{err.ename}: {err.evalue}"
        else:
            what = f"{type(err).__name__}: {err}"
        raise PipelineError(
            f"stage {stage.name} failed: {what}\n  executed notebook: {executed}"
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
    missing = [str(p) for p in stage.outputs(run) if not exists(p)]
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


def cpu_seconds() -> float:
    """User + sys CPU seconds of this process and its finished children (the stage kernels): on
    an idle machine with enough cores, what wall time approaches; unlike wall time, other
    processes' load hardly changes it."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def durations(run: Run) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of each stage's last run in this work dir."""
    found = read_json_object(run.executed / DURATIONS_FILE)
    return {k: v for k, v in found.items() if isinstance(v, dict) and "wall_s" in v}


def run_stages(
    run: Run,
    stages: list[Stage],
    notebooks_dir: Path,
    force: bool,
    log: Callable[[str], None],
) -> list[str]:
    """Run every stage of `stages` that is not complete (all with `force`), in order, logging a
    line as each starts and ends; names of the stages that ran. A stopped stage's name goes on
    the Stopped exception."""
    steps = plan(run, stages, force)
    check_notebooks(steps, notebooks_dir)
    ran, start, cpu = [], time.perf_counter(), cpu_seconds()
    for i, (stage, will_run) in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {stage.name}"
        if not will_run:
            log(f"{head}: skipped (outputs complete; --force reruns)")
            continue
        why = "forced" if force else why_incomplete(stage, run) or "an earlier stage ran"
        what = stage.notebook or "utils.synthetic.generate"  # the one stage without a notebook
        log(f"{head}: running {what} ({why}) ...")
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
        wall_s, cpu_s = round(time.perf_counter() - t0, 1), round(cpu_seconds() - cpu0, 1)
        record = durations(run) | {stage.name: {"wall_s": wall_s, "cpu_s": cpu_s}}
        (run.executed / DURATIONS_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
        log(f"{head}: done in {wall_s:.1f}s (CPU {cpu_s:.1f}s)")
        ran.append(stage.name)
    log(
        f"pipeline finished in {time.perf_counter() - start:.1f}s (CPU {cpu_seconds() - cpu:.1f}s);"
        f" work dir {run.work_dir}"
    )
    return ran
