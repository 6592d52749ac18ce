"""Kaggle packaging: metadata validation and self-contained kernel builds (the build CLI).

What runs inside a kernel (library checks, input paths) is utils.kaggle.input. Commands (the
README's "Kaggle workflow" walks through them):
    python -m utils.kaggle.build validate [--built build/kernels]
    python -m utils.kaggle.build build [--owner NAME] [--out build/kernels] [--tuned]
    python -m utils.kaggle.build dry-run [--out build/kernels]
    python -m utils.kaggle.build dataset SLUG --from DIR [--owner NAME] [--out build/datasets]
    python -m utils.kaggle.build weights --out DIR
`python -m utils.kaggle.build COMMAND --help` describes one command and its defaults.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import copy
import hashlib
import io
import json
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nbformat

from utils.cli import DefaultsHelpFormatter, RawDefaultsHelpFormatter
from utils.kaggle.input import IMPORT_NAMES, MIN_VERSIONS
from utils.layout import BEST_PARAMS_FILE
from utils.settings import IMAGE_MODELS as IMAGE_MODEL_REGISTRY
from utils.settings import RECIPES

REPO_ROOT = Path(__file__).resolve().parents[2]
UTILS_DIR = REPO_ROOT / "utils"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
KERNELS_DIR = REPO_ROOT / "kernels"
DATASETS_DIR = KERNELS_DIR / "datasets"
TOP_LEVEL_METADATA = REPO_ROOT / "kernel-metadata.json"
DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "kernels"
DEFAULT_DATASET_BUILD_DIR = REPO_ROOT / "build" / "datasets"

KERNEL_METADATA = "kernel-metadata.json"
DATASET_METADATA = "dataset-metadata.json"
DEFAULT_OWNER = "fusionnetx"
COMPETITION = "isic-2024-challenge"
GPU_SHAPE = "NvidiaTeslaT4"
SUBMISSION_KERNEL = "04_inference"
KAGGLE_WORKING = "/kaggle/working"
BOOTSTRAP_TAG = "fusionnetx-bootstrap"
INJECTED_TAG = "injected-parameters"

WEIGHTS_DATASET = "fusionnetx-timm-weights"
IMAGE_DATASET = "fusionnetx-isic2024-image-models"
TUNING_DATASET = "fusionnetx-isic2024-gbdt-tuning"
GBDT_DATASET = "fusionnetx-isic2024-gbdt-models"
IMAGE_MODELS = tuple(IMAGE_MODEL_REGISTRY)
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
KAGGLE_LICENSES = frozenset(
    [
        "CC0-1.0",
        "CC-BY-SA-3.0",
        "CC-BY-SA-4.0",
        "CC-BY-NC-SA-4.0",
        "GPL-2.0",
        "ODbL-1.0",
        "DbCL-1.0",
        "copyright-authors",
        "other",
        "unknown",
        "CC-BY-4.0",
        "CC-BY-NC-4.0",
        "PDDL",
        "CC-BY-3.0",
        "CC-BY-3.0-IGO",
        "US-Government-Works",
        "CC-BY-NC-SA-3.0-IGO",
        "CDLA-Permissive-1.0",
        "CDLA-Sharing-1.0",
        "CC-BY-ND-4.0",
        "CC-BY-NC-ND-4.0",
        "ODC-BY-1.0",
        "LGPL-3.0",
        "AGPL-3.0",
        "FDL-1.3",
        "EU-ODP-Legal-Notice",
        "apache-2.0",
        "GPL-3.0",
    ]
)
RETIRED_SHAPES = frozenset({"NvidiaTeslaP100", "TpuV38", "Tpu1VmV38"})
KERNEL_REQUIRED = (
    "id",
    "title",
    "code_file",
    "language",
    "kernel_type",
    "is_private",
    "enable_gpu",
    "enable_internet",
    "competition_sources",
    "dataset_sources",
)


class KaggleBuildError(ValueError):
    """A kernel or dataset definition that cannot be built or pushed."""


# ---------------------------------------------------------------- Kaggle parameters per kernel


@dataclass(frozen=True)
class InputPath:
    """A parameter that is the path of `name` in input `slug` (its folder when parent=True)."""

    slug: str
    name: str
    parent: bool = False

    def render(self, owner: str | None = None) -> str:
        """Python expression evaluated in the kernel (`owner` picks among same-slug mounts)."""
        args = f"{self.slug!r}, {self.name!r}" + (f", owner={owner!r}" if owner else "")
        expr = f"input_path({args})"
        return f"str({expr}.parent)" if self.parent else f"str({expr})"


@dataclass(frozen=True)
class LinkedInputs:
    """A parameter that is one folder joining named subfolders of several inputs."""

    sources: tuple[tuple[str, str], ...]

    def render(self, owner: str | None = None) -> str:
        """Python expression evaluated in the kernel."""
        extra = f", owner={owner!r}" if owner else ""
        return f"str(link_inputs({dict(self.sources)!r}{extra}))"


COMPETITION_DATA = InputPath(COMPETITION, "train-metadata.csv", parent=True)
IMAGE_OOF_DIRS = [InputPath(IMAGE_DATASET, name) for name in IMAGE_MODELS]


def _image_parameters(model: str) -> dict[str, Any]:
    """Kaggle parameters of one image-model kernel."""
    return {
        "data_dir": COMPETITION_DATA,
        "output_dir": KAGGLE_WORKING,
        "preset": "full",
        "weights_path": InputPath(WEIGHTS_DATASET, f"{IMAGE_BACKBONES[model]}.pth"),
        "num_workers": 4,
    }


# The probe kernels: what Kaggle's CPU and GPU images offer (utils.kaggle.probe).
PROBE_KERNELS = ("00_probe_cpu", "00_probe_gpu")

KAGGLE_PARAMETERS: dict[str, dict[str, Any]] = {
    **{
        kernel: {"output_dir": KAGGLE_WORKING, "image": kernel.rsplit("_", 1)[1]}
        for kernel in PROBE_KERNELS
    },
    **{f"01_image_{model}": _image_parameters(model) for model in IMAGE_MODELS},
    "02_tune_gbdt": {
        "data_dir": COMPETITION_DATA,
        "output_dir": KAGGLE_WORKING,
        "preset": "full",
        "recipe": "paper",  # `build --recipe` replaces it
        "image_oof_dirs": IMAGE_OOF_DIRS,
    },
    "03_gbdt": {
        "data_dir": COMPETITION_DATA,
        "output_dir": KAGGLE_WORKING,
        "preset": "full",
        "recipe": "paper",  # `build --recipe` replaces it
        "image_oof_dirs": IMAGE_OOF_DIRS,
    },
    SUBMISSION_KERNEL: {
        "data_dir": InputPath(COMPETITION, "test-metadata.csv", parent=True),
        "output_dir": KAGGLE_WORKING,
        "preset": "full",
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


def _input_slugs(value: Any) -> set[str]:
    """Every input slug a parameter value reads."""
    if isinstance(value, InputPath):
        return {value.slug}
    if isinstance(value, LinkedInputs):
        return {slug for _, slug in value.sources}
    if isinstance(value, list):
        return set().union(*(_input_slugs(v) for v in value))
    return set()


def _helpers(value: Any) -> set[str]:
    """Run-time helper functions a parameter value's expression calls."""
    if isinstance(value, InputPath):
        return {"input_path"}
    if isinstance(value, LinkedInputs):
        return {"link_inputs"}
    if isinstance(value, list):
        return set().union(*(_helpers(v) for v in value))
    return set()


def injected_source(parameters: dict[str, Any], owner: str | None = None) -> str:
    """Source of the cell that sets Kaggle parameters after the notebook's `parameters` cell."""
    lines = ["# Kaggle parameters, injected by `python -m utils.kaggle.build build`"]
    helpers = sorted(set().union(*(_helpers(v) for v in parameters.values())))
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


def _slug_problems(what: str, slug: str, lo: int, hi: int) -> list[str]:
    """Kaggle's slug rules: lowercase alphanumerics and single inner hyphens, lo..hi chars."""
    problems = []
    if not SLUG_RE.match(slug):
        problems.append(f"{what} slug {slug!r} must match {SLUG_RE.pattern}")
    if not lo <= len(slug) <= hi:
        problems.append(f"{what} slug {slug!r} must be {lo}..{hi} characters")
    return problems


def _ref_problems(what: str, ref: Any, lo: int, hi: int) -> list[str]:
    """Problems of an 'owner/slug' id."""
    try:
        owner, slug = split_ref(ref)
    except KaggleBuildError as err:
        return [f"{what}: {err}"]
    problems = [] if OWNER_RE.match(owner) else [f"{what} owner {owner!r} is not a Kaggle name"]
    return problems + _slug_problems(what, slug, lo, hi)


def kernel_problems(
    meta: dict[str, Any], source: str, known_datasets: set[str], submission: bool
) -> list[str]:
    """Every rule a kernel-metadata.json breaks (empty when it is valid)."""
    from slugify import slugify

    missing = [key for key in KERNEL_REQUIRED if key not in meta]
    if missing:
        return [f"{source}: missing required field(s) {missing}"]
    problems = _ref_problems("kernel id", meta["id"], 5, 50)
    title = meta["title"]
    if not isinstance(title, str) or not 5 <= len(title) <= 50:
        problems.append(f"title {title!r} must be a string of 5..50 characters")
    elif not problems and slugify(title) != split_ref(meta["id"])[1]:
        problems.append(f"title {title!r} slugifies to {slugify(title)!r}, not the id's slug")
    if meta["language"] != "python":
        problems.append(f"language must be 'python', got {meta['language']!r}")
    if meta["kernel_type"] != "notebook":
        problems.append(f"kernel_type must be 'notebook', got {meta['kernel_type']!r}")
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
    from slugify import slugify

    missing = [key for key in ("id", "title", "licenses") if key not in meta]
    if missing:
        return [f"{source}: missing required field(s) {missing}"]
    problems = _ref_problems("dataset id", meta["id"], 6, 50)
    title = meta["title"]
    if not isinstance(title, str) or not 6 <= len(title) <= 50:
        problems.append(f"title {title!r} must be a string of 6..50 characters")
    elif not problems and slugify(title) != split_ref(meta["id"])[1]:
        # Kaggle derives a new dataset's URL from its title: the id's slug would not be found
        problems.append(f"title {title!r} slugifies to {slugify(title)!r}, not the id's slug")
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
    nb = nbformat.read(code, as_version=4)
    tags = [cell.metadata.get("tags", []) for cell in nb.cells]
    if not tags or BOOTSTRAP_TAG not in tags[0]:
        return [f"{code}: first cell is not the {BOOTSTRAP_TAG} cell (built by an old build?)"]
    return []


def validate(
    kernels_dir: Path = KERNELS_DIR,
    top_level: Path | None = TOP_LEVEL_METADATA,
    notebooks_dir: Path = NOTEBOOKS_DIR,
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
            problems.append(f"{path}: no DATASET_CONTENTS entry in utils/kaggle/build.py")
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
            problems.append(f"{path}: no KAGGLE_PARAMETERS entry in utils/kaggle/build.py")
            continue
        sources = {split_ref(r)[1] for r in meta.get("dataset_sources", []) if "/" in str(r)}
        sources |= set(meta.get("competition_sources", []))
        for slug in sorted(set().union(*map(_input_slugs, params.values())) - sources):
            problems.append(f"{path}: parameters read input {slug!r}, not in its sources")
        if built_dir is not None:
            problems += _built_problems(built_dir / folder.name, meta)
    if top_level is not None:
        problems += _top_level_problems(top_level, kernels_dir / SUBMISSION_KERNEL)
    return problems


def _top_level_problems(top_level: Path, submission_dir: Path) -> list[str]:
    """The top-level kernel-metadata.json is the submission kernel's (for the owner its id
    names, as `build --owner` writes it), pointing at its build."""
    top = read_json(top_level)
    expected = top_level_metadata(submission_dir, split_ref(top.get("id", "x/x"))[0])
    if top != expected:
        diff = sorted(k for k in set(top) | set(expected) if top.get(k) != expected.get(k))
        return [f"{top_level}: differs from {submission_dir / KERNEL_METADATA} in {diff}"]
    return []


def top_level_metadata(submission_dir: Path, owner: str) -> dict[str, Any]:
    """The submission kernel's metadata for `owner`, its code_file the built notebook."""
    ref = read_json(submission_dir / KERNEL_METADATA)
    repo_ids = set(defined_datasets(submission_dir.parent / "datasets").values())
    owned = with_owner(ref, owner, repo_ids) if OWNER_RE.match(owner) else ref
    return {**owned, "code_file": top_level_code_file()}


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


def top_level_code_file() -> str:
    """code_file of the top-level metadata: the built submission notebook (repo-relative)."""
    return f"build/kernels/{SUBMISSION_KERNEL}/{SUBMISSION_KERNEL}.ipynb"


# ---------------------------------------------------------------- build


# Embedded in every kernel: the package itself and what runs before the stage.
KERNEL_BASE_MODULES = ("utils/__init__.py", "utils/kaggle/input.py")


def _module_file(module: str, root: Path) -> Path | None:
    """File of a `utils...` module under root (the repository), or None if it is not one."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(source: str, package: str) -> set[str]:
    """Every `utils` module a piece of source imports (in functions too; relative resolved)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "utils" or m.startswith("utils.")}


def kernel_modules(sources: list[str], root: Path = REPO_ROOT) -> list[Path]:
    """utils/ files a kernel needs: what its code imports, transitively, with parent packages."""
    files = {root / rel for rel in KERNEL_BASE_MODULES}
    todo = [(src, "utils") for src in sources] + [(f.read_text(), "utils") for f in files]
    while todo:
        source, package = todo.pop()
        for module in _imported_modules(source, package):
            parts = module.split(".")
            for depth in range(1, len(parts) + 1):
                path = _module_file(".".join(parts[:depth]), root)
                if path is not None and path not in files:
                    files.add(path)
                    is_package = path.name == "__init__.py"
                    pkg = ".".join(parts[:depth] if is_package else parts[: depth - 1])
                    todo.append((path.read_text(encoding="utf-8"), pkg))
    return sorted(files)


def notebook_sources(notebook: Path) -> list[str]:
    """Source of every code cell of a notebook."""
    nb = nbformat.read(notebook, as_version=4)
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def utils_archive(files: list[Path] | None = None, root: Path = REPO_ROOT) -> bytes:
    """Deterministic zip of utils/ files (*.py; all of utils/ by default; fixed timestamps)."""
    if files is None:
        files = [p for p in (root / "utils").rglob("*.py") if "__pycache__" not in p.parts]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(files):
            info = zipfile.ZipInfo(path.relative_to(root).as_posix())
            info.date_time = (2024, 1, 1, 0, 0, 0)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def third_party_imports(source: str) -> set[str]:
    """Top-level names of every module a piece of source imports (in functions too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def kernel_libraries(archive: bytes, code: list[str]) -> list[str]:
    """The checked libraries (input.MIN_VERSIONS) that a kernel's embedded modules or its own
    cells import: the only ones its version check looks at."""
    sources = list(code)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        sources += [zf.read(name).decode("utf-8") for name in zf.namelist()]
    imported = set().union(*(third_party_imports(s) for s in sources if s.strip()))
    found = {IMPORT_NAMES[name] for name in imported if name in IMPORT_NAMES}
    return [lib for lib in MIN_VERSIONS if lib in found]


def bootstrap_source(
    archive: bytes, libraries: list[str] | None = None, skip_version_check: bool = False
) -> str:
    """First cell of a built kernel: unpack the embedded utils/ and import it from there, then
    check the versions of `libraries` (all checked ones when None)."""
    digest = hashlib.sha256(archive).hexdigest()[:12]
    payload = base64.b64encode(archive).decode("ascii")
    checked = "" if libraries is None else repr(tuple(libraries))
    if skip_version_check:
        gate = (
            "# Built with --skip-version-check: every difference is printed, nothing stops.\n"
            f"check_versions({checked or 'None'}, stop=False)\n"
        )
    else:
        gate = (
            "# Stops here, in one line, only on a version known not to work with the code this\n"
            "# kernel embeds; any other difference from the tested pins is a WARNING line.\n"
            f"check_versions({checked})\n"
        )
    return (
        "# FusionNetX bootstrap, written by `python -m utils.kaggle.build build`: the utils/\n"
        "# package travels inside this notebook, so the kernel needs no repository checkout,\n"
        "# no code dataset and no internet.\n"
        "import base64, io, sys, tempfile, zipfile\n"
        "from pathlib import Path\n"
        f'FUSIONNETX_SRC = Path(tempfile.gettempdir()) / "fusionnetx-src-{digest}"\n'
        f'zipfile.ZipFile(io.BytesIO(base64.b64decode("{payload}"))).extractall(FUSIONNETX_SRC)\n'
        "sys.path.insert(0, str(FUSIONNETX_SRC))\n"
        '[sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] == "utils"]\n'
        "import utils\n"
        "if not Path(utils.__file__).resolve().is_relative_to(FUSIONNETX_SRC.resolve()):\n"
        '    raise ImportError(f"utils imported from {utils.__file__}, not the embedded copy")\n'
        f'print("FusionNetX utils {digest} unpacked to", FUSIONNETX_SRC)\n'
        "from utils.kaggle.input import check_versions\n" + gate
    )


def build_notebook(
    notebook: Path,
    parameters: dict[str, Any],
    archive: bytes | None = None,
    owner: str | None = None,
    skip_version_check: bool = False,
) -> nbformat.NotebookNode:
    """The notebook with the bootstrap cell first and Kaggle parameters after `parameters`."""
    if not notebook.is_file():
        raise KaggleBuildError(f"notebook {notebook} does not exist (needed by its kernel)")
    nb = nbformat.read(notebook, as_version=4)
    cells = [c for c in nb.cells if INJECTED_TAG not in c.metadata.get("tags", [])]
    index = next((i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])), -1)
    if index < 0:
        raise KaggleBuildError(f"{notebook}: no cell tagged 'parameters'")
    injected = nbformat.v4.new_code_cell(injected_source(parameters, owner))
    code = [c.source for c in cells if c.cell_type == "code"] + [injected.source]
    if archive is None:
        archive = utils_archive(kernel_modules(code))
    injected.metadata["tags"] = [INJECTED_TAG]
    libraries = kernel_libraries(archive, code)
    bootstrap = nbformat.v4.new_code_cell(bootstrap_source(archive, libraries, skip_version_check))
    bootstrap.metadata["tags"] = [BOOTSTRAP_TAG]
    nb.cells = [bootstrap, *cells[: index + 1], injected, *cells[index + 1 :]]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


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


def kaggle_config_user() -> str | None:
    """User name from the kaggle client's own configuration (KAGGLE_USERNAME, then kaggle.json)."""
    api = _kaggle_api()
    return api.read_config_environment(api.read_config_file(quiet=True)).get(api.CONFIG_NAME_USER)


def resolve_owner(owner: str | None) -> str:
    """--owner, else the kaggle client's configured user; never a silent default account."""
    owner = owner or kaggle_config_user()
    if not owner:
        raise KaggleBuildError(
            "no Kaggle user name: pass --owner NAME, or set KAGGLE_USERNAME, or put your API "
            "token in ~/.kaggle/kaggle.json (the kaggle client's configuration). Kernel and "
            "dataset ids start with it."
        )
    return owner


def build_kernel(
    folder: Path,
    out_dir: Path,
    owner: str,
    parameters: dict[str, Any],
    notebooks_dir: Path = NOTEBOOKS_DIR,
    repo_ids: frozenset[str] = frozenset(),
    archive: bytes | None = None,
    extra_sources: tuple[str, ...] = (),
    kernel_sources: tuple[str, ...] = (),
    skip_version_check: bool = False,
) -> Path:
    """Write out_dir/<folder.name>/ with owner-filled metadata and the self-contained notebook.

    `kernel_sources` are slugs of the owner's kernels whose output this one reads (--continue).
    """
    meta = read_json(folder / KERNEL_METADATA)
    meta["dataset_sources"] = [*meta.get("dataset_sources", []), *extra_sources]
    meta = with_owner(meta, owner, set(repo_ids))
    if kernel_sources:
        meta["kernel_sources"] = [f"{owner}/{slug}" for slug in kernel_sources]
    nb = build_notebook(
        notebooks_dir / meta["code_file"], parameters, archive, owner, skip_version_check
    )
    target = out_dir / folder.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    nbformat.write(nb, target / meta["code_file"])
    (target / KERNEL_METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return target


IMAGE_KERNEL_PREFIX = "01_image_"


def image_kernel_parameters(
    folder: Path, params: dict[str, Any], folds: list[int] | None, continue_run: bool
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """An image kernel's parameters for a fold selection and for continuing its own last output.

    With `continue_run` the kernel mounts its own output (a kernel source) and resumes from it:
    finished folds are kept, an unfinished fold continues from its last epoch (train.py checks
    that the earlier run has the same config hash). Returns (parameters, kernel source slugs).
    """
    params = dict(params)
    if folds is not None:
        params["folds"] = list(folds)
    if not continue_run:
        return params, ()
    model = folder.name.removeprefix(IMAGE_KERNEL_PREFIX)
    slug = split_ref(read_json(folder / KERNEL_METADATA)["id"])[1]
    # the output root holding <model>/, as the kernel's own output_dir was
    params["resume_from"] = InputPath(slug, model, parent=True)
    return params, (slug,)


def build_all(
    out_dir: Path = DEFAULT_BUILD_DIR,
    owner: str | None = None,
    tuned: bool = False,
    kernels_dir: Path = KERNELS_DIR,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    folds: list[int] | None = None,
    continue_run: bool = False,
    recipe: str = "paper",
    skip_version_check: bool = False,
) -> list[Path]:
    """Build every kernel folder; --tuned feeds the tuning dataset to the GBDT kernel; image
    kernels get a fold selection and/or continue from their own last output (see
    image_kernel_parameters). `recipe` goes to the kernels that take one (tuning and GBDT: no
    recipe changes an image model, and the submission kernel reads it from the GBDT dataset);
    --skip-version-check makes every version difference a warning."""
    if recipe not in RECIPES:
        raise KaggleBuildError(f"unknown recipe {recipe!r}; choose from {list(RECIPES)}")
    owner = resolve_owner(owner)
    datasets = defined_datasets(kernels_dir / "datasets")
    built = []
    for folder in kernel_folders(kernels_dir):
        params, extra, kernels = dict(KAGGLE_PARAMETERS[folder.name]), (), ()
        if "recipe" in params:
            params["recipe"] = recipe
        if tuned and folder.name == TUNED_GBDT[0]:
            params.update(TUNED_GBDT[2])
            extra = (datasets[TUNED_GBDT[1]],)
        if folder.name.startswith(IMAGE_KERNEL_PREFIX):
            params, kernels = image_kernel_parameters(folder, params, folds, continue_run)
        built.append(
            build_kernel(
                folder,
                out_dir,
                owner,
                params,
                notebooks_dir,
                frozenset(datasets.values()),
                extra_sources=extra,
                kernel_sources=kernels,
                # a probe reports every version, it never stops on one
                skip_version_check=skip_version_check or folder.name in PROBE_KERNELS,
            )
        )
    return built


def build_dataset(
    slug: str, source_dir: Path, out_dir: Path = DEFAULT_DATASET_BUILD_DIR, owner: str | None = None
) -> Path:
    """Upload folder for a repo-defined dataset: owner-filled metadata + its contents copied."""
    if slug not in DATASET_CONTENTS:
        raise KaggleBuildError(f"unknown dataset {slug!r}; defined: {sorted(DATASET_CONTENTS)}")
    missing = [n for n in DATASET_CONTENTS[slug] if not (source_dir / n).exists()]
    if missing:
        raise KaggleBuildError(f"{source_dir}: missing {missing} for dataset {slug!r}")
    meta = read_json(DATASETS_DIR / slug / DATASET_METADATA)
    meta["id"] = f"{resolve_owner(owner)}/{slug}"
    target = out_dir / slug
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in DATASET_CONTENTS[slug]:
        src = source_dir / name
        if src.is_dir():
            shutil.copytree(src, target / name)
        else:
            shutil.copy2(src, target / name)
    (target / DATASET_METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return target


def download_weights(out_dir: Path) -> list[Path]:
    """Save each pretrained timm backbone's state dict (needs internet: run on a laptop)."""
    import timm
    import torch

    from utils.image.models import BACKBONES

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted(set(IMAGE_BACKBONES.values())):
        model = timm.create_model(BACKBONES[name].timm_name, pretrained=True)
        torch.save(model.state_dict(), out_dir / f"{name}.pth")
        written.append(out_dir / f"{name}.pth")
    return written


# ---------------------------------------------------------------- offline dry run of the client


def _kaggle_api() -> Any:
    """The installed kaggle client's KaggleApi (its import-time auth chatter silenced)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
    return KaggleApi()


class _CapturingClient:
    """Stands in for kagglesdk's KaggleClient: records requests instead of sending them."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        ok = SimpleNamespace(error=None, invalidTags=[], versionNumber=1, url="dry-run")
        self.kernels = SimpleNamespace(kernels_api_client=SimpleNamespace(save_kernel=self._keep))
        self.datasets = SimpleNamespace(
            dataset_api_client=SimpleNamespace(create_dataset=self._keep)
        )
        self._response = ok

    def _keep(self, request: Any) -> Any:
        self.requests.append(request)
        return self._response

    def __enter__(self) -> _CapturingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def dry_run_push(folder: Path) -> Any:
    """Run the real `kaggle kernels push` on folder with the network call captured; the request."""
    api, client = _kaggle_api(), _CapturingClient()
    api.build_kaggle_client = lambda: client
    with contextlib.redirect_stdout(io.StringIO()) as said:
        api.kernels_push(str(folder))
    if "does not resolve to the specified id" in said.getvalue():
        raise KaggleBuildError(f"{folder}: kaggle client says the title does not match the id")
    return client.requests[-1]


def dry_run_dataset_create(folder: Path) -> tuple[Any, list[Any]]:
    """Run the real `kaggle datasets create` on folder offline; (request, resources uploaded)."""
    from requests import HTTPError

    api, client = _kaggle_api(), _CapturingClient()
    owner = split_ref(read_json(folder / DATASET_METADATA)["id"])[0]
    api.config_values = {**getattr(api, "config_values", {}), api.CONFIG_NAME_USER: owner}
    api.build_kaggle_client = lambda: client
    uploads: list[Any] = []

    def not_found(*args: Any, **kwargs: Any) -> None:
        raise HTTPError("404: dry run, dataset does not exist yet")

    api.dataset_status = not_found
    api.upload_files = lambda request, resources, *args, **kwargs: uploads.append(resources)
    result = api.dataset_create_new(str(folder))
    if result.error:
        raise KaggleBuildError(f"{folder}: {result.error}")
    return client.requests[-1], uploads


# ---------------------------------------------------------------- CLI


def _report(problems: list[str], ok: str) -> int:
    """Print problems (exit 1) or the ok line (exit 0)."""
    for line in problems:
        print(f"ERROR {line}", file=sys.stderr)
    if not problems:
        print(ok)
    return 1 if problems else 0


COMMANDS = {  # name -> (one-line help, what it does)
    "validate": (
        "check every kernel/dataset metadata file",
        "Check kernels/*/kernel-metadata.json, the top-level one and kernels/datasets/*: ids, "
        "sources, GPU, internet off; with --built also a build folder.",
    ),
    "build": (
        "make self-contained kernel folders",
        "Validate, then write one folder per kernel: the notebook with the utils modules it "
        "imports embedded (bootstrap cell) and the Kaggle settings injected.",
    ),
    "dry-run": (
        "run the kaggle client's push offline on a build",
        "Run the kaggle client's push request building on each built kernel, without network.",
    ),
    "dataset": (
        "make an upload folder for a repo-defined dataset",
        "Copy the files a dataset holds from --from into an upload folder with its "
        "dataset-metadata.json (then: kaggle datasets create -p <folder>).",
    ),
    "weights": (
        "download pretrained timm weights (internet)",
        "Download each backbone's pretrained timm weights as <backbone>.pth into --out (the "
        "weights dataset; also `python -m utils.pipeline --weights-dir`).",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.kaggle.build",
        description=__doc__,
        formatter_class=RawDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str) -> argparse.ArgumentParser:
        short, long = COMMANDS[name]
        return sub.add_parser(
            name, help=short, description=long, formatter_class=DefaultsHelpFormatter
        )

    p_val = command("validate")
    p_val.add_argument("--built", type=Path, help="also check this build folder")
    p_build = command("build")
    p_build.add_argument("--owner", help="Kaggle user name (default: $KAGGLE_USERNAME)")
    p_build.add_argument("--out", type=Path, default=DEFAULT_BUILD_DIR, help="build folder")
    p_build.add_argument("--tuned", action="store_true", help="GBDT kernel reads tuning dataset")
    p_build.add_argument(
        "--recipe", choices=RECIPES, default="paper", help="recipe of the tuning and GBDT kernels"
    )
    p_build.add_argument(
        "--folds",
        type=lambda text: [int(f) for f in text.split(",")],
        help="image kernels train only these folds, e.g. 0,1 (the others in later sessions)",
    )
    p_build.add_argument(
        "--continue",
        dest="continue_run",
        action="store_true",
        help="image kernels mount their own last output and resume from it",
    )
    p_build.add_argument(
        "--skip-version-check",
        action="store_true",
        help="kernels print library differences, even known-bad ones, and never stop on them",
    )
    p_dry = command("dry-run")
    p_dry.add_argument("--out", type=Path, default=DEFAULT_BUILD_DIR, help="build folder")
    p_ds = command("dataset")
    p_ds.add_argument("slug", choices=sorted(DATASET_CONTENTS), help="dataset to prepare")
    p_ds.add_argument("--from", dest="source", type=Path, required=True, help="files to upload")
    p_ds.add_argument("--owner", help="Kaggle user name (default: $KAGGLE_USERNAME)")
    p_ds.add_argument("--out", type=Path, default=DEFAULT_DATASET_BUILD_DIR, help="upload folder")
    p_w = command("weights")
    p_w.add_argument("--out", type=Path, required=True, help="folder for the .pth files")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except KaggleBuildError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    """Dispatch one parsed command."""
    if args.command == "validate":
        problems = validate(built_dir=args.built)
        return _report(problems, f"ok: {len(kernel_folders())} kernels, datasets valid")
    if args.command == "build":
        problems = validate()
        if problems:
            return _report(problems, "")
        built = build_all(
            args.out,
            args.owner,
            args.tuned,
            folds=args.folds,
            continue_run=args.continue_run,
            recipe=args.recipe,
            skip_version_check=args.skip_version_check,
        )
        for folder in built:
            print(f"built {folder}")
        owner = split_ref(read_json(built[0] / KERNEL_METADATA)["id"])[0]
        if write_top_level(args.out, owner):
            print(f"{TOP_LEVEL_METADATA.name} at the repository root now pushes as {owner}")
        return _report(validate(built_dir=args.out), f"ok: kernels built in {args.out}")
    if args.command == "dry-run":
        for folder in sorted(p.parent for p in args.out.glob(f"*/{KERNEL_METADATA}")):
            request = dry_run_push(folder)
            print(f"{folder.name}: would push {request.slug} internet={request.enable_internet}")
        return 0
    if args.command == "dataset":
        print(f"ready to upload: {build_dataset(args.slug, args.source, args.out, args.owner)}")
        return 0
    for path in download_weights(args.out):
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
