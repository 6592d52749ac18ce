"""The GPU smoke test the GPU probe kernel runs before any long kernel: each image model's full
config (image size, batch) trained for a few fp16 steps with the GradScaler, then predicting in
fp16, on one GPU, then with DistributedDataParallel on every GPU when there are several (one
process per GPU, launched as the training kernels launch theirs, the global batch shared between
the ranks). Random uint8 images stand in for the JPEGs there: they exercise CUDA, fp16 autocast,
the scaler, NCCL and memory at full size. Then, on the first PASS_ROWS real crops of the
competition's train-image.hdf5: each model's training input (`train_loader`: JPEG decode and
augmentation in the loader workers, the rate the CPUs can feed a training step) and the
submission kernel's image pass (`image_pass`: exactly as 04_inference runs it, with random
weights, which do not change the speed). Images/s per model and GPU count, peak GPU memory and
any failure with its traceback go to smoke-gpu.json. On a CPU it runs tiny (the dry path the
tests take), DDP as gloo ranks when asked for (`ddp_processes`).
"""

from __future__ import annotations

import functools
import json
import time
import traceback
from pathlib import Path
from typing import Any

SMOKE_FILE = "smoke-gpu.json"
TRAIN_STEPS = 200
WARMUP_STEPS = 5  # cuDNN autotuning and allocator growth, not timed
# A DDP rank waiting longer than this in a collective fails that model's DDP smoke (instead of
# the default half hour of utils.image.distributed: the probe session must stay short).
DDP_TIMEOUT_S = 600.0
PASS_ROWS = 4_000  # crops timed through the submission kernel's image pass


def _step_rate(run_step: Any, steps: int, batch: int, device: Any) -> float:
    """Images/s of `steps` calls of run_step after WARMUP_STEPS untimed ones."""
    import torch

    for count in (WARMUP_STEPS, steps):  # the second round is timed
        start = time.perf_counter()
        for _ in range(count):
            run_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return steps * batch / max(time.perf_counter() - start, 1e-9)


def _rates(
    cfg: Any, device: Any, batch: int, steps: int, wrap: Any = None
) -> tuple[float, float, float]:
    """(training images/s, inference images/s, peak GPU memory in GiB, 0 on a CPU) of this
    process: the model built on `device`, `steps` fp16 training steps of it (through `wrap(net)`,
    e.g. DDP, when given) on `batch` random images, then `steps // 4` inference batches."""
    import torch

    from utils.image.predict import build_model, to_device

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    net = to_device(build_model(cfg), device)
    model = net if wrap is None else wrap(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    shape = (batch, 3, cfg.image_size, cfg.image_size)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    y = (torch.arange(batch, device=device) % 2).float()

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = model(x, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    @torch.no_grad()
    def infer_step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            net(x)

    net.train()
    train_rate = _step_rate(train_step, steps, batch, device)
    net.eval()
    infer_rate = _step_rate(infer_step, max(1, steps // 4), batch, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    return train_rate, infer_rate, peak


def smoke_model(model_name: str, device: Any, steps: int, **overrides: Any) -> dict[str, Any]:
    """Train `steps` fp16 steps and predict `steps // 4` batches of one model's full config."""
    from utils.settings import image_config

    cfg = image_config(model_name, "full", **overrides)
    train_rate, infer_rate, peak = _rates(cfg, device, cfg.batch_size, steps)
    return _smoked(cfg, train_rate, infer_rate, peak if device.type == "cuda" else None)


def _smoked(cfg: Any, train_rate: float, infer_rate: float, peak: float | None) -> dict[str, Any]:
    """A model's smoke result: its config's sizes, its images/s, its peak GPU memory (GiB)."""
    return {
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "train_images_per_s": round(train_rate, 1),
        "infer_images_per_s": round(infer_rate, 1),
        "peak_gpu_memory_gib": None if peak is None else round(peak, 2),
    }


def ddp_rank(model_name: str, steps: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """One DDP rank of a model's smoke (run by utils.image.distributed.launch on every rank):
    the global batch shared between the ranks as training shares it, training steps through
    DistributedDataParallel, inference on this rank's share; every rank's rates are summed and
    the largest peak memory kept. Returns the same fields as smoke_model (on every rank)."""
    from utils.settings import image_config

    cfg = image_config(model_name, "full", **overrides)  # a bad config fails before the imports
    from utils.image import distributed
    from utils.image.fold_training import with_ddp

    group = distributed.current()
    if group is None:
        raise RuntimeError("ddp_rank runs inside a process group (utils.image.distributed.launch)")
    if cfg.batch_size < group.world_size:
        raise ValueError(
            f"{model_name}: batch_size {cfg.batch_size} is the global batch, shared by "
            f"{group.world_size} processes: it must be at least the number of processes"
        )
    lo, hi = distributed.shard_bounds(cfg.batch_size, group.rank, group.world_size)
    rates = _rates(cfg, group.device, hi - lo, steps, lambda net: with_ddp(net, group))
    trains, infers, peaks = zip(*group.all_gather(rates), strict=True)
    cuda = group.device.type == "cuda"
    return _smoked(cfg, sum(trains), sum(infers), max(peaks) if cuda else None)


def _failure(err: BaseException) -> dict[str, str]:
    """A model's smoke failure: one line (a rank's last traceback line for a failed DDP run)
    and the whole traceback (the rank's, as RankFailed carries it, then this process's)."""
    text = [line for line in str(err).strip().splitlines() if not line.startswith("then rank")]
    line = " ... ".join(text[:1] + text[1:][-1:])
    return {"error": f"{type(err).__name__}: {line}", "traceback": traceback.format_exc()}


def _each_model(names: list[str], measure: Any, tidy: Any = None) -> dict[str, Any]:
    """{"models": name -> measure(name) or its failure, "failed": the names that failed}; every
    model is tried, the failure is the finding (`tidy()` runs after each)."""
    models: dict[str, Any] = {}
    for name in names:
        try:
            models[name] = measure(name)
        except Exception as err:
            models[name] = _failure(err)
        if tidy is not None:
            tidy()
    return {"models": models, "failed": sorted(n for n, r in models.items() if "error" in r)}


def smoke_ddp(
    names: list[str], processes: int, device_type: str, steps: int, overrides: dict[str, Any]
) -> dict[str, Any]:
    """Each model's DDP smoke on `processes` ranks (NCCL, one GPU each, or gloo on the CPU), a
    launch per model so one model's failure stops only its own ranks."""
    from utils.image import distributed

    def ranks(name: str) -> dict[str, Any]:
        args = (name, steps, overrides)
        return distributed.launch(ddp_rank, args, processes, device_type, DDP_TIMEOUT_S)

    return {
        "world_size": processes,
        "device": device_type,
        "backend": "nccl" if device_type == "cuda" else "gloo",
        **_each_model(names, ranks),
    }


def competition_images() -> Path | None:
    """The mounted competition's train-image.hdf5 (the image pass times its crops: the public
    test file has 3), or None, with the reason printed, when it is not there."""
    from utils.io import TRAIN_IMAGES
    from utils.kaggle.input import input_path
    from utils.kaggle.metadata import COMPETITION

    try:
        return input_path(COMPETITION, TRAIN_IMAGES)
    except FileNotFoundError as err:
        print(f"image pass: skipped, {err}")
        return None


def pass_model(model_name: str, images: Any, ids: list[str], **overrides: Any) -> dict[str, Any]:
    """One image model's submission pass over `ids`: its n_folds fold models (random weights) on
    every visible device, at the submission kernel's batch size and loader workers (`overrides`
    may set both); images/s with every fold model applied, and how many crops could not be
    decoded."""
    import torch

    from utils.image.predict import build_model, inference_devices, predict_on_devices, to_device
    from utils.settings import image_config, resolve

    cfg = image_config(model_name, "full", **overrides)
    sizes = resolve("full").inference
    batch = overrides.get("batch_size", sizes.batch_size)
    workers = overrides.get("num_workers", sizes.num_workers)
    replicas = [
        (d, [to_device(build_model(cfg), d) for _ in range(cfg.n_folds)])
        for d in inference_devices()
    ]
    start = time.perf_counter()
    _, ok = predict_on_devices(
        replicas, images, ids, cfg.image_size, batch, workers, f"pass {model_name}"
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "rows": len(ids),
        "devices": len(replicas),
        "fold_models": cfg.n_folds,
        "images_per_s": round(len(ids) / max(seconds, 1e-9), 1),
        "unreadable": int((~ok).sum()),
    }


def loader_model(model_name: str, images: Any, ids: list[str], **overrides: Any) -> dict[str, Any]:
    """One image model's training input on real crops: its training augmentation at its full
    image size, batch size and loader workers, as a training epoch feeds the GPU (ImageDataset,
    make_loader); the images/s the CPUs deliver, which caps the training rate whatever the GPU."""
    import numpy as np

    from utils.image.data import ImageDataset, train_transforms
    from utils.image.predict import make_loader
    from utils.settings import image_config

    cfg = image_config(model_name, "full", **overrides)
    dataset = ImageDataset(images, ids, np.zeros(len(ids)), train_transforms(cfg.image_size))
    dataset.seed = cfg.seed
    start, seen = time.perf_counter(), 0
    for batch in make_loader(dataset, cfg.batch_size, cfg.num_workers):
        seen += len(batch["index"])
    seconds = time.perf_counter() - start
    return {
        "rows": seen,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "loader_images_per_s": round(seen / max(seconds, 1e-9), 1),
    }


def real_crops(
    images_path: str | Path, names: list[str], rows: int, overrides: dict[str, Any]
) -> dict[str, Any]:
    """Each model's training input (`train_loader`) and submission image pass (`image_pass`) on
    the first `rows` crops of `images_path`."""
    from utils.io import HDF5Images

    images = HDF5Images(images_path)
    ids = sorted(images)[:rows]
    found: dict[str, Any] = {}
    for part, measure in (("train_loader", loader_model), ("image_pass", pass_model)):
        on_crops = functools.partial(measure, images=images, ids=ids, **overrides)
        found[part] = {"images": str(images_path), "rows": len(ids), **_each_model(names, on_crops)}
    return found


def run_smoke(
    output_dir: str | Path,
    steps: int | None = None,
    models: list[str] | None = None,
    ddp_processes: int | None = None,
    images: str | Path | None = None,
    **overrides: Any,
) -> Path:
    """Smoke `models` (every image model by default) on this machine's first GPU (tiny on a
    CPU), then with DDP on `ddp_processes` ranks (default: every visible GPU when there are
    several, else none; on a CPU gloo ranks when asked for), then the submission's image pass on
    the crops of `images` (a Kaggle-layout hdf5; none: not run); smoke-gpu.json."""
    import torch

    from utils.settings import IMAGE_MODELS

    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    if not cuda:  # the dry path: a few tiny steps, to check the code, not the machine
        steps = steps or 2
        overrides = {"image_size": 32, "batch_size": 4, "num_workers": 0, **overrides}
    if ddp_processes is None:
        ddp_processes = torch.cuda.device_count() if cuda else 0
    names = models or list(IMAGE_MODELS)
    one_gpu = functools.partial(smoke_model, device=device, steps=steps or TRAIN_STEPS, **overrides)
    result: dict[str, Any] = {
        "device": str(device),
        "gpus": 1 if cuda else 0,
        **_each_model(names, one_gpu, torch.cuda.empty_cache if cuda else None),
    }
    if ddp_processes > 1:
        kind = "cuda" if cuda else "cpu"
        result["ddp"] = smoke_ddp(names, ddp_processes, kind, steps or TRAIN_STEPS, overrides)
    if images is not None:
        rows = PASS_ROWS if cuda else 8
        result |= real_crops(images, names, rows, overrides)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SMOKE_FILE
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(_without_tracebacks(result), indent=2))
    return path


def _without_tracebacks(value: Any) -> Any:
    """`value` with every "traceback" entry left out (what the notebook prints)."""
    if isinstance(value, dict):
        return {k: _without_tracebacks(v) for k, v in value.items() if k != "traceback"}
    return value


def smoke_failures(smoke: dict[str, Any] | None) -> list[str]:
    """One line per model whose smoke failed (its error; a DDP failure says on how many
    processes), empty when all ran."""
    if not smoke:
        return []
    lines = [f"{name}: {smoke['models'][name]['error']}" for name in smoke.get("failed", [])]
    ddp = smoke.get("ddp") or {}
    ranks = f"DDP on {ddp.get('world_size')} {'GPUs' if ddp.get('device') == 'cuda' else 'ranks'}"
    parts = {"ddp": ranks, "train_loader": "training input", "image_pass": "submission image pass"}
    for part, where in parts.items():
        found = smoke.get(part) or {}
        lines += [
            f"{name} ({where}): {found['models'][name]['error']}"
            for name in found.get("failed", [])
        ]
    return lines


def _model_summary(name: str, r: dict[str, Any]) -> str:
    """One model's rates and peak memory, or its error."""
    if "error" in r:
        return f"{name} FAILED ({r['error']})"
    peak = r.get("peak_gpu_memory_gib")
    return (
        f"{name} train {r['train_images_per_s']:g} img/s, infer "
        f"{r['infer_images_per_s']:g} img/s" + (f", peak {peak:g} GiB" if peak else "")
    )


def smoke_summary(smoke: dict[str, Any]) -> str:
    """One line: each model's training and inference images/s and peak memory, or its error;
    then the same with DDP when it ran."""
    text = "; ".join(_model_summary(n, r) for n, r in smoke.get("models", {}).items())
    ddp = smoke.get("ddp")
    if ddp:
        parts = "; ".join(_model_summary(n, r) for n, r in ddp.get("models", {}).items())
        text += f" | DDP x{ddp['world_size']} ({ddp['backend']}): {parts or 'no models'}"
    for part, key, what in (
        ("train_loader", "loader_images_per_s", "training input"),
        ("image_pass", "images_per_s", "submission image pass"),
    ):
        found = smoke.get(part)
        if found:
            parts = "; ".join(
                f"{n} FAILED ({r['error']})" if "error" in r else f"{n} {r[key]:g} img/s"
                for n, r in found.get("models", {}).items()
            )
            text += f" | {what} on {found['rows']} real crops: {parts or 'no models'}"
    return text or "no models"
