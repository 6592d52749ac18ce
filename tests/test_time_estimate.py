"""The submission kernel's time estimate on a CPU: a T4 projection from counted FLOPs that says
it is one, costs no prediction pass, and whose printed figures agree with each other."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from utils import submission_time
from utils.cli import format_duration
from utils.settings import image_config, resolve
from utils.submission_time import (
    DECODE_IMAGES_PER_S,
    HIDDEN_TEST_ROWS,
    T4_FP16_TFLOPS,
    T4_UTILISATION,
    estimate_time,
    forward_gflops,
)

CFG = resolve("demo").inference


def _model_dir(root: Path, name: str, preset: str) -> None:
    """An image model dir holding only config.json (all that the CPU projection reads)."""
    record = {"config": dataclasses.asdict(image_config(name, preset))}
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "config.json").write_text(json.dumps(record))


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    for name in ("vit_tiny", "vit_tiny_suspicious"):
        _model_dir(tmp_path, name, "demo")
    return tmp_path


def test_flops_are_counted_without_weights_and_grow_with_the_image():
    small = forward_gflops(image_config("vit_tiny", "demo"))
    large = forward_gflops(image_config("vit_tiny", "full"))
    assert 0 < small < large
    # docs/benchmarks.md: 2.15 GFLOPs without the attention matmuls, which the meta device counts
    assert large == pytest.approx(2.15 + 0.36, rel=0.03)


def test_cpu_estimate_is_a_t4_projection_without_any_prediction(artifacts, monkeypatch):
    def no_pass(*args, **kwargs):
        raise AssertionError("the CPU estimate must not predict")

    monkeypatch.setattr(submission_time, "predict_with_models", no_pass)
    monkeypatch.setattr(submission_time, "load_fold_models", no_pass)
    models = ("vit_tiny", "vit_tiny_suspicious")
    ids = [f"ISIC_{i}" for i in range(40)]
    folds = {"vit_tiny": (0, 1, 2, 3, 4), "vit_tiny_suspicious": (0, 1)}
    estimate = estimate_time(artifacts, models, None, ids, CFG, torch.device("cpu"), folds)
    assert estimate.projected and estimate.rows == 40
    per_fold = forward_gflops(image_config("vit_tiny", "demo"))
    assert estimate.gflops["vit_tiny"] == pytest.approx(5 * per_fold)
    assert estimate.gflops["vit_tiny_suspicious"] == pytest.approx(2 * per_fold)
    for name, rate in estimate.images_per_s.items():
        compute = T4_UTILISATION * T4_FP16_TFLOPS * 1e3 / estimate.gflops[name]
        assert rate == pytest.approx(min(compute, DECODE_IMAGES_PER_S))  # demo: 0 workers
    text = str(estimate)
    assert text.startswith("PROJECTED for one Kaggle T4, not measured (no GPU here)")
    assert f"an assumed {T4_UTILISATION:.0%} of the T4's 65 fp16 TFLOPs" in text
    assert "  vit_tiny: " in text and " GFLOPs/img (all its folds) -> 5,000 img/s" in text
    # the rows' lines are the printed rates times the rows, nothing else
    hidden = sum(HIDDEN_TEST_ROWS / r for r in estimate.images_per_s.values())
    assert f"{format_duration(hidden)} of image inference (fits" in text
    assert f"{format_duration(estimate.seconds())} of image inference" in text


def test_full_size_models_project_the_documented_kernel_time(artifacts):
    """4 models x 5 folds at 224 px at 10% of a T4: docs/benchmarks.md's 1.89 h, plus the
    attention matmuls it left out."""
    models = ("convnextv2_nano", "vit_tiny", "vit_tiny_suspicious", "vit_small_suspicious")
    for name in models:
        _model_dir(artifacts, name, "full")
    full = dataclasses.replace(CFG, num_workers=4)
    estimate = estimate_time(artifacts, models, None, ["x"], full, torch.device("cpu"))
    assert 1.89 < estimate.seconds(HIDDEN_TEST_ROWS) / 3600 < 2.3
    assert estimate.fits(HIDDEN_TEST_ROWS)
