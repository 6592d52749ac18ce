"""The four stage-1 notebooks: thin and clean, one per registered image model.

Their papermill runs are in tests/test_pipeline.py (the real notebooks through utils.pipeline:
a demo run, a new seed, --force), which checks each run's OOF, folds, label and manifest.
"""

from pathlib import Path

import nbformat
import pytest
from notebook_checks import assert_thin_and_clean

from utils.settings import IMAGE_MODELS

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = {name: REPO / "notebooks" / f"01_image_{name}.ipynb" for name in IMAGE_MODELS}
PARAMETERS = {"data_dir", "output_dir", "preset", "recipe", "n_folds", "epochs", "image_size"}
PARAMETERS |= {"batch_size", "weights_path", "num_workers"}
# a fold selection and an earlier output to continue (one model over several Kaggle
# sessions), and the explicit switch that lets `full` train without pretrained weights
PARAMETERS |= {"folds", "resume_from", "allow_random_init"}


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_thin_and_clean(name):
    assert_thin_and_clean(NOTEBOOKS[name], PARAMETERS)
    code = [c.source for c in nbformat.read(NOTEBOOKS[name], as_version=4).cells]
    assert any(f'MODEL = "{name}"' in source for source in code)
