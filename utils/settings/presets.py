"""The size presets of utils.settings: `full` (Kaggle, the real sizes) and `demo` (CPU, CI,
minutes), each a function of the recipe returning every stage's config.
"""

from __future__ import annotations

import dataclasses

from utils.settings.configs import (
    ExternalEvalConfig,
    GBDTConfig,
    ImageConfig,
    InferenceConfig,
    Settings,
    SyntheticConfig,
    TuneConfig,
)
from utils.settings.recipes import PLUS_GBDT

# The demo preset's folds (stages 1-3): 4 image models x 3 fp16 fold checkpoints keep the demo's
# work dir under 300 MB (x 5 folds: 456 MiB whatever the image size); `full` keeps the paper's 5.
DEMO_FOLDS = 3


def _full(recipe: str) -> Settings:
    """The real sizes: the paper's Table 1 for the image models, the published GBDTs."""
    return Settings(
        preset="full",
        recipe=recipe,
        data=SyntheticConfig(
            rows=20_000, patients=None, positive_rate=0.01, test_rows=None, image_size=128
        ),
        image=ImageConfig(preset="full", recipe=recipe),
        tuning=TuneConfig(preset="full", recipe=recipe),
        gbdt=GBDTConfig(preset="full", recipe=recipe, **(PLUS_GBDT if recipe == "plus" else {})),
        inference=InferenceConfig(preset="full", recipe=recipe),
        external=ExternalEvalConfig(preset="full", recipe=recipe),
    )


def _demo(recipe: str) -> Settings:
    """Small enough that the whole chain (4 image models x 3 folds, GBDTs, inference) runs in
    about two minutes on 2 CPU cores, and the same whether a notebook runs alone or in the
    pipeline."""
    full = _full(recipe)
    # a tuning trial takes about a second on ~1,500 rows (few rounds, shallow CatBoost trees,
    # whose cost grows with 2**depth)
    centres = {
        "lgb": {"n_estimators": 20},
        "cat": {"iterations": 10, "depth": 4},
        "xgb": {"n_estimators": 20},
    }
    rounds = {"lgb": {"n_estimators": 60}, "cat": {"iterations": 60}, "xgb": {"n_estimators": 40}}
    # what the demo changes in each stage's full config (besides the preset's name)
    changes = {
        "image": dict(
            n_folds=DEMO_FOLDS, image_size=32, batch_size=64, epochs=1, lr=3e-4, num_workers=0
        ),
        "tuning": dict(n_trials=3, timeout=60, centres=centres, n_folds=DEMO_FOLDS),
        "gbdt": dict(rounds=rounds, n_folds=DEMO_FOLDS),
        "inference": dict(batch_size=64, num_workers=0, estimate_batches=1),
        # 2 CPU cores in CI: one small ViT on 32 px crops of 64 px images, 1 epoch, 5 folds.
        # On busy shared cores two spinning torch threads ran 10x slower than one (bench: 87-110 s
        # vs 9 s for this demo's 5 folds while other jobs ran).
        "external": dict(
            image_models=("vit_tiny",),
            epochs=1,
            image_size=32,
            batch_size=32,
            num_workers=0,
            max_image_side=64,
            torch_threads=1,
        ),
    }
    return dataclasses.replace(
        full,
        preset="demo",
        data=SyntheticConfig(
            rows=600, patients=30, positive_rate=0.05, test_rows=40, image_size=48
        ),
        **{
            stage: dataclasses.replace(getattr(full, stage), preset="demo", **values)
            for stage, values in changes.items()
        },
    )


PRESETS = {"demo": _demo, "full": _full}
