"""The kernel steps of utils.kaggle.run: push what is stale (GPU kernels at most --gpu-sessions
at once), wait with back-off, collect the outputs, continue a kernel its time budget stopped,
push once more after a mount race; the quota check and the probe report before them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from utils.cli import format_duration
from utils.kaggle import build as kb, limits as kl, pins as pins_mod, probe, quota, smoke
from utils.kaggle.client import COMPLETE, KaggleClient, RunStopped
from utils.kaggle.state import LOG_TAIL_LINES, checksums, code_digest, log_tail
from utils.kaggle.steps import (
    DATASET_STEP,
    FAILED,
    IMAGE_KERNELS,
    MAX_FAILED_CHECKS,
    PARTIAL,
    POLL_FIRST_S,
    POLL_MAX_S,
    PROBE_KERNELS,
    PRODUCES,
    Options,
    Queued,
    Step,
    push_reason,
)
from utils.layout import ABLATION_TABLE_FILE, PROGRESS_FILE


class KernelSteps:
    """The Runner's kernel steps (a mixin: utils.kaggle.runner.Runner holds
    the attributes below and provides say() and save())."""

    opts: Options
    plan: bool
    state: dict[str, Any]
    client: KaggleClient
    build_dir: Path
    gpu: dict[str, bool]
    pushed_at: dict[str, float]
    failed_checks: int
    sleep: Callable[[float], None]
    clock: Callable[[], float]

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

    def push(self, step: Step, item: Queued) -> dict[str, Any]:
        """Push one kernel; its new state record (with the recipe it runs, if it takes one)."""
        version = self.client.push_kernel(item.folder)
        inputs = ", ".join(f"{slug} v{v}" for slug, v in item.against.items()) or "no datasets"
        self.say(step.name, f"push {item.ref} -> v{version} ({item.why}; against {inputs})")
        record = {
            "ref": item.ref,
            "version": version,
            "against": item.against,
            "status": "pushed",
            "folder": str(item.folder),
            "code_sha256": item.notebook,
        }
        if "recipe" in kb.KAGGLE_PARAMETERS.get(item.kernel, {}):
            record["recipe"] = self.opts.recipe
        if item.mount_retry:
            record["mount_retry"] = True
        self.state["kernels"][item.kernel] = record
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
            self.say(
                "probe",
                "  GPU smoke in 00_probe_gpu: every image model on one GPU, then DDP on every GPU, "
                "then its training input and the submission's image pass on 4,000 real crops; "
                "a failure refuses the image step, its rates replace the FLOP projection",
            )
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
            if notes and found.get("image") == pins_mod.WRITTEN_IMAGE:
                self.say("probe", f"  to pin what it has: python -m utils.kaggle.pins {path}")
            for line in notes:
                self.say("probe", f"  differs: {line}")
            if not notes and not blocking:
                self.say("probe", f"  {kernel}: as requirements-kaggle.txt pins")
        self.save()
        if blocking_all:
            raise RunStopped(
                "the kernels would stop in their first cell: " + "; ".join(blocking_all)
            )

    def report_ablation(self) -> None:
        """Print the downloaded ablation table (utils.tabular.ablation_stage's ablation.json),
        row by row, and the kept set, which the state keeps with the kernel version."""
        if self.plan:
            self.say("ablation", "  then print its table and the kept set from ablation.json")
            return
        kernel = kb.ABLATION_KERNEL
        path = self.opts.work_dir / "outputs" / kernel / PRODUCES[kernel]
        table = json.loads(path.read_text(encoding="utf-8"))
        for row in table["rows"]:
            gain = f"  gain {_cell(row['gain_mean'], '+')} ± {_cell(row['gain_std'])}"
            gain = "" if row["row"] == "paper" else gain
            self.say(
                "ablation",
                f"  {row['row']:<44} pAUC {row['pauc_mean']:.4f}{gain}  {row['verdict']}",
            )
        kept = list(table["kept"])
        where = path.with_name(ABLATION_TABLE_FILE)
        self.say("ablation", f"  kept: {', '.join(kept) or 'none'} (table: {where})")
        self.state["ablation"] = {"kept": kept, "version": self.state["kernels"][kernel]["version"]}
        self.save()

    def push_queued(
        self, step: Step, pending: dict[str, dict[str, Any]], queued: list[Queued]
    ) -> None:
        """Push queued kernels in order while a GPU session is free; a cap refusal is a wait."""
        while queued:
            item = queued[0]
            busy = sum(self.gpu.get(kernel, False) for kernel in pending)  # GPU sessions held
            if self.gpu[item.kernel] and busy >= self.opts.gpu_sessions:
                return
            try:
                record = self.push(step, item)
            except kl.SessionCapReached as err:
                self.say(step.name, f"  {item.kernel}: Kaggle's GPU session cap ({err}); waiting")
                return
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
            record = self.push(step, item)
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
        mount_race = kl.MOUNT_RACE.search(f"{message}\n{log_tail(log)}")
        if mount_race and not record.get("mount_retry"):
            self.say(step.name, f"  {kernel}: an input was not mounted yet; pushing it once more")
            folder = Path(record.get("folder", self.build_dir / kernel))  # a continuation's own
            notebook = record.get("code_sha256", "")
            why = f"an input was not mounted in v{record['version']}"
            retry = Queued(kernel, folder, record["ref"], record["against"], why, notebook, True)
            queued.insert(0, retry)
            return
        why = f": {message}" if message else ""
        raise RunStopped(
            f"{kernel} ({record['ref']} v{record['version']}) ended with status "
            f"{record['status']}{why}\n{self.tail_text(record)}\n"
            "(resuming pushes it again and waits for the kernels still running)"
        )

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

    def tail_text(self, record: dict[str, Any]) -> str:
        """The last lines of a kernel version's log, framed."""
        tail = log_tail(self.client.kernel_log(record["ref"], record["version"]))
        head = f"--- last {LOG_TAIL_LINES} log lines of {record['ref']} v{record['version']} ---"
        return f"{head}\n{tail or '(empty log)'}\n---"

    def collect(self, step: Step, kernel: str, record: dict[str, Any]) -> None:
        """Download a completed kernel's output; record the checksums of what it produced."""
        dest = kb.fresh_dir(self.opts.work_dir / "outputs" / kernel)
        name = PRODUCES[kernel]
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
            kb.KERNELS_DIR / kernel,
            self.build_dir / "continue",
            self.opts.owner,
            params,
            repo_ids=repo_ids,
            kernel_sources=own,
        )
        notebook = code_digest(folder / f"{kernel}.ipynb")
        done = record["progress"]["finished"]
        why = f"continue folds {remaining} of v{record['version']} (folds {done} finished)"
        self.say(step.name, f"  {kernel}: v{record['version']} ran out of its time budget; {why}")
        return Queued(kernel, folder, record["ref"], record["against"], why, notebook)


def _cell(value: float | None, sign: str = "") -> str:
    """A number of the ablation table, 4 decimals (`sign` "+": always signed); n/a for none
    (one seed has no spread)."""
    return "n/a" if value is None else f"{value:{sign}.4f}"
