"""Stage 4, the submission kernel: image models -> features -> GBDT soft vote -> submission.csv.

`predict_submission(data_dir, artifacts_dir, cfg)` makes every check before the first image is
decoded (steps 1-4), so a late error costs seconds, not the image pass:
1. `read_inputs`: test-metadata.csv, read and checked by `utils.io.read_test_metadata` (an
   empty file, duplicate ids or a value that is not a number stop the kernel with the file, the
   column and the rows' isic_id; values a lesion cannot have become missing and are counted);
2. `load_artifacts`: every artifact file checked against its folder's manifest before a library
   opens it (utils.manifest.DAMAGED_FILE_RULES), and the image plan
   (utils.submission_checks.plan_images): which image models run, on which folds, and every
   fallback, each warned;
3. `metadata_features`: the test features that need no image, by the training code;
   `open_images` indexes the hdf5 file (absent ids) and reads every JPEG header (degenerate
   images);
4. `rehearse`: the whole chain scores a handful of test rows in [0, 1], or the kernel stops;
5. `image_pass`: the time estimate against Kaggle's 12 hours (utils.submission_time), then each
   needed image model over every row (fold mean, fp16 autocast on CUDA); the GBDT soft vote on
   the features with the image columns; a row whose image is unreadable or absent gets the
   `lgb_meta` score, counted and named.

`run_submission` checks the output dir is writable before anything runs, writes the checked
submission.csv (utils.submission_file) and `submission_report.json` beside it; the report's
`text()` is the summary block printed at the end of the kernel (utils.submission_report).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from utils.cli import format_duration
from utils.image.predict import default_device, inference_devices, predict
from utils.io import (
    TEST_METADATA,
    DataDir,
    HDF5Images,
    MetadataNotes,
    check_ids_match,
    read_test_metadata,
)
from utils.layout import ENSEMBLE_FILE, FEATURES_FILE, GBDT_DIR, REPORT_FILE
from utils.manifest import write_json
from utils.settings import InferenceConfig, resolve
from utils.submission_checks import (
    SHOW_IDS,
    ImagePlan,
    check_gbdt_description,
    check_member_columns,
    degenerate_images,
    image_sources_of,
    plan_images,
    rehearsal_problems,
)
from utils.submission_file import (
    check_writable,
    naming_the_file,
    read_test_ids,
    validate_submission,
    write_submission,
)
from utils.submission_report import InferenceReport, _count_ids
from utils.submission_time import TimeEstimate, estimate_time
from utils.tabular.ensemble import ArtifactError, GBDTEnsemble, recorded_recipe
from utils.tabular.features import IMAGE_PREFIX, build_features
from utils.tabular.libraries import ENSEMBLE, META_MEMBER
from utils.tabular.plus_features import OPTIONAL_GROUPS, add_optional_features

# ---------------------------------------------------------------------------------- predict


REHEARSAL_ROWS = 4  # test rows the whole chain runs on before the long image pass


@dataclass
class KernelRun:
    """One run of the kernel: where things are, its settings, and every warning, by class."""

    data: DataDir
    artifacts_dir: Path
    cfg: InferenceConfig
    device: torch.device
    log: Callable[[str], None]
    warnings: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # warnings of no class of the report

    def warn(self, message: str, other: bool = False) -> None:
        self.warnings.append(message)
        if other:
            self.other.append(message)
        self.log(f"WARNING: {message}")


def image_features(
    run: KernelRun, plan: ImagePlan, images, ids: Sequence[str], log: Callable[[str], None]
) -> tuple[pl.DataFrame, dict[str, float]]:
    """isic_id plus img_<model> of every model `plan` runs (mean over its usable folds; NaN if
    unreadable) and images/s per model; on "cuda" every visible GPU scores a share of the rows
    (predict)."""
    devices = inference_devices(run.device)
    where = f" on {len(devices)} GPUs" if len(devices) > 1 else ""
    frame = pl.DataFrame({"isic_id": list(ids)}, schema={"isic_id": pl.String})
    rates = {}
    for name in plan.run:
        start = time.perf_counter()
        cfg, used = run.cfg, plan.folds.get(name)
        pred = predict(
            run.artifacts_dir / name, images, ids, cfg.batch_size, cfg.num_workers, run.device, used
        )
        seconds = time.perf_counter() - start
        rates[name] = len(ids) / max(seconds, 1e-9)
        log(f"{name}: {len(ids):,} images in {seconds:.1f}s{where}")
        column = pl.col("pred").cast(pl.Float32).alias(f"{IMAGE_PREFIX}{name}")
        frame = frame.join(
            pred.select("isic_id", column), on="isic_id", how="left", maintain_order="left"
        )
        for d in devices:
            if d.type == "cuda":
                with torch.cuda.device(d):
                    torch.cuda.empty_cache()
    return frame, rates


def read_inputs(run: KernelRun) -> tuple[pl.DataFrame, MetadataNotes]:
    """Step 1: test-metadata.csv, read and checked (utils.io.read_test_metadata), its notes."""
    path = run.data.path(TEST_METADATA)
    metadata, notes = read_test_metadata(path)
    run.log(f"{path}: {metadata.height:,} test rows; device {_device_name(run.device)}")
    for line in notes.lines():
        run.log(f"NOTE: {path}: {line}")
    return metadata, notes


def load_artifacts(run: KernelRun) -> tuple[GBDTEnsemble, ImagePlan]:
    """Step 2: every artifact checked against its manifest and loaded, the image plan made;
    each finding printed (NOTE) or warned."""
    gbdt_dir = run.artifacts_dir / GBDT_DIR
    if not (gbdt_dir / ENSEMBLE_FILE).is_file():
        raise FileNotFoundError(
            f"no GBDT artifacts at {gbdt_dir} ({ENSEMBLE_FILE}): run 03_gbdt first or attach its "
            "dataset"
        )
    check_gbdt_description(gbdt_dir)
    ensemble = GBDTEnsemble.load(gbdt_dir)
    plan = plan_images(run.artifacts_dir, image_sources_of(ensemble))
    for note in ensemble.notes + plan.notes:
        run.log(f"NOTE: {note}")
    warn_plan(run, ensemble, plan)
    return ensemble, plan


def warn_plan(run: KernelRun, ensemble: GBDTEnsemble, plan: ImagePlan) -> None:
    """One WARNING per fallback the plan takes and per run that does not belong."""
    for name, why in ensemble.dropped.items():
        run.warn(f"GBDT member {name} left out of the vote: {why}")
    for why in plan.mismatched.values():
        run.warn(f"GBDT AND IMAGE MODELS DO NOT BELONG TOGETHER: {why}")
    for name, damaged in plan.damaged_folds.items():
        if name not in plan.missing:
            used = list(plan.checks[name].folds)
            run.warn(
                f"image model {name} averages folds {used}; left out: {list(damaged.values())}"
            )
    for name, why in plan.missing.items():
        details = list(plan.checks[name].damaged.values())
        run.warn(f"image model {name} is needed by the GBDT but unusable: {why} {details or ''}")
    if plan.missing:
        run.warn(f"METADATA-ONLY SUBMISSION: every row gets the {META_MEMBER} score")
    elif not plan.needed:
        run.warn("METADATA-ONLY SUBMISSION: the GBDT was trained without image columns", True)
    if plan.unused:
        run.log(f"image model(s) {list(plan.unused)} present but not read by the GBDT: skipped")
    if META_MEMBER not in ensemble.models and plan.needed:
        run.warn(
            f"no usable {META_MEMBER} member: rows without an image feature are scored by "
            f"{list(ensemble.models)} with the image columns missing",
            True,
        )


def metadata_features(
    run: KernelRun, metadata: pl.DataFrame, ensemble: GBDTEnsemble
) -> pl.DataFrame:
    """Step 3: the test features that need no image, by the training code and as stage 3 built
    them (features.json: the site features, and each metadata group of the optional-group
    registry; artifacts that record no groups get the site features); then every GBDT member
    must find each of its columns (ArtifactError naming ensemble.json otherwise)."""
    site = ensemble.feature_groups.get("site_features", True)
    source = run.data.path(TEST_METADATA)
    frame, _ = build_features(metadata, source=source, site_features=site)
    groups = _recorded_groups(ensemble, "meta")
    if any(groups.values()):
        start = time.perf_counter()
        frame, _, _ = add_optional_features(frame, metadata, (), threads=run.cfg.threads, **groups)
        built = [g for g, on in groups.items() if on]
        run.log(f"optional feature groups {built}: {time.perf_counter() - start:.1f}s")
    head = with_images(frame.head(REHEARSAL_ROWS), frame.select("isic_id"), ensemble, 1)
    check_member_columns(ensemble, head, run.artifacts_dir / GBDT_DIR)
    return frame


def with_images(
    features: pl.DataFrame, image_frame: pl.DataFrame, ensemble: GBDTEnsemble, threads: int
) -> pl.DataFrame:
    """The GBDT's input: `features` with the image columns (missing ones null) and, when stage
    3 recorded them, the patient-relative image features."""
    frame = features.join(image_frame, on="isic_id", how="left", maintain_order="left")
    absent = [c for c in ensemble.image_columns if c not in frame.columns]
    frame = frame.with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in absent)
    groups = _recorded_groups(ensemble, "image")
    if any(groups.values()):
        frame, _, _ = add_optional_features(
            frame, frame, ensemble.image_columns, threads=threads, **groups
        )
    return frame


def _recorded_groups(ensemble: GBDTEnsemble, kind: str) -> dict[str, bool]:
    """The optional groups of `kind` ("meta" or "image") and whether stage 3 built each."""
    return {
        name: bool(ensemble.feature_groups.get(name, False))
        for name, (group_kind, _) in OPTIONAL_GROUPS.items()
        if group_kind == kind
    }


def rehearse(
    run: KernelRun, features: pl.DataFrame, ensemble: GBDTEnsemble, plan: ImagePlan, images
) -> None:
    """Step 4: before the long pass, the whole chain (image models, features, members, vote)
    scores a handful of rows; a score that is not in [0, 1] stops the kernel naming the file,
    within seconds rather than after the image pass."""
    head = features.head(REHEARSAL_ROWS)
    ids = head["isic_id"].to_list()
    # its timings on a few rows mean nothing: not logged
    image_frame, _ = image_features(run, plan, images, ids, lambda _: None)
    scores = ensemble.predict(with_images(head, image_frame, ensemble, 1), run.cfg.threads)
    problems = rehearsal_problems(scores, ids)
    if problems:
        raise ArtifactError(
            f"{run.artifacts_dir / GBDT_DIR}: the chain on {len(ids)} test rows gives unusable "
            "scores:\n  " + "\n  ".join(problems)
        )
    run.log(f"checks passed: the whole chain scored {len(ids)} test rows; the long pass starts")


def open_images(
    run: KernelRun, metadata: pl.DataFrame, plan: ImagePlan
) -> tuple[HDF5Images | None, list[str], dict[str, str]]:
    """The test images (None when no image model runs), the ids absent from them and the
    degenerate images (smaller than MIN_IMAGE_SIDE), each warned."""
    if not plan.run:
        return None, [], {}
    images = run.data.test_images()
    absent = check_ids_match(metadata, images, str(images.path))
    if absent:
        run.warn(f"{len(absent):,} test id(s) absent from {images.path}: {_count_ids(absent)}")
    small = degenerate_images(images, metadata["isic_id"].to_list())
    if small:
        shown = dict(list(small.items())[:SHOW_IDS])
        run.warn(f"{len(small):,} degenerate test image(s) in {images.path}: {shown}")
    return images, absent, small


def image_pass(
    run: KernelRun, plan: ImagePlan, images, ids: Sequence[str]
) -> tuple[pl.DataFrame, dict[str, float], TimeEstimate | None]:
    """Step 5: the time estimate, then the long pass: every needed image model on every row."""
    estimate = None
    if plan.run and run.cfg.estimate_batches > 0 and ids:
        estimate = estimate_time(
            run.artifacts_dir, plan.run, images, ids, run.cfg, run.device, plan.folds
        )
        run.log(f"time estimate of the image models ({_device_name(run.device)}):\n{estimate}")
        if not estimate.fits():
            run.warn(
                f"image inference needs ~{format_duration(estimate.seconds())}, over 12 h", True
            )
    frame, rates = image_features(run, plan, images, ids, run.log)
    return frame, rates, estimate


def predict_submission(
    data_dir: str | Path,
    artifacts_dir: str | Path,
    cfg: InferenceConfig,
    log: Callable[[str], None] = print,
) -> tuple[pl.DataFrame, InferenceReport]:
    """The submission frame (isic_id, target in test-metadata order) and what was done: every
    check first (steps 1-4), then the long image pass and the vote."""
    device = default_device()
    run = KernelRun(DataDir(data_dir), Path(artifacts_dir), cfg, device, log)
    metadata, notes = read_inputs(run)
    ids = metadata["isic_id"].to_list()
    ensemble, plan = load_artifacts(run)
    features = metadata_features(run, metadata, ensemble)
    images, absent, small = open_images(run, metadata, plan)
    rehearse(run, features, ensemble, plan, images)
    image_frame, rates, estimate = image_pass(run, plan, images, ids)
    frame = with_images(features, image_frame, ensemble, cfg.threads)
    scores = ensemble.predict(frame, cfg.threads)
    submission = pl.DataFrame(
        {"isic_id": frame["isic_id"], "target": scores[ENSEMBLE].astype(np.float64)},
        schema={"isic_id": pl.String, "target": pl.Float64},
    )
    validate_submission(submission, ids)
    fallback = ensemble.image_missing(frame) if META_MEMBER in scores else np.zeros(len(ids), bool)
    fallback_ids = tuple(np.asarray(ids, dtype=object)[fallback].tolist())
    if fallback.any() and not plan.missing:
        run.warn(
            f"{len(fallback_ids):,} row(s) fell back to {META_MEMBER}: {_count_ids(fallback_ids)}"
        )
    report = InferenceReport(
        rows=len(ids),
        device=_device_name(device),
        plan=plan,
        absent_ids=tuple(absent),
        fallback_ids=fallback_ids,
        estimate=estimate,
        images_per_s=rates,
        member_means={m: float(np.mean(s)) for m, s in scores.items()},
        warnings=tuple(run.warnings),
        members=tuple(ensemble.models),
        dropped_members=dict(ensemble.dropped),
        metadata=notes,
        artifact_notes=ensemble.notes + plan.notes,
        degenerate=small,
        other_warnings=tuple(run.other),
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


def run_submission(
    data_dir: str | Path,
    artifacts_dir: str | Path,
    output_dir: str | Path,
    preset: str = "full",
    **overrides,
) -> tuple[pl.DataFrame, InferenceReport, Path]:
    """Stage 4 entry: settings (utils.settings), predict, validate and write submission.csv and,
    beside it, submission_report.json (InferenceReport.to_dict: every fallback decision).

    The recipe is the one stage 3 recorded with its artifacts (gbdt/features.json, with the
    feature groups and blend it used): the kernel takes no recipe of its own to disagree with.
    `overrides` are InferenceConfig fields (batch_size, num_workers, ...); None keeps the preset's.
    """
    if "recipe" in overrides:
        raise TypeError(
            "run_submission takes no recipe: it reads the one stage 3 recorded in "
            f"{Path(artifacts_dir) / GBDT_DIR / FEATURES_FILE}"
        )
    recipe = recorded_recipe(Path(artifacts_dir) / GBDT_DIR)
    cfg = resolve(preset, recipe or "paper", inference=overrides).inference
    print(cfg)
    check_writable(Path(output_dir))
    print(f"recipe: {recipe or 'not recorded (GBDT artifacts from before recipes were recorded)'}")
    submission, report = predict_submission(data_dir, artifacts_dir, cfg)
    path = write_submission(submission, output_dir, read_test_ids(data_dir))
    with naming_the_file(Path(output_dir) / REPORT_FILE):
        write_json(Path(output_dir) / REPORT_FILE, {**report.to_dict(), "recipe": recipe})
    print(f"wrote {path} and {REPORT_FILE}: {submission.height:,} rows; {report.mode}")
    return submission, report, path
