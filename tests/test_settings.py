"""utils.settings: one registry, one preset table, one resolve; no stage has its own."""

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from utils import pipeline
from utils.image.models import BACKBONES
from utils.kaggle import build as kaggle_build
from utils.settings import (
    IMAGE_MODELS,
    PAPER_GBDT_PARAMS,
    RECIPES,
    GBDTConfig,
    ImageConfig,
    image_config,
    resolve,
)
from utils.tabular.libraries import resolve_params

REPO = Path(__file__).resolve().parents[1]
# Modules that may define settings: the settings module itself and the owners of other issues
# (utils.image.models' BACKBONES is the timm name per backbone, checked against the registry below).
SETTINGS_FREE = [
    p
    for p in sorted((REPO / "utils").glob("*.py"))
    if p.stem not in {"settings", "models", "kaggle_build", "kaggle_input", "kaggle_run"}
]


def test_registry_agrees_with_models_pipeline_kaggle_and_notebooks():
    assert set(IMAGE_MODELS) == {
        "convnextv2_nano",
        "vit_tiny",
        "vit_tiny_suspicious",
        "vit_small_suspicious",
    }
    assert {spec.backbone for spec in IMAGE_MODELS.values()} == set(BACKBONES)
    for name, spec in IMAGE_MODELS.items():
        assert spec.pooling == BACKBONES[spec.backbone].head, name
        assert (REPO / "notebooks" / f"01_image_{name}.ipynb").is_file()
        assert (REPO / "kernels" / f"01_image_{name}").is_dir()
    assert [s.name for s in pipeline.STAGES if s.name.startswith("image_")] == [
        f"image_{m}" for m in IMAGE_MODELS
    ]
    assert tuple(kaggle_build.IMAGE_MODELS) == tuple(IMAGE_MODELS)
    backbones = {name: spec.backbone for name, spec in IMAGE_MODELS.items()}
    assert {m: getattr(b, "backbone", b) for m, b in kaggle_build.IMAGE_BACKBONES.items()} == (
        backbones
    )


def test_settings_module_imports_without_torch():
    code = "import sys, utils.settings; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def _own_settings(path: Path) -> list[str]:
    """Module-level preset tables, *Config classes or dicts keyed by a preset name in `path`."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name.endswith(("Config", "Preset", "Sizes")):
            found.append(f"class {node.name}")
        targets = node.targets if isinstance(node, ast.Assign) else []
        targets += [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name) and "PRESET" in target.id:
                found.append(target.id)
        value = getattr(node, "value", None)
        if isinstance(value, ast.Dict):
            keys = {k.value for k in value.keys if isinstance(k, ast.Constant)}
            if keys & {"demo", "full"}:
                found.append(f"dict keyed by {sorted(keys & {'demo', 'full'})}")
    return found


def test_no_stage_module_has_settings_of_its_own():
    offenders = {p.name: _own_settings(p) for p in SETTINGS_FREE}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(SETTINGS_FREE) > 10  # the scan really covers the stage modules


def test_the_scan_catches_a_stage_preset_table(tmp_path):
    planted = tmp_path / "stage.py"
    planted.write_text('PRESETS = {"demo": 1, "full": 2}\n\nclass EvalConfig:\n    pass\n')
    assert sorted(_own_settings(planted)) == [
        "PRESETS",
        "class EvalConfig",
        "dict keyed by ['demo', 'full']",
    ]


def test_resolve_keeps_none_applies_overrides_and_rejects_unknowns():
    demo = resolve("demo")
    assert (demo.preset, demo.recipe) == ("demo", "paper") and RECIPES == ("paper", "plus")
    assert demo.image.image_size == 32 and demo.image.epochs == 1
    changed = resolve("demo", image={"epochs": 3, "image_size": None}, gbdt={"seeds": [0, 1]})
    assert (changed.image.epochs, changed.image.image_size) == (3, 32)
    assert changed.gbdt.seeds == (0, 1) and isinstance(changed.gbdt, GBDTConfig)
    assert changed.tuning == demo.tuning
    with pytest.raises(KeyError, match="unknown preset"):
        resolve("huge")
    with pytest.raises(KeyError, match="unknown recipe"):
        resolve("demo", "fancy")
    with pytest.raises(KeyError, match="unknown stage"):
        resolve("demo", images={"epochs": 1})
    with pytest.raises(TypeError):
        resolve("demo", image={"epoch": 1})  # a misspelt field is an error, not ignored


def test_image_config_full_is_the_papers_table_1():
    cfg = image_config("vit_small_suspicious", "full", epochs=None, image_size=96)
    assert (cfg.backbone, cfg.label, cfg.epochs, cfg.image_size) == (
        "vit_small",
        "suspicious",
        30,
        96,
    )
    full = image_config("convnextv2_nano", "full")
    assert (full.batch_size, full.lr, full.min_lr, full.warmup, full.n_folds) == (
        32,
        1e-4,
        1e-6,
        0.05,
        5,
    )
    with pytest.raises(KeyError, match="unknown image model"):
        image_config("resnet", "demo")
    with pytest.raises(ValueError, match="label"):
        dataclasses.replace(cfg, label="iddx")
    with pytest.raises(ValueError, match="backbone"):
        ImageConfig(backbone="resnet50")


def test_pipeline_passes_names_and_paths_only(tmp_path):
    """So a notebook run alone and the pipeline get the same demo sizes from utils.settings."""
    run = pipeline.make_run(None, tmp_path, "demo")
    image = next(s for s in pipeline.STAGES if s.name == "image_vit_tiny")
    assert set(image.parameters(run)) == {"data_dir", "output_dir", "preset"}  # no recipe
    assert run.sizes == resolve("demo").data


@pytest.mark.parametrize("preset", ["demo", "full"])
def test_paper_recipe_is_the_reference_training_recipe(preset):
    """The reference's values in every preset (demo only shrinks sizes)."""
    for name in IMAGE_MODELS:
        cfg = image_config(name, preset)
        assert (cfg.dropout, cfg.dropout_samples) == (0.5, 1)
        assert (cfg.neg_ratio, cfg.pos_repeat) == (1.0, 2)  # 2P positives + 2P negatives
        assert (cfg.val_neg_per_pos, cfg.val_min_confidence) == (10.0, 80.0)
        assert (cfg.pool, cfg.head_norm) == (None, False)
        assert cfg.weight_decay is None  # the backbone's: ConvNeXt 1e-2, ViT 1e-3
        assert cfg.max_grad_norm is None  # the reference clips no gradient
        assert cfg.validate_on == "label"  # it relabels before the split: suspicious validation
        assert (cfg.lr, cfg.min_lr, cfg.warmup) == (
            (1e-4, 1e-6, 0.05) if preset == "full" else (3e-4, 1e-6, 0.05)
        )
    gbdt = resolve(preset).gbdt
    assert gbdt.site_features is False
    assert gbdt.filter_training is False  # the fold models ship: on every row, as the refit
    assert resolve_params(gbdt)["cat"].get("border_count") is None  # the library default
    assert PAPER_GBDT_PARAMS["cat"]["iterations"] == 250  # Table 2


def test_train_config_rejects_unknown_pool_and_bad_repeat():
    assert ImageConfig(pool="avg").pool == "avg"
    with pytest.raises(ValueError, match="pool"):
        ImageConfig(pool="max")
    with pytest.raises(ValueError, match="pos_repeat"):
        ImageConfig(pos_repeat=0)


@pytest.mark.parametrize(
    ("stage", "given", "parsed"),
    [
        ("gbdt", {"seeds": "[0, 1]"}, {"seeds": (0, 1)}),  # papermill -p seeds '[0, 1]'
        ("gbdt", {"seeds": 3}, {"seeds": (3,)}),  # papermill -p seeds 3
        ("tuning", {"kinds": '["lgb"]'}, {"kinds": ("lgb",)}),
        ("tuning", {"kinds": "cat"}, {"kinds": ("cat",)}),
        ("tuning", {"timeout": "90"}, {"timeout": 90.0}),
        ("image", {"epochs": "2", "head_norm": "true"}, {"epochs": 2, "head_norm": True}),
        ("image", {"max_grad_norm": "1.5"}, {"max_grad_norm": 1.5}),
        ("external", {"image_models": '["vit_tiny"]'}, {"image_models": ("vit_tiny",)}),
    ],
)
def test_resolve_parses_parameters_by_field_type(stage, given, parsed):
    config = getattr(resolve("demo", **{stage: given}), stage)
    assert {name: getattr(config, name) for name in parsed} == parsed


@pytest.mark.parametrize(
    ("stage", "given", "message"),
    [
        ("image", {"epochs": "two"}, "epochs: expected int, got 'two'"),
        ("gbdt", {"seeds": "[0,"}, "seeds: '[0,' looks like a list but is not valid JSON"),
        ("external", {"weights_path": "{vit_tiny}"}, "weights_path: '{vit_tiny}' is not a JSON"),
    ],
)
def test_resolve_names_the_parameter_it_cannot_parse(stage, given, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve("demo", **{stage: given})
