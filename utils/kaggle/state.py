"""utils.kaggle.run's state file and the digests, checksums and log tails it records."""

from __future__ import annotations

import contextlib
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from utils.kaggle.client import RunStopped
from utils.manifest import file_sha256, write_atomic

LOG_TAIL_LINES = 25


def empty_state(owner: str) -> dict[str, Any]:
    """State of a run that has done nothing yet."""
    return {"owner": owner, "kernels": {}, "datasets": {}, "steps": {}, "submitted": None}


def load_state(path: Path, owner: str) -> dict[str, Any]:
    """The state file, or an empty state; RunStopped when it belongs to another owner."""
    if not path.is_file():
        return empty_state(owner)
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("owner") != owner:
        raise RunStopped(
            f"{path} records a run for owner {state.get('owner')!r}, not {owner!r}: "
            "use another --work-dir for another account"
        )
    return state


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the state atomically (a crash leaves the old file or the new, never half)."""
    write_atomic(path, json.dumps(state, indent=2) + "\n")


def checksums(root: Path, name: str) -> dict[str, str]:
    """sha256 of `name` under root (a file, or every file of a folder), by relative path."""
    target = root / name
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in files}


def code_digest(notebook: Path) -> str:
    """sha256 of a built notebook's cell sources (cell ids are random per build, so not bytes)."""
    import nbformat

    cells = nbformat.read(notebook, as_version=4).cells
    return digest_of({"cells": [[cell.cell_type, cell.source] for cell in cells]})


def digest_of(items: dict[str, Any]) -> str:
    """One sha256 for a JSON-able mapping (the content of a dataset to publish)."""
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def log_tail(log: str, lines: int = LOG_TAIL_LINES) -> str:
    """Last lines of a kernel log; Kaggle's log is a JSON list of {stream_name, time, data}."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        log = "".join(entry.get("data", "") for entry in json.loads(log))
    return "\n".join(log.rstrip().splitlines()[-lines:])


def utc_now() -> str:
    """UTC time stamp for the state file."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
