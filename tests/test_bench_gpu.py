"""The GPU bench's card lookup, projection arithmetic and its no-GPU FLOP projection."""

import argparse

import pytest

from bench import bench_gpu
from utils.settings import IMAGE_MODELS


def test_card_tflops_matches_names_as_cuda_reports_them():
    assert bench_gpu.card_tflops("Tesla T4") == 65.0
    assert bench_gpu.card_tflops("NVIDIA H100 80GB HBM3") == 990.0
    assert bench_gpu.card_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert bench_gpu.card_tflops("NVIDIA L40S") == 362.0
    assert bench_gpu.card_tflops("NVIDIA L4") == 121.0
    assert bench_gpu.card_tflops("Some Future Card") is None


def test_projection_takes_the_slower_of_gpu_and_decode_per_model(capsys):
    args = argparse.Namespace(test_images=36_000, folds=5, kaggle_workers=4)
    # 36,000 x 5 / 50 img/s = 1 h of GPU; 36,000 / (10 x 4) img/s = 0.25 h of decode
    rates = {"convnextv2_nano": 50.0, "vit_tiny": 500.0, "vit_small": 100.0}
    total = bench_gpu.project(args, rates, decode=10.0)
    hours = {"convnextv2_nano": 1.0, "vit_tiny": 0.25, "vit_small": 0.5}
    assert total == pytest.approx(sum(hours[s.backbone] for s in IMAGE_MODELS.values()))
    assert "not measured" not in capsys.readouterr().out
    partial = bench_gpu.project(args, {"convnextv2_nano": 50.0}, decode=10.0)
    assert partial == pytest.approx(1.0)
    assert capsys.readouterr().out.count("not measured (budget)") == len(IMAGE_MODELS) - 1


def test_counted_flops_scale_with_pixels_and_model_width():
    small, large = (bench_gpu.forward_gflops("convnextv2_nano", s) for s in (32, 64))
    assert large == pytest.approx(4 * small, rel=0.02)  # a CNN's FLOPs grow with the pixel count
    assert bench_gpu.forward_gflops("vit_small", 32) > 3 * bench_gpu.forward_gflops("vit_tiny", 32)


def test_flops_only_runs_without_a_gpu(capsys):
    bench_gpu.main(["--flops-only", "--size", "32", "--utilisation", "0.5"])
    out = capsys.readouterr().out
    for backbone in ("convnextv2_nano", "vit_tiny", "vit_small"):
        assert backbone in out
    assert "analytic projection on one T4 at 50%" in out and "image models total" in out


@pytest.mark.slow  # trains models for minutes on 2 cores: CI, not the inner loop
def test_mode_measurements_run_the_gpu_code_path_on_cpu(capsys):
    # the same train/inference steps, autocast and GradScaler calls as on CUDA, tiny and on CPU
    args = argparse.Namespace(size=32, train_batch=2, infer_batch=2, steps=1, budget_s=60.0)
    rates = bench_gpu.run_modes(args, deadline=float("inf"), device="cpu")
    assert set(rates) == {(b, m) for b in ("convnextv2_nano", "vit_tiny", "vit_small")
                          for m in bench_gpu.MODES}  # fmt: skip
    assert all(rate > 0 for rate in rates.values())
    assert bench_gpu.run_modes(args, deadline=0.0, device="cpu") == {}
    assert capsys.readouterr().out.count("skipped: --budget-s") == 3 * len(bench_gpu.MODES)
