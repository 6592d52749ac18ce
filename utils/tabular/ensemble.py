"""The fitted GBDT ensemble of a stage 3 artifact dir, loaded for inference (stage 4).

`GBDTEnsemble.load` checks every file against the folder's `manifest.json` before a library
opens it (a truncated LightGBM file kills the process inside native code, with no traceback):
- `ensemble.json` or `features.json` unreadable: ArtifactError naming the file (no fallback);
  readable but not what the manifest says: a note, and they are used;
- a member with a damaged, missing or unloadable model file is left out of the vote (`dropped`,
  naming the file and why) while another member is intact; with none left, ArtifactError;
- a folder without a manifest (artifacts made before manifests) is loaded with a note; its
  LightGBM files are first checked to end with their closing lines, as a cut file would not.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from utils.layout import ENSEMBLE_FILE, FEATURES_FILE, MANIFEST_FILE
from utils.manifest import FolderCheck, check_folder
from utils.tabular.libraries import ENSEMBLE, LIBRARIES, META_MEMBER, Member, member_matrix

LIGHTGBM_END = "end of trees"  # the line after a LightGBM model's last tree


class ArtifactError(ValueError):
    """A GBDT artifact that cannot be used and has no fallback; the message names the file."""


def read_json_artifact(check: FolderCheck, name: str, notes: list[str]) -> Any:
    """The parsed JSON file `name` of the checked folder, adding to `notes` when the manifest
    disagrees; ArtifactError naming the file when it is absent or unreadable."""
    path = check.folder / name
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        why = check.problem(name) or f"{type(err).__name__}: {err}"
        raise ArtifactError(f"{path}: unreadable, the GBDT cannot be used ({why})") from err
    if (note := check.problem(name)) is not None:
        notes.append(f"{note}; it parses and is used")
    return data


def lightgbm_text_problem(path: Path) -> str | None:
    """Why a LightGBM text model is incomplete: no 'end of trees' line, or fewer trees than
    its header's tree_sizes lists (a file cut at a tree boundary)."""
    text = path.read_text(errors="replace")
    if LIGHTGBM_END not in text:
        return f"{path}: incomplete LightGBM model (no '{LIGHTGBM_END}' line: truncated?)"
    sizes = next((ln for ln in text.splitlines() if ln.startswith("tree_sizes=")), "tree_sizes=")
    trees = sum(ln.startswith("Tree=") for ln in text.splitlines())
    if len(sizes.split("=", 1)[1].split()) != trees:
        return f"{path}: incomplete LightGBM model ({trees} trees, header lists more)"
    return None


def model_file_problem(check: FolderCheck, rel: str, library: str) -> str | None:
    """Why model file `rel` must not be opened: the manifest's verdict, or (no manifest) absent,
    empty, or an incomplete LightGBM text."""
    path = check.folder / rel
    if check.has_manifest:
        if rel not in check.listed and rel not in check.unlisted:
            return f"{path}: missing (not in the manifest either)"
        return check.problem(rel)
    if not path.is_file():
        return f"{path}: missing"
    if path.stat().st_size == 0:
        return f"{path}: empty file (0 bytes)"
    return lightgbm_text_problem(path) if library == "lgb" else None


def load_member(check: FolderCheck, files: list[str], library: str) -> tuple[list[Any], str]:
    """The loaded fold models of one member, or ([], why) for its first unusable file."""
    models = []
    for rel in files:
        if (why := model_file_problem(check, rel, library)) is not None:
            return [], why
        try:
            models.append(LIBRARIES[library].load(check.folder / rel))
        except Exception as err:  # noqa: BLE001 - each library raises its own error types
            return [], f"{check.folder / rel}: cannot be loaded ({type(err).__name__}: {err})"
    if not models:
        return [], f"{check.folder / ENSEMBLE_FILE}: the member lists no model file"
    return models, ""


def recorded_recipe(gbdt_dir: str | Path) -> str | None:
    """The recipe stage 3 recorded in `<gbdt_dir>/features.json`; None when absent or unreadable
    (GBDTEnsemble.load then names what is wrong with the folder)."""
    try:
        recipe = json.loads((Path(gbdt_dir) / FEATURES_FILE).read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None
    return recipe if isinstance(recipe, str) else None


@dataclass(frozen=True)
class GBDTEnsemble:
    """Fitted members loaded from a gbdt artifact dir, for inference."""

    features: dict[str, tuple[str, ...]]
    libraries: dict[str, str]
    models: dict[str, list[Any]]
    image_columns: tuple[str, ...]
    image_sources: dict[str, dict[str, str]]  # image column -> image_model, config_hash (stage 3)
    dropped: dict[str, str] = field(default_factory=dict)  # member left out -> why (names a file)
    notes: tuple[str, ...] = ()  # what the file check found that did not stop anything
    # blend weights fitted in stage 3 (GBDTConfig.blend "nested"); None: the equal soft vote
    weights: dict[str, float] | None = None
    # optional feature groups stage 3 built (features.json; artifacts from before: none)
    feature_groups: dict[str, bool] = field(default_factory=dict)
    recipe: str | None = None  # the recipe stage 3 ran (features.json; artifacts from before: None)

    @classmethod
    def load(cls, gbdt_dir: str | Path) -> GBDTEnsemble:
        """Load every fold/seed model listed in `<gbdt_dir>/ensemble.json`, each file verified
        against the manifest first; damaged members are left out (`dropped`)."""
        check = check_folder(gbdt_dir)
        notes = []
        if not check.has_manifest:
            notes.append(
                f"{check.folder}: no usable {MANIFEST_FILE} ({check.error}); model files are "
                "checked for presence, size and (LightGBM) completeness only"
            )
        elif check.unlisted:
            notes.append(f"{check.folder}: file(s) not in the manifest, ignored: {check.unlisted}")
        members = read_json_artifact(check, ENSEMBLE_FILE, notes)
        info = read_json_artifact(check, FEATURES_FILE, notes)
        try:
            weights = members.get("weights")
            members = members["members"]
            image_columns = tuple(info["image_columns"])
            image_sources = dict(info.get("image_sources", {}))
            groups = {k: bool(v) for k, v in dict(info.get("feature_groups", {})).items()}
            recipe = info.get("recipe")
            weights = None if weights is None else {k: float(v) for k, v in weights.items()}
            listed = {
                name: (m["library"], list(m["models"]), m["features"])
                for name, m in members.items()
            }
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ArtifactError(
                f"{check.folder}: {ENSEMBLE_FILE} / {FEATURES_FILE} lack a field ({err!r})"
            ) from err
        models, dropped = {}, {}
        for name, (library, files, _) in listed.items():
            loaded, why = load_member(check, files, library)
            if loaded:
                models[name] = loaded
            else:
                dropped[name] = why
        if not models:
            raise ArtifactError(
                f"{check.folder}: no GBDT member can be used: "
                + "; ".join(f"{m}: {why}" for m, why in dropped.items())
            )
        return cls(
            features={name: tuple(listed[name][2]) for name in models},
            libraries={name: listed[name][0] for name in models},
            models=models,
            image_columns=image_columns,
            image_sources=image_sources,
            dropped=dropped,
            notes=tuple(notes),
            weights=weights,
            feature_groups=groups,
            recipe=recipe,
        )

    def image_missing(self, frame: pl.DataFrame) -> np.ndarray:
        """True for rows whose image columns hold a null or NaN (they get the metadata score)."""
        if not self.image_columns:
            return np.zeros(frame.height, dtype=bool)
        x = frame.select(self.image_columns).to_numpy().astype(np.float64)
        return np.isnan(x).any(axis=1)

    def blend(self, preds: dict[str, np.ndarray]) -> np.ndarray:
        """The soft vote of the members' probabilities: equal weights, or the fitted `weights`
        of the members present, renormalised (a dropped member's weight is shared out; all
        remaining weights zero: equal weights)."""
        names = list(preds)
        if self.weights is None:
            return np.mean([preds[n] for n in names], axis=0)
        w = np.array([self.weights.get(n, 0.0) for n in names], dtype=np.float64)
        w = np.full(len(names), 1 / len(names)) if w.sum() <= 0 else w / w.sum()
        return np.sum([wi * preds[n] for wi, n in zip(w, names, strict=True)], axis=0)

    def predict(self, frame: pl.DataFrame, threads: int | None = None) -> dict[str, np.ndarray]:
        """Probability per member (mean over fold models) and the soft-vote "ensemble".

        Rows with a missing image column get the lgb_meta score as their ensemble score.
        To score metadata only, add the image columns as nulls.
        """
        threads = threads or os.cpu_count() or 1
        preds = {}
        for name, features in self.features.items():
            x = member_matrix(frame, Member(name, self.libraries[name], {}, features))
            predict = LIBRARIES[self.libraries[name]].predict
            preds[name] = np.mean([predict(m, x, threads) for m in self.models[name]], axis=0)
        blend = self.blend(preds)
        if META_MEMBER in preds:
            blend = np.where(self.image_missing(frame), preds[META_MEMBER], blend)
        preds[ENSEMBLE] = blend
        return preds
