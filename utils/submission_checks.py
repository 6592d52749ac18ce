"""The submission kernel's checks, all made before the long image pass.

- `plan_images`: every image model dir the GBDT reads, checked file by file against its manifest
  (`check_image_model`): usable folds, damaged folds left out, a model with none unusable, and a
  model dir holding another run than the one the GBDT was trained on (`mismatched`);
- `check_gbdt_description`: `gbdt/ensemble.json` and `features.json` against the manifest (a
  difference stops the kernel, utils.manifest.DAMAGED_FILE_RULES) before anything else is read;
- `check_member_columns`: every GBDT member finds each of its columns in the test features;
- `rehearsal_problems`: the whole chain's scores on a handful of rows are finite and in [0, 1];
- `degenerate_images`: test images smaller than MIN_IMAGE_SIDE pixels, found from the JPEG
  headers (no decode).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from utils.image.predict import CheckpointError, checkpoint_problem, load_checkpoint, load_config
from utils.io import HDF5Images, jpeg_size
from utils.layout import (
    CONFIG_FILE,
    ENSEMBLE_FILE,
    FEATURES_FILE,
    GBDT_DIR,
    MANIFEST_FILE,
    fold_file,
)
from utils.manifest import check_folder, damaged_file_rule, verified_json
from utils.tabular.ensemble import ArtifactError, GBDTEnsemble

# A test crop this small carries no lesion to score (real crops are 100-200 px a side); such
# images are still scored, like any other, but counted and named in the report.
MIN_IMAGE_SIDE = 16
SHOW_IDS = 5  # ids or columns named in a message


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
        return check.problem(rel) or checkpoint_problem(model_dir / rel)
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
        notes.append(f"{why}: not used; {damaged_file_rule(CONFIG_FILE)[1]}")
    try:
        cfg = load_config(model_dir)
    except (FileNotFoundError, TypeError, ValueError, KeyError) as err:
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


def recorded_run_hash(model_dir: Path) -> str | None:
    """The config_hash stage 1 recorded in `model_dir`/config.json (None if unreadable)."""
    try:
        return verified_json(model_dir, CONFIG_FILE).get("config_hash")
    except (OSError, ValueError, AttributeError):
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
    unused = tuple(n for n in present if check_image_model(artifacts_dir / n).problem is None)
    run = () if missing else needed
    return ImagePlan(needed, run, missing, unused, mismatched, checks)


# ---------------------------------------------------------------------------------- gbdt


def check_gbdt_description(gbdt_dir: Path) -> None:
    """Stop (DamagedArtifact naming the file) when ensemble.json or features.json differs from
    the gbdt folder's manifest: what the members are and read cannot be guessed."""
    check = check_folder(gbdt_dir)
    for name in (ENSEMBLE_FILE, FEATURES_FILE):
        verified_json(gbdt_dir, name, check)


def check_member_columns(ensemble: GBDTEnsemble, frame: pl.DataFrame, gbdt_dir: Path) -> None:
    """ArtifactError naming ensemble.json / features.json unless every member finds each column
    it was trained on in `frame` (one line per member that does not)."""
    problems = [
        f"member {name!r}: {len(missing)} column(s) missing from the test features, e.g. "
        f"{missing[:SHOW_IDS]}"
        for name, columns in ensemble.features.items()
        if (missing := [c for c in columns if c not in frame.columns])
    ]
    if problems:
        raise ArtifactError(
            f"{gbdt_dir / ENSEMBLE_FILE} / {FEATURES_FILE}: the members read columns the test "
            "features do not have (built by other code or from other data?):\n  "
            + "\n  ".join(problems)
        )


def rehearsal_problems(scores: Mapping[str, np.ndarray], ids: Sequence[str]) -> list[str]:
    """Why the scores of the chain's run on a few rows are not a submission's: a member's score
    that is not finite or outside [0, 1] (each line names the member and the rows)."""
    problems = []
    for name, values in scores.items():
        bad = ~np.isfinite(values) | (values < 0) | (values > 1)
        if bad.any():
            shown = list(np.asarray(ids, dtype=object)[bad][:SHOW_IDS])
            problems.append(f"{name}: {int(bad.sum())} score(s) not in [0, 1] for {shown}")
    return problems


# ---------------------------------------------------------------------------------- images


def degenerate_images(
    images: HDF5Images, ids: Sequence[str], min_side: int = MIN_IMAGE_SIDE
) -> dict[str, str]:
    """isic_id -> 'W x H px' for each image whose JPEG header says it is smaller than `min_side`
    on a side (or has no readable size); absent ids are left to the hdf5 check."""
    found = {}
    for isic_id in tqdm(ids, desc=f"image sizes {images.path.name}", mininterval=5.0):
        try:
            size = jpeg_size(images.read_bytes(isic_id))
        except KeyError:
            continue
        if size is None:
            found[isic_id] = "no JPEG size in its header"
        elif min(size) < min_side:
            found[isic_id] = f"{size[1]} x {size[0]} px"
    return found
