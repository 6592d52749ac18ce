"""utils.settings: one registry, one preset table, one resolve; no stage has its own."""

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from utils.image.models import BACKBONES
from utils.pipeline import make_run
from utils.pipeline_runner import check_notebooks, plan
from utils.pipeline_stages import NOTEBOOKS_DIR
from utils.settings import (
    IMAGE_MODELS,
    PAPER_GBDT_PARAMS,
    PRESETS,
    RECIPES,
    GBDTConfig,
    ImageConfig,
    image_config,
    resolve,
)
from utils.tabular.gbdt import feature_groups
from utils.tabular.libraries import resolve_params

REPO = Path(__file__).resolve().parents[1]
SETTINGS_DIR = REPO / "utils" / "settings"
# Every module of the package but the settings themselves (subpackages included).
SETTINGS_FREE = [p for p in sorted((REPO / "utils").rglob("*.py")) if SETTINGS_DIR not in p.parents]
# ImageConfig fields the demo preset may shrink; every other field is the recipe's, in any preset.
# (lr: the demo's single epoch from random weights learns nothing at the full preset's rate.)
SIZE_FIELDS = {"preset", "n_folds", "image_size", "batch_size", "epochs", "lr", "num_workers"}


def _notebook_cells(notebook: Path, kind: str) -> list[str]:
    """Source of every `kind` ("code" or "markdown") cell of a notebook."""
    cells = json.loads(notebook.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == kind]


def _trained_model(notebook: Path) -> str:
    """The model a stage 1 notebook trains: the `MODEL = "..."` its code passes to training."""
    for source in _notebook_cells(notebook, "code"):
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["MODEL"]:
                return node.value.value
    raise AssertionError(f"{notebook.name}: no MODEL assignment")


def test_each_registered_image_model_is_trained_by_the_notebook_its_stage_runs(tmp_path):
    """What `python -m utils.pipeline` runs per image model: a notebook that exists, trains that
    model and writes the folder the stage checks; each model's head is the one models builds."""
    run = make_run(None, tmp_path, "demo")
    steps = [(s, will) for s, will in plan(run) if s.name.startswith("image_")]
    check_notebooks(steps, NOTEBOOKS_DIR)
    trained = {}
    for stage, _ in steps:
        model = _trained_model(NOTEBOOKS_DIR / stage.notebook)
        assert {p.parent.name for p in stage.outputs(run)} == {model}, stage.name
        trained[model] = stage.name
    assert sorted(trained) == sorted(IMAGE_MODELS)  # each model once, none without a stage
    for name, spec in IMAGE_MODELS.items():
        assert spec.pooling == BACKBONES[spec.backbone].head, name


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
    offenders = {p.relative_to(REPO).as_posix(): _own_settings(p) for p in SETTINGS_FREE}
    assert {k: v for k, v in offenders.items() if v} == {}
    stages = {"utils/image/train.py", "utils/tabular/gbdt.py", "utils/inference.py"}
    assert stages <= set(offenders)  # the scan really covers the stage modules, subpackages too


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
    assert (demo.preset, demo.recipe) == ("demo", "paper")
    changed = resolve("demo", image={"epochs": 3, "image_size": None}, gbdt={"seeds": [0, 1]})
    assert changed.image.epochs == 3 and changed.image.epochs != demo.image.epochs
    assert dataclasses.replace(changed.image, epochs=demo.image.epochs) == demo.image  # None kept
    assert changed.gbdt == dataclasses.replace(demo.gbdt, seeds=(0, 1))
    assert isinstance(changed.gbdt, GBDTConfig)
    assert (changed.data, changed.tuning, changed.inference) == (
        demo.data,
        demo.tuning,
        demo.inference,
    )
    with pytest.raises(KeyError, match="unknown preset"):
        resolve("huge")
    with pytest.raises(KeyError, match="unknown recipe"):
        resolve("demo", "fancy")
    with pytest.raises(KeyError, match="unknown stage"):
        resolve("demo", images={"epochs": 1})
    with pytest.raises(TypeError):
        resolve("demo", image={"epoch": 1})  # a misspelt field is an error, not ignored


@pytest.mark.parametrize("model", sorted(IMAGE_MODELS))
def test_image_config_is_the_models_registry_entry_on_the_presets_template(model):
    spec = IMAGE_MODELS[model]
    for preset in PRESETS:
        template = resolve(preset).image
        cfg = image_config(model, preset, epochs=None, image_size=96)
        assert (cfg.model_name, cfg.backbone, cfg.label) == (model, spec.backbone, spec.label)
        same = dict(model_name=template.model_name, backbone=template.backbone, label="target")
        assert dataclasses.replace(cfg, image_size=template.image_size, **same) == template
    with pytest.raises(KeyError, match="unknown image model"):
        image_config("resnet", "demo")
    with pytest.raises(ValueError, match="label"):
        dataclasses.replace(image_config(model), label="iddx")
    with pytest.raises(ValueError, match="backbone"):
        ImageConfig(backbone="resnet50")


def test_full_preset_trains_what_the_image_notebooks_document():
    """Each stage 1 notebook tells its reader the `full` settings (the paper's Table 1 and the
    reference's sampling); the config a run of it resolves must be those."""
    table_1 = re.compile(
        r"`full` is the paper's Table 1 \((\d+) px, batch (\d+), lr ([\d.e-]+), cosine, "
        r"warm-up ([\d.]+), min lr ([\d.e-]+), (\d+) epochs\)"
    )
    for model in IMAGE_MODELS:
        text = " ".join(_notebook_cells(NOTEBOOKS_DIR / f"01_image_{model}.ipynb", "markdown"))
        size, batch, lr, warmup, min_lr, epochs = table_1.search(text).groups()
        cfg = image_config(model, "full")
        assert (cfg.image_size, cfg.batch_size, cfg.epochs) == (int(size), int(batch), int(epochs))
        assert (cfg.lr, cfg.warmup, cfg.min_lr) == (float(lr), float(warmup), float(min_lr))
        assert "every positive twice plus as many fresh negatives" in text
        assert (cfg.pos_repeat, cfg.neg_ratio) == (2, 1.0)  # 2P positives, 2P negatives
        assert f"plus {cfg.val_neg_per_pos:g} negatives per positive" in text
        assert f"(default {cfg.n_folds})" in text


@pytest.mark.parametrize("recipe", RECIPES)
def test_demo_only_shrinks_sizes(recipe):
    """A demo run trains the same recipe as a full one, smaller: only size fields differ."""
    for model in IMAGE_MODELS:
        demo, full = image_config(model, "demo", recipe), image_config(model, "full", recipe)
        differ = {f.name for f in dataclasses.fields(ImageConfig)}
        differ = {name for name in differ if getattr(demo, name) != getattr(full, name)}
        assert differ <= SIZE_FIELDS, model
        assert demo.epochs < full.epochs and demo.image_size < full.image_size
        assert demo.n_folds <= full.n_folds
    demo, full = resolve("demo", recipe).gbdt, resolve("full", recipe).gbdt
    assert dataclasses.replace(demo, preset="full", rounds={}, n_folds=full.n_folds) == full


def test_paper_recipe_gives_the_libraries_the_published_params():
    """At full size every library gets the published params untouched (the libraries' own
    binning); the demo changes only how many trees."""
    full = resolve_params(resolve("full", "paper").gbdt)
    demo = resolve_params(resolve("demo", "paper").gbdt)
    rounds = {"n_estimators", "iterations"}
    for member, params in full.items():
        library = member.split("_")[0]
        assert params == PAPER_GBDT_PARAMS[library], member
        changed = {k for k in params if demo[member].get(k) != params[k]}
        assert changed and changed <= rounds, member
        assert all(demo[member][k] < params[k] for k in changed), member


def test_every_stage_3_switch_changes_what_stage_3_builds():
    """No dead switch: each boolean of GBDTConfig, on, changes the feature groups the stage
    builds, except filter_training, which changes the fold models' training rows instead."""
    paper = resolve("demo", "paper").gbdt
    switches = [
        f.name
        for f in dataclasses.fields(GBDTConfig)
        if f.type == "bool" and f.name != "filter_training"
    ]
    assert switches
    for name in switches:
        on = feature_groups(dataclasses.replace(paper, **{name: True}))
        assert on != feature_groups(paper) and on[name], name


def test_pipeline_passes_names_and_paths_only(tmp_path):
    """So a notebook run alone and the pipeline get the same sizes from utils.settings: no stage
    parameter carries a setting, only the preset and recipe names and paths."""
    weights = tmp_path / "weights"
    weights.mkdir()
    for spec in IMAGE_MODELS.values():
        (weights / f"{spec.backbone}.pth").write_text("")
    names = {"preset", "recipe"}
    for preset in PRESETS:
        for recipe in RECIPES:
            run = make_run(None, tmp_path / "work", preset, True, 0, None, recipe, weights)
            for stage, _ in plan(run):
                if not stage.notebook:
                    continue  # the synthetic data step: generate's sizes, not a notebook's
                params = stage.parameters(run)
                assert params["preset"] == preset and params.get("recipe", recipe) == recipe
                for key, value in params.items():
                    paths = value if isinstance(value, list) else [value]
                    assert key in names or all(Path(p).is_absolute() for p in paths), key
    image = next(s for s, _ in plan(run) if s.name == "image_vit_tiny")
    assert "recipe" not in image.parameters(run)  # no recipe changes an image model


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
