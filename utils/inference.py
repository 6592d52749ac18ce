"""Stage 4, the submission kernel: image models -> features -> GBDT soft vote -> submission.csv.

`predict_submission(data_dir, artifacts_dir, cfg)` does, in order:
1. reads test-metadata.csv with `utils.io.read_test_metadata`: only the columns the features read
   are required, extra columns are ignored, category spellings are matched after trimming and
   ignoring case; what it found (ignored/absent columns, respelled and unseen categories, empty
   feature columns) goes into the report. An empty file, duplicate ids or a value that is not a
   number stop the kernel with the file, the column and the rows' isic_id;
2. checks every artifact file against its folder's manifest before a library opens it
   (`utils.manifest.check_folder`; a folder without one, made before manifests, is checked for
   presence and completeness only, with a note) and plans:
   - the image sources the GBDT recorded (`gbdt/features.json`: per image column the image
     model and its run's config hash) decide which image models are needed; a model dir holding
     another run than the recorded one is reported (WARNING "GBDT AND IMAGE MODELS DO NOT BELONG
     TOGETHER") and used;
   - a missing or damaged `fold{k}.pt` is left out: that model averages its other folds;
   - a needed model with no usable fold (or no readable config.json) leaves every row without
     that image column, so the metadata-only member (`lgb_meta`) scores every row (the other
     image models are then not run: their output could not be used);
   - a GBDT member with a damaged model file is left out of the soft vote
     (`utils.tabular.ensemble.GBDTEnsemble.load`); with no member left, or an unreadable
     ensemble.json / features.json, the kernel stops naming the file;
3. prints a time estimate early, against Kaggle's 12 hours: on a GPU images/s measured on a few
   batches per model (decode and every used fold model included) times the rows; on a CPU a
   projection for one T4 from the models' counted FLOPs (stated as such; no extra pass);
4. runs each needed image model with `utils.image.predict.predict`: the mean of its fold models'
   probabilities, as its OOF was made in training (fp16 autocast on CUDA, DataLoader workers);
5. builds features with `utils.tabular.features.build_features` (the training code) plus the image
   columns and runs `GBDTEnsemble.predict`: each member and the soft vote;
6. documented fallback: a row whose image is unreadable or absent from the hdf5 file gets the
   `lgb_meta` score; the report counts those rows and names the first few.

`write_submission` checks the frame with `validate_submission` (exactly the test ids in
test-metadata order, targets finite and in [0, 1]) and refuses to write a bad file;
`run_submission` writes `submission_report.json` beside it (every fallback decision) and the
report's `text()` is the summary block printed at the end of the kernel.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from utils.image.distributed import workers_per_process
from utils.image.predict import (
    CONFIG_FILE,
    CheckpointError,
    build_model,
    checkpoint_problem,
    default_device,
    fold_file,
    inference_devices,
    load_checkpoint,
    load_config,
    load_fold_models,
    predict,
    predict_with_models,
)
from utils.io import (
    TEST_METADATA,
    DataDir,
    HDF5Images,
    MetadataNotes,
    check_ids_match,
    read_test_metadata,
)
from utils.manifest import MANIFEST_FILE, atomic_output, check_folder, write_json
from utils.settings import InferenceConfig, TrainConfig, resolve
from utils.tabular.ensemble import GBDTEnsemble
from utils.tabular.features import IMAGE_PREFIX, build_features
from utils.tabular.libraries import ENSEMBLE, META_MEMBER
from utils.tabular.plus_features import OPTIONAL_GROUPS, add_optional_features

GBDT_DIR = "gbdt"
SUBMISSION_FILE = "submission.csv"
REPORT_FILE = "submission_report.json"
SUBMISSION_COLUMNS = ("isic_id", "target")
KAGGLE_LIMIT_S = 12 * 3600
HIDDEN_TEST_ROWS = 500_000  # about the size of the hidden test set the kernel is rerun on
SHOW_IDS = 5  # ids named in messages


class SubmissionError(ValueError):
    """A submission frame that Kaggle would reject or score wrongly (message lists why)."""


# ---------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ModelCheck:
    """What the file check found in one image model dir."""

    n_folds: int
    folds: tuple[int, ...]  # fold checkpoints that can be used
    damaged: dict[str, str] = field(default_factory=dict)  # fold file left out -> why
    problem: str | None = None  # why no fold can be used (the model drops out)
    notes: tuple[str, ...] = ()  # manifest findings that stopped nothing


def fold_problem(model_dir: Path, k: int, check) -> str | None:
    """Why fold{k}.pt of `model_dir` must not be used: the manifest's verdict, else (no
    manifest) absent, empty, not a complete zip or not loadable by torch."""
    rel = fold_file(k)
    if check.has_manifest:
        if rel not in check.listed and rel not in check.unlisted:
            return f"{model_dir / rel}: missing"
        if (why := check.problem(rel)) is not None:
            return why
        return checkpoint_problem(model_dir / rel)
    if (why := checkpoint_problem(model_dir / rel)) is not None:
        return why
    try:  # no manifest vouches for it: read it once, here, rather than die in the long pass
        load_checkpoint(model_dir / rel)
    except CheckpointError as err:
        return str(err)
    return None


def check_image_model(model_dir: Path) -> ModelCheck:
    """The usable folds of an image model dir, the ones left out and why (each names its file)."""
    if not model_dir.is_dir():
        return ModelCheck(0, (), problem=f"{model_dir} does not exist")
    check = check_folder(model_dir)
    notes = []
    if not check.has_manifest:
        notes.append(
            f"{model_dir}: no usable {MANIFEST_FILE} ({check.error}); its fold checkpoints are "
            "checked by reading them instead"
        )
    elif (why := check.problem(CONFIG_FILE)) is not None:
        notes.append(f"{why}; it parses and is used")
    try:
        cfg = load_config(model_dir)
    except (FileNotFoundError, TypeError, ValueError, json.JSONDecodeError) as err:
        return ModelCheck(
            0, (), problem=f"{model_dir}: unreadable config ({err})", notes=tuple(notes)
        )
    damaged = {
        fold_file(k): why
        for k in range(cfg.n_folds)
        if (why := fold_problem(model_dir, k, check)) is not None
    }
    folds = tuple(k for k in range(cfg.n_folds) if fold_file(k) not in damaged)
    problem = None if folds else f"{model_dir}: no usable fold checkpoint"
    return ModelCheck(cfg.n_folds, folds, damaged, problem, tuple(notes))


def model_dir_problem(model_dir: Path) -> str | None:
    """Why an image model dir cannot be used at all (absent, no config.json, no usable fold)."""
    return check_image_model(model_dir).problem


def recorded_run_hash(model_dir: Path) -> str | None:
    """The config_hash stage 1 recorded in `model_dir`/config.json (None if unreadable)."""
    try:
        return json.loads((model_dir / CONFIG_FILE).read_text()).get("config_hash")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def image_sources_of(ensemble: GBDTEnsemble) -> dict[str, dict[str, str]]:
    """Image column -> its recorded source run; ValueError for a GBDT that recorded none."""
    absent = [c for c in ensemble.image_columns if c not in ensemble.image_sources]
    if absent:
        raise ValueError(
            f"GBDT features.json records no image_sources for {absent}: rerun 03_gbdt so each "
            "image column names the image model and run it was trained on"
        )
    return {c: ensemble.image_sources[c] for c in ensemble.image_columns}


@dataclass(frozen=True)
class ImagePlan:
    """Which image models the GBDT reads, which will run (on which folds), which are unusable."""

    needed: tuple[str, ...]  # read by the GBDT (features.json image_sources), in its order
    run: tuple[str, ...]  # will be run on the test images
    missing: dict[str, str]  # needed but unusable (no usable fold) -> why
    unused: tuple[str, ...]  # complete under artifacts_dir but not read by the GBDT
    mismatched: dict[str, str] = field(default_factory=dict)  # another run than the GBDT's -> why
    checks: dict[str, ModelCheck] = field(default_factory=dict)  # needed model -> file check

    @property
    def metadata_only(self) -> bool:
        """True when no row can use an image feature."""
        return not self.needed or bool(self.missing)

    @property
    def folds(self) -> dict[str, tuple[int, ...]]:
        """The fold checkpoints each model to run averages."""
        return {n: self.checks[n].folds for n in self.run if n in self.checks}

    @property
    def damaged_folds(self) -> dict[str, dict[str, str]]:
        """Needed model -> {fold file left out -> why}."""
        return {n: c.damaged for n, c in self.checks.items() if c.damaged}

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(note for c in self.checks.values() for note in c.notes)


def plan_images(artifacts_dir: Path, image_sources: Mapping[str, Mapping[str, str]]) -> ImagePlan:
    """The ImagePlan for a GBDT whose image columns came from `image_sources` (features.json:
    column -> image_model, config_hash), given the run dirs under `artifacts_dir`. A run dir
    whose config_hash is not the recorded one is another run than the GBDT saw: `mismatched`."""
    needed = tuple(source["image_model"] for source in image_sources.values())
    checks = {n: check_image_model(artifacts_dir / n) for n in needed}
    missing = {n: c.problem for n, c in checks.items() if c.problem is not None}
    mismatched = {}
    for source in image_sources.values():
        name, wanted = source["image_model"], source["config_hash"]
        found = recorded_run_hash(artifacts_dir / name)
        if name not in missing and found != wanted:
            mismatched[name] = (
                f"the GBDT was trained on the OOF of {name} run {wanted}, but "
                f"{artifacts_dir / name} holds run {found}"
            )
    present = sorted(
        p.name
        for p in artifacts_dir.iterdir()
        if p.name != GBDT_DIR and p.name not in needed and (p / CONFIG_FILE).is_file()
    )
    unused = tuple(n for n in present if model_dir_problem(artifacts_dir / n) is None)
    run = () if missing else needed
    return ImagePlan(needed, run, missing, unused, mismatched, checks)


# ---------------------------------------------------------------------------------- timing


# The CPU projection for one Kaggle T4 (docs/benchmarks.md, section 4): the card's dense fp16
# tensor peak, the share of it small models in fp16 at batch 128 reach (10-25% is typical; the
# low end makes the projection conservative), and JPEG decode + resize per DataLoader worker
# (bench_image_io: 5,026 img/s per core on a 2-core EPYC).
T4_FP16_TFLOPS = 65.0
T4_UTILISATION = 0.10
DECODE_IMAGES_PER_S = 5_000.0


@dataclass(frozen=True)
class TimeEstimate:
    """Image inference time: images/s per model (decode + every used fold model) times rows.

    On a GPU the rates are measured here; on a CPU they are projected for one T4 from the
    models' counted forward FLOPs at T4_UTILISATION of its fp16 peak (`gflops` holds them), so
    the kernel's 12 h budget is judged for the machine it runs on, not for this CPU.
    """

    rows: int
    images_per_s: dict[str, float]
    gflops: dict[str, float] = field(default_factory=dict)  # per image, all used folds
    projected: bool = False  # True: a T4 projection from FLOPs, not a measurement

    def seconds(self, rows: int | None = None) -> float:
        """Image inference seconds for `rows` (default: this test set)."""
        n = self.rows if rows is None else rows
        return sum(n / rate for rate in self.images_per_s.values())

    def fits(self, rows: int | None = None, limit_s: float = KAGGLE_LIMIT_S) -> bool:
        return self.seconds(rows) < limit_s

    def __str__(self) -> str:
        if self.projected:
            lines = [
                "PROJECTED for one Kaggle T4, not measured (no GPU here): counted FLOPs per image "
                f"at an assumed {T4_UTILISATION:.0%} of the T4's {T4_FP16_TFLOPS:.0f} fp16 "
                f"TFLOPs, JPEG decode at most {DECODE_IMAGES_PER_S:,.0f} img/s per worker"
            ]
            lines += [
                f"  {m}: {self.gflops[m]:.2f} GFLOPs/img (all its folds) -> {r:,.0f} img/s"
                for m, r in self.images_per_s.items()
            ]
        else:
            rates = ", ".join(f"{m} {r:,.0f} img/s" for m, r in self.images_per_s.items())
            lines = [f"measured: {rates}"]
        for label, n in (("this test set", self.rows), ("hidden test", HIDDEN_TEST_ROWS)):
            s = self.seconds(n)
            verdict = "fits" if self.fits(n) else "DOES NOT FIT"
            lines.append(
                f"{label}: {n:,} rows x {len(self.images_per_s)} image model(s) -> "
                f"{format_duration(s)} of image inference ({verdict} Kaggle's "
                f"{KAGGLE_LIMIT_S / 3600:.0f} h limit: {100 * s / KAGGLE_LIMIT_S:.1f}%)"
            )
        return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """Seconds as '12.3 s', '4.5 min' or '6.78 h'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _timed(fn: Callable[[Sequence[str]], object], ids: Sequence[str]) -> float:
    start = time.perf_counter()
    fn(ids)
    return time.perf_counter() - start


def measure_images_per_s(
    predict_ids: Callable[[Sequence[str]], object],
    ids: Sequence[str],
    batch_size: int,
    batches: int,
) -> float:
    """Images/s of `predict_ids` from the extra time `batches` more batches take.

    After one warm-up batch it times n and 2n ids (n = batches x batch_size): the difference
    cancels fixed costs (DataLoader start-up) that would inflate a 500k-row projection. A test
    set smaller than 2n is cycled, so the 3-row public test set gives a real figure too.
    """
    if not ids:
        raise ValueError("measure_images_per_s: no ids to time")
    n = batches * batch_size
    sample = [ids[i % len(ids)] for i in range(2 * n)]
    predict_ids(sample[:batch_size])
    t_short = _timed(predict_ids, sample[:n])
    t_long = _timed(predict_ids, sample)
    if t_long > t_short:
        return n / (t_long - t_short)
    return 2 * n / max(t_long, 1e-9)


def forward_gflops(model_cfg: TrainConfig) -> float:
    """Forward GFLOPs of one image through the architecture `model_cfg` trains (2 per
    multiply-add; matmuls and convolutions), counted by torch's FlopCounterMode on the meta
    device: shapes only, no weights initialised or read (well under a second per model)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    size = model_cfg.image_size
    with torch.device("meta"), torch.no_grad():
        model = build_model(model_cfg).eval()
        with counter:
            model(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    return counter.get_total_flops() / 1e9


def project_t4(
    artifacts_dir: Path,
    models: Sequence[str],
    rows: int,
    cfg: InferenceConfig,
    folds: Mapping[str, Sequence[int]] | None = None,
) -> TimeEstimate:
    """The T4 projection of each image model (its `folds`, default all) from counted FLOPs: no
    checkpoint is read and no image predicted (a few seconds on a CPU)."""
    gflops, rates = {}, {}
    for name in models:
        model_cfg = load_config(artifacts_dir / name)
        used = model_cfg.n_folds if folds is None else len(folds.get(name, ()))
        gflops[name] = forward_gflops(model_cfg) * used
        compute = T4_UTILISATION * T4_FP16_TFLOPS * 1e3 / max(gflops[name], 1e-9)
        rates[name] = min(compute, DECODE_IMAGES_PER_S * max(cfg.num_workers, 1))
    return TimeEstimate(rows, rates, gflops, projected=True)


def estimate_time(
    artifacts_dir: Path,
    models: Sequence[str],
    images: HDF5Images,
    ids: Sequence[str],
    cfg: InferenceConfig,
    device: torch.device,
    folds: Mapping[str, Sequence[int]] | None = None,
) -> TimeEstimate:
    """On a GPU: images/s of each image model (its `folds`, default all) measured on the first
    batches of `ids` on one GPU with its share of the DataLoader workers, times the GPUs that
    `predict` shares the rows between (image.predict.inference_devices), projected to all rows.
    On a CPU: the T4 projection (project_t4, one T4), with the T4 x 2 figure printed beside it
    (twice the compute, the same CPUs decoding); the real pass then reports this machine's
    images/s."""

    if device.type != "cuda":
        one = project_t4(artifacts_dir, models, len(ids), cfg, folds)
        decode = DECODE_IMAGES_PER_S * max(cfg.num_workers, 1)
        compute = T4_UTILISATION * T4_FP16_TFLOPS * 1e3
        two = TimeEstimate(
            len(ids), {m: min(2 * compute / max(g, 1e-9), decode) for m, g in one.gflops.items()}
        )
        print(
            f"GPUs: projected for one T4; on Kaggle's T4 x 2 predict scores on both: "
            f"{format_duration(two.seconds(HIDDEN_TEST_ROWS))} for the hidden test's "
            f"{HIDDEN_TEST_ROWS:,} rows (one T4: {format_duration(one.seconds(HIDDEN_TEST_ROWS))})"
        )
        return one
    devices = inference_devices(device)
    workers = workers_per_process(cfg.num_workers, len(devices))
    rates = {}
    for name in models:
        used = None if folds is None else folds.get(name)
        model_cfg, fold_models = load_fold_models(artifacts_dir / name, devices[0], used)

        def run(part: Sequence[str], fold_models=fold_models, size=model_cfg.image_size) -> None:
            predict_with_models(
                fold_models, images, part, size, cfg.batch_size, workers, devices[0]
            )

        rate = measure_images_per_s(run, ids, cfg.batch_size, cfg.estimate_batches)
        rates[name] = rate * len(devices)
        del fold_models
        with torch.cuda.device(devices[0]):
            torch.cuda.empty_cache()
    print(
        f"GPUs: measured on {devices[0]} with {workers} DataLoader worker(s), times "
        f"{len(devices)} GPU(s) that share the rows"
    )
    return TimeEstimate(len(ids), rates)


# ---------------------------------------------------------------------------------- predict


@dataclass(frozen=True)
class InferenceReport:
    """What the kernel did: plan, fallbacks, timings and every warning it printed."""

    rows: int
    device: str
    plan: ImagePlan
    absent_ids: tuple[str, ...]  # test ids with no key in test-image.hdf5 (counted up front)
    fallback_ids: tuple[str, ...]  # rows scored by lgb_meta: an image feature is missing
    estimate: TimeEstimate | None
    images_per_s: dict[str, float]  # measured on the full pass, per image model
    member_means: dict[str, float]  # mean score per GBDT member and the ensemble
    warnings: tuple[str, ...] = field(default=())
    members: tuple[str, ...] = ()  # GBDT members in the soft vote
    dropped_members: dict[str, str] = field(default_factory=dict)  # left out -> why
    metadata: MetadataNotes | None = None  # what reading test-metadata.csv found
    artifact_notes: tuple[str, ...] = ()  # manifest findings that stopped nothing

    @property
    def n_fallback(self) -> int:
        return len(self.fallback_ids)

    @property
    def mode(self) -> str:
        """How the rows were scored, in words."""
        if not self.plan.needed:
            return "metadata-only: the GBDT was trained without image columns"
        if self.plan.missing:
            missing = sorted(self.plan.missing)
            return f"metadata-only: {META_MEMBER} for every row (missing {missing})"
        mode = f"full: image models {list(self.plan.run)} + GBDT soft vote"
        partial = [
            f"{n} on folds {list(c.folds)} of {c.n_folds}"
            for n, c in self.plan.checks.items()
            if n in self.plan.run and len(c.folds) < c.n_folds
        ]
        if partial:
            mode += f"; {', '.join(partial)}"
        if self.dropped_members:
            mode += f"; members left out: {sorted(self.dropped_members)}"
        return mode

    def decisions(self) -> list[str]:
        """Every fallback decision, one line each, naming the file or rows behind it."""
        lines = []
        for name, damaged in self.plan.damaged_folds.items():
            check = self.plan.checks[name]
            effect = (
                f"averages folds {list(check.folds)} of {check.n_folds}"
                if check.folds
                else "has no usable fold"
            )
            for why in damaged.values():
                lines.append(f"image model {name} {effect}: left out {why}")
        for name, why in self.plan.missing.items():
            lines.append(f"image model {name} unusable ({why}): {META_MEMBER} scores every row")
        for name, why in self.dropped_members.items():
            lines.append(f"GBDT member {name} left out of the vote: {why}")
        if self.fallback_ids and not self.plan.missing:
            lines.append(
                f"{self.n_fallback:,} row(s) without a readable image scored by {META_MEMBER}: "
                f"{_count_ids(self.fallback_ids)}"
            )
        return lines

    def to_dict(self) -> dict:
        """The JSON of submission_report.json."""
        return {
            "rows": self.rows,
            "device": self.device,
            "mode": self.mode,
            "decisions": self.decisions(),
            "image_models": {
                "needed": list(self.plan.needed),
                "run": list(self.plan.run),
                "folds_used": {n: list(f) for n, f in self.plan.folds.items()},
                "folds_left_out": self.plan.damaged_folds,
                "unusable": self.plan.missing,
                "unused": list(self.plan.unused),
                "another_run": self.plan.mismatched,
            },
            "gbdt_members": {"voting": list(self.members), "left_out": self.dropped_members},
            "fallback_rows": {"count": self.n_fallback, "first_ids": list(self.fallback_ids[:20])},
            "absent_from_hdf5": {
                "count": len(self.absent_ids),
                "first_ids": list(self.absent_ids[:20]),
            },
            "test_metadata": asdict(self.metadata) if self.metadata else None,
            "artifact_notes": list(self.artifact_notes),
            "warnings": list(self.warnings),
            "images_per_s": self.images_per_s,
            "estimate_s": None if self.estimate is None else self.estimate.seconds(),
            "member_means": self.member_means,
        }

    def text(self) -> str:
        """The summary block the kernel prints last: mode, every decision and finding."""
        notes = self.metadata.lines() if self.metadata else []
        sections = [
            ("mode", [self.mode]),
            ("fallback decisions", self.decisions() or ["none"]),
            ("test-metadata.csv", notes or ["as expected"]),
            ("artifacts", list(self.artifact_notes) or ["every file matches its manifest"]),
        ]
        lines = ["=" * 30 + " SUBMISSION SUMMARY " + "=" * 30, f"rows: {self.rows:,}"]
        for title, items in sections:
            lines.append(f"{title}:")
            lines += [f"  - {item}" for item in items]
        return "\n".join(lines + ["=" * 80])

    def summary(self) -> pl.DataFrame:
        """One row per fact, for the notebook."""
        facts = {
            "rows": f"{self.rows:,}",
            "device": self.device,
            "mode": self.mode,
            "image models run": ", ".join(self.plan.run) or "none",
            "image models unused by the GBDT": ", ".join(self.plan.unused) or "none",
            "image models of another run than the GBDT's": ", ".join(self.plan.mismatched)
            or "none",
            "GBDT members voting": ", ".join(self.members) or "none",
            "test ids absent from the hdf5": _count_ids(self.absent_ids),
            f"rows scored by {META_MEMBER} (fallback)": _count_ids(self.fallback_ids),
            **{f"{m} img/s (full pass)": f"{r:,.1f}" for m, r in self.images_per_s.items()},
            **{f"mean score {m}": f"{s:.5f}" for m, s in self.member_means.items()},
            **{f"decision {i + 1}": d for i, d in enumerate(self.decisions())},
            **{f"warning {i + 1}": w for i, w in enumerate(self.warnings)},
        }
        return pl.DataFrame({"item": list(facts), "value": list(facts.values())})


def _count_ids(ids: Sequence[str]) -> str:
    """'n' or 'n (first ids ...)'."""
    shown = f" (e.g. {list(ids[:SHOW_IDS])})" if len(ids) else ""
    return f"{len(ids):,}{shown}"


def image_features(
    artifacts_dir: Path,
    models: Sequence[str],
    images: HDF5Images,
    ids: Sequence[str],
    cfg: InferenceConfig,
    device: torch.device,
    log: Callable[[str], None] = print,
    folds: Mapping[str, Sequence[int]] | None = None,
) -> tuple[pl.DataFrame, dict[str, float]]:
    """isic_id plus img_<model> (mean over its `folds`, default all; NaN if unreadable) and
    images/s per model; on "cuda" every visible GPU scores a share of the rows (predict)."""

    devices = inference_devices(device)
    where = f" on {len(devices)} GPUs" if len(devices) > 1 else ""
    frame = pl.DataFrame({"isic_id": list(ids)}, schema={"isic_id": pl.String})
    rates = {}
    for name in models:
        start = time.perf_counter()
        used = None if folds is None else folds.get(name)
        pred = predict(
            artifacts_dir / name, images, ids, cfg.batch_size, cfg.num_workers, device, used
        )
        rates[name] = len(ids) / max(time.perf_counter() - start, 1e-9)
        log(f"{name}: {len(ids):,} images in {time.perf_counter() - start:.1f}s{where}")
        column = pl.col("pred").cast(pl.Float32).alias(f"{IMAGE_PREFIX}{name}")
        frame = frame.join(
            pred.select("isic_id", column), on="isic_id", how="left", maintain_order="left"
        )
        for d in devices:
            if d.type == "cuda":
                with torch.cuda.device(d):
                    torch.cuda.empty_cache()
    return frame, rates


def predict_submission(
    data_dir: str | Path,
    artifacts_dir: str | Path,
    cfg: InferenceConfig | None = None,
    device: torch.device | None = None,
    log: Callable[[str], None] = print,
) -> tuple[pl.DataFrame, InferenceReport]:
    """The submission frame (isic_id, target in test-metadata order) and what was done."""
    cfg = cfg or resolve("full").inference
    device = device or default_device()
    artifacts_dir = Path(artifacts_dir)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        log(f"WARNING: {message}")

    data = DataDir(data_dir)
    metadata, notes = read_test_metadata(data.path(TEST_METADATA))
    ids = metadata["isic_id"].to_list()
    log(f"{data.path(TEST_METADATA)}: {len(ids):,} test rows; device {_device_name(device)}")
    for line in notes.lines():
        log(f"NOTE: {data.path(TEST_METADATA)}: {line}")
    if not (artifacts_dir / GBDT_DIR / "ensemble.json").is_file():
        raise FileNotFoundError(
            f"no GBDT artifacts at {artifacts_dir / GBDT_DIR} (ensemble.json): run 03_gbdt first "
            "or attach its dataset"
        )
    ensemble = GBDTEnsemble.load(artifacts_dir / GBDT_DIR)
    plan = plan_images(artifacts_dir, image_sources_of(ensemble))
    artifact_notes = ensemble.notes + plan.notes
    for note in artifact_notes:
        log(f"NOTE: {note}")
    for name, why in ensemble.dropped.items():
        warn(f"GBDT member {name} left out of the vote: {why}")
    for why in plan.mismatched.values():
        warn(f"GBDT AND IMAGE MODELS DO NOT BELONG TOGETHER: {why}")
    for name, damaged in plan.damaged_folds.items():
        if name not in plan.missing:
            used = list(plan.checks[name].folds)
            warn(f"image model {name} averages folds {used}; left out: {list(damaged.values())}")
    for name, why in plan.missing.items():
        details = list(plan.checks[name].damaged.values())
        warn(f"image model {name} is needed by the GBDT but unusable: {why} {details or ''}")
    if plan.missing:
        warn(f"METADATA-ONLY SUBMISSION: every row gets the {META_MEMBER} score")
    elif not plan.needed:
        warn("METADATA-ONLY SUBMISSION: the GBDT was trained without image columns")
    if plan.unused:
        log(f"image model(s) {list(plan.unused)} present but not read by the GBDT: skipped")
    if META_MEMBER not in ensemble.models and plan.needed:
        warn(
            f"no usable {META_MEMBER} member: rows without an image feature are scored by "
            f"{list(ensemble.models)} with the image columns missing"
        )

    absent: list[str] = []
    estimate = None
    image_frame = pl.DataFrame({"isic_id": ids}, schema={"isic_id": pl.String})
    rates: dict[str, float] = {}
    if plan.run:
        images = data.test_images()
        absent = check_ids_match(metadata, images, str(images.path))
        if absent:
            warn(f"{len(absent):,} test id(s) absent from {images.path}: {_count_ids(absent)}")
        if cfg.estimate_batches > 0 and ids:
            estimate = estimate_time(artifacts_dir, plan.run, images, ids, cfg, device, plan.folds)
            log(f"time estimate of the image models ({_device_name(device)}):\n{estimate}")
            if not estimate.fits():
                warn(f"image inference needs ~{format_duration(estimate.seconds())}, over 12 h")
        image_frame, rates = image_features(
            artifacts_dir, plan.run, images, ids, cfg, device, log, plan.folds
        )
    # site features as stage 3 built them (a column another group shares is then computed by the
    # same group on both sides); artifacts that record no groups get them all
    site = ensemble.feature_groups.get("site_features", True)
    frame, _ = build_features(metadata, source=data.path(TEST_METADATA), site_features=site)
    frame = frame.join(image_frame, on="isic_id", how="left", maintain_order="left")
    for column in ensemble.image_columns:
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.Float32).alias(column))
    # the optional groups stage 3 recorded in features.json (the `plus` recipe), by the same code:
    # ugly-duckling features of the test metadata, patient-relative fold-mean test scores
    groups = {g: ensemble.feature_groups.get(g, False) for g in OPTIONAL_GROUPS}
    if any(groups.values()):
        start = time.perf_counter()
        frame, _, _ = add_optional_features(
            frame, metadata, ensemble.image_columns, threads=cfg.threads, **groups
        )
        built = [g for g, on in groups.items() if on]
        log(f"optional feature groups {built}: {time.perf_counter() - start:.1f}s")
    scores = ensemble.predict(frame, cfg.threads)
    fallback = ensemble.image_missing(frame) if META_MEMBER in scores else np.zeros(len(ids), bool)
    fallback_ids = tuple(np.asarray(ids, dtype=object)[fallback].tolist())
    if fallback.any() and not plan.missing:
        warn(f"{len(fallback_ids):,} row(s) fell back to {META_MEMBER}: {_count_ids(fallback_ids)}")
    submission = pl.DataFrame(
        {"isic_id": frame["isic_id"], "target": scores[ENSEMBLE].astype(np.float64)},
        schema={"isic_id": pl.String, "target": pl.Float64},
    )
    validate_submission(submission, ids)
    report = InferenceReport(
        rows=len(ids),
        device=_device_name(device),
        plan=plan,
        absent_ids=tuple(absent),
        fallback_ids=fallback_ids,
        estimate=estimate,
        images_per_s=rates,
        member_means={m: float(np.mean(s)) for m, s in scores.items()},
        warnings=tuple(warnings),
        members=tuple(ensemble.models),
        dropped_members=dict(ensemble.dropped),
        metadata=notes,
        artifact_notes=artifact_notes,
    )
    log(f"mode: {report.mode}; {report.n_fallback:,} row(s) scored by {META_MEMBER}")
    return submission, report


def _device_name(device: torch.device) -> str:
    """'cuda (GPU name), fp16 autocast', with every GPU predict uses counted ('cuda (2 x Tesla
    T4), ...'; 'cuda:1 (...)' for one given GPU), or 'cpu'."""

    if device.type == "cuda":
        devices = inference_devices(device)
        count = f"{len(devices)} x " if len(devices) > 1 else ""
        return f"{device} ({count}{torch.cuda.get_device_name(devices[0])}), fp16 autocast"
    return device.type


# ---------------------------------------------------------------------------------- output


def read_test_ids(data_dir: str | Path) -> list[str]:
    """isic_ids of `<data_dir>/test-metadata.csv` in file order (what the submission must hold)."""
    return read_test_metadata(Path(data_dir) / TEST_METADATA)[0]["isic_id"].to_list()


def submission_problems(sub: pl.DataFrame, test_ids: Sequence[str]) -> list[str]:
    """Every reason `sub` is not a valid submission for `test_ids` (empty when valid)."""
    if tuple(sub.columns) != SUBMISSION_COLUMNS:
        return [f"columns must be {list(SUBMISSION_COLUMNS)}, got {sub.columns}"]
    if not sub.schema["target"].is_numeric():
        return [f"target must be numeric, got {sub.schema['target']}"]
    problems = []
    ids = sub["isic_id"].to_list()
    expected = list(test_ids)
    dupes = sub.filter(pl.col("isic_id").is_duplicated())["isic_id"].unique(maintain_order=True)
    if len(dupes):
        problems.append(f"{len(dupes)} duplicate isic_id(s): {dupes.head(SHOW_IDS).to_list()}")
    given, wanted = set(ids), set(expected)
    missing = [i for i in expected if i not in given]
    if missing:
        problems.append(f"{len(missing)} test id(s) missing: {missing[:SHOW_IDS]}")
    extra = [i for i in ids if i not in wanted]
    if extra:
        problems.append(f"{len(extra)} id(s) not in the test set: {extra[:SHOW_IDS]}")
    if not (missing or extra or len(dupes)) and ids != expected:
        first = next(k for k, (a, b) in enumerate(zip(ids, expected, strict=True)) if a != b)
        problems.append(f"ids not in test-metadata order: row {first} is {ids[first]!r}")
    if len(ids) != len(expected):
        problems.append(f"{len(ids)} rows, the test set has {len(expected)}")
    target = sub["target"].cast(pl.Float64)
    unscored = sub.filter(target.is_null() | target.is_nan())["isic_id"]
    if len(unscored):
        problems.append(f"{len(unscored)} null/NaN target(s): {unscored.head(SHOW_IDS).to_list()}")
    outside = sub.filter(~target.is_between(0.0, 1.0) & ~target.is_nan())["isic_id"]
    if len(outside):
        shown = outside.head(SHOW_IDS).to_list()
        problems.append(f"{len(outside)} target(s) outside [0, 1]: {shown}")
    return problems


def validate_submission(sub: pl.DataFrame, test_ids: Sequence[str]) -> None:
    """Raise SubmissionError listing every problem unless `sub` is exactly right for `test_ids`."""
    problems = submission_problems(sub, test_ids)
    if problems:
        raise SubmissionError("invalid submission:\n  " + "\n  ".join(problems))


def write_submission(sub: pl.DataFrame, output_dir: str | Path, test_ids: Sequence[str]) -> Path:
    """Validate, then write `<output_dir>/submission.csv` atomically; its path."""
    validate_submission(sub, test_ids)
    path = Path(output_dir) / SUBMISSION_FILE
    with atomic_output(path) as tmp:
        sub.write_csv(tmp)
    return path


def run_submission(
    data_dir: str | Path,
    artifacts_dir: str | Path,
    output_dir: str | Path,
    preset: str = "full",
    recipe: str = "paper",
    **overrides,
) -> tuple[pl.DataFrame, InferenceReport, Path]:
    """Stage 4 entry: settings (utils.settings), predict, validate and write submission.csv and,
    beside it, submission_report.json (InferenceReport.to_dict: every fallback decision).

    `overrides` are InferenceConfig fields (batch_size, num_workers, ...); None keeps the preset's.
    """
    cfg = resolve(preset, recipe, inference=overrides).inference
    print(cfg)
    submission, report = predict_submission(data_dir, artifacts_dir, cfg)
    path = write_submission(submission, output_dir, read_test_ids(data_dir))
    write_json(Path(output_dir) / REPORT_FILE, report.to_dict())
    print(f"wrote {path} and {REPORT_FILE}: {submission.height:,} rows; {report.mode}")
    return submission, report, path
