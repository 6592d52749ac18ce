"""What made an artifact folder: one `manifest.json`, written last, and a reader that checks it.

The manifest lists every file of the folder (relative path, size, sha256), the resolved config
and its hash, the hash of the `utils` code that ran and the library versions. A folder without
one is unfinished (or predates manifests); `verify_manifest` lists every way a folder differs
from its manifest (missing, changed or extra files), so a reader can refuse a mixed folder.
Writers here are atomic (temporary file + os.replace): an interrupted write leaves no half file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
PREVIOUS_DIR = ".previous"
# Distribution names per library; the first one installed is reported (xgboost-cpu off Kaggle).
LIBRARIES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    "polars": ("polars",),
    "pandas": ("pandas",),
    "scikit-learn": ("scikit-learn",),
    "torch": ("torch",),
    "timm": ("timm",),
    "lightgbm": ("lightgbm",),
    "catboost": ("catboost",),
    "xgboost": ("xgboost", "xgboost-cpu"),
    "optuna": ("optuna",),
    "imbalanced-learn": ("imbalanced-learn",),
    "h5py": ("h5py",),
    "albumentations": ("albumentations",),
    "opencv": ("opencv-python-headless", "opencv-python"),
}
CHUNK = 1 << 20


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """JSON (indented, NaN allowed) written atomically."""
    return write_atomic(path, json.dumps(data, indent=2, allow_nan=True, default=str))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def config_hash(config: Any) -> str:
    """16 hex digits of the sha256 of the config's canonical JSON (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """16 hex digits over every `utils/**/*.py` (relative path and bytes) that is running."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str | None]:
    """Installed version of each library in LIBRARIES (None when absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in LIBRARIES.items():
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def _files(folder: Path) -> list[Path]:
    """Every regular file under `folder` but the manifest, temporary files and runs set aside."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.name != MANIFEST_FILE
        and not p.name.endswith(".tmp")
        and PREVIOUS_DIR not in p.relative_to(folder).parts
    )


def write_manifest(
    folder: str | Path, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write `<folder>/manifest.json` (call it last): files, config, hashes, library versions."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in _files(folder)
    }
    record = {
        "config": config,
        "config_hash": config_hash(config),
        "code_hash": code_hash(),
        "libraries": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": uuid.uuid4().hex,
        **(extra or {}),
        "files": files,
    }
    return write_json(folder / MANIFEST_FILE, record)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of `folder`; FileNotFoundError naming the folder when it has none."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST_FILE} (unfinished or older run)")
    return json.loads(path.read_text())


def verify_manifest(folder: str | Path) -> list[str]:
    """Every way `folder` differs from its manifest (empty when it matches)."""
    folder = Path(folder)
    try:
        record = read_manifest(folder)
        listed = record["files"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError) as err:
        return [f"{folder}: manifest unreadable ({err})"]
    problems = []
    for rel, entry in listed.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{path}: size {path.stat().st_size}, manifest says {entry['size']}")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{path}: content differs from the manifest (sha256)")
    extra = [p.relative_to(folder).as_posix() for p in _files(folder)]
    extra = [rel for rel in extra if rel not in listed]
    if extra:
        problems.append(f"{folder}: file(s) not in the manifest (another run?): {extra[:5]}")
    return problems


def set_aside(folder: str | Path, log: Any = print) -> Path | None:
    """Move a non-empty `folder` to `<parent>/.previous/<name>` (replacing an older one there),
    so a rerun starts clean and never mixes its files with an earlier run's; the new path."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    target = folder.parent / PREVIOUS_DIR / folder.name
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(target))
    log(f"{folder}: earlier run moved aside to {target}")
    return target
