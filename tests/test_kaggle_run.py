"""utils.kaggle.run: the whole Kaggle workflow against a recording fake Kaggle, resumed after
a failure at every step, the re-push rule, the offline plan, and the real client's calls."""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from requests import HTTPError

from utils.kaggle import (
    build as kb,
    client as kc,
    limits as kl,
    metadata as km,
    probe,
    run as kr,
    state as ks,
    steps as kst,
)
from utils.layout import SUBMISSION_FILE
from utils.manifest import file_sha256

REPO = Path(__file__).resolve().parents[1]
OWNER = "alice"
IMAGE_MODELS = kb.DATASET_CONTENTS[kb.IMAGE_DATASET]
# What each notebook writes under /kaggle/working (see the notebooks' output cells).
KERNEL_FILES = {
    **{kernel: [kst.PRODUCES[kernel]] for kernel in kst.PROBE_KERNELS},
    **{
        f"01_image_{m}": [f"{m}/oof.csv", f"{m}/fold0.pt", f"{m}/config.json"] for m in IMAGE_MODELS
    },
    "02_tune_gbdt": ["tuning/best_params.json", "tuning/optuna.sqlite3"],
    "03_gbdt": ["gbdt/oof.csv", "gbdt/cv_report.json", "gbdt/models/lgb_meta_fold0.txt"],
    "04_inference": ["submission.csv"],
}
KAGGLE_LOG = [
    {"stream_name": "stdout", "time": 1.0, "data": "FusionNetX utils 0123abcd unpacked\n"},
    {"stream_name": "stdout", "time": 2.0, "data": "fold 0 epoch 1/10\n"},
    {"stream_name": "stderr", "time": 3.0, "data": "OutOfMemoryError: CUDA out of memory.\n"},
]


def http_error(code: int) -> HTTPError:
    """An HTTPError as requests raises it, with a status code."""
    response = type("Response", (), {"status_code": code})()
    return HTTPError(f"{code} Server Error", response=response)


MOUNT_RACE_LOG = (
    "FileNotFoundError: Kaggle input 'fusionnetx-timm-weights' (not mounted) has no "
    "'vit_tiny.pth' under /kaggle/input; mounted inputs: ['isic-2024-challenge']"
)


_PROBED: dict[str, dict] = {}


def probe_result(kernel: str) -> dict:
    """utils.kaggle.probe run for real on this machine (once), as that probe kernel's output."""
    image = kst.PRODUCES[kernel].removeprefix("probe-").removesuffix(".json")
    if not _PROBED:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            _PROBED.update(probe.probe_environment("cpu", Path(scratch)))
    return {**_PROBED, "image": image}


class FakeKaggle:
    """Kaggle as the workflow sees it, recording every call. A kernel version is queued, then
    running, then complete (or `error` when its kernel is in fail_kernels); an upload is
    'pending' for one check, then ready. Each push remembers which dataset versions were ready
    then: what Kaggle would mount, to check nothing runs against stale inputs.

    Kaggle's limits, off by default: `gpu_cap` refuses a GPU push while that many GPU sessions
    run (`other_gpu_sessions` of them started by hand, ending after `other_gpu_until` s);
    `forbid_unready` answers 403 for a dataset still processing (the adapter turns a 403 from
    dataset_version into None, as for a missing one) and `status_403` 403s kernel status checks;
    `dataset_outages` 503s dataset status checks; `mount_race` fails the first version of those
    kernels as input_path does when a dataset is not mounted yet; `out_of_time` {kernel: folds}
    makes a first image session end with those folds left by its time budget. `gpu_seconds` is
    the GPU session time Kaggle would charge (push to end)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.kernels: dict[str, int] = {}
        self.kernel_of: dict[str, str] = {}
        self.mounted: dict[tuple[str, int], dict[str, int | str]] = {}
        self.datasets: dict[str, dict] = {}
        self.checks: Counter = Counter()
        self.fail_kernels: set[str] = set()
        self.fail_datasets: set[str] = set()
        self.fail_calls: set[str] = set()
        self.never_finish: set[str] = set()
        self.status_outages = 0
        self.now, self.sleeps = 0.0, []
        self.gpu_cap: int | None = None
        self.other_gpu_sessions, self.other_gpu_until = 0, 0.0
        self.forbid_unready = False
        self.status_403 = 0
        self.dataset_outages = 0
        self.mount_race: set[str] = set()
        self.mount_race_version = 1
        self.processing_checks: dict[str, int] = {}
        self.gpu_started: dict[tuple[str, int], float] = {}
        self.gpu_seconds = 0.0
        self.most_gpu_sessions = 0
        self.refusals = 0
        self.submissions: list[dict] = []
        self.out_of_time: dict[str, list[int]] = {}
        self.smoke: dict | None = None  # the GPU probe's smoke-gpu.json, when set
        self.pushed_meta: dict[tuple[str, int], dict] = {}
        self.fail_scoring = False
        self.probes = {kernel: probe_result(kernel) for kernel in kst.PROBE_KERNELS}

    # the clock the runner polls with
    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now

    def _maybe_fail(self, call: str) -> None:
        if call in self.fail_calls:
            raise http_error(503)

    # the KaggleClient protocol
    def gpu_sessions(self) -> int:
        others = self.other_gpu_sessions if self.now < self.other_gpu_until else 0
        return len(self.gpu_started) + others

    def push_kernel(self, folder: Path) -> int:
        meta = json.loads((folder / kb.KERNEL_METADATA).read_text())
        ref = meta["id"]
        capped = self.gpu_cap is not None and self.gpu_sessions() >= self.gpu_cap
        if meta["enable_gpu"] and capped:
            self.refusals += 1
            self.calls.append(("refused", folder.name, self.kernels.get(ref, 0) + 1))
            raise kl.SessionCapReached("Maximum number of concurrent GPU sessions reached")
        self.kernels[ref] = self.kernels.get(ref, 0) + 1
        self.kernel_of[ref] = folder.name
        sources = {}
        for source in meta["dataset_sources"]:
            data = self.datasets.get(source)
            sources[source] = "missing" if data is None else data["version"]
            if data is not None and not data["ready"]:
                sources[source] = f"v{data['version']} still processing"
        self.mounted[(ref, self.kernels[ref])] = sources
        self.pushed_meta[(ref, self.kernels[ref])] = {**meta, "folder": str(folder)}
        if meta["enable_gpu"]:
            self.gpu_started[(ref, self.kernels[ref])] = self.now
            self.most_gpu_sessions = max(self.most_gpu_sessions, self.gpu_sessions())
        self.calls.append(("push", folder.name, self.kernels[ref]))
        return self.kernels[ref]

    def kernel_status(self, ref: str, version: int) -> tuple[str, str]:
        if self.status_outages:
            self.status_outages -= 1
            raise http_error(503)
        if self.status_403:
            self.status_403 -= 1
            raise http_error(403)
        self.checks[(ref, version)] += 1
        kernel = self.kernel_of[ref]
        self.calls.append(("status", kernel, version))
        if kernel in self.never_finish:
            return "running", ""
        seen = self.checks[(ref, version)]
        if seen < 3:
            return ("queued", "running")[seen - 1], ""
        status, message = "complete", ""
        if kernel in self.fail_kernels or (
            kernel in self.mount_race and version == self.mount_race_version
        ):
            status, message = "error", "Notebook failed: see log"
        if (ref, version) in self.gpu_started:
            self.gpu_seconds += self.now - self.gpu_started.pop((ref, version))
        return status, message

    def kernel_output(self, ref: str, version: int, path: Path) -> list[str]:
        kernel = self.kernel_of[ref]
        self.calls.append(("output", kernel, version))
        written = []
        names = KERNEL_FILES[kernel]
        if kernel in self.out_of_time and version == 1:  # the time budget left folds
            names = [n for n in names if not n.endswith("oof.csv")]
            model = names[0].split("/")[0]
            progress = {"finished": [0], "remaining": self.out_of_time[kernel], "over_budget": []}
            (path / model).mkdir(parents=True, exist_ok=True)
            (path / model / "progress.json").write_text(json.dumps(progress))
        for name in names:
            target = path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"{ref} v{version} {name}")
            if kernel in self.probes:  # what the probe found in that image
                target.write_text(json.dumps(self.probes[kernel]))
            if kernel == "00_probe_gpu" and self.smoke is not None:
                (path / "smoke-gpu.json").write_text(json.dumps(self.smoke))
            written.append(str(target))
        log = path / f"{ref.split('/')[1]}.log"
        log.write_text(json.dumps(KAGGLE_LOG))
        return [*written, str(log)]

    def kernel_log(self, ref: str, version: int) -> str:
        self.calls.append(("log", self.kernel_of[ref], version))
        if self.kernel_of[ref] in self.mount_race and version == self.mount_race_version:
            return json.dumps([{"stream_name": "stderr", "time": 1.0, "data": MOUNT_RACE_LOG}])
        return json.dumps(KAGGLE_LOG)

    def dataset_version(self, ref: str) -> int | None:
        data = self.datasets.get(ref)
        if data is not None and self.forbid_unready and not data["ready"]:
            return None  # Kaggle's 403, as the adapter reports it
        return None if data is None else data["version"]

    def dataset_status(self, ref: str) -> str:
        if self.dataset_outages:
            self.dataset_outages -= 1
            raise http_error(503)
        data = self.datasets.get(ref)
        if data is None:
            raise http_error(403 if self.forbid_unready else 404)
        if ref.split("/")[1] in self.fail_datasets:
            return "failed"
        if not data["ready"]:
            left = self.processing_checks.get(ref.split("/")[1], 1)
            self.processing_checks[ref.split("/")[1]] = left - 1
            if left <= 1:
                data["ready"] = True
            if self.forbid_unready:
                raise http_error(403)
            return "pending"
        return "ready"

    def _upload(self, folder: Path) -> str:
        meta = json.loads((folder / kb.DATASET_METADATA).read_text())
        names = sorted(p.name for p in folder.iterdir() if p.name != kb.DATASET_METADATA)
        assert names == sorted(kb.DATASET_CONTENTS[folder.name]), names
        return meta["id"]

    def create_dataset(self, folder: Path) -> None:
        self._maybe_fail(f"create:{folder.name}")
        ref = self._upload(folder)
        assert ref not in self.datasets, f"{ref} created twice"
        self.datasets[ref] = {"version": 1, "ready": False}
        self.calls.append(("create", folder.name, 1))

    def version_dataset(self, folder: Path, notes: str) -> None:
        self._maybe_fail(f"version:{folder.name}")
        data = self.datasets[self._upload(folder)]
        data.update(version=data["version"] + 1, ready=False)
        self.calls.append(("version", folder.name, data["version"]))

    def submit(self, competition: str, kernel: str, version: int, file_name: str, message: str):
        self._maybe_fail("submit")
        self.calls.append(("submit", kernel, version))
        self.submissions.append({"ref": 900 + len(self.submissions), "description": message})
        return "Successfully submitted"

    def latest_submission(self, competition: str) -> dict | None:
        """The newest submission: pending for two polls, then scored (or failed: fail_scoring)."""
        if not self.submissions:
            return None
        newest = self.submissions[-1]
        newest["polls"] = newest.get("polls", 0) + 1
        status, score, error = "pending", "", ""
        if newest["polls"] > 2:
            status, score = "complete", "0.1702"
            if self.fail_scoring:
                status, score, error = "error", "", "Submission Scoring Error: see the kernel log"
        return {**newest, "status": status, "public_score": score, "error": error}

    # what the tests read back
    def actions(self, kinds=("push", "create", "version", "submit")) -> list[tuple]:
        return [c for c in self.calls if c[0] in kinds]

    def bump(self, slug: str) -> None:
        """A new version made by hand on Kaggle."""
        self.datasets[f"{OWNER}/{slug}"]["version"] += 1


_BUILT: dict[tuple[str | None, bool, str], Path] = {}


@pytest.fixture(autouse=True)
def build_once(monkeypatch, tmp_path_factory):
    """kaggle_build.build_all, run for real once per (owner, tuned, recipe) and copied after
    that: the kernels are the real builds, and ~60 runs don't each rebuild seven notebooks."""
    real = kb.build_all

    def cached(
        out_dir: Path, owner: str | None = None, tuned: bool = False, recipe: str = "paper"
    ) -> list[Path]:
        key = owner, tuned, recipe
        if key not in _BUILT:
            _BUILT[key] = tmp_path_factory.mktemp("built")
            real(_BUILT[key], owner, tuned, recipe=recipe)
        shutil.copytree(_BUILT[key], out_dir, dirs_exist_ok=True)
        return sorted(out_dir / p.name for p in _BUILT[key].iterdir())

    monkeypatch.setattr(kb, "build_all", cached)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local weights folder with every backbone file (tiny stand-ins)."""
    root = tmp_path_factory.mktemp("weights")
    for name in km.WEIGHT_FILES:
        (root / name).write_bytes(b"state dict of " + name.encode())
    return root


def run(tmp_path: Path, fake: FakeKaggle, weights: Path, **options) -> tuple[str | None, list]:
    """One invocation against the fake: (the stop message or None, the printed lines)."""
    lines: list[str] = []
    opts = kr.Options(
        owner=OWNER,
        work_dir=tmp_path / "work",
        weights_dir=weights,
        build_dir=tmp_path / "build",
        resume_args=["--owner", OWNER, "--work-dir", str(tmp_path / "work")],
        **options,
    )
    runner = kr.Runner(fake, opts, sleep=fake.sleep, clock=fake.clock, say=lines.append)
    try:
        runner.run()
    except kr.RunStopped as err:
        return str(err), lines
    return None, lines


def state_of(tmp_path: Path) -> dict:
    """The state file as written."""
    return json.loads((tmp_path / "work" / kst.STATE_FILE).read_text())


def steps_done(tmp_path: Path) -> list[str]:
    """Steps the state file records as finished (none before the first save)."""
    path = tmp_path / "work" / kst.STATE_FILE
    return list(json.loads(path.read_text())["steps"]) if path.is_file() else []


def assert_no_stale_push(fake: FakeKaggle) -> None:
    """Every kernel version ran against the newest ready version of each of its datasets."""
    for (ref, version), mounted in fake.mounted.items():
        for source, seen in mounted.items():
            assert isinstance(seen, int), f"{ref} v{version} pushed with {source} {seen}"


# the steps of a run with --tune (the ablation is off without --ablation: test_kaggle_ablation)
TUNE_RUN_STEPS = [step.name for step in kst.STEPS if step.option in (None, "tune")]
FULL_RUN = [
    *[("push", kernel, 1) for kernel in kst.PROBE_KERNELS],
    ("create", kb.WEIGHTS_DATASET, 1),
    *[("push", kernel, 1) for kernel in kst.IMAGE_KERNELS],
    ("create", kb.IMAGE_DATASET, 1),
    ("push", "02_tune_gbdt", 1),
    ("create", kb.TUNING_DATASET, 1),
    ("push", "03_gbdt", 1),
    ("create", kb.GBDT_DATASET, 1),
    ("push", "04_inference", 1),
    ("submit", f"{OWNER}/fusionnetx-isic2024-submission", 1),
]


def test_full_run_makes_every_call_in_order_and_records_it(tmp_path, weights_dir):
    fake = FakeKaggle()
    stopped, lines = run(tmp_path, fake, weights_dir, tune=True, submit=True)
    assert stopped is None, stopped
    assert fake.actions() == FULL_RUN
    assert_no_stale_push(fake)
    # two image kernels run at once (Kaggle's GPU session cap), the other two when those end
    image_calls = [c for c in fake.calls if c[1] in kst.IMAGE_KERNELS]
    first_status = next(i for i, c in enumerate(image_calls) if c[0] == "status")
    assert [c[0] for c in image_calls[:first_status]] == ["push"] * 2
    pushes = [i for i, c in enumerate(fake.calls) if c[:2] == ("push", kst.IMAGE_KERNELS[2])]
    assert fake.calls[pushes[0] - 1][0] == "output"  # after a running one was collected
    # back-off: 30 s doubling while the probes are queued, then 30 s for the weights upload
    assert fake.sleeps[:3] == [30.0, 60.0, 30.0]
    assert max(fake.sleeps) <= kst.POLL_MAX_S
    state = state_of(tmp_path)
    assert list(state["steps"]) == TUNE_RUN_STEPS
    gbdt = state["kernels"]["03_gbdt"]
    assert gbdt["version"] == 1 and gbdt["status"] == "complete"
    assert gbdt["against"] == {kb.IMAGE_DATASET: 1, kb.TUNING_DATASET: 1}
    assert set(gbdt["outputs"]) == set(KERNEL_FILES["03_gbdt"])
    expected = file_sha256(tmp_path / "work/outputs/03_gbdt/gbdt/oof.csv")
    assert gbdt["outputs"]["gbdt/oof.csv"] == expected
    assert {s: d["version"] for s, d in state["datasets"].items()} == dict.fromkeys(
        kb.DATASET_CONTENTS, 1
    )
    assert state["submitted"]["version"] == 1
    # the image dataset was uploaded from the four kernels' outputs, byte for byte
    upload = tmp_path / "work/datasets" / kb.IMAGE_DATASET / "vit_tiny/oof.csv"
    assert upload.read_text() == f"{OWNER}/fusionnetx-isic2024-vit-tiny v1 vit_tiny/oof.csv"
    assert any("push alice/fusionnetx-isic2024-vit-tiny -> v1" in line for line in lines)


def test_a_second_run_pushes_and_uploads_nothing(tmp_path, weights_dir):
    fake = FakeKaggle()
    run(tmp_path, fake, weights_dir, submit=True)
    before = list(fake.calls)
    stopped, lines = run(tmp_path, fake, weights_dir, submit=True)
    assert stopped is None
    assert fake.calls == before
    assert any("already submitted" in line for line in lines)
    assert not any("code changed" in line for line in lines)  # a rebuild is not a code change


def test_without_submit_it_prints_the_submit_call_with_the_kernel_version(tmp_path, weights_dir):
    fake = FakeKaggle()
    stopped, lines = run(tmp_path, fake, weights_dir)
    assert stopped is None
    assert fake.actions(("submit",)) == []
    command = next(line for line in lines if "to submit, run:" in line).split("run: ")[1]
    assert command.split() == [
        "kaggle", "competitions", "submit", kb.COMPETITION,
        "-k", f"{OWNER}/fusionnetx-isic2024-submission", "-v", "1",
        "-f", "submission.csv", "-m", "'FusionNetX", "v1'",
    ]  # fmt: skip
    assert "submit" not in state_of(tmp_path)["steps"]


# (step, how it breaks, the call that breaks it is fixed before resuming)
FAILURES = [
    ("weights", "calls", f"create:{kb.WEIGHTS_DATASET}"),
    ("images", "kernels", "01_image_vit_tiny"),
    ("image-dataset", "datasets", kb.IMAGE_DATASET),
    ("tune", "kernels", "02_tune_gbdt"),
    ("tune-dataset", "calls", f"create:{kb.TUNING_DATASET}"),
    ("gbdt", "kernels", "03_gbdt"),
    ("gbdt-dataset", "datasets", kb.GBDT_DATASET),
    ("submission", "kernels", "04_inference"),
    ("submit", "calls", "submit"),
]


@pytest.mark.parametrize(("step", "kind", "what"), FAILURES, ids=[f[0] for f in FAILURES])
def test_a_failure_stops_the_run_and_a_rerun_resumes_it(tmp_path, weights_dir, step, kind, what):
    fake = FakeKaggle()
    getattr(fake, f"fail_{kind}").add(what)
    stopped, _ = run(tmp_path, fake, weights_dir, tune=True, submit=True)
    assert stopped is not None and f"STOPPED at step {step!r}" in stopped
    assert f"python -m utils.kaggle.run --owner {OWNER} --work-dir" in stopped
    later = kr.STEP_NAMES[kr.STEP_NAMES.index(step) + 1 :]
    assert not set(later) & set(steps_done(tmp_path))
    first = fake.actions()
    assert first == FULL_RUN[: len(first)]  # nothing past the failed step was pushed
    if kind == "kernels":
        assert "ended with status error: Notebook failed: see log" in stopped
        assert "OutOfMemoryError: CUDA out of memory." in stopped  # the log tail
    getattr(fake, f"fail_{kind}").clear()

    stopped, _ = run(tmp_path, fake, weights_dir, tune=True, submit=True)
    assert stopped is None, stopped
    resumed = fake.actions()[len(first) :]
    if kind == "kernels":  # the failed kernel is pushed again, as version 2
        expected = [("push", what, 2)] + FULL_RUN[len(first) :]
    elif kind == "datasets":  # the upload exists but failed processing: a new version
        expected = [("version", what, 2)] + FULL_RUN[len(first) :]
    else:
        expected = FULL_RUN[len(first) :]
    assert [c[:2] for c in resumed] == [c[:2] for c in expected]
    assert_no_stale_push(fake)
    assert list(state_of(tmp_path)["steps"]) == TUNE_RUN_STEPS


def test_kernels_still_running_at_a_failure_are_awaited_not_pushed_again(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.fail_kernels.add("01_image_vit_tiny_suspicious")
    stopped, _ = run(tmp_path, fake, weights_dir, gpu_sessions=4)
    assert "01_image_vit_tiny_suspicious" in stopped
    statuses = state_of(tmp_path)["kernels"]
    assert statuses["01_image_convnextv2_nano"]["status"] == "complete"
    assert statuses["01_image_vit_small_suspicious"]["status"] == "running"
    fake.fail_kernels.clear()
    calls_before = len(fake.calls)
    run(tmp_path, fake, weights_dir)
    pushed = [
        c[1] for c in fake.calls[calls_before:] if c[0] == "push" and c[1] in kst.IMAGE_KERNELS
    ]
    assert pushed == ["01_image_vit_tiny_suspicious"]
    downloads = [c for c in fake.calls if c[0] == "output" and c[1] in kst.IMAGE_KERNELS]
    assert sorted(c[1] for c in downloads) == sorted(kst.IMAGE_KERNELS)  # each once


def test_another_recipe_repushes_tuning_and_gbdt_never_an_image_kernel(tmp_path, weights_dir):
    fake = FakeKaggle()
    run(tmp_path, fake, weights_dir, tune=True)
    assert state_of(tmp_path)["kernels"]["03_gbdt"]["recipe"] == "paper"
    before = len(fake.calls)
    stopped, lines = run(tmp_path, fake, weights_dir, tune=True, recipe="plus")
    assert stopped is None, stopped
    pushes = [c[1] for c in fake.calls[before:] if c[0] == "push"]
    assert pushes[:2] == ["02_tune_gbdt", "03_gbdt"]
    assert not set(pushes) & set(kst.IMAGE_KERNELS)
    assert any("recipe paper -> plus" in line for line in lines), lines
    assert state_of(tmp_path)["kernels"]["03_gbdt"]["recipe"] == "plus"
    before = len(fake.calls)
    run(tmp_path, fake, weights_dir, tune=True, recipe="plus")
    assert not [c for c in fake.calls[before:] if c[0] == "push"]  # nothing left to redo


@pytest.mark.parametrize(
    ("bumped", "repushed"),
    [
        (kb.GBDT_DATASET, ["04_inference"]),
        (kb.IMAGE_DATASET, ["02_tune_gbdt", "03_gbdt", "04_inference"]),
        (kb.TUNING_DATASET, ["03_gbdt", "04_inference"]),
        (kb.WEIGHTS_DATASET, [*kst.IMAGE_KERNELS, "02_tune_gbdt", "03_gbdt", "04_inference"]),
    ],
)
def test_a_new_dataset_version_repushes_exactly_its_consumers(
    tmp_path, weights_dir, bumped, repushed
):
    fake = FakeKaggle()
    run(tmp_path, fake, weights_dir, tune=True)
    fake.bump(bumped)
    before = len(fake.calls)
    stopped, lines = run(tmp_path, fake, weights_dir, tune=True)
    assert stopped is None, stopped
    pushes = [c[1] for c in fake.calls[before:] if c[0] == "push"]
    assert pushes == repushed
    assert_no_stale_push(fake)
    reason = f"new input {bumped} v1 -> v2"
    assert any(reason in line for line in lines), lines


def test_a_timeout_stops_with_the_log_and_the_resume_waits_instead_of_pushing(
    tmp_path, weights_dir
):
    fake = FakeKaggle()
    fake.never_finish.add("03_gbdt")
    stopped, _ = run(tmp_path, fake, weights_dir, timeout_h=1.0)
    assert "timed out after 1 h waiting for 03_gbdt v1 (running)" in stopped
    assert "fold 0 epoch 1/10" in stopped
    assert fake.now >= 3600 and fake.actions()[-1] == ("push", "03_gbdt", 1)
    fake.never_finish.clear()
    stopped, _ = run(tmp_path, fake, weights_dir)
    assert stopped is None
    assert fake.actions().count(("push", "03_gbdt", 1)) == 1
    assert ("push", "03_gbdt", 2) not in fake.actions()


def test_from_repushes_that_step_and_every_later_one_only(tmp_path, weights_dir):
    fake = FakeKaggle()
    run(tmp_path, fake, weights_dir)
    before = len(fake.calls)
    stopped, _ = run(tmp_path, fake, weights_dir, start="gbdt")
    assert stopped is None
    actions = [c for c in fake.calls[before:] if c[0] in ("push", "create", "version")]
    assert actions == [
        ("push", "03_gbdt", 2),
        ("version", kb.GBDT_DATASET, 2),
        ("push", "04_inference", 2),
    ]


def test_only_runs_one_step_and_says_what_it_needs_first(tmp_path, weights_dir):
    fake = FakeKaggle()
    stopped, _ = run(tmp_path, fake, weights_dir, only="gbdt")
    assert f"reads dataset {OWNER}/{kb.IMAGE_DATASET}" in stopped
    assert "run step 'image-dataset' first" in stopped
    assert fake.actions() == []
    stopped, _ = run(tmp_path, fake, weights_dir, only="weights")
    assert stopped is None and fake.actions() == [("create", kb.WEIGHTS_DATASET, 1)]


def test_an_existing_weights_dataset_is_used_and_a_missing_folder_is_explained(tmp_path):
    fake = FakeKaggle()
    stopped, _ = run(tmp_path, fake, tmp_path / "no-weights", only="weights")
    assert "`python -m utils.kaggle.build weights --out" in stopped
    fake.datasets[f"{OWNER}/{kb.WEIGHTS_DATASET}"] = {"version": 4, "ready": True}
    stopped, lines = run(tmp_path, fake, tmp_path / "no-weights")
    assert stopped is None
    assert f"{OWNER}/{kb.WEIGHTS_DATASET} exists on Kaggle (v4): using it" in "".join(lines)
    assert fake.actions()[len(kst.PROBE_KERNELS)] == ("push", kst.IMAGE_KERNELS[0], 1)
    assert state_of(tmp_path)["kernels"][kst.IMAGE_KERNELS[0]]["against"] == {kb.WEIGHTS_DATASET: 4}


def test_a_kernel_that_completes_without_its_output_stops_the_run(
    tmp_path, weights_dir, monkeypatch
):
    fake = FakeKaggle()
    monkeypatch.setitem(KERNEL_FILES, "03_gbdt", ["something_else.txt"])
    stopped, _ = run(tmp_path, fake, weights_dir)
    assert "03_gbdt completed but its output has no 'gbdt'" in stopped
    assert fake.actions()[-1] == ("push", "03_gbdt", 1)


def test_a_state_file_of_another_owner_is_refused(tmp_path, weights_dir):
    run(tmp_path, FakeKaggle(), weights_dir, only="weights")
    with pytest.raises(kr.RunStopped, match="records a run for owner 'alice', not 'bob'"):
        ks.load_state(tmp_path / "work" / kst.STATE_FILE, "bob")


def test_the_state_file_is_replaced_atomically(tmp_path):
    path = tmp_path / "state.json"
    ks.save_state(path, ks.empty_state(OWNER))
    ks.save_state(path, {**ks.empty_state(OWNER), "submitted": {"version": 3}})
    assert ks.load_state(path, OWNER)["submitted"] == {"version": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_push_reason():
    record = {"ref": "a/k", "version": 3, "against": {"d": 1}, "status": "complete"}
    assert kst.push_reason(None, "a/k", {}, False) == "never pushed"
    assert kst.push_reason(record, "a/k", {"d": 1}, False) is None
    assert kst.push_reason(record, "a/k", {"d": 2}, False) == "new input d v1 -> v2"
    assert kst.push_reason(record, "a/k", {"d": 1, "t": 1}, False) == "new input t v- -> v1"
    assert (
        kst.push_reason({**record, "status": "error"}, "a/k", {"d": 1}, False) == "v3 ended error"
    )
    assert kst.push_reason({**record, "status": "running"}, "a/k", {"d": 1}, False) is None
    assert kst.push_reason(record, "a/k", {"d": 1}, True) == "forced by --from/--only"


def test_log_tail_reads_kaggles_json_log_and_plain_text():
    assert ks.log_tail(json.dumps(KAGGLE_LOG), lines=2).splitlines() == [
        "fold 0 epoch 1/10",
        "OutOfMemoryError: CUDA out of memory.",
    ]
    assert ks.log_tail("a\nb\nc\n", lines=1) == "c"


# ---------------------------------------------------------------- --dry-run


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and no Kaggle credentials."""

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run opened a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle-config"))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def dry_run(argv: list[str]) -> tuple[int, list[str]]:
    """main() with --dry-run: (exit code, the plan's lines)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = kr.main(["--dry-run", *argv])
    return code, out.getvalue().splitlines()


def test_dry_run_prints_the_complete_ordered_plan_offline(offline, tmp_path, weights_dir):
    work = tmp_path / "work"
    code, lines = dry_run(["--owner", "bob", "--work-dir", str(work), "--tune"])
    assert code == 0
    actions = [line.split()[1:3] for line in lines if line.split()[1] in ("create", "push")]
    assert actions == [
        ["push", "bob/fusionnetx-isic2024-probe-cpu"],
        ["push", "bob/fusionnetx-isic2024-probe-gpu"],
        ["create", f"bob/{kb.WEIGHTS_DATASET}"],
        ["push", "bob/fusionnetx-isic2024-convnextv2-nano"],
        ["push", "bob/fusionnetx-isic2024-vit-tiny"],
        ["push", "bob/fusionnetx-isic2024-vit-tiny-suspicious"],
        ["push", "bob/fusionnetx-isic2024-vit-small-suspicious"],
        ["create", f"bob/{kb.IMAGE_DATASET}"],
        ["push", "bob/fusionnetx-isic2024-gbdt-tuning"],
        ["create", f"bob/{kb.TUNING_DATASET}"],
        ["push", "bob/fusionnetx-isic2024-gbdt"],
        ["create", f"bob/{kb.GBDT_DATASET}"],
        ["push", "bob/fusionnetx-isic2024-submission"],
    ]
    gbdt = next(line for line in lines if "push bob/fusionnetx-isic2024-gbdt " in line)
    assert f"against {kb.IMAGE_DATASET} v1, {kb.TUNING_DATASET} v1" in gbdt
    assert "-k bob/fusionnetx-isic2024-submission -v 1" in lines[-3]
    assert not work.exists()  # a plan writes no state


def test_recipe_reaches_the_tuning_and_gbdt_kernels_and_the_resume_command(
    offline, tmp_path, weights_dir
):
    work = tmp_path / "work"
    code, lines = dry_run(["--owner", "bob", "--work-dir", str(work), "--recipe", "plus"])
    assert code == 0 and any(
        "(recipe plus in the tuning and GBDT kernels)" in line for line in lines
    )
    args = kr.parse_args(["--owner", "bob", "--recipe", "plus", "--tune"])
    opts = kr.options_from(args)
    assert opts.recipe == "plus" and "--recipe plus" in opts.resume_command()
    assert kr.options_from(kr.parse_args(["--owner", "bob"])).recipe == "paper"


def test_dry_run_after_a_partial_run_plans_only_what_is_left(tmp_path, weights_dir, offline):
    fake = FakeKaggle()
    fake.fail_kernels.add("03_gbdt")
    run(tmp_path, fake, weights_dir)
    code, lines = dry_run(["--owner", OWNER, "--work-dir", str(tmp_path / "work")])
    assert code == 0
    pushes = [line.split()[2:5] for line in lines if line.split()[1] == "push"]
    assert pushes == [
        [f"{OWNER}/fusionnetx-isic2024-gbdt", "->", "v2"],
        [f"{OWNER}/fusionnetx-isic2024-submission", "->", "v1"],
    ]
    assert not any(" create " in line for line in lines if line.startswith("image-dataset"))


# ---------------------------------------------------------------- the real kaggle client


def installed_kaggle_api() -> type:
    """The installed package's KaggleApi class (imported without authenticating)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
    return KaggleApi


class RecordingApi:
    """Stands in for KaggleApi: binds each call to the installed method's signature (TypeError
    when a name or an argument is wrong) and answers with kagglesdk's own response types."""

    def __init__(self) -> None:
        self.real = installed_kaggle_api()
        self.bound: list[str] = []

    def __getattr__(self, name: str):
        method = getattr(self.real, name)  # AttributeError: no such call on the installed client

        def call(*args, **kwargs):
            inspect.signature(method).bind(self, *args, **kwargs)
            self.bound.append(name)
            return getattr(self, f"answer_{name}")(*args, **kwargs)

        return call

    def answer_kernels_push(self, folder, **kwargs):
        from kagglesdk.kernels.types.kernels_api_service import ApiSaveKernelResponse

        response = ApiSaveKernelResponse()
        response.version_number = 7
        return response

    def answer_kernels_status(self, kernel):
        from kagglesdk.kernels.types.kernels_api_service import ApiGetKernelSessionStatusResponse
        from kagglesdk.kernels.types.kernels_enums import KernelWorkerStatus

        assert kernel == "alice/k/7"
        response = ApiGetKernelSessionStatusResponse()
        response.status = KernelWorkerStatus.CANCEL_ACKNOWLEDGED
        response.failure_message = "cancelled"
        return response

    def answer_kernels_output(self, kernel, path, **kwargs):
        return [f"{path}/oof.csv"], ""

    def answer_kernels_logs(self, kernel):
        return json.dumps(KAGGLE_LOG)

    def answer_dataset_status(self, dataset, format=None):
        if dataset.endswith("missing"):
            raise http_error(404)
        return "ready" if format is None else json.dumps({"current_version_number": 3})

    def answer_dataset_create_new(self, folder, **kwargs):
        from kagglesdk.datasets.types.dataset_api_service import ApiCreateDatasetResponse

        return ApiCreateDatasetResponse()

    answer_dataset_create_version = answer_dataset_create_new

    def answer_competition_submissions(self, competition, **kwargs):
        from kagglesdk.competitions.types.competition_api_service import ApiSubmission
        from kagglesdk.competitions.types.submission_status import SubmissionStatus

        newest = ApiSubmission()
        newest.ref, newest.status, newest.public_score = 41, SubmissionStatus.COMPLETE, "0.17"
        newest.description = "FusionNetX v7"
        return [newest]

    def answer_competition_submit_code(self, **kwargs):
        from kagglesdk.competitions.types.competition_api_service import (
            ApiCreateCodeSubmissionResponse,
        )

        response = ApiCreateCodeSubmissionResponse()
        response.message = "Successfully submitted"
        return response


def api_calls_in(cls: type) -> set[str]:
    """Names of every `self.api.NAME(...)` call in a class's source."""
    tree = ast.parse(inspect.getsource(cls))
    return {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and ast.unparse(node.func.value) == "self.api"
    }


def test_every_call_exists_with_that_signature_on_the_installed_kaggle_package(tmp_path):
    api = RecordingApi()
    client = kr.KaggleApiClient(api)
    assert client.push_kernel(tmp_path) == 7
    assert client.kernel_status("alice/k", 7) == ("cancel_acknowledged", "cancelled")
    assert client.kernel_output("alice/k", 7, tmp_path) == [f"{tmp_path}/oof.csv"]
    assert "CUDA out of memory" in ks.log_tail(client.kernel_log("alice/k", 7))
    assert client.dataset_version("alice/weights") == 3
    assert client.dataset_version("alice/missing") is None
    assert client.dataset_status("alice/weights") == "ready"
    client.create_dataset(tmp_path)
    client.version_dataset(tmp_path, "notes")
    assert client.submit(kb.COMPETITION, "alice/k", 7, "submission.csv", "m") == (
        "Successfully submitted"
    )
    assert client.latest_submission(kb.COMPETITION) == {
        "ref": 41, "status": "complete", "public_score": "0.17", "error": "",
        "description": "FusionNetX v7",
    }  # fmt: skip
    assert set(api.bound) == api_calls_in(kr.KaggleApiClient)
    assert "cancel_acknowledged" in kst.FAILED


def test_the_fake_and_the_plan_client_speak_the_real_clients_protocol():
    protocol = [n for n in vars(kr.KaggleClient) if not n.startswith("_")]
    assert len(protocol) == 10
    for name in protocol:
        real = inspect.signature(getattr(kr.KaggleApiClient, name)).parameters
        for other in (FakeKaggle, kc.PlanClient):
            assert list(inspect.signature(getattr(other, name)).parameters) == list(real), name


def test_a_rejected_push_stops_with_kaggles_message(tmp_path):
    api = RecordingApi()
    api.answer_kernels_push = lambda folder, **kw: type(
        "R", (), {"error": "Notebook not found", "version_number": None}
    )()
    with pytest.raises(kr.RunStopped, match="Notebook not found"):
        kr.KaggleApiClient(api).push_kernel(tmp_path)


def test_every_kernel_folder_belongs_to_exactly_one_step():
    kernels = [kernel for step in kst.STEPS for kernel in step.kernels]
    assert sorted(kernels) == sorted(p.name for p in kb.kernel_folders())
    assert set(kst.PRODUCES) == set(kernels)
    published = {name for slug in kst.DATASET_STEP for name in kb.DATASET_CONTENTS[slug]}
    probes = {kst.PRODUCES[kernel] for kernel in kst.PROBE_KERNELS}
    reported = {SUBMISSION_FILE, kst.PRODUCES[kb.ABLATION_KERNEL]}  # downloaded, not published
    assert published - set(km.WEIGHT_FILES) == set(kst.PRODUCER) - reported - probes


def test_the_command_line_stops_with_exit_1_and_the_resume_command(tmp_path, capsys):
    work = tmp_path / "work"
    code = kr.main(
        ["--owner", OWNER, "--work-dir", str(work), "--tune", "--only", "gbdt"], FakeKaggle()
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "STOPPED at step 'gbdt'" in err and "run step 'image-dataset' first" in err
    assert f"  python -m utils.kaggle.run --owner {OWNER} --work-dir {work} --tune\n" in err + "\n"


def test_python_m_dry_run_with_owner_needs_nothing_else(tmp_path):
    env = {**os.environ, "KAGGLE_CONFIG_DIR": str(tmp_path), "HOME": str(tmp_path)}
    env.pop("KAGGLE_USERNAME", None)
    env.pop("KAGGLE_KEY", None)
    result = subprocess.run(
        [sys.executable, "-m", "utils.kaggle.run", "--dry-run", "--owner", "carol",
         "--work-dir", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "push carol/fusionnetx-isic2024-submission -> v1" in result.stdout
    assert "kaggle competitions submit isic-2024-challenge" in result.stdout


def test_changed_code_is_reported_but_only_pushed_on_request(tmp_path, weights_dir):
    fake = FakeKaggle()
    run(tmp_path, fake, weights_dir)
    state = state_of(tmp_path)
    state["kernels"]["03_gbdt"]["code_sha256"] = "built from older code"
    ks.save_state(tmp_path / "work" / kst.STATE_FILE, state)
    before = len(fake.calls)
    stopped, lines = run(tmp_path, fake, weights_dir)
    assert stopped is None and fake.actions(("push",))[before:] == []
    assert [line.split()[0] for line in lines if "code changed" in line] == ["gbdt"]
    assert "--from gbdt re-pushes" in next(line for line in lines if "code changed" in line)


class CannedTransport:
    """Stands in for kagglesdk's KaggleClient under a real KaggleApi: each service call
    (`client.kernels.kernels_api_client.save_kernel(request)`) is recorded and answered."""

    def __init__(self, answers: dict) -> None:
        self.answers, self.requests = answers, {}
        service = type("Service", (), {"__getattr__": lambda _, method: self._call(method)})
        self.kernels = self.datasets = self.competitions = type(
            "Group", (), {"__getattr__": lambda _, name: service()}
        )()

    def _call(self, method: str):
        def answer(request):
            self.requests[method] = request
            return self.answers[method]

        return answer

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def test_the_adapter_runs_through_the_installed_clients_own_code(tmp_path):
    from kagglesdk.competitions.types.competition_api_service import (
        ApiCreateCodeSubmissionResponse,
    )
    from kagglesdk.datasets.types.dataset_api_service import (
        ApiDataset,
        ApiGetDatasetStatusResponse,
    )
    from kagglesdk.datasets.types.dataset_enums import DatabundleVersionStatus
    from kagglesdk.kernels.types.kernels_api_service import (
        ApiGetKernelSessionStatusResponse,
        ApiListKernelSessionOutputResponse,
        ApiSaveKernelResponse,
    )
    from kagglesdk.kernels.types.kernels_enums import KernelWorkerStatus

    saved, status, dataset, ready, listing, submitted = (
        ApiSaveKernelResponse(),
        ApiGetKernelSessionStatusResponse(),
        ApiDataset(),
        ApiGetDatasetStatusResponse(),
        ApiListKernelSessionOutputResponse(),
        ApiCreateCodeSubmissionResponse(),
    )
    saved.version_number = 12
    status.status = KernelWorkerStatus.RUNNING
    dataset.current_version_number = 5
    ready.status = DatabundleVersionStatus.READY
    listing.log = json.dumps(KAGGLE_LOG)
    submitted.message = "Submission successful"
    transport = CannedTransport(
        {
            "save_kernel": saved,
            "get_kernel_session_status": status,
            "get_dataset": dataset,
            "get_dataset_status": ready,
            "list_kernel_session_output": listing,
            "create_code_submission": submitted,
        }
    )
    api = installed_kaggle_api()()
    api.build_kaggle_client = lambda: transport
    client = kr.KaggleApiClient(api)
    built = kb.build_all(tmp_path / "build", OWNER)
    folder = next(f for f in built if f.name == "03_gbdt")

    assert client.push_kernel(folder) == 12
    assert transport.requests["save_kernel"].slug == f"{OWNER}/fusionnetx-isic2024-gbdt"
    assert client.kernel_status(f"{OWNER}/fusionnetx-isic2024-gbdt", 12) == ("running", "")
    assert transport.requests["get_kernel_session_status"].version_label == "v12"
    assert client.dataset_version(f"{OWNER}/{kb.IMAGE_DATASET}") == 5
    assert client.dataset_status(f"{OWNER}/{kb.IMAGE_DATASET}") == "ready"
    assert "CUDA out of memory" in client.kernel_log(f"{OWNER}/fusionnetx-isic2024-gbdt", 12)
    files = client.kernel_output(f"{OWNER}/fusionnetx-isic2024-gbdt", 12, tmp_path / "out")
    assert files == [str(tmp_path / "out" / "fusionnetx-isic2024-gbdt.log")]
    sub = f"{OWNER}/fusionnetx-isic2024-submission"
    reply = client.submit(kb.COMPETITION, sub, 3, "submission.csv", "FusionNetX v3")
    assert reply == "Submission successful"
    request = transport.requests["create_code_submission"]
    assert (request.kernel_slug, request.kernel_version, request.file_name) == (
        "fusionnetx-isic2024-submission",
        3,
        "submission.csv",
    )


def test_a_dropped_status_check_is_retried_until_it_keeps_failing(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.status_outages = kst.MAX_FAILED_CHECKS - 1
    stopped, lines = run(tmp_path / "a", fake, weights_dir)
    assert stopped is None
    failed = [line for line in lines if "status check failed (503 Server Error)" in line]
    assert len(failed) == kst.MAX_FAILED_CHECKS - 1
    fake = FakeKaggle()
    fake.status_outages = kst.MAX_FAILED_CHECKS
    stopped, lines = run(tmp_path / "b", fake, weights_dir)
    assert "STOPPED at step 'probe': HTTPError: 503 Server Error" in stopped
    assert sum("status check failed" in line for line in lines) == kst.MAX_FAILED_CHECKS - 1
    assert "resume with:\n  python -m utils.kaggle.run" in stopped


def test_ctrl_c_keeps_the_state_and_prints_the_resume_command(tmp_path, capsys):
    fake = FakeKaggle()
    fake.datasets[f"{OWNER}/{kb.WEIGHTS_DATASET}"] = {"version": 1, "ready": True}

    def interrupted(ref, version):
        raise KeyboardInterrupt

    fake.kernel_status = interrupted
    code = kr.main(["--owner", OWNER, "--work-dir", str(tmp_path / "work")], fake)
    assert code == 130
    assert "resume with:\n  python -m utils.kaggle.run --owner alice" in capsys.readouterr().err
    pushed = state_of(tmp_path)["kernels"]
    assert sorted(pushed) == sorted(kst.PROBE_KERNELS)  # the first step's pushes
    assert {r["status"] for r in pushed.values()} == {"pushed"}
