"""Kaggle's weekly GPU quota: the GPU-hours a run's image step and submission are projected to
take, checked against `--gpu-hours` before the image kernels are pushed. Two sources, each
labelled where it is printed:
- measured by the smoke kernel (utils.kaggle.smoke), once the GPU probe has run: each image
  model's images/s on Kaggle's GPUs turn the images a kernel processes
  (utils.image.budget.fold_images, on ISIC 2024's counts) into session hours; a kernel trains at
  the slower of its GPU steps and its training input on real crops, and the submission kernel
  takes the smoke's timed image pass where it ran for every model;
- else a FLOP projection: `python -m bench.bench_training --gpus 2` (docs/benchmarks.md,
  section 9) at an assumed 10% of a T4's fp16 peak on Kaggle's T4 x 2, which that section reads
  as good to about 2x.
QUOTA_SAFETY applies a factor of 2 to either before refusing.
"""

from __future__ import annotations

from typing import Any

from utils.image.budget import ISIC_MALIGNANT, ISIC_ROWS, ISIC_SUSPICIOUS, fold_images
from utils.kaggle.metadata import IMAGE_KERNEL_PREFIX, SUBMISSION_KERNEL
from utils.settings import IMAGE_MODELS, image_config

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
MEASURED = "measured by the smoke kernel"
QUOTA_SAFETY = 2.0
# The submission kernel: the hidden test's images (about 500,000) through each image model's
# fold models (bench.bench_training's TEST_IMAGES, TEST_FOLDS).
TEST_IMAGES, TEST_FOLDS = 500_000, 5
POSITIVES = {"target": ISIC_MALIGNANT, "suspicious": ISIC_SUSPICIOUS}


def spent_hours(state: dict[str, Any]) -> float:
    """GPU session hours this run's state records as spent."""
    return sum(float(s) for s in state.get("gpu_seconds", {}).values()) / 3600


def smoke_rates(smoke: dict[str, Any] | None) -> dict[str, tuple[dict[str, Any], str]]:
    """model -> (its measured rates, where they were measured): the smoke's DDP pass on every
    GPU where it ran that model (as the kernels run), else its one-GPU pass; a model that
    failed or was not run is left out, and so is everything of a smoke that ran on a CPU (the
    dry path measures no GPU)."""
    if not smoke:
        return {}
    found: dict[str, tuple[dict[str, Any], str]] = {}
    if smoke.get("gpus"):
        for name, r in smoke.get("models", {}).items():
            found[name] = r, "one GPU"
    ddp = smoke.get("ddp") or {}
    if ddp.get("device") == "cuda":
        for name, r in ddp.get("models", {}).items():
            if "error" not in r:
                found[name] = r, f"DDP on {ddp['world_size']} GPUs"
    loaders = (smoke.get("train_loader") or {}).get("models", {}) if smoke.get("gpus") else {}
    for name, (r, where) in list(found.items()):
        loader = loaders.get(name)
        if "error" in r:
            del found[name]
        elif loader and "error" not in loader:  # its training input, timed on real crops
            rate = {"loader_images_per_s": loader["loader_images_per_s"]}
            found[name] = r | rate, f"{where}, training input on real crops"
    return found


def image_kernel_seconds(model: str, rates: dict[str, Any]) -> float:
    """Session seconds of one image model's training kernel at measured rates: every fold's
    training images at the training rate (the GPU steps' rate, or the loader's on real crops
    when that is slower: `loader_images_per_s`), its validation and OOF images at the inference
    rate (validated on the training label or the target, as cfg.validate_on says)."""
    cfg = image_config(model, "full")
    positives = POSITIVES[IMAGE_MODELS[model].label]
    validation_positives = positives if cfg.validate_on == "label" else ISIC_MALIGNANT
    images = fold_images(cfg, ISIC_ROWS, positives, validation_positives)
    predicted = images.validation + images.oof
    train_rate = min(rates["train_images_per_s"], rates.get("loader_images_per_s", float("inf")))
    per_fold = images.train / train_rate + predicted / rates["infer_images_per_s"]
    return cfg.n_folds * per_fold


def pass_rates(smoke: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """model -> its submission image pass (every fold model on every GPU, JPEG decode included)
    as the GPU smoke timed it; empty for a smoke on a CPU or without the pass."""
    if not smoke or not smoke.get("gpus"):
        return {}
    passes = (smoke.get("image_pass") or {}).get("models", {})
    return {name: r for name, r in passes.items() if "error" not in r}


def measured_hours(
    kernel: str,
    rates: dict[str, tuple[dict[str, Any], str]],
    passes: dict[str, dict[str, Any]],
) -> tuple[float, str] | None:
    """(session hours of a kernel at the smoke's rates, where they were measured), None when a
    model it runs was not measured. The submission kernel takes the timed image pass (`passes`)
    where the smoke ran it for every model, else the inference steps' rates."""
    if kernel.startswith(IMAGE_KERNEL_PREFIX):
        model = kernel.removeprefix(IMAGE_KERNEL_PREFIX)
        if model not in rates:
            return None
        measured, where = rates[model]
        return image_kernel_seconds(model, measured) / 3600, where
    if kernel == SUBMISSION_KERNEL and set(IMAGE_MODELS) <= set(passes):
        seconds = sum(TEST_IMAGES / passes[m]["images_per_s"] for m in IMAGE_MODELS)
        devices = max(passes[m]["devices"] for m in IMAGE_MODELS)
        return seconds / 3600, f"the submission's image pass on {devices} GPU(s), decode included"
    if kernel == SUBMISSION_KERNEL and set(IMAGE_MODELS) <= set(rates):
        images = TEST_IMAGES * TEST_FOLDS
        seconds = sum(images / rates[m][0]["infer_images_per_s"] for m in IMAGE_MODELS)
        return seconds / 3600, " and ".join(sorted({rates[m][1] for m in IMAGE_MODELS}))
    return None


def projection(
    kernels: list[str], smoke: dict[str, Any] | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """(hours per kernel, what each figure is) for the kernels still to run: measured by the
    smoke kernel where it measured every model the kernel runs, else the FLOP projection."""
    rates, passes = smoke_rates(smoke), pass_rates(smoke)
    hours, sources = {}, {}
    for kernel in kernels:
        measured = measured_hours(kernel, rates, passes)
        if measured is not None:
            hours[kernel], sources[kernel] = measured[0], f"{MEASURED}, {measured[1]}"
        elif kernel in PROJECTED_HOURS:
            hours[kernel], sources[kernel] = PROJECTED_HOURS[kernel], SOURCE
    return hours, sources


def quota_lines(
    kernels: list[str], state: dict[str, Any], limit_h: float
) -> tuple[list[str], str | None]:
    """(lines to print, the refusal or None): the projected GPU-hours of `kernels` (from the
    smoke's rates in `state` where it has them), spent ones, and whether QUOTA_SAFETY x the
    projection fits in what `--gpu-hours` leaves."""
    hours, sources = projection(kernels, state.get("smoke"))
    total, spent = sum(hours.values()), spent_hours(state)
    labels = sorted(set(sources.values()))
    if len(labels) == 1:
        lines = [f"projected GPU-hours, {labels[0]}:"]
        lines += [f"  {kernel}: {h:.2f} h" for kernel, h in hours.items()]
    else:
        lines = ["projected GPU-hours:"]
        lines += [f"  {kernel}: {h:.2f} h ({sources[kernel]})" for kernel, h in hours.items()]
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
