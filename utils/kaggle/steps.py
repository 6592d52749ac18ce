"""The workflow's definitions (utils.kaggle.run): its steps in order, the kernels each pushes
and the datasets each publishes, what each kernel produces, the options of one invocation, and
the rule that decides whether a recorded kernel version still stands."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.kaggle import build as kb, limits as kl
from utils.layout import ABLATION_FILE, SUBMISSION_FILE

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

IMAGE_KERNELS = tuple(kb.IMAGE_KERNEL_PREFIX + model for model in kb.IMAGE_MODELS)
TUNE_KERNEL = "02_tune_gbdt"
GBDT_KERNEL = kb.TUNED_GBDT[0]
# What each kernel writes under /kaggle/working that the next step needs.
PROBE_KERNELS = kb.PROBE_KERNELS
PRODUCES: dict[str, str] = {
    **{kernel: f"probe-{kernel.rsplit('_', 1)[1]}.json" for kernel in PROBE_KERNELS},
    **{kb.IMAGE_KERNEL_PREFIX + model: model for model in kb.IMAGE_MODELS},
    kb.ABLATION_KERNEL: ABLATION_FILE,
    TUNE_KERNEL: "tuning",
    GBDT_KERNEL: "gbdt",
    kb.SUBMISSION_KERNEL: SUBMISSION_FILE,
}
PRODUCER = {name: kernel for kernel, name in PRODUCES.items()}


@dataclass(frozen=True)
class Step:
    """One resumable step: the kernels it pushes and awaits, or the dataset it publishes;
    `option` names the Options flag that makes it part of a run (None: every run)."""

    name: str
    kernels: tuple[str, ...] = ()
    dataset: str | None = None
    option: str | None = None


STEPS = (
    Step("probe", kernels=PROBE_KERNELS),
    Step("weights", dataset=kb.WEIGHTS_DATASET),
    Step("images", kernels=IMAGE_KERNELS),
    Step("image-dataset", dataset=kb.IMAGE_DATASET),
    Step("ablation", kernels=(kb.ABLATION_KERNEL,), option="ablation"),
    Step("tune", kernels=(TUNE_KERNEL,), option="tune"),
    Step("tune-dataset", dataset=kb.TUNING_DATASET, option="tune"),
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


@dataclass
class Options:
    """What one invocation asks for."""

    owner: str
    work_dir: Path = DEFAULT_WORK_DIR
    weights_dir: Path = DEFAULT_WEIGHTS_DIR
    build_dir: Path = kb.DEFAULT_BUILD_DIR
    tune: bool = False
    ablation: bool = False
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
