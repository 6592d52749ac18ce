"""Every setting of every stage, in one torch-free package: the image-model registry, the presets
and one `resolve` function. Import from here; the modules inside hold the stage configs and
registry (`configs`), the recipes' GBDT parameters and switches (`recipes`) and the size presets
(`presets`); this one resolves a preset x recipe with a notebook's overrides.

Two axes: the size preset (`demo`: CPU, CI, minutes; `full`: Kaggle, real sizes) and
the recipe (`paper`: the validated reference, the default; `plus`: `paper` plus the stage 3
additions the ablation (bench/ablation.py, docs/benchmarks.md) showed to help, PLUS_GBDT).
`resolve(preset, recipe, image=..., gbdt=..., ...)` returns one `Settings` holding each stage's
config; an override that is None keeps the preset's value, so a notebook can pass its parameters
cell through unchanged. Stage modules hold logic only: they take these configs.

    cfg = resolve("demo", gbdt={"seeds": [0, 1]}).gbdt
    image = image_config("vit_tiny", "demo", epochs=2)
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from utils.notebook_params import list_parameter, mapping_parameter
from utils.settings.configs import (
    FOLD_SEED,
    IMAGE_MODELS,
    N_FOLDS,
    STAGES,
    TRAIN_IDENTITY_FREE,
    ExternalEvalConfig,
    GBDTConfig,
    ImageConfig,
    InferenceConfig,
    Sampling,
    Settings,
    SyntheticConfig,
    TuneConfig,
)
from utils.settings.presets import DEMO_FOLDS, PRESETS
from utils.settings.recipes import GBDT_BINNING, GBDT_PARAMS, PAPER_GBDT_PARAMS, PLUS_GBDT, RECIPES

__all__ = [
    "DEMO_FOLDS",
    "FOLD_SEED",
    "GBDT_BINNING",
    "GBDT_PARAMS",
    "IMAGE_MODELS",
    "N_FOLDS",
    "PAPER_GBDT_PARAMS",
    "PLUS_GBDT",
    "PRESETS",
    "RECIPES",
    "STAGES",
    "TRAIN_IDENTITY_FREE",
    "ExternalEvalConfig",
    "GBDTConfig",
    "ImageConfig",
    "InferenceConfig",
    "Sampling",
    "Settings",
    "SyntheticConfig",
    "TuneConfig",
    "image_config",
    "resolve",
]


def _given(overrides: Mapping[str, Any] | None, config: type | None = None) -> dict[str, Any]:
    """Overrides without None values, each parsed to its field's type in `config` (if given).

    Notebook parameters arrive as papermill delivers them: `-p seeds '[0, 1]'` is a string, and
    `-p seeds 1` an int where the field holds a tuple. Lists become tuples (frozen configs).
    """
    hints = typing.get_type_hints(config) if config is not None else {}
    return {
        k: _typed(v, hints[k], k) if k in hints else tuple(v) if isinstance(v, list) else v
        for k, v in (overrides or {}).items()
        if v is not None
    }


def _typed(value: Any, hint: Any, name: str) -> Any:
    """`value` parsed to the field type `hint`; ValueError naming the parameter and the value."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = {typing.get_origin(h) or h for h in (typing.get_args(hint) if union else (hint,))}
    if kinds & {tuple, list}:
        return tuple(list_parameter(value if not isinstance(value, int | float) else [value], name))
    if kinds & {Mapping, dict}:
        return mapping_parameter(value, name)
    if isinstance(value, str) and kinds & {int, float, bool}:
        return _scalar(value, kinds, name)
    return value


def _scalar(text: str, kinds: set[Any], name: str) -> int | float | bool:
    """A number or a boolean written as text (`-p epochs '3'`, `-p head_norm true`)."""
    lowered = text.strip().lower()
    if bool in kinds and lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        if kind in kinds:
            with contextlib.suppress(ValueError):
                return kind(text)
    expected = " or ".join(sorted(k.__name__ for k in kinds if k in (int, float, bool)))
    raise ValueError(f"{name}: expected {expected}, got {text!r}")


def resolve(
    preset: str = "demo", recipe: str = "paper", **stage_overrides: Mapping[str, Any] | None
) -> Settings:
    """The preset's settings for `recipe`, each stage updated by its overrides (None: keep).

    `stage_overrides` are keyed by stage (`data`, `image`, `tuning`, `gbdt`, `inference`,
    `external`), each a mapping of field -> value.
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    if recipe not in RECIPES:
        raise KeyError(f"unknown recipe {recipe!r}; known: {list(RECIPES)}")
    unknown = sorted(set(stage_overrides) - set(STAGES))
    if unknown:
        raise KeyError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    settings = PRESETS[preset](recipe)
    changes = {
        stage: dataclasses.replace(
            getattr(settings, stage), **_given(values, type(getattr(settings, stage)))
        )
        for stage, values in stage_overrides.items()
        if _given(values)
    }
    return dataclasses.replace(settings, **changes)


def image_config(
    model_name: str, preset: str = "demo", recipe: str = "paper", **overrides: Any
) -> ImageConfig:
    """The stage 1 config of one registered image model (overrides that are None keep)."""
    if model_name not in IMAGE_MODELS:
        raise KeyError(f"unknown image model {model_name!r}; known: {sorted(IMAGE_MODELS)}")
    spec = IMAGE_MODELS[model_name]
    template = resolve(preset, recipe).image
    return dataclasses.replace(
        template,
        model_name=model_name,
        backbone=spec.backbone,
        label=spec.label,
        **_given(overrides, type(template)),
    )
