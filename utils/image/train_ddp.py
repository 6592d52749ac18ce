"""Stage 1 under torchrun: one image model trained by DDP ranks on one or several machines.

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --local-ranks-filter 0 -m utils.image.train_ddp vit_tiny --data-dir DATA --output-dir OUT \\
        --preset full --set weights_path=/weights/vit_tiny.pth

Every rank runs utils.image.train.run_image_stage with the same arguments (the same data dir and
settings on every machine; the ranks check their config_hash agrees) inside the group torchrun
describes: NCCL with one GPU per rank, or gloo on CPUs (`--backend gloo`). Rank 0 writes the
run dir (oof.csv, fold{k}.pt, config.json, history.csv, manifest.json, as a notebook run) and
prints the fold scores. A resumed run (fold{k}.last.pt) is read by every rank, so on several
machines `--output-dir` must be one shared file system. One machine needs no torchrun: the
stage's notebook (or run_image_stage) spawns one process per visible GPU itself.
docs/multi_gpu.md has the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from typing import Any

import torch.distributed as dist

from utils.cli import RawDefaultsHelpFormatter
from utils.image.distributed import DEFAULT_TIMEOUT_S, init_from_env
from utils.settings import IMAGE_MODELS, PRESETS, RECIPES, ImageConfig

# fixed by the model's registry entry, not by --set
FIXED_FIELDS = ("model_name", "backbone", "label")


def parse_override(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' -> (KEY, VALUE) for a ImageConfig field; VALUE read as JSON (2, 0.5, null,
    true) or else kept as a string (a path)."""
    key, sep, raw = text.partition("=")
    fields = [f.name for f in dataclasses.fields(ImageConfig) if f.name not in FIXED_FIELDS]
    if not sep or key not in fields:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE with KEY one of {fields}")
    with contextlib.suppress(json.JSONDecodeError):
        return key, json.loads(raw)
    return key, raw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun ... -m utils.image.train_ddp",
        description=__doc__,
        formatter_class=RawDefaultsHelpFormatter,
    )
    parser.add_argument("model", choices=sorted(IMAGE_MODELS), help="image model to train")
    parser.add_argument("--data-dir", required=True, help="Kaggle layout: train-metadata.csv …")
    parser.add_argument("--output-dir", required=True, help="the run dir is OUTPUT_DIR/MODEL")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full", help="sizes")
    parser.add_argument("--recipe", choices=RECIPES, default="paper", help="method variant")
    parser.add_argument("--folds", type=int, nargs="+", help="train only these folds")
    parser.add_argument("--resume-from", help="an earlier output dir of the same run")
    parser.add_argument("--force", action="store_true", help="start the run dir afresh")
    parser.add_argument(
        "--allow-random-init", action="store_true", help="full preset without weights_path"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        type=parse_override,
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="ImageConfig overrides, e.g. epochs=10 weights_path=/w/vit_tiny.pth",
    )
    parser.add_argument(
        "--backend", choices=("nccl", "gloo"), help="default: nccl with GPUs, else gloo"
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="a rank waiting longer in a collective fails the run",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from utils.image.train import fold_scores, run_image_stage

    group = init_from_env(args.backend, args.timeout_s)
    if group.is_main:
        print(f"{args.model}: {group.world_size} ranks, {dist.get_backend()}")
    _, oof = run_image_stage(
        args.model,
        args.data_dir,
        args.output_dir,
        args.preset,
        args.recipe,
        force=args.force,
        folds=args.folds,
        resume_from=args.resume_from,
        allow_random_init=args.allow_random_init,
        **dict(args.overrides),
    )
    if oof is not None:
        print(fold_scores(oof))
    # on an exception the process just exits: torchrun stops the other ranks
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
