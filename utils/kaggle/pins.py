"""Pins from a probe: the versions Kaggle's GPU image reported (utils.kaggle.probe, the
`probe-gpu.json` that `python -m utils.kaggle.run` downloads) as requirements-kaggle.txt's pins.

    python -m utils.kaggle.pins work/kaggle/outputs/00_probe_gpu/probe-gpu.json [--write]

Prints each pin the probe's version would change; `--write` rewrites requirements-kaggle.txt
(every comment and other line kept) and the tested versions in utils/kaggle/input.py
(MIN_VERSIONS, which tests hold equal to that file). A pin stays when the library is missing in
the image, or when the image's version is one the suite is known not to work with
(KNOWN_INCOMPATIBLE: the kernels stop on it anyway, so the pin is never loosened to it). Only
the GPU image's probe is written (the file describes that image); a CPU probe is compared only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from utils.kaggle.input import KNOWN_INCOMPATIBLE, MIN_VERSIONS, release
from utils.kaggle.metadata import REPO_ROOT
from utils.kaggle.probe import requirement_pins

REQUIREMENTS = REPO_ROOT / "requirements-kaggle.txt"
INPUT_MODULE = REPO_ROOT / "utils" / "kaggle" / "input.py"
WRITTEN_IMAGE = "gpu"
# A requirements line `name==version`, the rest of the line (a comment) kept as it is.
PIN_LINE = re.compile(
    r"^(?P<name>[A-Za-z0-9_.\-]+)(?P<op>\s*==\s*)(?P<version>[^\s#]+)(?P<rest>.*)$"
)


def pin_updates(probe: dict[str, Any], pins: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(library -> the version to pin, one line per pin kept and why) from a probe's libraries
    against the current pins (probe.requirement_pins)."""
    image = probe.get("image", "?")
    found = probe.get("libraries", {})
    updates, kept = {}, []
    for lib, pinned in pins.items():
        version = found.get(lib)
        if version is None:
            kept.append(f"{lib}=={pinned} kept: not installed in the {image} image")
            continue
        works_from, why = KNOWN_INCOMPATIBLE.get(lib, ("0", ""))
        if release(version) < release(works_from):
            kept.append(
                f"{lib}=={pinned} kept: the {image} image's {version} is known not to work "
                f"(needs >= {works_from}): {why}"
            )
        elif release(version) != release(pinned):
            updates[lib] = version.split("+")[0]  # as an index serves it: no local segment
    return updates, kept


def _library_of(distribution: str) -> str | None:
    """The MIN_VERSIONS library a requirements distribution name provides."""
    name = distribution.lower()
    return next((lib for lib, (dists, _) in MIN_VERSIONS.items() if name in dists), None)


def rewrite_requirements(text: str, updates: dict[str, str]) -> str:
    """requirements text with each updated library's pin replaced, everything else as it was."""
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        match = PIN_LINE.match(body)
        lib = _library_of(match["name"]) if match else None
        if match and lib in updates:
            body = f"{match['name']}{match['op']}{updates[lib]}{match['rest']}"
            line = body + line[len(line.rstrip("\r\n")) :]
        lines.append(line)
    return "".join(lines)


def rewrite_min_versions(source: str, updates: dict[str, str]) -> str:
    """utils/kaggle/input.py's source with MIN_VERSIONS' tested version of each updated library
    replaced; an entry not found is an error naming it."""
    for lib, version in updates.items():
        entry = re.compile(rf'^(\s*"{re.escape(lib)}": \(\(.*\), ")([^"]+)("\),)$', re.MULTILINE)
        source, count = entry.subn(lambda m, v=version: f"{m[1]}{v}{m[3]}", source)
        if count != 1:
            raise ValueError(f"MIN_VERSIONS in {INPUT_MODULE.name}: no single entry for {lib!r}")
    return source


def pins_report(
    probe: dict[str, Any], requirements: Path = REQUIREMENTS
) -> tuple[dict[str, str], list[str]]:
    """(the updates, the lines to print) for a probe against a requirements file."""
    pins = requirement_pins(requirements.read_text(encoding="utf-8"))
    updates, kept = pin_updates(probe, pins)
    image = probe.get("image", "?")
    python = probe.get("python", "?")
    lines = [f"{image} image probe (Python {python}) against {requirements.name}:"]
    lines += [f"  {lib}: {pins[lib]} -> {version}" for lib, version in updates.items()]
    lines += [f"  {line}" for line in kept]
    if not updates and not kept:
        lines.append("  every pin is the version the image has")
    return updates, lines


def main(argv: list[str] | None = None) -> int:
    """Command line; 1 on a probe that cannot be written (a CPU image's) or an unreadable one."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.kaggle.pins",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("probe", type=Path, help="a probe-<image>.json a probe kernel wrote")
    parser.add_argument("--write", action="store_true", help="update the pins and MIN_VERSIONS")
    parser.add_argument(
        "--requirements", type=Path, default=REQUIREMENTS, help="the pins compared and written"
    )
    parser.add_argument(
        "--input-module", type=Path, default=INPUT_MODULE, help="the module holding MIN_VERSIONS"
    )
    args = parser.parse_args(argv)
    try:
        probe = json.loads(args.probe.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        print(f"cannot read the probe {args.probe}: {err}", file=sys.stderr)
        return 1
    updates, lines = pins_report(probe, args.requirements)
    print("\n".join(lines))
    if not args.write:
        if updates:
            print(f"rerun with --write to update {args.requirements.name} and MIN_VERSIONS")
        return 0
    if probe.get("image") != WRITTEN_IMAGE:
        print(
            f"{args.probe}: the {probe.get('image', '?')} image's probe; "
            f"{args.requirements.name} pins Kaggle's {WRITTEN_IMAGE} image, so nothing is written",
            file=sys.stderr,
        )
        return 1
    # both files rewritten before either is written: both or neither
    text = rewrite_requirements(args.requirements.read_text(encoding="utf-8"), updates)
    source = rewrite_min_versions(args.input_module.read_text(encoding="utf-8"), updates)
    args.requirements.write_text(text, encoding="utf-8")
    args.input_module.write_text(source, encoding="utf-8")
    print(
        f"wrote {len(updates)} pin(s) to {args.requirements} and {args.input_module.name}'s "
        "MIN_VERSIONS; CI installs these pins: check they install before committing"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
