"""Kaggle's weekly GPU quota: the GPU-hours a run's image step and submission are projected to
take, checked against `--gpu-hours` before the image kernels are pushed.

The figures are a FLOP projection, not a measurement: `python -m bench.bench_training --gpus 2`
(docs/benchmarks.md, section 9) at an assumed 10% of a T4's fp16 peak on Kaggle's T4 x 2, which
that section reads as good to about 2x; QUOTA_SAFETY applies that factor before refusing.
"""

from __future__ import annotations

from typing import Any

# Session hours per kernel on T4 x 2 (docs/benchmarks.md section 9: training kernel and the
# submission's four image models on 500,000 images).
PROJECTED_HOURS: dict[str, float] = {
    "01_image_convnextv2_nano": 0.13,
    "01_image_vit_tiny": 0.06,
    "01_image_vit_tiny_suspicious": 0.15,
    "01_image_vit_small_suspicious": 0.58,
    "04_inference": 0.94,
}
SOURCE = "FLOP projection (bench_training --gpus 2, 10% of T4 fp16 peak; not measured)"
QUOTA_SAFETY = 2.0


def spent_hours(state: dict[str, Any]) -> float:
    """GPU session hours this run's state records as spent."""
    return sum(float(s) for s in state.get("gpu_seconds", {}).values()) / 3600


def projection(kernels: list[str]) -> tuple[dict[str, float], str]:
    """(hours per kernel, what the figures are) for the kernels still to run."""
    return {k: PROJECTED_HOURS[k] for k in kernels if k in PROJECTED_HOURS}, SOURCE


def quota_lines(
    kernels: list[str], state: dict[str, Any], limit_h: float
) -> tuple[list[str], str | None]:
    """(lines to print, the refusal or None): the projected GPU-hours of `kernels`, spent ones,
    and whether QUOTA_SAFETY x the projection fits in what `--gpu-hours` leaves."""
    hours, source = projection(kernels)
    total, spent = sum(hours.values()), spent_hours(state)
    lines = [f"projected GPU-hours, {source}:"]
    lines += [f"  {kernel}: {h:.2f} h" for kernel, h in hours.items()]
    lines.append(
        f"  total {total:.2f} h (x{QUOTA_SAFETY:g} for the projection's error: "
        f"{QUOTA_SAFETY * total:.2f} h); spent so far {spent:.2f} h of --gpu-hours {limit_h:g}"
    )
    left = limit_h - spent
    if QUOTA_SAFETY * total > left:
        return lines, (
            f"the image step and the submission are projected at up to "
            f"{QUOTA_SAFETY * total:.2f} GPU-hours, more than the {left:.2f} h left of "
            f"--gpu-hours {limit_h:g}: raise --gpu-hours if the account's weekly quota allows"
        )
    return lines, None
