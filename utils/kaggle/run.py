"""The whole Kaggle workflow in one resumable command: build, push, wait, collect, publish, submit.

    python -m utils.kaggle.run [--owner NAME] [--work-dir work/kaggle] [--weights weights/]
                               [--tune] [--ablation] [--submit] [--from STEP | --only STEP]
                               [--dry-run]

Steps, in order (see docs/kaggle_run.md, which also lists each Kaggle limit and its handling):
    probe          push the CPU and GPU probe kernels (and the GPU smoke), compare with the pins
    weights        create the weights dataset if it is missing (upload --weights)
    images         check the projected GPU-hours, push the four image kernels (at most
                   --gpu-sessions at once), wait, download, continue those out of time
    image-dataset  create or version the image-model dataset from those outputs
    ablation       (--ablation) push 06_ablation (CPU: the plus candidates on the real data),
                   wait, download ablation.json and ablation.md, print the table and kept set
    tune           (--tune) push 02_tune_gbdt, wait, download
    tune-dataset   (--tune) create or version the tuning dataset
    gbdt           push 03_gbdt, wait, download
    gbdt-dataset   create or version the GBDT model dataset
    submission     push the submission kernel, wait for its run on the public test
    submit         print the submit command (with --submit: submit that kernel version and
                   follow it until Kaggle has scored it)

A JSON state file in the work dir records every pushed kernel version, the dataset versions it
was pushed against, its output checksums and every dataset version, so a rerun skips what is
done, waits for kernels still running, and re-pushes exactly the kernels that failed or whose
input datasets have a newer version than the one they ran against.

This module is the command line; the steps and options are defined in utils.kaggle.steps, the
Runner walks them (utils.kaggle.runner) with the kernel steps of utils.kaggle.kernel_steps and
the dataset steps of utils.kaggle.dataset_steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.kaggle import build as kb, limits as kl
from utils.kaggle.client import KaggleApiClient, KaggleClient, RunStopped
from utils.kaggle.runner import Runner
from utils.kaggle.steps import (
    DEFAULT_TIMEOUT_H,
    DEFAULT_WEIGHTS_DIR,
    DEFAULT_WORK_DIR,
    STEP_NAMES,
    Options,
)

# The options a resume command repeats where they differ from their default (then the switches).
RESUMED = ("--work-dir", "--weights", "--timeout-h", "--message", "--recipe", "--gpu-sessions",
           "--gpu-hours")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.kaggle.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--owner", help="Kaggle user name (default: the kaggle client's)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="state + outputs")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR, help="local .pth dir")
    parser.add_argument("--tune", action="store_true", help="run 02_tune_gbdt; 03 reads its params")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="run 06_ablation (the plus candidates on the real data, CPU) once the image "
        "dataset is ready; download ablation.json and print the kept set",
    )
    parser.add_argument(
        "--recipe",
        choices=kb.RECIPES,
        default="paper",
        help="recipe of the tuning and GBDT kernels (the image kernels take none): after a run "
        "with another recipe, they and what reads them are pushed again, the image kernels not",
    )
    parser.add_argument("--submit", action="store_true", help="submit (default: print the call)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--from", dest="start", choices=STEP_NAMES, help="redo this step and on")
    group.add_argument("--only", choices=STEP_NAMES, help="redo just this step")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; no network")
    parser.add_argument("--timeout-h", type=float, default=DEFAULT_TIMEOUT_H, help="per kernel")
    parser.add_argument("--message", default="FusionNetX", help="submission / version note")
    parser.add_argument(
        "--gpu-sessions",
        type=int,
        default=kl.DEFAULT_GPU_SESSIONS,
        help="GPU kernels running at once (Kaggle's per-account cap); the rest are queued",
    )
    parser.add_argument(
        "--gpu-hours",
        type=float,
        default=kl.DEFAULT_GPU_HOURS,
        help="refuse the image step when its projected GPU-hours exceed this (weekly quota)",
    )
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    """Options, with the command line that resumes this run (no --from/--only/--dry-run)."""
    owner, defaults = kb.resolve_owner(args.owner), parse_args([])
    resume = ["--owner", owner]
    for flag in RESUMED:
        dest = flag[2:].replace("-", "_")
        value = getattr(args, dest)
        if value != getattr(defaults, dest):
            resume += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    resume += [flag for flag in ("--tune", "--ablation", "--submit") if getattr(args, flag[2:])]
    same = ("tune", "ablation", "recipe", "submit", "start", "only", "timeout_h", "message")
    return Options(
        owner=owner,
        work_dir=args.work_dir,
        weights_dir=args.weights,
        gpu_sessions=args.gpu_sessions,
        gpu_hours=args.gpu_hours,
        resume_args=resume,
        **{name: getattr(args, name) for name in same},
    )


def main(argv: list[str] | None = None, client: KaggleClient | None = None) -> int:
    """Command-line entry point; 1 when the run stopped (the message says how to resume)."""
    args = parse_args(argv)
    opts = None
    try:
        opts = options_from(args)
        if not args.dry_run and client is None:
            kl.check_client_version()
            client = KaggleApiClient()
        Runner(client, opts, plan=args.dry_run).run()
    except (RunStopped, kb.KaggleBuildError, kl.ClientVersionError) as err:
        print(err, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        resume = f"; resume with:\n  {opts.resume_command()}" if opts else ""
        print(f"\ninterrupted: the state file keeps every finished action{resume}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
