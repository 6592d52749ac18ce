"""Kaggle packaging: self-contained kernel builds, datasets, weights and the build CLI.

What each kernel and dataset declares (and its rules) is utils.kaggle.metadata; how a notebook
becomes self-contained is utils.kaggle.embed; what runs inside a kernel (library checks, input
paths) is utils.kaggle.input. This module re-exports the names the workflow and tests use.
Commands (the README's "Kaggle workflow" walks through them):
    python -m utils.kaggle.build validate [--built build/kernels]
    python -m utils.kaggle.build build [--owner NAME] [--out build/kernels] [--tuned]
    python -m utils.kaggle.build dry-run [--out build/kernels]
    python -m utils.kaggle.build dataset SLUG --from DIR [--owner NAME] [--out build/datasets]
    python -m utils.kaggle.build weights --out DIR
`python -m utils.kaggle.build COMMAND --help` describes one command and its defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nbformat

from utils.cli import DefaultsHelpFormatter, RawDefaultsHelpFormatter
from utils.kaggle.embed import (
    build_notebook,
)
from utils.kaggle.metadata import (
    ABLATION_KERNEL as ABLATION_KERNEL,
    COMPETITION as COMPETITION,
    DATASET_CONTENTS,
    DATASET_METADATA,
    DATASETS_DIR,
    DEFAULT_BUILD_DIR,
    DEFAULT_DATASET_BUILD_DIR,
    GBDT_DATASET as GBDT_DATASET,
    IMAGE_BACKBONES,
    IMAGE_DATASET as IMAGE_DATASET,
    IMAGE_KERNEL_PREFIX,
    IMAGE_MODELS as IMAGE_MODELS,
    KAGGLE_PARAMETERS,
    KERNEL_METADATA,
    KERNELS_DIR as KERNELS_DIR,
    NOTEBOOKS_DIR,
    PROBE_KERNELS,
    REPO_ROOT as REPO_ROOT,
    SUBMISSION_KERNEL as SUBMISSION_KERNEL,
    TOP_LEVEL_METADATA,
    TUNED_GBDT,
    TUNING_DATASET as TUNING_DATASET,
    WEIGHT_FILES,
    WEIGHTS_DATASET as WEIGHTS_DATASET,
    InputPath,
    KaggleBuildError,
    defined_datasets,
    kernel_folders,
    read_json,
    split_ref,
    validate,
    with_owner,
    write_top_level,
)
from utils.settings import RECIPES


def resolve_owner(owner: str | None) -> str:
    """--owner, else the user name of the kaggle client's own configuration (KAGGLE_USERNAME,
    then kaggle.json); never a silent default account."""
    if not owner:
        api = kaggle_api()
        config = api.read_config_environment(api.read_config_file(quiet=True))
        owner = config.get(api.CONFIG_NAME_USER)
    if not owner:
        raise KaggleBuildError(
            "no Kaggle user name: pass --owner NAME, or set KAGGLE_USERNAME, or put your API "
            "token in ~/.kaggle/kaggle.json (the kaggle client's configuration). Kernel and "
            "dataset ids start with it."
        )
    return owner


def fresh_dir(path: Path) -> Path:
    """`path` as a new empty folder (whatever was there removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def build_kernel(
    folder: Path,
    out_dir: Path,
    owner: str,
    parameters: dict[str, Any],
    notebooks_dir: Path = NOTEBOOKS_DIR,
    repo_ids: frozenset[str] = frozenset(),
    extra_sources: tuple[str, ...] = (),
    kernel_sources: tuple[str, ...] = (),
    skip_version_check: bool = False,
) -> Path:
    """Write out_dir/<folder.name>/ with owner-filled metadata and the self-contained notebook.

    `kernel_sources` are slugs of the owner's kernels whose output this one reads (--continue).
    """
    meta = read_json(folder / KERNEL_METADATA)
    meta["dataset_sources"] = [*meta.get("dataset_sources", []), *extra_sources]
    meta = with_owner(meta, owner, set(repo_ids))
    if kernel_sources:
        meta["kernel_sources"] = [f"{owner}/{slug}" for slug in kernel_sources]
    nb = build_notebook(notebooks_dir / meta["code_file"], parameters, owner, skip_version_check)
    target = fresh_dir(out_dir / folder.name)
    nbformat.write(nb, target / meta["code_file"])
    (target / KERNEL_METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return target


def image_kernel_parameters(
    folder: Path, params: dict[str, Any], folds: list[int] | None, continue_run: bool
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """An image kernel's parameters for a fold selection and for continuing its own last output.

    With `continue_run` the kernel mounts its own output (a kernel source) and resumes from it:
    finished folds are kept, an unfinished fold continues from its last epoch (train.py checks
    that the earlier run has the same config hash). Returns (parameters, kernel source slugs).
    """
    params = dict(params)
    if folds is not None:
        params["folds"] = list(folds)
    if not continue_run:
        return params, ()
    model = folder.name.removeprefix(IMAGE_KERNEL_PREFIX)
    slug = split_ref(read_json(folder / KERNEL_METADATA)["id"])[1]
    # the output root holding <model>/, as the kernel's own output_dir was
    params["resume_from"] = InputPath(slug, model, parent=True)
    return params, (slug,)


def build_all(
    out_dir: Path = DEFAULT_BUILD_DIR,
    owner: str | None = None,
    tuned: bool = False,
    folds: list[int] | None = None,
    continue_run: bool = False,
    recipe: str = "paper",
    skip_version_check: bool = False,
) -> list[Path]:
    """Build every kernel folder; --tuned feeds the tuning dataset to the GBDT kernel; image
    kernels get a fold selection and/or continue from their own last output (see
    image_kernel_parameters). `recipe` goes to the kernels that take one (tuning and GBDT: no
    recipe changes an image model, and the submission kernel reads it from the GBDT dataset);
    --skip-version-check makes every version difference a warning."""
    if recipe not in RECIPES:
        raise KaggleBuildError(f"unknown recipe {recipe!r}; choose from {list(RECIPES)}")
    owner = resolve_owner(owner)
    datasets = defined_datasets()
    built = []
    for folder in kernel_folders():
        params, extra, kernels = dict(KAGGLE_PARAMETERS[folder.name]), (), ()
        if "recipe" in params:
            params["recipe"] = recipe
        if tuned and folder.name == TUNED_GBDT[0]:
            params.update(TUNED_GBDT[2])
            extra = (datasets[TUNED_GBDT[1]],)
        if folder.name.startswith(IMAGE_KERNEL_PREFIX):
            params, kernels = image_kernel_parameters(folder, params, folds, continue_run)
        built.append(
            build_kernel(
                folder,
                out_dir,
                owner,
                params,
                repo_ids=frozenset(datasets.values()),
                extra_sources=extra,
                kernel_sources=kernels,
                # a probe reports every version, it never stops on one
                skip_version_check=skip_version_check or folder.name in PROBE_KERNELS,
            )
        )
    return built


def build_dataset(
    slug: str, source_dir: Path, out_dir: Path = DEFAULT_DATASET_BUILD_DIR, owner: str | None = None
) -> Path:
    """Upload folder for a repo-defined dataset: owner-filled metadata + its contents copied."""
    if slug not in DATASET_CONTENTS:
        raise KaggleBuildError(f"unknown dataset {slug!r}; defined: {sorted(DATASET_CONTENTS)}")
    missing = [n for n in DATASET_CONTENTS[slug] if not (source_dir / n).exists()]
    if missing:
        raise KaggleBuildError(f"{source_dir}: missing {missing} for dataset {slug!r}")
    meta = read_json(DATASETS_DIR / slug / DATASET_METADATA)
    meta["id"] = f"{resolve_owner(owner)}/{slug}"
    target = fresh_dir(out_dir / slug)
    for name in DATASET_CONTENTS[slug]:
        src = source_dir / name
        if src.is_dir():
            shutil.copytree(src, target / name)
        else:
            shutil.copy2(src, target / name)
    (target / DATASET_METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return target


def download_weights(out_dir: Path) -> list[Path]:
    """Save each pretrained timm backbone's state dict (needs internet: run on a laptop)."""
    import timm
    import torch

    from utils.image.models import BACKBONES

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in sorted(set(IMAGE_BACKBONES.values())):
        model = timm.create_model(BACKBONES[name].timm_name, pretrained=True)
        torch.save(model.state_dict(), out_dir / f"{name}.pth")
    return [out_dir / name for name in WEIGHT_FILES]


# ---------------------------------------------------------------- offline dry run of the client


def kaggle_api() -> Any:
    """The installed kaggle client's KaggleApi, not authenticated (its import-time chatter
    silenced; `import kaggle` would authenticate at import and exit without credentials)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
    return KaggleApi()


class _CapturingClient:
    """Stands in for kagglesdk's KaggleClient: records requests instead of sending them."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.kernels = SimpleNamespace(kernels_api_client=SimpleNamespace(save_kernel=self._keep))
        self.datasets = SimpleNamespace(
            dataset_api_client=SimpleNamespace(create_dataset=self._keep)
        )

    def _keep(self, request: Any) -> Any:
        self.requests.append(request)
        return SimpleNamespace(error=None, invalidTags=[], versionNumber=1, url="dry-run")

    def __enter__(self) -> _CapturingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def dry_run_push(folder: Path) -> Any:
    """Run the real `kaggle kernels push` on folder with the network call captured; the request."""
    api, client = kaggle_api(), _CapturingClient()
    api.build_kaggle_client = lambda: client
    with contextlib.redirect_stdout(io.StringIO()) as said:
        api.kernels_push(str(folder))
    if "does not resolve to the specified id" in said.getvalue():
        raise KaggleBuildError(f"{folder}: kaggle client says the title does not match the id")
    return client.requests[-1]


# ---------------------------------------------------------------- CLI


def _report(problems: list[str], ok: str) -> int:
    """Print problems (exit 1) or the ok line (exit 0)."""
    for line in problems:
        print(f"ERROR {line}", file=sys.stderr)
    if not problems:
        print(ok)
    return 1 if problems else 0


COMMANDS = {  # name -> (one-line help, what it does)
    "validate": (
        "check every kernel/dataset metadata file",
        "Check kernels/*/kernel-metadata.json, the top-level one and kernels/datasets/*: ids, "
        "sources, GPU, internet off; with --built also a build folder.",
    ),
    "build": (
        "make self-contained kernel folders",
        "Validate, then write one folder per kernel: the notebook with the utils modules it "
        "imports embedded (bootstrap cell) and the Kaggle settings injected.",
    ),
    "dry-run": (
        "run the kaggle client's push offline on a build",
        "Run the kaggle client's push request building on each built kernel, without network.",
    ),
    "dataset": (
        "make an upload folder for a repo-defined dataset",
        "Copy the files a dataset holds from --from into an upload folder with its "
        "dataset-metadata.json (then: kaggle datasets create -p <folder>).",
    ),
    "weights": (
        "download pretrained timm weights (internet)",
        "Download each backbone's pretrained timm weights as <backbone>.pth into --out (the "
        "weights dataset; also `python -m utils.pipeline --weights-dir`).",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.kaggle.build",
        description=__doc__,
        formatter_class=RawDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str) -> argparse.ArgumentParser:
        short, long = COMMANDS[name]
        return sub.add_parser(
            name, help=short, description=long, formatter_class=DefaultsHelpFormatter
        )

    p_val = command("validate")
    p_val.add_argument("--built", type=Path, help="also check this build folder")
    p_build = command("build")
    p_build.add_argument("--owner", help="Kaggle user name (default: $KAGGLE_USERNAME)")
    p_build.add_argument("--out", type=Path, default=DEFAULT_BUILD_DIR, help="build folder")
    p_build.add_argument("--tuned", action="store_true", help="GBDT kernel reads tuning dataset")
    p_build.add_argument(
        "--recipe", choices=RECIPES, default="paper", help="recipe of the tuning and GBDT kernels"
    )
    p_build.add_argument(
        "--folds",
        type=lambda text: [int(f) for f in text.split(",")],
        help="image kernels train only these folds, e.g. 0,1 (the others in later sessions)",
    )
    p_build.add_argument(
        "--continue",
        dest="continue_run",
        action="store_true",
        help="image kernels mount their own last output and resume from it",
    )
    p_build.add_argument(
        "--skip-version-check",
        action="store_true",
        help="kernels print library differences, even known-bad ones, and never stop on them",
    )
    p_dry = command("dry-run")
    p_dry.add_argument("--out", type=Path, default=DEFAULT_BUILD_DIR, help="build folder")
    p_ds = command("dataset")
    p_ds.add_argument("slug", choices=sorted(DATASET_CONTENTS), help="dataset to prepare")
    p_ds.add_argument("--from", dest="source", type=Path, required=True, help="files to upload")
    p_ds.add_argument("--owner", help="Kaggle user name (default: $KAGGLE_USERNAME)")
    p_ds.add_argument("--out", type=Path, default=DEFAULT_DATASET_BUILD_DIR, help="upload folder")
    p_w = command("weights")
    p_w.add_argument("--out", type=Path, required=True, help="folder for the .pth files")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except KaggleBuildError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    """Dispatch one parsed command."""
    if args.command == "validate":
        problems = validate(built_dir=args.built)
        return _report(problems, f"ok: {len(kernel_folders())} kernels, datasets valid")
    if args.command == "build":
        problems = validate()
        if problems:
            return _report(problems, "")
        same = ("owner", "tuned", "folds", "continue_run", "recipe", "skip_version_check")
        built = build_all(args.out, **{name: getattr(args, name) for name in same})
        for folder in built:
            print(f"built {folder}")
        owner = split_ref(read_json(built[0] / KERNEL_METADATA)["id"])[0]
        if write_top_level(args.out, owner):
            print(f"{TOP_LEVEL_METADATA.name} at the repository root now pushes as {owner}")
        return _report(validate(built_dir=args.out), f"ok: kernels built in {args.out}")
    if args.command == "dry-run":
        for folder in kernel_folders(args.out):
            request = dry_run_push(folder)
            print(f"{folder.name}: would push {request.slug} internet={request.enable_internet}")
        return 0
    if args.command == "dataset":
        print(f"ready to upload: {build_dataset(args.slug, args.source, args.out, args.owner)}")
        return 0
    for path in download_weights(args.out):
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
