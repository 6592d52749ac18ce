"""What each Kaggle kernel and dataset declares, and its rules: names and paths, the parameters
the build injects per kernel (input paths resolved at run time), reading and validating the
committed metadata, the top-level submission metadata."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from utils.layout import BEST_PARAMS_FILE
from utils.settings import IMAGE_MODELS as IMAGE_MODEL_REGISTRY

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
KERNELS_DIR = REPO_ROOT / "kernels"
DATASETS_DIR = KERNELS_DIR / "datasets"
TOP_LEVEL_METADATA = REPO_ROOT / "kernel-metadata.json"
DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "kernels"
DEFAULT_DATASET_BUILD_DIR = REPO_ROOT / "build" / "datasets"

KERNEL_METADATA = "kernel-metadata.json"
DATASET_METADATA = "dataset-metadata.json"
COMPETITION = "isic-2024-challenge"
GPU_SHAPE = "NvidiaTeslaT4"
SUBMISSION_KERNEL = "04_inference"
# code_file of the top-level metadata: the built submission notebook (repo-relative)
TOP_LEVEL_CODE_FILE = f"build/kernels/{SUBMISSION_KERNEL}/{SUBMISSION_KERNEL}.ipynb"
ABLATION_KERNEL = "06_ablation"  # the plus candidates on the real data (CPU, optional)
KAGGLE_WORKING = "/kaggle/working"
BOOTSTRAP_TAG = "fusionnetx-bootstrap"
INJECTED_TAG = "injected-parameters"

WEIGHTS_DATASET = "fusionnetx-timm-weights"
IMAGE_DATASET = "fusionnetx-isic2024-image-models"
TUNING_DATASET = "fusionnetx-isic2024-gbdt-tuning"
GBDT_DATASET = "fusionnetx-isic2024-gbdt-models"
IMAGE_MODELS = tuple(IMAGE_MODEL_REGISTRY)
IMAGE_KERNEL_PREFIX = "01_image_"  # then the model: the kernel that trains it
# Pretrained backbone (image.models.BACKBONES name) of each image model; its file is <name>.pth.
IMAGE_BACKBONES = {model: spec.backbone for model, spec in IMAGE_MODEL_REGISTRY.items()}
WEIGHT_FILES = tuple(sorted({f"{b}.pth" for b in IMAGE_BACKBONES.values()}))
# What each repo-defined dataset holds: names copied from the source folder by `dataset`.
DATASET_CONTENTS: dict[str, tuple[str, ...]] = {
    WEIGHTS_DATASET: WEIGHT_FILES,
    IMAGE_DATASET: IMAGE_MODELS,
    TUNING_DATASET: ("tuning",),
    GBDT_DATASET: ("gbdt",),
}
# Public datasets a kernel may reference without the repo defining them: id -> why it is trusted.
# Empty on purpose: every input is defined here, so `validate` rejects any unknown source.
PUBLIC_DATASETS: dict[str, str] = {}

# From the kaggle client (kernels_push, _validate_slug_syntax) and Kaggle's dataset docs.
SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
OWNER_RE = re.compile(r"^[a-z0-9]+(?:[_-][a-z0-9]+)*$")
KAGGLE_LICENSES = frozenset({
    "CC0-1.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC-BY-NC-SA-4.0", "GPL-2.0", "ODbL-1.0", "DbCL-1.0",
    "copyright-authors", "other", "unknown", "CC-BY-4.0", "CC-BY-NC-4.0", "PDDL", "CC-BY-3.0",
    "CC-BY-3.0-IGO", "US-Government-Works", "CC-BY-NC-SA-3.0-IGO", "CDLA-Permissive-1.0",
    "CDLA-Sharing-1.0", "CC-BY-ND-4.0", "CC-BY-NC-ND-4.0", "ODC-BY-1.0", "LGPL-3.0", "AGPL-3.0",
    "FDL-1.3", "EU-ODP-Legal-Notice", "apache-2.0", "GPL-3.0",
})  # fmt: skip
RETIRED_SHAPES = frozenset({"NvidiaTeslaP100", "TpuV38", "Tpu1VmV38"})
KERNEL_REQUIRED = (
    "id", "title", "code_file", "language", "kernel_type", "is_private", "enable_gpu",
    "enable_internet", "competition_sources", "dataset_sources",
)  # fmt: skip


class KaggleBuildError(ValueError):
    """A kernel or dataset definition that cannot be built or pushed."""


# ---------------------------------------------------------------- Kaggle parameters per kernel


@dataclass(frozen=True)
class InputPath:
    """A parameter that is the path of `name` in input `slug` (its folder when parent=True)."""

    slug: str
    name: str
    parent: bool = False
    helper = "input_path"  # the run-time function its expression calls (utils.kaggle.input)

    def render(self, owner: str | None = None) -> str:
        """Python expression evaluated in the kernel (`owner` picks among same-slug mounts)."""
        args = f"{self.slug!r}, {self.name!r}" + (f", owner={owner!r}" if owner else "")
        expr = f"input_path({args})"
        return f"str({expr}.parent)" if self.parent else f"str({expr})"

    def slugs(self) -> set[str]:
        """The input slugs it reads."""
        return {self.slug}


@dataclass(frozen=True)
class LinkedInputs:
    """A parameter that is one folder joining named subfolders of several inputs."""

    sources: tuple[tuple[str, str], ...]
    helper = "link_inputs"

    def render(self, owner: str | None = None) -> str:
        """Python expression evaluated in the kernel."""
        extra = f", owner={owner!r}" if owner else ""
        return f"str(link_inputs({dict(self.sources)!r}{extra}))"

    def slugs(self) -> set[str]:
        """The input slugs it reads."""
        return {slug for _, slug in self.sources}


COMPETITION_DATA = InputPath(COMPETITION, "train-metadata.csv", parent=True)
IMAGE_OOF_DIRS = [InputPath(IMAGE_DATASET, name) for name in IMAGE_MODELS]
# What every stage kernel reads first (the probes take none of it).
STAGE_PARAMETERS = {"data_dir": COMPETITION_DATA, "output_dir": KAGGLE_WORKING, "preset": "full"}
# The tuning and GBDT kernels; `build --recipe` replaces the recipe.
TABULAR_PARAMETERS = {**STAGE_PARAMETERS, "recipe": "paper", "image_oof_dirs": IMAGE_OOF_DIRS}

# The probe kernels: what Kaggle's CPU and GPU images offer (utils.kaggle.probe).
PROBE_KERNELS = ("00_probe_cpu", "00_probe_gpu")

KAGGLE_PARAMETERS: dict[str, dict[str, Any]] = {
    **{
        kernel: {"output_dir": KAGGLE_WORKING, "image": kernel.rsplit("_", 1)[1]}
        for kernel in PROBE_KERNELS
    },
    **{
        IMAGE_KERNEL_PREFIX + model: {
            **STAGE_PARAMETERS,
            "weights_path": InputPath(WEIGHTS_DATASET, f"{IMAGE_BACKBONES[model]}.pth"),
            "num_workers": 4,
        }
        for model in IMAGE_MODELS
    },
    "02_tune_gbdt": dict(TABULAR_PARAMETERS),
    "03_gbdt": dict(TABULAR_PARAMETERS),
    ABLATION_KERNEL: {**STAGE_PARAMETERS, "image_oof_dirs": IMAGE_OOF_DIRS},
    SUBMISSION_KERNEL: {
        **STAGE_PARAMETERS,
        "data_dir": InputPath(COMPETITION, "test-metadata.csv", parent=True),
        "artifacts_dir": LinkedInputs(
            tuple((name, IMAGE_DATASET) for name in IMAGE_MODELS) + (("gbdt", GBDT_DATASET),)
        ),
        "num_workers": 4,
    },
}
# `build --tuned`: the GBDT kernel reads Optuna's best parameters from the tuning dataset.
TUNED_GBDT = (
    "03_gbdt",
    TUNING_DATASET,
    {"params_path": InputPath(TUNING_DATASET, BEST_PARAMS_FILE)},
)


def render_value(value: Any, owner: str | None = None) -> str:
    """Python source for one parameter value (literals via repr, inputs via their expression).

    `owner` is passed to every input but the competition, which has no owner.
    """
    if isinstance(value, InputPath):
        return value.render(owner if value.slug != COMPETITION else None)
    if isinstance(value, LinkedInputs):
        return value.render(owner)
    if isinstance(value, list):
        return "[" + ", ".join(render_value(v, owner) for v in value) + "]"
    return repr(value)


def _inputs(value: Any) -> list[InputPath | LinkedInputs]:
    """The inputs a parameter value reads (a list's, each of its items')."""
    if isinstance(value, list):
        return [found for item in value for found in _inputs(item)]
    return [value] if isinstance(value, InputPath | LinkedInputs) else []


def injected_source(parameters: dict[str, Any], owner: str | None = None) -> str:
    """Source of the cell that sets Kaggle parameters after the notebook's `parameters` cell."""
    lines = ["# Kaggle parameters, injected by `python -m utils.kaggle.build build`"]
    helpers = sorted({found.helper for found in _inputs(list(parameters.values()))})
    if helpers:
        lines.append(f"from utils.kaggle.input import {', '.join(helpers)}")
    lines += [f"{key} = {render_value(value, owner)}" for key, value in parameters.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- metadata loading


def read_json(path: Path) -> dict[str, Any]:
    """A metadata JSON object, or KaggleBuildError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise KaggleBuildError(f"{path}: missing") from err
    except json.JSONDecodeError as err:
        raise KaggleBuildError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(data, dict):
        raise KaggleBuildError(f"{path}: expected a JSON object")
    return data


def kernel_folders(kernels_dir: Path = KERNELS_DIR) -> list[Path]:
    """Every kernel folder (those holding kernel-metadata.json)."""
    return sorted(p.parent for p in kernels_dir.glob(f"*/{KERNEL_METADATA}"))


def dataset_folders(datasets_dir: Path = DATASETS_DIR) -> list[Path]:
    """Every repo-defined dataset folder (those holding dataset-metadata.json)."""
    return sorted(p.parent for p in datasets_dir.glob(f"*/{DATASET_METADATA}"))


def defined_datasets(datasets_dir: Path = DATASETS_DIR) -> dict[str, str]:
    """Repo-defined datasets: slug -> id as committed."""
    return {
        folder.name: read_json(folder / DATASET_METADATA)["id"]
        for folder in dataset_folders(datasets_dir)
    }


def split_ref(ref: Any) -> tuple[str, str]:
    """(owner, slug) of an 'owner/slug' reference, or KaggleBuildError."""
    if not isinstance(ref, str) or ref.count("/") != 1:
        raise KaggleBuildError(f"reference {ref!r} is not 'owner/slug'")
    owner, slug = ref.split("/")
    return owner, slug


# ---------------------------------------------------------------- validation


def _ref_problems(what: str, ref: Any, lo: int, hi: int) -> list[str]:
    """Problems of an 'owner/slug' id; Kaggle's slug rules: lowercase alphanumerics and single
    inner hyphens, lo..hi chars."""
    try:
        owner, slug = split_ref(ref)
    except KaggleBuildError as err:
        return [f"{what}: {err}"]
    problems = [] if OWNER_RE.match(owner) else [f"{what} owner {owner!r} is not a Kaggle name"]
    if not SLUG_RE.match(slug):
        problems.append(f"{what} slug {slug!r} must match {SLUG_RE.pattern}")
    if not lo <= len(slug) <= hi:
        problems.append(f"{what} slug {slug!r} must be {lo}..{hi} characters")
    return problems


def _id_and_title_problems(kind: str, meta: dict[str, Any], shortest: int) -> list[str]:
    """The id's and the title's rules (a kernel's or dataset's): both `shortest`..50 characters,
    and the title slugifies to the id's slug (Kaggle derives the URL from the title, so another
    slug would not be found)."""
    from slugify import slugify

    problems = _ref_problems(f"{kind} id", meta["id"], shortest, 50)
    title = meta["title"]
    if not isinstance(title, str) or not shortest <= len(title) <= 50:
        problems.append(f"title {title!r} must be a string of {shortest}..50 characters")
    elif not problems and slugify(title) != split_ref(meta["id"])[1]:
        problems.append(f"title {title!r} slugifies to {slugify(title)!r}, not the id's slug")
    return problems


def kernel_problems(
    meta: dict[str, Any], source: str, known_datasets: set[str], submission: bool
) -> list[str]:
    """Every rule a kernel-metadata.json breaks (empty when it is valid)."""

    missing = [key for key in KERNEL_REQUIRED if key not in meta]
    if missing:
        return [f"{source}: missing required field(s) {missing}"]
    problems = _id_and_title_problems("kernel", meta, 5)
    for key, wanted in (("language", "python"), ("kernel_type", "notebook")):
        if meta[key] != wanted:
            problems.append(f"{key} must be {wanted!r}, got {meta[key]!r}")
    if not str(meta["code_file"]).endswith(".ipynb"):
        problems.append(f"code_file {meta['code_file']!r} must be a .ipynb notebook")
    for key in ("is_private", "enable_gpu", "enable_internet"):
        if not isinstance(meta[key], bool):
            problems.append(f"{key} must be JSON true/false, got {meta[key]!r}")
    if submission and meta["enable_internet"] is not False:
        problems.append("the submission kernel must set enable_internet false (code competition)")
    shape = meta.get("machine_shape")
    if meta["enable_gpu"] is True and shape != GPU_SHAPE:
        problems.append(f"a GPU kernel needs machine_shape {GPU_SHAPE!r}, got {shape!r}")
    if meta["enable_gpu"] is False and shape:
        problems.append(f"a CPU kernel must not set machine_shape ({shape!r})")
    if shape in RETIRED_SHAPES:
        problems.append(f"machine_shape {shape!r} is retired on Kaggle")
    if meta["competition_sources"] != [COMPETITION]:
        problems.append(f"competition_sources must be [{COMPETITION!r}]")
    for ref in meta["dataset_sources"]:
        problems += _ref_problems("dataset source", ref, 3, 50)
        if ref not in known_datasets:
            problems.append(
                f"dataset source {ref!r} is neither defined in kernels/datasets/ "
                "nor listed in PUBLIC_DATASETS"
            )
    for key in ("kernel_sources", "model_sources"):
        if meta.get(key):
            problems.append(f"{key} is not used by this project, got {meta[key]!r}")
    return [f"{source}: {p}" for p in problems]


def dataset_problems(meta: dict[str, Any], source: str) -> list[str]:
    """Every rule a dataset-metadata.json breaks for `kaggle datasets create`."""

    missing = [key for key in ("id", "title", "licenses") if key not in meta]
    if missing:
        return [f"{source}: missing required field(s) {missing}"]
    problems = _id_and_title_problems("dataset", meta, 6)
    if "INSERT_" in json.dumps(meta):
        problems.append("still holds a kaggle-init placeholder (INSERT_...)")
    licenses = meta["licenses"]
    if not isinstance(licenses, list) or len(licenses) != 1:
        problems.append("licenses must hold exactly one entry")
    elif licenses[0].get("name") not in KAGGLE_LICENSES:
        problems.append(f"license {licenses[0].get('name')!r} is not one Kaggle accepts")
    subtitle = meta.get("subtitle")
    if subtitle is not None and not 20 <= len(subtitle) <= 80:
        problems.append(f"subtitle must be 20..80 characters, got {len(subtitle)}")
    return [f"{source}: {p}" for p in problems]


def _built_problems(folder: Path, meta: dict[str, Any]) -> list[str]:
    """A built kernel folder: its code file exists and carries the embedded utils."""
    code = folder / str(meta.get("code_file", ""))
    if not code.is_file():
        return [f"{folder / KERNEL_METADATA}: code_file {code} does not exist (run build)"]
    cells = nbformat.read(code, as_version=4).cells
    if not cells or BOOTSTRAP_TAG not in cells[0].metadata.get("tags", []):
        return [f"{code}: first cell is not the {BOOTSTRAP_TAG} cell (built by an old build?)"]
    return []


def validate(
    kernels_dir: Path = KERNELS_DIR,
    top_level: Path = TOP_LEVEL_METADATA,
    built_dir: Path | None = None,
) -> list[str]:
    """All problems of the committed metadata (and of a build when built_dir is given)."""
    problems: list[str] = []
    datasets_dir = kernels_dir / "datasets"
    for folder in dataset_folders(datasets_dir):
        path = folder / DATASET_METADATA
        meta = read_json(path)
        problems += dataset_problems(meta, str(path))
        if str(meta.get("id", "")).partition("/")[2] != folder.name:
            problems.append(f"{path}: folder name must equal the dataset slug")
        if folder.name not in DATASET_CONTENTS:
            problems.append(f"{path}: no DATASET_CONTENTS entry in utils/kaggle/metadata.py")
    known = set(defined_datasets(datasets_dir).values()) | set(PUBLIC_DATASETS)
    folders = kernel_folders(kernels_dir)
    if not folders:
        problems.append(f"{kernels_dir}: no kernel folders")
    for folder in folders:
        path = folder / KERNEL_METADATA
        meta = read_json(path)
        problems += kernel_problems(meta, str(path), known, folder.name == SUBMISSION_KERNEL)
        if meta.get("code_file") != f"{folder.name}.ipynb":
            problems.append(f"{path}: code_file must be {folder.name}.ipynb (the folder name)")
        params = KAGGLE_PARAMETERS.get(folder.name)
        if params is None:
            problems.append(f"{path}: no KAGGLE_PARAMETERS entry in utils/kaggle/metadata.py")
            continue
        sources = {split_ref(r)[1] for r in meta.get("dataset_sources", []) if "/" in str(r)}
        sources |= set(meta.get("competition_sources", []))
        read = {slug for found in _inputs(list(params.values())) for slug in found.slugs()}
        for slug in sorted(read - sources):
            problems.append(f"{path}: parameters read input {slug!r}, not in its sources")
        if built_dir is not None:
            problems += _built_problems(built_dir / folder.name, meta)
    return problems + _top_level_problems(top_level, kernels_dir / SUBMISSION_KERNEL)


def _top_level_problems(top_level: Path, submission_dir: Path) -> list[str]:
    """The top-level kernel-metadata.json is the submission kernel's (for the owner its id
    names, as `build --owner` writes it), pointing at its build."""
    top = read_json(top_level)
    expected = top_level_metadata(submission_dir, split_ref(top.get("id", "x/x"))[0])
    if top != expected:
        diff = sorted(k for k in set(top) | set(expected) if top.get(k) != expected.get(k))
        return [f"{top_level}: differs from {submission_dir / KERNEL_METADATA} in {diff}"]
    return []


def with_owner(meta: dict[str, Any], owner: str, repo_ids: set[str]) -> dict[str, Any]:
    """Metadata with the default owner replaced in its id and in repo-defined dataset sources."""
    if not OWNER_RE.match(owner):
        raise KaggleBuildError(f"owner {owner!r} is not a Kaggle user name")
    out = copy.deepcopy(meta)
    out["id"] = f"{owner}/{split_ref(meta['id'])[1]}"
    if "dataset_sources" in out:
        out["dataset_sources"] = [
            f"{owner}/{split_ref(ref)[1]}" if ref in repo_ids else ref
            for ref in out["dataset_sources"]
        ]
    return out


def top_level_metadata(submission_dir: Path, owner: str) -> dict[str, Any]:
    """The submission kernel's metadata for `owner`, its code_file the built notebook."""
    ref = read_json(submission_dir / KERNEL_METADATA)
    repo_ids = set(defined_datasets(submission_dir.parent / "datasets").values())
    owned = with_owner(ref, owner, repo_ids) if OWNER_RE.match(owner) else ref
    return {**owned, "code_file": TOP_LEVEL_CODE_FILE}


def write_top_level(
    out_dir: Path, owner: str, top_level: Path = TOP_LEVEL_METADATA, kernels_dir: Path = KERNELS_DIR
) -> bool:
    """Point the top-level kernel-metadata.json (`kaggle kernels push` at the repository root)
    at `owner`'s submission kernel; only for a build into the default folder, which its
    code_file names. True when written."""
    if out_dir.resolve() != DEFAULT_BUILD_DIR.resolve():
        return False
    meta = top_level_metadata(kernels_dir / SUBMISSION_KERNEL, owner)
    top_level.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return True
