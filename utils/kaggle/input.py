"""What runs inside a Kaggle kernel before the stage: library checks and input paths.

Kept apart from the build CLI (utils.kaggle.build) and free of third-party imports, so a built
kernel embeds it whatever stage it runs, and it can fail in seconds, before any long import.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

KAGGLE_INPUT_ENV = "FUSIONNETX_KAGGLE_INPUT"
KAGGLE_INPUT_ROOT = "/kaggle/input"
SKIP_VERSION_CHECK_ENV = "FUSIONNETX_SKIP_VERSION_CHECK"

# The version of each library the suite is tested with on Kaggle's side: CI runs every test under
# requirements-kaggle.txt (Kaggle's GPU image) as well as requirements.txt, and
# tests/test_kaggle.py holds these equal to that file's pins. A difference only warns. Several
# distributions provide one import (Kaggle's opencv-python and xgboost; the headless / CPU builds
# off Kaggle).
MIN_VERSIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "torch": (("torch",), "2.10.0"),
    "torchvision": (("torchvision",), "0.25.0"),
    "timm": (("timm",), "1.0.26"),
    "albumentations": (("albumentations",), "2.0.8"),
    "opencv": (("opencv-python", "opencv-python-headless", "opencv-contrib-python"), "4.13.0.92"),
    "numpy": (("numpy",), "2.0.2"),
    "polars": (("polars",), "1.35.2"),
    "pandas": (("pandas",), "2.2.2"),
    "h5py": (("h5py",), "3.16.0"),
    "pillow": (("pillow",), "11.3.0"),
    "scipy": (("scipy",), "1.15.3"),
    "scikit-learn": (("scikit-learn",), "1.6.1"),
    "imbalanced-learn": (("imbalanced-learn",), "0.14.1"),
    "lightgbm": (("lightgbm",), "4.6.0"),
    "catboost": (("catboost",), "1.2.10"),
    "xgboost": (("xgboost", "xgboost-cpu"), "3.2.0"),
    "optuna": (("optuna",), "5.0.0"),
    "matplotlib": (("matplotlib",), "3.10.0"),
    "tqdm": (("tqdm",), "4.67.1"),
}


# The import name of each library, to tell from a module's source which libraries it needs: its
# own name but for these.
IMPORTED_AS = {
    "opencv": "cv2",
    "pillow": "PIL",
    "scikit-learn": "sklearn",
    "imbalanced-learn": "imblearn",
}
IMPORT_NAMES: dict[str, str] = {IMPORTED_AS.get(lib, lib): lib for lib in MIN_VERSIONS}

# Versions known not to work with the suite: library -> (first version that works, why). Only
# these stop a kernel; any other difference from the tested pins is a warning, because a pin
# nobody has seen on Kaggle must not strand a submission kernel in its first cell.
KNOWN_INCOMPATIBLE: dict[str, tuple[str, str]] = {
    "timm": (
        "0.9.0",
        "create_model has no pretrained_cfg_overlay, through which utils.image.models loads the "
        "weights dataset's .pth (with custom_load=False)",
    ),
    "torch": (
        "2.3.0",
        "torch.amp.GradScaler(device) used by utils.image.train does not exist "
        "(only torch.cuda.amp.GradScaler)",
    ),
    "polars": ("0.19.0", "DataFrame.group_by, used throughout, was still called groupby"),
}


class LibraryVersionError(RuntimeError):
    """An installed library has a version known not to work with the suite."""


def release(version: str) -> tuple[int, ...]:
    """Numeric release of a version: '2.10.0+cu128' -> (2, 10, 0), '1.0.26rc1' -> (1, 0, 26)."""
    numeric = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in numeric.group().split(".")) if numeric else ()


def installed_version(distributions: tuple[str, ...]) -> str | None:
    """Version of the first installed distribution among `distributions`, or None."""
    for name in distributions:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return None


def installed_versions(libraries: Iterable[str] | None = None) -> dict[str, str | None]:
    """Installed version of each library (every one of MIN_VERSIONS by default; None: absent)."""
    names = MIN_VERSIONS if libraries is None else libraries
    return {lib: installed_version(MIN_VERSIONS[lib][0]) for lib in names}


def version_problems(versions: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """(blocking, warnings): a known incompatibility blocks; a missing library or another
    version than the tested pin only warns (the kernel may never call the code needing it)."""
    blocking, warnings = [], []
    for lib, found in versions.items():
        pinned = MIN_VERSIONS[lib][1]
        if found is None:
            warnings.append(f"{lib} is not installed (tested with {pinned})")
            continue
        works_from, why = KNOWN_INCOMPATIBLE.get(lib, ("0", ""))
        if release(found) < release(works_from):
            blocking.append(f"{lib} {found} is known not to work (needs >= {works_from}): {why}")
        elif release(found) != release(pinned):
            warnings.append(f"{lib} {found} differs from the tested {pinned}")
    return blocking, warnings


def check_versions(
    libraries: Iterable[str] | None = None,
    versions: dict[str, str | None] | None = None,
    stop: bool = True,
) -> dict[str, str | None]:
    """Print the versions of `libraries` (those a kernel imports; all by default) and a WARNING
    for each difference from the tested pins; raise LibraryVersionError (one line) only for a
    version with a known incompatibility.

    stop=False (a kernel built with --skip-version-check) or FUSIONNETX_SKIP_VERSION_CHECK=1
    prints even those as a warning and runs anyway.
    """
    versions = installed_versions(libraries) if versions is None else versions
    print("libraries: " + ", ".join(f"{lib} {v or '-'}" for lib, v in versions.items()))
    blocking, warnings = version_problems(versions)
    for line in warnings:
        print(f"WARNING: {line}", file=sys.stderr)
    if blocking:
        line = "; ".join(blocking)
        if not stop or os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
            print(f"WARNING: {line} (version check skipped: running anyway)", file=sys.stderr)
        else:
            raise LibraryVersionError(
                f"{line}. Rebuild with `build --skip-version-check` or set "
                f"{SKIP_VERSION_CHECK_ENV}=1 to run anyway."
            )
    return versions


def kaggle_input_root() -> Path:
    """Root of the mounted Kaggle inputs (env FUSIONNETX_KAGGLE_INPUT overrides /kaggle/input)."""
    return Path(os.environ.get(KAGGLE_INPUT_ENV, KAGGLE_INPUT_ROOT))


def _natural_key(path: Path) -> tuple:
    """Sort key that orders numeric parts by value: versions/10 after versions/2."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def _matches(root: Path, name: str, max_depth: int) -> list[Path]:
    """Paths named `name` under root at the shallowest depth (0..max_depth) that has any."""
    for depth in range(max_depth + 1):
        hits = list(root.glob("/".join(["*"] * depth + [name])))
        if hits:
            return hits
    return []


def _mount(root: Path, slug: str, owner: str | None) -> Path | None:
    """The folder where input `slug` is mounted; with several, the one under `owner`."""
    mounts = sorted(p for p in _matches(root, slug, max_depth=3) if p.is_dir())
    if owner is not None and len(mounts) > 1:
        mine = [p for p in mounts if owner in p.relative_to(root).parts[:-1]]
        if mine:
            return mine[0]
        raise FileNotFoundError(
            f"Kaggle input {slug!r} is mounted {len(mounts)} times ({[str(p) for p in mounts]}), "
            f"none under the owner {owner!r}"
        )
    return mounts[0] if mounts else None


def input_path(slug: str, name: str, owner: str | None = None) -> Path:
    """Path of file/folder `name` inside the mounted input `slug` (any Kaggle mount layout).

    Kaggle mounts an input as /kaggle/input/<slug> or deeper (.../competitions/<slug>,
    .../<owner>/<slug>, .../<slug>/versions/<n>). With several versions mounted the highest
    number wins; with the same slug from several owners, `owner`'s.
    """
    root = kaggle_input_root()
    mount = _mount(root, slug, owner)
    found = _matches(mount, name, max_depth=3) if mount is not None else []
    if not found:
        mounted = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        where = f"mounted at {mount}" if mount is not None else "not mounted"
        raise FileNotFoundError(
            f"Kaggle input {slug!r} ({where}) has no {name!r} under {root}; mounted inputs: "
            f"{mounted}. Add {slug!r} to the kernel's sources and check the dataset's files."
        )
    return max(found, key=_natural_key)


def link_inputs(
    sources: dict[str, str], out_dir: str | Path | None = None, owner: str | None = None
) -> Path:
    """One folder of symlinks `name -> input_path(slug, name)`: several inputs seen as one dir.

    A missing name is left out with a loud warning, so the notebook can fall back (the
    submission kernel scores with metadata-only members when image models are absent).
    """
    out = Path(out_dir) if out_dir else Path(tempfile.gettempdir()) / "fusionnetx-artifacts"
    out.mkdir(parents=True, exist_ok=True)
    for name, slug in sources.items():
        link = out / name
        link.unlink(missing_ok=True)
        try:
            link.symlink_to(input_path(slug, name, owner), target_is_directory=True)
        except FileNotFoundError as err:
            print(f"WARNING: {name} left out of {out}: {err}", file=sys.stderr)
    return out
