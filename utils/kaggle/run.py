"""The whole Kaggle workflow in one resumable command: build, push, wait, collect, publish, submit.

    python -m utils.kaggle.run [--owner NAME] [--work-dir work/kaggle] [--weights weights/]
                               [--tune] [--submit] [--from STEP | --only STEP] [--dry-run]

Steps, in order (see docs/kaggle_run.md, which also lists each Kaggle limit and its handling):
    probe          push the CPU and GPU probe kernels (and the GPU smoke), compare with the pins
    weights        create the weights dataset if it is missing (upload --weights)
    images         check the projected GPU-hours, push the four image kernels (at most
                   --gpu-sessions at once), wait, download, continue those out of time
    image-dataset  create or version the image-model dataset from those outputs
    tune           (--tune) push 02_tune_gbdt, wait, download
    tune-dataset   (--tune) create or version the tuning dataset
    gbdt           push 03_gbdt, wait, download
    gbdt-dataset   create or version the GBDT model dataset
    submission     push the submission kernel, wait for its run on the public test
    submit         print the submit command (with --submit: submit that kernel version and
                   follow it until Kaggle has scored it)

A JSON state file in the work dir records every pushed kernel version, the dataset versions it
was pushed against, its output checksums and every dataset version, so a rerun skips what is
done, waits for kernels still running, and re-pushes exactly the kernels that failed or whose
input datasets have a newer version than the one they ran against.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.cli import format_duration
from utils.kaggle import build as kb, limits as kl, probe, quota, smoke, submission as sub
from utils.kaggle.client import COMPLETE, KaggleApiClient, KaggleClient, PlanClient, RunStopped
from utils.kaggle.state import (
    LOG_TAIL_LINES,
    checksums,
    code_digest,
    digest_of,
    load_state,
    log_tail,
    save_state,
    utc_now,
)
from utils.layout import PROGRESS_FILE, SUBMISSION_FILE

DEFAULT_WORK_DIR = Path("work") / "kaggle"
DEFAULT_WEIGHTS_DIR = Path("weights")
STATE_FILE = "state.json"
# Kaggle stops a session after 12 h; a queued GPU kernel can wait a while before it starts.
DEFAULT_TIMEOUT_H = 14.0
# Back-off between status checks: a training kernel runs for hours, so 30 s doubling to 10 min
# keeps one run under ~100 status calls per kernel while noticing a quick failure at once.
POLL_FIRST_S = 30.0
POLL_MAX_S = 600.0
# A dropped connection during an hours-long wait is no reason to stop: retry, unless it repeats
# this many times in a row (over half an hour at the back-off cap).
MAX_FAILED_CHECKS = 5
# An image kernel that completed with folds left by its time budget (utils.image.train).
PARTIAL = "partial"
FAILED = frozenset({"error", "cancel_requested", "cancel_acknowledged"})

IMAGE_KERNELS = tuple(f"01_image_{model}" for model in kb.DATASET_CONTENTS[kb.IMAGE_DATASET])
TUNE_KERNEL = "02_tune_gbdt"
GBDT_KERNEL = kb.TUNED_GBDT[0]
# What each kernel writes under /kaggle/working that the next step needs.
PROBE_KERNELS = kb.PROBE_KERNELS
PRODUCES: dict[str, str] = {
    **{kernel: f"probe-{kernel.rsplit('_', 1)[1]}.json" for kernel in PROBE_KERNELS},
    **{f"01_image_{model}": model for model in kb.DATASET_CONTENTS[kb.IMAGE_DATASET]},
    TUNE_KERNEL: "tuning",
    GBDT_KERNEL: "gbdt",
    kb.SUBMISSION_KERNEL: SUBMISSION_FILE,
}
PRODUCER = {name: kernel for kernel, name in PRODUCES.items()}


@dataclass(frozen=True)
class Step:
    """One resumable step: the kernels it pushes and awaits, or the dataset it publishes."""

    name: str
    kernels: tuple[str, ...] = ()
    dataset: str | None = None
    optional: bool = False


STEPS = (
    Step("probe", kernels=PROBE_KERNELS),
    Step("weights", dataset=kb.WEIGHTS_DATASET),
    Step("images", kernels=IMAGE_KERNELS),
    Step("image-dataset", dataset=kb.IMAGE_DATASET),
    Step("tune", kernels=(TUNE_KERNEL,), optional=True),
    Step("tune-dataset", dataset=kb.TUNING_DATASET, optional=True),
    Step("gbdt", kernels=(GBDT_KERNEL,)),
    Step("gbdt-dataset", dataset=kb.GBDT_DATASET),
    Step("submission", kernels=(kb.SUBMISSION_KERNEL,)),
    Step("submit"),
)
STEP_NAMES = tuple(step.name for step in STEPS)
DATASET_STEP = {step.dataset: step.name for step in STEPS if step.dataset}
KERNEL_STEP = {kernel: step.name for step in STEPS for kernel in step.kernels}


@dataclass(frozen=True)
class Queued:
    """A kernel to push once a GPU session is free."""

    kernel: str
    folder: Path
    ref: str
    against: dict[str, int]
    why: str
    notebook: str
    mount_retry: bool = False


# ---------------------------------------------------------------- the run


@dataclass
class Options:
    """What one invocation asks for."""

    owner: str
    work_dir: Path = DEFAULT_WORK_DIR
    weights_dir: Path = DEFAULT_WEIGHTS_DIR
    build_dir: Path = kb.DEFAULT_BUILD_DIR
    tune: bool = False
    recipe: str = "paper"
    submit: bool = False
    start: str | None = None
    only: str | None = None
    timeout_h: float = DEFAULT_TIMEOUT_H
    message: str = "FusionNetX"
    gpu_sessions: int = kl.DEFAULT_GPU_SESSIONS
    gpu_hours: float = kl.DEFAULT_GPU_HOURS
    resume_args: list[str] = field(default_factory=list)

    def resume_command(self) -> str:
        """The command that continues this run."""
        return shlex.join(["python", "-m", "utils.kaggle.run", *self.resume_args])


class Runner:
    """Walks STEPS against a client, recording every finished action in the state file."""

    def __init__(
        self,
        client: KaggleClient | None,
        opts: Options,
        plan: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        self.opts, self.plan, self.sleep, self.clock, self.out = opts, plan, sleep, clock, say
        self.failed_checks = 0
        self.gpu: dict[str, bool] = {}  # kernel -> runs on the GPU image
        self.pushed_at: dict[str, float] = {}  # kernel -> clock() at its push in this run
        self.state_path = opts.work_dir / STATE_FILE
        state = load_state(self.state_path, opts.owner)
        self.state = copy.deepcopy(state) if plan else state
        self.client: KaggleClient = PlanClient(self.state) if plan else client  # type: ignore[assignment]

    # ------------------------------------------------------------ driving

    def selected(self) -> list[tuple[Step, bool]]:
        """(step, forced) in order: --only runs one step, --from forces it and every later one."""
        steps = [s for s in STEPS if self.opts.tune or not s.optional]
        names = [s.name for s in steps]
        for wanted in (self.opts.only, self.opts.start):
            if wanted and wanted not in names:
                raise RunStopped(f"step {wanted!r} is not part of this run (tuning needs --tune)")
        if self.opts.only:
            return [(s, True) for s in steps if s.name == self.opts.only]
        first = names.index(self.opts.start) if self.opts.start else len(names)
        return [(s, i >= first) for i, s in enumerate(steps) if not self.opts.start or i >= first]

    def run(self) -> None:
        """Build, then every selected step; RunStopped says where and how to resume."""
        if self.plan:
            self.say("plan", f"owner {self.opts.owner}, no network; versions are predicted")
        with tempfile.TemporaryDirectory() as scratch:
            self.build_dir = Path(scratch) / "kernels" if self.plan else self.opts.build_dir
            self.build()
            for step, forced in self.selected():
                try:
                    self.run_step(step, forced)
                except RunStopped as err:
                    raise RunStopped(self._stop_text(step, str(err))) from err
                except (OSError, ValueError) as err:
                    text = f"{type(err).__name__}: {err}"
                    raise RunStopped(self._stop_text(step, text)) from err
        self.say("done", "every step finished" if not self.plan else "end of plan")

    def _stop_text(self, step: Step, why: str) -> str:
        """What the user reads when a step stops the run."""
        return (
            f"STOPPED at step {step.name!r}: {why}\n"
            f"Nothing after it was pushed. Fix the cause, then resume with:\n"
            f"  {self.opts.resume_command()}"
        )

    def run_step(self, step: Step, forced: bool) -> None:
        """One step; marks it finished in the state."""
        if step.name == "images":
            self.check_quota(forced)
        if step.kernels:
            self.kernel_step(step, forced)
            if step.name == "probe":
                self.report_probes()
        elif step.dataset:
            self.dataset_step(step, forced)
        elif not self.submit_step(forced):
            return
        self.state["steps"][step.name] = {"finished": utc_now()}
        self.save()

    def build(self) -> None:
        """Validate the committed metadata and build every kernel for this owner."""
        problems = kb.validate()
        if problems:
            raise RunStopped("validate failed:\n" + "\n".join(problems))
        built = kb.build_all(
            self.build_dir, self.opts.owner, tuned=self.opts.tune, recipe=self.opts.recipe
        )
        where = "a scratch folder" if self.plan else str(self.build_dir)
        self.say(
            "build",
            f"validated and built {len(built)} kernels into {where} "
            f"(recipe {self.opts.recipe} in the tuning and GBDT kernels)",
        )

    def save(self) -> None:
        """Persist the state (never in a plan)."""
        if not self.plan:
            save_state(self.state_path, self.state)

    def say(self, step: str, text: str) -> None:
        """One line per action."""
        self.out(f"{step:<14}{text}")

    # ------------------------------------------------------------ kernels

    def kernel_step(self, step: Step, forced: bool) -> None:
        """Push what is stale (GPU kernels at most --gpu-sessions at once, the rest queued),
        wait for what is running, collect what completed."""
        pending: dict[str, dict[str, Any]] = {}
        queued: list[Queued] = []
        for kernel in step.kernels:
            folder = self.build_dir / kernel
            meta = kb.read_json(folder / kb.KERNEL_METADATA)
            against = self.inputs_of(kernel, meta)
            record = self.state["kernels"].get(kernel)
            reason = push_reason(record, meta["id"], against, forced) or self.recipe_change(
                kernel, record
            )
            notebook = code_digest(folder / meta["code_file"])
            self.gpu[kernel] = bool(meta.get("enable_gpu"))
            if reason is None and record["status"] == COMPLETE and "outputs" in record:
                self.say(step.name, f"{kernel}: v{record['version']} complete, inputs unchanged")
                if record.get("code_sha256") != notebook:
                    self.say(step.name, f"  note: its code changed; --from {step.name} re-pushes")
                continue
            if reason is None and record["status"] == PARTIAL:
                queued.append(self.continuation(step, kernel, record))
            elif reason is None:
                self.say(step.name, f"{kernel}: v{record['version']} {record['status']}, waiting")
                pending[kernel] = record
            else:
                queued.append(Queued(kernel, folder, meta["id"], against, reason, notebook))
        if pending or queued:
            self.wait_kernels(step, pending, queued)

    def recipe_change(self, kernel: str, record: dict[str, Any] | None) -> str | None:
        """Why a kernel that takes the recipe must run again under this run's recipe (a state
        from before recipes were recorded ran `paper`, the only one built then)."""
        if record is None or "recipe" not in kb.KAGGLE_PARAMETERS.get(kernel, {}):
            return None
        ran = record.get("recipe", "paper")
        return None if ran == self.opts.recipe else f"recipe {ran} -> {self.opts.recipe}"

    def inputs_of(self, kernel: str, meta: dict[str, Any]) -> dict[str, int]:
        """Dataset slug -> the recorded version a push of this kernel would run against."""
        against = {}
        for ref in meta.get("dataset_sources", []):
            slug = kb.split_ref(ref)[1]
            record = self.state["datasets"].get(slug)
            if record is None:
                raise RunStopped(
                    f"{kernel} reads dataset {ref} which this run has not published yet: "
                    f"run step {DATASET_STEP.get(slug, '?')!r} first"
                )
            against[slug] = record["version"]
        return against

    def push(
        self, step: Step, kernel: str, folder: Path, ref: str, against: dict[str, int], why: str
    ) -> dict[str, Any]:
        """Push one kernel; its new state record."""
        version = self.client.push_kernel(folder)
        inputs = ", ".join(f"{slug} v{v}" for slug, v in against.items()) or "no datasets"
        self.say(step.name, f"push {ref} -> v{version} ({why}; against {inputs})")
        record = {
            "ref": ref,
            "version": version,
            "against": against,
            "status": "pushed",
            "folder": str(folder),
        }
        self.state["kernels"][kernel] = record
        return record

    def check_quota(self, forced: bool) -> None:
        """Print the projected GPU-hours of the image kernels still to run and the submission;
        stop before pushing any when they may exceed what --gpu-hours leaves."""
        todo = [
            kernel
            for kernel in IMAGE_KERNELS
            if forced or self.state["kernels"].get(kernel, {}).get("status") != COMPLETE
        ]
        lines, refusal = quota.quota_lines(
            [*todo, kb.SUBMISSION_KERNEL], self.state, self.opts.gpu_hours
        )
        for line in lines:
            self.say("images", line)
        if refusal:
            raise RunStopped(refusal)
        failed = smoke.smoke_failures(self.state.get("smoke"))
        if failed and todo:
            raise RunStopped(
                "the GPU smoke test in 00_probe_gpu failed, so the image kernels would too: "
                + "; ".join(failed)
                + f" (tracebacks in {self.opts.work_dir / 'outputs' / '00_probe_gpu'}); once "
                "fixed, rerun the probes with --only probe"
            )

    def report_probes(self) -> None:
        """Keep the probes' findings in the state and print each difference from
        requirements-kaggle.txt; stop on a library the kernels would stop on anyway."""
        if self.plan:
            self.say("probe", "  compare both images with requirements-kaggle.txt (printed here)")
            return
        pins = probe.requirement_pins((kb.REPO_ROOT / "requirements-kaggle.txt").read_text())
        blocking_all = []
        for kernel in PROBE_KERNELS:
            path = self.opts.work_dir / "outputs" / kernel / PRODUCES[kernel]
            found = json.loads(path.read_text(encoding="utf-8"))
            self.state.setdefault("probes", {})[found.get("image", kernel)] = found
            measured = path.parent / smoke.SMOKE_FILE
            if measured.is_file():
                self.state["smoke"] = json.loads(measured.read_text(encoding="utf-8"))
                self.say("probe", f"  GPU smoke: {smoke.smoke_summary(self.state['smoke'])}")
            blocking, notes = probe.differences(found, pins)
            blocking_all += blocking
            for line in notes:
                self.say("probe", f"  differs: {line}")
            if not notes and not blocking:
                self.say("probe", f"  {kernel}: as requirements-kaggle.txt pins")
        self.save()
        if blocking_all:
            raise RunStopped(
                "the kernels would stop in their first cell: " + "; ".join(blocking_all)
            )

    def gpu_busy(self, pending: dict[str, dict[str, Any]]) -> int:
        """GPU sessions this run holds: its GPU kernels pushed and not ended."""
        return sum(self.gpu.get(kernel, False) for kernel in pending)

    def push_queued(
        self, step: Step, pending: dict[str, dict[str, Any]], queued: list[Queued]
    ) -> None:
        """Push queued kernels in order while a GPU session is free; a cap refusal is a wait."""
        while queued:
            item = queued[0]
            if self.gpu[item.kernel] and self.gpu_busy(pending) >= self.opts.gpu_sessions:
                return
            try:
                record = self.push(step, item.kernel, item.folder, item.ref, item.against, item.why)
            except kl.SessionCapReached as err:
                self.say(step.name, f"  {item.kernel}: Kaggle's GPU session cap ({err}); waiting")
                return
            record["code_sha256"] = item.notebook
            if "recipe" in kb.KAGGLE_PARAMETERS.get(item.kernel, {}):
                record["recipe"] = self.opts.recipe
            if item.mount_retry:
                record["mount_retry"] = True
            self.save()
            self.pushed_at[item.kernel] = self.clock()
            pending[item.kernel] = record
            queued.pop(0)

    def wait_kernels(
        self, step: Step, pending: dict[str, dict[str, Any]], queued: list[Queued]
    ) -> None:
        """Poll with back-off until each completes (collect it) or one fails or times out."""
        if self.plan:
            self.plan_kernels(step, pending, queued)
            return
        start, delay = self.clock(), POLL_FIRST_S
        while True:
            self.push_queued(step, pending, queued)
            elapsed = format_duration(self.clock() - start)
            for kernel, record in list(pending.items()):
                answer = self.check(step, kernel, record)
                if answer is None:
                    continue
                status, message = answer
                self.say(step.name, f"  {kernel} v{record['version']}: {status} after {elapsed}")
                record["status"] = status
                if status == COMPLETE or status in FAILED:
                    self.account_gpu(kernel)
                self.save()
                if status == COMPLETE:
                    self.collect(step, kernel, record)
                    del pending[kernel]
                    if record["status"] == PARTIAL:
                        queued.insert(0, self.continuation(step, kernel, record))
                elif status in FAILED:
                    del pending[kernel]
                    self.after_failure(step, kernel, record, message, queued)
            if not pending and not queued:
                return
            if self.clock() - start >= self.opts.timeout_h * 3600:
                self.timed_out(pending, queued)
            if pending:
                self.sleep(delay)
                delay = min(2 * delay, POLL_MAX_S)

    def plan_kernels(
        self, step: Step, pending: dict[str, dict[str, Any]], queued: list[Queued]
    ) -> None:
        """The plan: what is pushed at once, what waits for a GPU session, then the download."""
        for kernel, record in pending.items():
            self.say(step.name, f"  wait for {kernel} v{record['version']}, then download")
            record.update(status=COMPLETE, outputs={"planned": record["version"]})
        running: list[str] = []
        for item in queued:
            if self.gpu[item.kernel] and len(running) >= self.opts.gpu_sessions:
                ends = running.pop(0)
                self.say(
                    step.name,
                    f"queue {item.kernel}: {self.opts.gpu_sessions} GPU sessions busy "
                    f"(--gpu-sessions), pushed when {ends} ends",
                )
            record = self.push(step, item.kernel, item.folder, item.ref, item.against, item.why)
            running += [item.kernel] if self.gpu[item.kernel] else []
            record.update(status=COMPLETE, outputs={"planned": record["version"]})
        if queued:
            names = ", ".join(item.kernel for item in queued)
            self.say(step.name, f"  wait for {names}; download each as it completes")

    def timed_out(self, pending: dict[str, dict[str, Any]], queued: list[Queued]) -> None:
        """Stop after --timeout-h: name what is still running and what never got a session."""
        names = ", ".join(f"{k} v{r['version']} ({r['status']})" for k, r in pending.items())
        names += "".join(f", {q.kernel} (queued, not pushed)" for q in queued)
        raise RunStopped(
            f"timed out after {self.opts.timeout_h:g} h waiting for {names.lstrip(', ')}; "
            "they may still be running on Kaggle: resuming waits for them again"
            + "".join(f"\n{self.tail_text(r)}" for r in pending.values())
        )

    def after_failure(
        self,
        step: Step,
        kernel: str,
        record: dict[str, Any],
        message: str,
        queued: list[Queued],
    ) -> None:
        """A failed kernel: pushed again once when an input was not mounted yet, else stop."""
        log = self.client.kernel_log(record["ref"], record["version"])
        if kl.is_mount_race(f"{message}\n{log_tail(log)}") and not record.get("mount_retry"):
            self.say(step.name, f"  {kernel}: an input was not mounted yet; pushing it once more")
            folder = Path(record.get("folder", self.build_dir / kernel))  # a continuation's own
            notebook = record.get("code_sha256", "")
            why = f"an input was not mounted in v{record['version']}"
            retry = Queued(kernel, folder, record["ref"], record["against"], why, notebook, True)
            queued.insert(0, retry)
            return
        raise RunStopped(self.failure_text(kernel, record, message))

    def account_gpu(self, kernel: str) -> None:
        """Add a GPU kernel's session time (push to end, as seen from here) to the state."""
        if not self.gpu.get(kernel) or kernel not in self.pushed_at:
            return
        spent = self.state.setdefault("gpu_seconds", {})
        spent[kernel] = spent.get(kernel, 0.0) + self.clock() - self.pushed_at.pop(kernel)

    def check(self, step: Step, kernel: str, record: dict[str, Any]) -> tuple[str, str] | None:
        """kernel_status, or None after a network error (raised once it keeps happening) or a
        403 (a version Kaggle does not show yet: pending)."""
        try:
            answer = self.client.kernel_status(record["ref"], record["version"])
        except OSError as err:
            if kl.http_status(err) == 403:
                self.say(step.name, f"  {kernel} v{record['version']}: not visible yet (403)")
                return None
            self.failed_checks += 1
            if self.failed_checks >= MAX_FAILED_CHECKS:
                raise
            self.say(step.name, f"  {kernel} v{record['version']}: status check failed ({err})")
            return None
        self.failed_checks = 0
        return answer

    def failure_text(self, kernel: str, record: dict[str, Any], message: str) -> str:
        """Status, Kaggle's failure message and the log tail of a failed kernel."""
        why = f": {message}" if message else ""
        return (
            f"{kernel} ({record['ref']} v{record['version']}) ended with status "
            f"{record['status']}{why}\n{self.tail_text(record)}\n"
            "(resuming pushes it again and waits for the kernels still running)"
        )

    def tail_text(self, record: dict[str, Any]) -> str:
        """The last lines of a kernel version's log, framed."""
        tail = log_tail(self.client.kernel_log(record["ref"], record["version"]))
        head = f"--- last {LOG_TAIL_LINES} log lines of {record['ref']} v{record['version']} ---"
        return f"{head}\n{tail or '(empty log)'}\n---"

    def collect(self, step: Step, kernel: str, record: dict[str, Any]) -> None:
        """Download a completed kernel's output; record the checksums of what it produced."""
        dest = self.opts.work_dir / "outputs" / kernel
        name = PRODUCES[kernel]
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        self.client.kernel_output(record["ref"], record["version"], dest)
        if not (dest / name).exists():
            found = sorted(p.name for p in dest.iterdir())
            raise RunStopped(f"{kernel} completed but its output has no {name!r} (got {found})")
        record["outputs"] = checksums(dest, name)
        progress = dest / name / PROGRESS_FILE
        if progress.is_file():  # the session's time budget left folds for the next one
            record.update(status=PARTIAL, progress=json.loads(progress.read_text()))
        self.save()
        count = len(record["outputs"])
        self.say(step.name, f"  downloaded {name} ({count} file{'s' * (count != 1)}) to {dest}")

    def continuation(self, step: Step, kernel: str, record: dict[str, Any]) -> Queued:
        """The next session of an image kernel whose time budget left folds: built to train
        only those, resuming from its own last output (a kernel source), never the same code."""
        remaining = record["progress"]["remaining"]
        params, own = kb.image_kernel_parameters(
            kb.KERNELS_DIR / kernel, kb.KAGGLE_PARAMETERS[kernel], remaining, continue_run=True
        )
        repo_ids = frozenset(kb.defined_datasets().values())
        folder = kb.build_kernel(
            kb.KERNELS_DIR / kernel, self.build_dir / "continue", self.opts.owner, params,
            repo_ids=repo_ids, kernel_sources=own,
        )  # fmt: skip
        notebook = code_digest(folder / f"{kernel}.ipynb")
        done = record["progress"]["finished"]
        why = f"continue folds {remaining} of v{record['version']} (folds {done} finished)"
        self.say(step.name, f"  {kernel}: v{record['version']} ran out of its time budget; {why}")
        return Queued(kernel, folder, record["ref"], record["against"], why, notebook)

    # ------------------------------------------------------------ datasets

    def dataset_step(self, step: Step, forced: bool) -> None:
        """Create the dataset, or version it when its content changed; wait until it is ready.
        An upload this run made and never saw ready (Kaggle answers 403 while it processes) is
        waited for, not uploaded again."""
        slug = step.dataset
        ref = f"{self.opts.owner}/{slug}"
        record = self.state["datasets"].get(slug)
        content = self.dataset_content(slug)
        uploads = self.state.setdefault("uploads", {})
        upload = uploads.get(slug)
        current = self.client.dataset_version(ref)
        if upload and upload["digest"] == digest_of(content) and not forced:
            self.say(step.name, f"{ref}: the upload of {upload['at']} is still processing")
        elif slug == kb.WEIGHTS_DATASET and current is not None and not forced:
            if record is None or record["version"] != current:
                self.say(step.name, f"{ref} exists on Kaggle (v{current}): using it")
            else:
                self.say(step.name, f"{ref} v{current} is up to date")
            version = self.wait_dataset(step, ref)
            self.state["datasets"][slug] = {"ref": ref, "version": version, "digest": None}
            return
        elif record and current is not None and record["digest"] == digest_of(content):
            if not forced:
                if current != record["version"]:
                    self.say(
                        step.name, f"{ref}: v{record['version']} -> v{current} (changed on Kaggle)"
                    )
                    record["version"] = current
                self.say(step.name, f"{ref} v{current} is up to date")
                return
            self.upload(step, ref, slug, current, content)
        else:
            self.upload(step, ref, slug, current, content)
        version = self.wait_dataset(step, ref)
        self.state["datasets"][slug] = {
            "ref": ref,
            "version": version,
            "digest": digest_of(content),
        }
        uploads.pop(slug, None)
        self.save()
        self.say(step.name, f"{ref} v{version} ready")

    def upload(
        self, step: Step, ref: str, slug: str, current: int | None, content: dict[str, Any]
    ) -> None:
        """Create (no version yet) or version the dataset; record the upload before waiting."""
        folder = self.dataset_folder(slug)
        if current is None:
            self.client.create_dataset(folder)
            self.say(step.name, f"create {ref} from {folder}")
        else:
            self.client.version_dataset(folder, f"{self.opts.message}: new {slug} outputs")
            self.say(step.name, f"version {ref} (was v{current}) from {folder}")
        self.state.setdefault("uploads", {})[slug] = {"digest": digest_of(content), "at": utc_now()}
        self.save()

    def dataset_content(self, slug: str) -> dict[str, Any]:
        """What a dataset would hold: the output checksums of the kernels that produce it."""
        if slug == kb.WEIGHTS_DATASET:
            return {"weights": str(self.opts.weights_dir)}
        content = {}
        for name in kb.DATASET_CONTENTS[slug]:
            record = self.state["kernels"].get(PRODUCER[name])
            if record is None or record["status"] != COMPLETE or "outputs" not in record:
                step = KERNEL_STEP[PRODUCER[name]]
                raise RunStopped(f"{slug} needs {name} from {PRODUCER[name]}: run {step!r} first")
            content[name] = record["outputs"]
        return content

    def dataset_folder(self, slug: str) -> Path:
        """The upload folder (kaggle.build.build_dataset) from the collected outputs."""
        out = self.opts.work_dir / "datasets"
        if self.plan:
            if slug == kb.WEIGHTS_DATASET and not self.opts.weights_dir.is_dir():
                self.say("weights", f"  note: {self.opts.weights_dir} does not exist yet")
            return out / slug
        if slug == kb.WEIGHTS_DATASET:
            source = self.opts.weights_dir
            if not source.is_dir():
                raise RunStopped(
                    f"{kb.WEIGHTS_DATASET} is missing on Kaggle and {source} does not exist: run "
                    f"`python -m utils.kaggle.build weights --out {source}` first (needs internet)"
                )
        else:
            source = self.opts.work_dir / "staging" / slug
            if source.exists():
                shutil.rmtree(source)
            source.mkdir(parents=True)
            for name in kb.DATASET_CONTENTS[slug]:
                produced = self.opts.work_dir / "outputs" / PRODUCER[name] / name
                (source / name).symlink_to(produced.resolve(), produced.is_dir())
        return kb.build_dataset(slug, source, out, self.opts.owner)

    def wait_dataset(self, step: Step, ref: str) -> int:
        """Poll until Kaggle has processed the upload; its version number. A 403 means still
        processing; a dropped connection or a 5xx is asked again with back-off."""
        start, delay = self.clock(), POLL_FIRST_S
        while True:
            status = self.dataset_state(step, ref)
            version = self.dataset_version_now(step, ref) if status == "ready" else None
            if version is not None:
                return version
            self.say(step.name, f"  {ref}: {status} after {format_duration(self.clock() - start)}")
            if status in ("failed", "deleted"):
                self.state.get("uploads", {}).pop(kb.split_ref(ref)[1], None)
                self.save()  # the resume uploads it again
                raise RunStopped(f"Kaggle could not process {ref}: status {status}")
            if self.clock() - start >= self.opts.timeout_h * 3600:
                raise RunStopped(f"timed out waiting for {ref} to become ready ({status})")
            self.sleep(delay)
            delay = min(2 * delay, POLL_MAX_S)

    def dataset_state(self, step: Step, ref: str) -> str:
        """dataset_status, 'pending (403)' while Kaggle does not show it yet."""
        say = lambda text: self.say(step.name, text)  # noqa: E731
        try:
            return kl.retry_transient(
                lambda: self.client.dataset_status(ref), f"{ref} status", self.sleep, say
            )
        except OSError as err:
            if kl.http_status(err) == 403:
                return "pending (403)"
            raise

    def dataset_version_now(self, step: Step, ref: str) -> int | None:
        """The ready dataset's version (None while it still answers 403)."""
        say = lambda text: self.say(step.name, text)  # noqa: E731
        return kl.retry_transient(
            lambda: self.client.dataset_version(ref), f"{ref} version", self.sleep, say
        )

    # ------------------------------------------------------------ submit

    def submit_command(self, ref: str, version: int) -> str:
        """The kaggle CLI call that submits this kernel version."""
        return shlex.join(
            ["kaggle", "competitions", "submit", kb.COMPETITION, "-k", ref, "-v", str(version)]
            + ["-f", SUBMISSION_FILE, "-m", f"{self.opts.message} v{version}"]
        )

    def submit_step(self, forced: bool) -> bool:
        """Submit the completed submission kernel version (or print how); True when submitted."""
        record = self.state["kernels"].get(kb.SUBMISSION_KERNEL)
        if record is None or record["status"] != COMPLETE:
            raise RunStopped("the submission kernel has not completed: run 'submission' first")
        ref, version = record["ref"], record["version"]
        done = self.state.get("submitted")
        if done and done["ref"] == ref and done["version"] == version and not forced:
            self.say("submit", f"{ref} v{version} was already submitted ({done['reply']})")
            if done.get("status", sub.PENDING) == sub.PENDING:
                self.follow(done)
            else:
                self.say("submit", f"  {sub.outcome(done)}")
            return True
        if not self.opts.submit:
            self.say("submit", f"to submit, run: {self.submit_command(ref, version)}")
            self.say(
                "submit",
                "(or rerun with --submit: it then polls the submission until Kaggle scores it "
                "and prints the public score or the error)",
            )
            return False
        message = f"{self.opts.message} v{version}"
        reply = self.client.submit(kb.COMPETITION, ref, version, SUBMISSION_FILE, message)
        done = {"ref": ref, "version": version, "reply": reply, "at": utc_now(), "message": message}
        self.state["submitted"] = done
        self.save()
        verb = "would submit" if self.plan else "submitted"
        self.say("submit", f"{verb} {ref} v{version} to {kb.COMPETITION}: {reply}")
        self.follow(done)
        return True

    def follow(self, done: dict[str, Any]) -> None:
        """Poll the submission until it is scored or failed; record and print the outcome."""
        if self.plan:
            self.say("submit", "  then poll it until scored; print the public score or the error")
            return
        description = done.get("message", f"{self.opts.message} v{done['version']}")
        try:
            found = sub.follow_submission(
                lambda: self.client.latest_submission(kb.COMPETITION),
                description,
                self.sleep,
                self.clock,
                lambda text: self.say("submit", text),
                self.opts.timeout_h * 3600,
            )
        except sub.SubmissionNotFound as err:
            self.say("submit", f"  cannot follow the submission: {err}")
            return
        done.update({k: found.get(k) for k in ("status", "public_score", "error")})
        done["submission_ref"] = found.get("ref")
        self.save()
        self.say("submit", f"  {sub.outcome(found)}")
        if found["status"] == sub.FAILED:
            raise RunStopped(f"Kaggle could not score the submission: {found.get('error')}")


def push_reason(
    record: dict[str, Any] | None, ref: str, against: dict[str, int], forced: bool
) -> str | None:
    """Why a kernel must be pushed now, or None when its recorded version still stands."""
    if record is None:
        return "never pushed"
    if forced:
        return "forced by --from/--only"
    if record["ref"] != ref:
        return f"id changed from {record['ref']}"
    if record["against"] != against:
        old = record["against"]
        changed = [
            f"{slug} v{old.get(slug, '-')} -> v{against.get(slug, '-')}"
            for slug in sorted(set(old) | set(against))
            if old.get(slug) != against.get(slug)
        ]
        return "new input " + ", ".join(changed)
    if record["status"] in FAILED:
        return f"v{record['version']} ended {record['status']}"
    return None


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.kaggle.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--owner", help="Kaggle user name (default: the kaggle client's)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="state + outputs")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR, help="local .pth dir")
    parser.add_argument("--tune", action="store_true", help="run 02_tune_gbdt; 03 reads its params")
    parser.add_argument(
        "--recipe",
        choices=kb.RECIPES,
        default="paper",
        help="recipe of the tuning and GBDT kernels (the image kernels take none): after a run "
        "with another recipe, they and what reads them are pushed again, the image kernels not",
    )
    parser.add_argument("--submit", action="store_true", help="submit (default: print the call)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--from", dest="start", choices=STEP_NAMES, help="redo this step and on")
    group.add_argument("--only", choices=STEP_NAMES, help="redo just this step")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; no network")
    parser.add_argument("--timeout-h", type=float, default=DEFAULT_TIMEOUT_H, help="per kernel")
    parser.add_argument("--message", default="FusionNetX", help="submission / version note")
    parser.add_argument(
        "--gpu-sessions",
        type=int,
        default=kl.DEFAULT_GPU_SESSIONS,
        help="GPU kernels running at once (Kaggle's per-account cap); the rest are queued",
    )
    parser.add_argument(
        "--gpu-hours",
        type=float,
        default=kl.DEFAULT_GPU_HOURS,
        help="refuse the image step when its projected GPU-hours exceed this (weekly quota)",
    )
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    """Options, with the command line that resumes this run (no --from/--only/--dry-run)."""
    owner = kb.resolve_owner(args.owner)
    resume = ["--owner", owner]
    if args.work_dir != DEFAULT_WORK_DIR:
        resume += ["--work-dir", str(args.work_dir)]
    if args.weights != DEFAULT_WEIGHTS_DIR:
        resume += ["--weights", str(args.weights)]
    if args.timeout_h != DEFAULT_TIMEOUT_H:
        resume += ["--timeout-h", f"{args.timeout_h:g}"]
    if args.message != "FusionNetX":
        resume += ["--message", args.message]
    if args.recipe != "paper":
        resume += ["--recipe", args.recipe]
    if args.gpu_sessions != kl.DEFAULT_GPU_SESSIONS:
        resume += ["--gpu-sessions", str(args.gpu_sessions)]
    if args.gpu_hours != kl.DEFAULT_GPU_HOURS:
        resume += ["--gpu-hours", f"{args.gpu_hours:g}"]
    resume += [flag for flag, on in (("--tune", args.tune), ("--submit", args.submit)) if on]
    return Options(
        owner=owner,
        work_dir=args.work_dir,
        weights_dir=args.weights,
        tune=args.tune,
        recipe=args.recipe,
        submit=args.submit,
        start=args.start,
        only=args.only,
        timeout_h=args.timeout_h,
        message=args.message,
        gpu_sessions=args.gpu_sessions,
        gpu_hours=args.gpu_hours,
        resume_args=resume,
    )


def main(argv: list[str] | None = None, client: KaggleClient | None = None) -> int:
    """Command-line entry point; 1 when the run stopped (the message says how to resume)."""
    args = parse_args(argv)
    opts = None
    try:
        opts = options_from(args)
        if not args.dry_run and client is None:
            kl.check_client_version()
            client = KaggleApiClient()
        Runner(client, opts, plan=args.dry_run).run()
    except (RunStopped, kb.KaggleBuildError, kl.ClientVersionError) as err:
        print(err, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        resume = f"; resume with:\n  {opts.resume_command()}" if opts else ""
        print(f"\ninterrupted: the state file keeps every finished action{resume}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
