"""utils.kaggle.run's Runner: walks the steps against a client, building first, recording every
finished action in the state file; the submit step and the following of a submission's scoring."""

from __future__ import annotations

import copy
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from utils.kaggle import build as kb, submission as sub
from utils.kaggle.client import COMPLETE, KaggleClient, PlanClient, RunStopped
from utils.kaggle.dataset_steps import DatasetSteps
from utils.kaggle.kernel_steps import KernelSteps
from utils.kaggle.state import load_state, save_state, utc_now
from utils.kaggle.steps import STATE_FILE, STEPS, Options, Step
from utils.layout import SUBMISSION_FILE


class Runner(KernelSteps, DatasetSteps):
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
        steps = [s for s in STEPS if s.option is None or getattr(self.opts, s.option)]
        names = [s.name for s in steps]
        for wanted in (self.opts.only, self.opts.start):
            if wanted and wanted not in names:
                raise RunStopped(
                    f"step {wanted!r} is not part of this run "
                    "(tuning needs --tune, the ablation --ablation)"
                )
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
                except (RunStopped, OSError, ValueError) as err:
                    why = (
                        str(err) if isinstance(err, RunStopped) else f"{type(err).__name__}: {err}"
                    )
                    raise RunStopped(
                        f"STOPPED at step {step.name!r}: {why}\n"
                        "Nothing after it was pushed. Fix the cause, then resume with:\n"
                        f"  {self.opts.resume_command()}"
                    ) from err
        self.say("done", "every step finished" if not self.plan else "end of plan")

    def run_step(self, step: Step, forced: bool) -> None:
        """One step; marks it finished in the state."""
        if step.name == "images":
            self.check_quota(forced)
        if step.kernels:
            self.kernel_step(step, forced)
            if step.name == "probe":
                self.report_probes()
            if step.name == "ablation":
                self.report_ablation()
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

    # ------------------------------------------------------------ submit

    def submit_step(self, forced: bool) -> bool:
        """Submit the completed submission kernel version (or print how); True when submitted."""
        record = self.state["kernels"].get(kb.SUBMISSION_KERNEL)
        if record is None or record["status"] != COMPLETE:
            raise RunStopped("the submission kernel has not completed: run 'submission' first")
        ref, version = record["ref"], record["version"]
        message = f"{self.opts.message} v{version}"
        done = self.state.get("submitted")
        if done and done["ref"] == ref and done["version"] == version and not forced:
            self.say("submit", f"{ref} v{version} was already submitted ({done['reply']})")
            if done.get("status", sub.PENDING) == sub.PENDING:
                self.follow(done)
            else:
                self.say("submit", f"  {sub.outcome(done)}")
            return True
        if not self.opts.submit:
            command = ["kaggle", "competitions", "submit", kb.COMPETITION, "-k", ref]
            command += ["-v", str(version), "-f", SUBMISSION_FILE, "-m", message]
            self.say("submit", f"to submit, run: {shlex.join(command)}")
            self.say(
                "submit",
                "(or rerun with --submit: it then polls the submission until Kaggle scores it "
                "and prints the public score or the error)",
            )
            return False
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
