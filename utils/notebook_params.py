"""Notebook parameters as papermill delivers them: `-p name '["a", "b"]'` arrives as a string.

    image_oof_dirs = list_parameter(image_oof_dirs, "image_oof_dirs")

A list parameter accepts a list (papermill's `-y`, the pipeline, a notebook edit), a JSON string
holding a list (`-p name '["a", "b"]'`), one plain string (a single item) or None (an empty list).
A mapping parameter (`weights_path` of 05_external_eval) accepts a dict, a JSON string of one
(`-p weights_path '{"vit_tiny": "w/vit_tiny.pth"}'`) or None.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def _from_json(value: str, name: str, problem: str, example: str) -> Any:
    """`value` parsed; ValueError naming the parameter and how to write it otherwise."""
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{name}: {value!r} {problem} ({err.msg}); write it as -p {name} '{example}' (double "
            "quotes inside)"
        ) from err


def list_parameter(value: Any, name: str = "parameter") -> list[Any]:
    """`value` as a list; ValueError naming the parameter for anything else."""
    if value is None:
        return []
    if isinstance(value, str):
        if not value.strip().startswith("["):
            return [value] if value.strip() else []
        value = _from_json(value, name, "looks like a list but is not valid JSON", '["a", "b"]')
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    raise ValueError(f"{name}: expected a list (or a JSON string of one), got {value!r}")


def mapping_parameter(value: Any, name: str = "parameter") -> dict[str, Any] | None:
    """`value` as a dict (None stays None); ValueError naming the parameter for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _from_json(value, name, "is not a JSON object", '{"key": "value"}')
    if isinstance(value, Mapping):
        return dict(value)
    raise ValueError(f"{name}: expected a mapping (or a JSON string of one), got {value!r}")
