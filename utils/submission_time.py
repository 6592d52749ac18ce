"""The submission kernel's image-inference time estimate against Kaggle's 12-hour limit.

On a GPU `estimate_time` measures each image model's images/s on the first batches of the test
ids (measure_images_per_s: the extra time of more batches, so fixed start-up costs do not
inflate a 500,000-row projection) and multiplies by the GPUs `predict` shares the rows between;
on a CPU it projects one Kaggle T4 from the models' counted forward FLOPs (t4_images_per_s),
reading no checkpoint and predicting no image. `TimeEstimate` prints the figures for this test
set and for the hidden one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.cli import format_duration
from utils.image.distributed import workers_per_process
from utils.image.predict import (
    build_model,
    inference_devices,
    load_config,
    load_fold_models,
    predict_with_models,
)
from utils.io import HDF5Images
from utils.settings import ImageConfig, InferenceConfig

KAGGLE_LIMIT_S = 12 * 3600
HIDDEN_TEST_ROWS = 500_000  # about the size of the hidden test set the kernel is rerun on


# The CPU projection for one Kaggle T4 (docs/benchmarks.md, section 4): the card's dense fp16
# tensor peak, the share of it small models in fp16 at batch 128 reach (10-25% is typical; the
# low end makes the projection conservative), and JPEG decode + resize per DataLoader worker
# (bench_image_io: 5,026 img/s per core on a 2-core EPYC).
T4_FP16_TFLOPS = 65.0
T4_UTILISATION = 0.10
DECODE_IMAGES_PER_S = 5_000.0


@dataclass(frozen=True)
class TimeEstimate:
    """Image inference time: images/s per model (decode + every used fold model) times rows;
    `projected` rates are for a T4, not this CPU, so the 12 h budget is judged for Kaggle."""

    rows: int
    images_per_s: dict[str, float]
    gflops: dict[str, float] = field(default_factory=dict)  # per image, all used folds
    projected: bool = False  # True: a T4 projection from FLOPs, not a measurement

    def seconds(self, rows: int | None = None) -> float:
        """Image inference seconds for `rows` (default: this test set)."""
        n = self.rows if rows is None else rows
        return sum(n / rate for rate in self.images_per_s.values())

    def fits(self, rows: int | None = None, limit_s: float = KAGGLE_LIMIT_S) -> bool:
        return self.seconds(rows) < limit_s

    def __str__(self) -> str:
        if self.projected:
            lines = [
                "PROJECTED for one Kaggle T4, not measured (no GPU here): counted FLOPs per image "
                f"at an assumed {T4_UTILISATION:.0%} of the T4's {T4_FP16_TFLOPS:.0f} fp16 "
                f"TFLOPs, JPEG decode at most {DECODE_IMAGES_PER_S:,.0f} img/s per worker"
            ]
            lines += [
                f"  {m}: {self.gflops[m]:.2f} GFLOPs/img (all its folds) -> {r:,.0f} img/s"
                for m, r in self.images_per_s.items()
            ]
        else:
            rates = ", ".join(f"{m} {r:,.0f} img/s" for m, r in self.images_per_s.items())
            lines = [f"measured: {rates}"]
        for label, n in (("this test set", self.rows), ("hidden test", HIDDEN_TEST_ROWS)):
            s = self.seconds(n)
            verdict = "fits" if self.fits(n) else "DOES NOT FIT"
            lines.append(
                f"{label}: {n:,} rows x {len(self.images_per_s)} image model(s) -> "
                f"{format_duration(s)} of image inference ({verdict} Kaggle's "
                f"{KAGGLE_LIMIT_S / 3600:.0f} h limit: {100 * s / KAGGLE_LIMIT_S:.1f}%)"
            )
        return "\n".join(lines)


def _timed(fn: Callable[[Sequence[str]], object], ids: Sequence[str]) -> float:
    start = time.perf_counter()
    fn(ids)
    return time.perf_counter() - start


def measure_images_per_s(
    predict_ids: Callable[[Sequence[str]], object],
    ids: Sequence[str],
    batch_size: int,
    batches: int,
) -> float:
    """Images/s of `predict_ids` from the extra time `batches` more batches take.

    After one warm-up batch it times n and 2n ids (n = batches x batch_size): the difference
    cancels fixed costs (DataLoader start-up) that would inflate a 500k-row projection. A test
    set smaller than 2n is cycled, so the 3-row public test set gives a real figure too.
    """
    if not ids:
        raise ValueError("measure_images_per_s: no ids to time")
    n = batches * batch_size
    sample = [ids[i % len(ids)] for i in range(2 * n)]
    predict_ids(sample[:batch_size])
    t_short = _timed(predict_ids, sample[:n])
    t_long = _timed(predict_ids, sample)
    if t_long > t_short:
        return n / (t_long - t_short)
    return 2 * n / max(t_long, 1e-9)


def forward_gflops(model_cfg: ImageConfig) -> float:
    """Forward GFLOPs of one image through the architecture `model_cfg` trains (2 per
    multiply-add; matmuls and convolutions), counted by torch's FlopCounterMode on the meta
    device: shapes only, no weights initialised or read (well under a second per model)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    size = model_cfg.image_size
    with torch.device("meta"), torch.no_grad():
        model = build_model(model_cfg).eval()
        with counter:
            model(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    return counter.get_total_flops() / 1e9


def t4_images_per_s(gflops: float, cfg: InferenceConfig, gpus: int = 1) -> float:
    """Images/s of `gpus` Kaggle T4s on a model of `gflops` per image: T4_UTILISATION of each
    card's fp16 peak, at most the JPEG decode of cfg.num_workers DataLoader workers (the same
    CPUs feed every card)."""
    compute = gpus * T4_UTILISATION * T4_FP16_TFLOPS * 1e3 / max(gflops, 1e-9)
    return min(compute, DECODE_IMAGES_PER_S * max(cfg.num_workers, 1))


def estimate_time(
    artifacts_dir: Path,
    models: Sequence[str],
    images: HDF5Images,
    ids: Sequence[str],
    cfg: InferenceConfig,
    device: torch.device,
    folds: Mapping[str, Sequence[int]] | None = None,
) -> TimeEstimate:
    """On a GPU: images/s of each image model (its `folds`, default all) measured on the first
    batches of `ids` on one GPU with its share of the DataLoader workers, times the GPUs that
    `predict` shares the rows between (image.predict.inference_devices), projected to all rows.
    On a CPU: the projection for one T4 from counted FLOPs, reading no checkpoint and predicting
    no image (a few seconds), with the T4 x 2 figure printed beside it (twice the compute, the
    same CPUs decoding); the real pass then reports this machine's images/s."""
    if device.type != "cuda":
        gflops = {}
        for name in models:
            model_cfg = load_config(artifacts_dir / name)
            used = model_cfg.n_folds if folds is None else len(folds.get(name, ()))
            gflops[name] = forward_gflops(model_cfg) * used
        one, two = (
            TimeEstimate(
                len(ids), {m: t4_images_per_s(g, cfg, n) for m, g in gflops.items()}, gflops, True
            )
            for n in (1, 2)
        )
        print(
            f"GPUs: projected for one T4; on Kaggle's T4 x 2 predict scores on both: "
            f"{format_duration(two.seconds(HIDDEN_TEST_ROWS))} for the hidden test's "
            f"{HIDDEN_TEST_ROWS:,} rows (one T4: {format_duration(one.seconds(HIDDEN_TEST_ROWS))})"
        )
        return one
    devices = inference_devices(device)
    workers = workers_per_process(cfg.num_workers, len(devices))
    rates = {}
    for name in models:
        used = None if folds is None else folds.get(name)
        model_cfg, fold_models = load_fold_models(artifacts_dir / name, devices[0], used)

        def run(part: Sequence[str], fold_models=fold_models, size=model_cfg.image_size) -> None:
            predict_with_models(
                fold_models, images, part, size, cfg.batch_size, workers, devices[0]
            )

        rate = measure_images_per_s(run, ids, cfg.batch_size, cfg.estimate_batches)
        rates[name] = rate * len(devices)
        del fold_models
        with torch.cuda.device(devices[0]):
            torch.cuda.empty_cache()
    print(
        f"GPUs: measured on {devices[0]} with {workers} DataLoader worker(s), times "
        f"{len(devices)} GPU(s) that share the rows"
    )
    return TimeEstimate(len(ids), rates)
