"""What made an artifact folder: one `manifest.json`, written last, and a reader that checks it.

The manifest lists every file of the folder (relative path, size, sha256), the resolved config
and its hash, the hash of the `utils` code that ran and the library versions. A folder without
one is unfinished (or predates manifests); `check_folder` says, per file, how a folder differs
from its manifest (missing, changed or extra files), so a reader can refuse a damaged file before
any library opens it, and `verify_manifest` lists the same as messages.
Writers here are atomic (temporary file + os.replace): an interrupted write leaves no half file;
`atomic_output` gives a library that writes to a path (a model's save_model) the same guarantee.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path
from typing import Any

from utils.layout import MANIFEST_FILE, PREVIOUS_DIR

# Libraries whose versions a manifest records, by distribution name; where a library has more than
# one distribution, the first one installed is reported (xgboost-cpu off Kaggle).
ALTERNATIVES = {
    "xgboost": ("xgboost", "xgboost-cpu"),
    "opencv": ("opencv-python-headless", "opencv-python"),
}
LIBRARIES: dict[str, tuple[str, ...]] = {
    name: ALTERNATIVES.get(name, (name,)) for name in (
        "numpy", "polars", "pandas", "scikit-learn", "torch", "timm", "lightgbm", "catboost",
        "xgboost", "optuna", "imbalanced-learn", "h5py", "albumentations", "opencv",
    )
}  # fmt: skip


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder (atomic_output)."""
    with atomic_output(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
    return Path(path)


def is_temporary(name: str) -> bool:
    """True for the temporary files of an unfinished atomic write (never part of an artifact)."""
    return name.endswith(".tmp") or (name.startswith(".") and ".tmp." in name)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` through; it replaces `path` only when the block
    ends without an error, so a killed or failed writer never leaves a partial file there. The
    temporary name is hidden, keeps the suffix (libraries such as XGBoost choose the format by
    suffix) and manifests skip it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> Path:
    """JSON (indented, NaN allowed) written atomically."""
    return write_atomic(path, json.dumps(data, indent=2, allow_nan=True, default=str))


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when it is absent, unreadable or not an object."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(frame: Any, label: str = "target") -> dict[str, Any]:
    """Rows, positives (of `target`) and a sha1 of (isic_id, fold, `label`) sorted by isic_id:
    which data a run saw (a polars frame; resume and provenance compare it)."""
    rows = frame.select("isic_id", "fold", label).sort("isic_id").rows()
    digest = hashlib.sha1("\n".join(f"{i},{f},{y}" for i, f, y in rows).encode()).hexdigest()
    return {"rows": frame.height, "positives": int(frame["target"].sum()), "sha1": digest}


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
            with contextlib.suppress(metadata.PackageNotFoundError):
                versions[name] = metadata.version(dist)
                break
    return versions


def _files(folder: Path) -> dict[str, Path]:
    """Every regular file under `folder` but the manifest, temporary files and runs set aside,
    by its relative posix path."""
    return {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.name != MANIFEST_FILE
        and not is_temporary(p.name)
        and PREVIOUS_DIR not in p.relative_to(folder).parts
    }


def write_manifest(
    folder: str | Path, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write `<folder>/manifest.json` (call it last): files, config, hashes, library versions."""
    folder = Path(folder)
    files = {
        rel: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for rel, p in _files(folder).items()
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


@dataclass(frozen=True)
class FolderCheck:
    """How the files of a folder compare with its manifest, file by file."""

    folder: Path
    error: str | None  # why there is no usable manifest (absent or unreadable); None when read
    problems: dict[str, str] = field(default_factory=dict)  # listed file -> what is wrong
    unlisted: tuple[str, ...] = ()  # files present but not in the manifest
    listed: tuple[str, ...] = ()

    @property
    def has_manifest(self) -> bool:
        return self.error is None

    def problem(self, rel: str) -> str | None:
        """What is wrong with file `rel` by the manifest (None when it matches or none exists)."""
        if not self.has_manifest:
            return None
        if rel in self.unlisted:
            return f"{self.folder / rel}: not in the manifest (another run?)"
        return self.problems.get(rel)

    def messages(self) -> list[str]:
        """Every difference as one line naming the file (what verify_manifest returns)."""
        if self.error is not None:
            return [f"{self.folder}: manifest unreadable ({self.error})"]
        lines = list(self.problems.values())
        if self.unlisted:
            shown = list(self.unlisted[:5])
            lines.append(f"{self.folder}: file(s) not in the manifest (another run?): {shown}")
        return lines


def file_problem(path: Path, size: int, sha256: str) -> str | None:
    """How `path` differs from its manifest entry (size first: a truncated file costs no hash)."""
    if not path.is_file():
        return f"{path}: listed in the manifest but missing"
    found = path.stat().st_size
    if found != size:
        return f"{path}: size {found}, manifest says {size} (truncated or replaced)"
    if file_sha256(path) != sha256:
        return f"{path}: content differs from the manifest (sha256)"
    return None


def check_folder(folder: str | Path) -> FolderCheck:
    """Compare every file of `folder` with its manifest (a FolderCheck with `error` set when
    the folder has no readable manifest: older artifacts or an interrupted upload)."""
    folder = Path(folder)
    try:
        listed = read_manifest(folder)["files"]
        entries = {rel: (int(e["size"]), str(e["sha256"])) for rel, e in listed.items()}
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as err:  # JSON, no file list
        return FolderCheck(folder, str(err))
    problems = {
        rel: why for rel, entry in entries.items() if (why := file_problem(folder / rel, *entry))
    }
    unlisted = tuple(rel for rel in _files(folder) if rel not in entries)
    return FolderCheck(folder, None, problems, unlisted, tuple(entries))


class DamagedArtifact(ValueError):
    """A file differs from its folder's manifest and no fallback exists (message names it)."""


RECORDED, STOP, LEAVE_OUT = "recorded", "stop", "leave out"
# What a reader does with a file whose size or sha256 differs from its folder's manifest (or that
# the manifest lists and is missing): the first pattern that matches the file name decides.
# README's robustness section shows this table.
DAMAGED_FILE_RULES: tuple[tuple[str, str, str], ...] = (
    (
        "config.json",
        RECORDED,
        "the configuration the manifest records is used; none recorded: the image model is "
        "unusable (its fallback: the metadata-only member scores every row)",
    ),
    ("ensemble.json", STOP, "the kernel stops before any image is read, naming the file"),
    ("features.json", STOP, "the kernel stops before any image is read, naming the file"),
    ("fold*.pt", LEAVE_OUT, "the fold is left out: the image model averages its other folds"),
    ("*", LEAVE_OUT, "a GBDT member's model file: the member is left out of the soft vote"),
)


def damaged_file_rule(rel: str) -> tuple[str, str]:
    """(action, words) of DAMAGED_FILE_RULES for file `rel` of an artifact folder."""
    name = Path(rel).name
    return next((action, words) for p, action, words in DAMAGED_FILE_RULES if fnmatch(name, p))


def verified_json(folder: str | Path, rel: str, check: FolderCheck | None = None) -> Any:
    """The parsed JSON file `rel` of `folder` when it matches the manifest (or there is none);
    when it differs, the rule for its name: RECORDED gives the record the manifest holds (the
    `config` a stage's manifest saves), STOP (or nothing recorded) raises DamagedArtifact."""
    folder = Path(folder)
    path = folder / rel
    check = check or check_folder(folder)
    why = check.problem(rel)
    if why is None:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing")
        return json.loads(path.read_text())
    action, words = damaged_file_rule(rel)
    recorded = read_manifest(folder).get("config") if action == RECORDED else None
    if not isinstance(recorded, dict):
        raise DamagedArtifact(f"{why}: not used ({words})")
    return recorded


def verify_manifest(folder: str | Path) -> list[str]:
    """Every way `folder` differs from its manifest (empty when it matches)."""
    return check_folder(folder).messages()


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
