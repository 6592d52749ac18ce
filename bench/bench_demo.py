"""The README's main job as a new user runs it: wall and CPU seconds, per stage and in all, and
the work dir's size on disk.

    python -m bench.bench_demo [--work-dir DIR] [--keep] [-- extra pipeline options]

Runs `python -m utils.pipeline --work-dir DIR` (demo preset, synthetic data) from a clean work
dir (a temporary one unless --work-dir), then prints one row per stage from the pipeline's own
record (`executed/durations.json`), the totals, and the megabytes per top-level folder. CPU
seconds are user + sys of the pipeline and its notebook kernels: on a loaded machine wall time
grows with other people's work, CPU time hardly does, and on 2 idle cores the wall time of this
mostly single-threaded chain is close to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, cpu_seconds, print_end, print_machine


def folder_mib(path: Path) -> float:
    """Bytes of every file under `path`, in MiB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def sizes(work: Path) -> dict[str, float]:
    """MiB per top-level entry of the work dir, the artifacts folder split per stage folder."""
    out = {}
    for entry in sorted(work.iterdir()):
        if entry.name == "artifacts":
            out |= {f"artifacts/{p.name}": folder_mib(p) for p in sorted(entry.iterdir())}
        else:
            out[entry.name] = folder_mib(entry) if entry.is_dir() else entry.stat().st_size / 2**20
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_demo", description=__doc__)
    parser.add_argument("--work-dir", type=Path, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    parser.add_argument("extra", nargs="*", help="more pipeline options, after --")
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fusionnetx-demo-")) / "work"
    if work.exists():
        shutil.rmtree(work)
    command = [sys.executable, "-m", "utils.pipeline", "--work-dir", str(work), *args.extra]
    print_machine(f"command: {' '.join(command)}")
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    subprocess.run(command, cwd=REPO, check=True)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    print_end()
    stages = json.loads((work / "executed" / "durations.json").read_text())
    print("\n| stage | wall s | CPU s |\n|---|---:|---:|")
    for name, record in stages.items():
        print(f"| {name} | {record['wall_s']:.1f} | {record['cpu_s']:.1f} |")
    print(f"| **main job** (incl. start-up) | **{wall:.1f}** | **{cpu:.1f}** |")
    table = sizes(work)
    print("\n| work dir | MiB |\n|---|---:|")
    for name, mib in table.items():
        print(f"| {name} | {mib:.1f} |")
    print(f"| **total** | **{sum(table.values()):.1f}** |")
    if args.work_dir is None and not args.keep:
        shutil.rmtree(work.parent)


if __name__ == "__main__":
    main()
