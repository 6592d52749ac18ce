"""The GPU smoke test the GPU probe kernel runs before any long kernel: each image model's full
config (its image size and batch) trained for a few steps in fp16 with the GradScaler, then the
same model predicting in fp16, on one GPU; images/s, peak GPU memory, and any failure with its
traceback, written as smoke-gpu.json.

Random uint8 images stand in for the competition's JPEGs: the smoke exercises CUDA, fp16
autocast, the scaler and memory at full size; decode speed is the probe's CPU count's matter.
DDP on every GPU is not run here yet (docs/kaggle_run.md). On a CPU it runs tiny (the dry path
the tests take).
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

SMOKE_FILE = "smoke-gpu.json"
TRAIN_STEPS = 200
INFER_STEPS = 50
WARMUP_STEPS = 5  # cuDNN autotuning and allocator growth, not timed


def _step_rate(run_step: Any, steps: int, batch: int, device: Any) -> float:
    """Images/s of `steps` calls of run_step after WARMUP_STEPS untimed ones."""
    import torch

    for _ in range(WARMUP_STEPS):
        run_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / max(time.perf_counter() - start, 1e-9)


def smoke_model(model_name: str, device: Any, steps: int, **overrides: Any) -> dict[str, Any]:
    """Train `steps` fp16 steps and predict `steps // 4` batches of one model's full config."""
    import torch

    from utils.image.predict import build_model, to_device
    from utils.settings import image_config

    cfg = image_config(model_name, "full", **overrides)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    net = to_device(build_model(cfg), device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    y = (torch.arange(cfg.batch_size, device=device) % 2).float()

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = net(x, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    @torch.no_grad()
    def infer_step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            net(x)

    net.train()
    train_rate = _step_rate(train_step, steps, cfg.batch_size, device)
    net.eval()
    infer_rate = _step_rate(infer_step, max(1, steps // 4), cfg.batch_size, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return {
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "train_images_per_s": round(train_rate, 1),
        "infer_images_per_s": round(infer_rate, 1),
        "peak_gpu_memory_gib": None if peak is None else round(peak, 2),
    }


def run_smoke(
    output_dir: str | Path,
    steps: int | None = None,
    models: list[str] | None = None,
    **overrides: Any,
) -> Path:
    """Smoke `models` (every image model by default) on this machine's first GPU (tiny on a
    CPU); smoke-gpu.json."""
    import torch

    from utils.settings import IMAGE_MODELS

    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    if not cuda:  # the dry path: a few tiny steps, to check the code, not the machine
        steps = steps or 2
        overrides = {"image_size": 32, "batch_size": 4, **overrides}
    result: dict[str, Any] = {"device": str(device), "gpus": 1 if cuda else 0, "models": {}}
    for name in models or list(IMAGE_MODELS):
        try:
            result["models"][name] = smoke_model(name, device, steps or TRAIN_STEPS, **overrides)
        except Exception as err:  # every model is tried; the failure is the finding
            result["models"][name] = {"error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc()}  # fmt: skip
        if cuda:
            torch.cuda.empty_cache()
    result["failed"] = sorted(n for n, r in result["models"].items() if "error" in r)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SMOKE_FILE
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({n: {k: v for k, v in r.items() if k != "traceback"}
                      for n, r in result["models"].items()}, indent=2))  # fmt: skip
    return path


def smoke_failures(smoke: dict[str, Any] | None) -> list[str]:
    """One line per model whose smoke failed (its error), empty when all ran."""
    if not smoke:
        return []
    return [f"{name}: {smoke['models'][name]['error']}" for name in smoke.get("failed", [])]


def smoke_summary(smoke: dict[str, Any]) -> str:
    """One line: each model's training and inference images/s and peak memory, or its error."""
    parts = []
    for name, r in smoke.get("models", {}).items():
        if "error" in r:
            parts.append(f"{name} FAILED ({r['error']})")
        else:
            peak = r.get("peak_gpu_memory_gib")
            parts.append(
                f"{name} train {r['train_images_per_s']:g} img/s, infer "
                f"{r['infer_images_per_s']:g} img/s" + (f", peak {peak:g} GiB" if peak else "")
            )
    return "; ".join(parts) or "no models"
