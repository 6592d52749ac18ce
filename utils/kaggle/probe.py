"""What a Kaggle image offers, measured inside it by the probe kernels (00_probe_cpu and
00_probe_gpu), and how it differs from requirements-kaggle.txt (utils.kaggle.run reads it before
any long kernel).

Free of third-party imports at module level: the probe must report a missing or broken library,
not fail importing it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from utils.kaggle.input import (
    MIN_VERSIONS,
    installed_versions,
    kaggle_input_root,
    release,
    version_problems,
)

PROBE_FILE = "probe-{image}.json"
# What the suite's GPU kernels are planned for: Kaggle's T4 x 2 (compute capability 7.5).
EXPECTED_GPUS = 2
EXPECTED_CAPABILITY = "7.5"
LAYOUT_DEPTH = 4
LAYOUT_FILES = 20  # per folder: the competition's image folders hold 400k files


def accelerator() -> dict[str, Any]:
    """nvidia-smi's answer and torch's view of the GPUs (count, names, compute capability)."""
    info: dict[str, Any] = {"nvidia_smi": None, "gpu_count": 0, "gpus": []}
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,memory.total,driver_version"
        done = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        info["nvidia_smi"] = (done.stdout or done.stderr).strip()
    try:
        import torch
    except Exception as err:  # a broken torch is a finding, not a crash
        info["torch_error"] = f"{type(err).__name__}: {err}"
        return info
    info["cuda_available"] = bool(torch.cuda.is_available())
    info["torch_cuda"] = torch.version.cuda
    if info["cuda_available"]:
        info["gpu_count"] = torch.cuda.device_count()
        for index in range(info["gpu_count"]):
            props = torch.cuda.get_device_properties(index)
            gib = round(props.total_memory / 2**30, 2)
            capability = f"{props.major}.{props.minor}"
            info["gpus"].append({"name": props.name, "capability": capability, "memory_gib": gib})
    return info


def memory_gib() -> float | None:
    """Total memory (GiB) from /proc/meminfo, None where there is none."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 2)
    return None


def disk(path: Path) -> dict[str, float]:
    """Total and free GiB of the file system holding path."""
    usage = shutil.disk_usage(path)
    return {
        "path": str(path),
        "total_gib": round(usage.total / 2**30, 2),
        "free_gib": round(usage.free / 2**30, 2),
    }


def input_layout(root: Path, depth: int = LAYOUT_DEPTH) -> dict[str, Any]:
    """The mounted inputs as nested {name: subtree or size in bytes}, LAYOUT_FILES per folder
    (the rest counted under '...')."""
    if depth == 0 or not root.is_dir():
        return {}
    entries = sorted(root.iterdir())
    tree: dict[str, Any] = {}
    for entry in entries[:LAYOUT_FILES]:
        if entry.is_dir():
            tree[entry.name + "/"] = input_layout(entry, depth - 1)
        else:
            tree[entry.name] = entry.stat().st_size
    if len(entries) > LAYOUT_FILES:
        tree["..."] = len(entries) - LAYOUT_FILES
    return tree


def probe_environment(image: str, working_dir: Path) -> dict[str, Any]:
    """Everything the suite depends on in this image, as one JSON-able dict."""
    return {
        "image": image,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": installed_versions(),
        "accelerator": accelerator(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib(),
        "disk": disk(working_dir),
        "input_root": str(kaggle_input_root()),
        "inputs": input_layout(kaggle_input_root()),
    }


def write_probe(image: str, output_dir: str | Path) -> Path:
    """Probe this image, print the result and write it as probe-<image>.json in output_dir."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = probe_environment(image, out)
    path = out / PROBE_FILE.format(image=image)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    print(f"probe written to {path}", file=sys.stderr)
    return path


def requirement_pins(text: str) -> dict[str, str]:
    """library (as in MIN_VERSIONS) -> version pinned in a requirements file's text."""
    pins = {}
    for line in text.splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if version:
            pins[name.strip().lower()] = version.strip()
    return {
        lib: pins[dist]
        for lib, (dists, _) in MIN_VERSIONS.items()
        for dist in dists
        if dist in pins
    }


def differences(probe: dict[str, Any], pins: dict[str, str]) -> tuple[list[str], list[str]]:
    """(blocking, notes): a known-incompatible library blocks (the kernels built for this image
    would stop in their first cell); every other difference from the pins and the planned
    hardware is a note."""
    image = probe.get("image", "?")
    found = probe.get("libraries", {})
    blocking, _ = version_problems({lib: v for lib, v in found.items() if lib in MIN_VERSIONS})
    notes = []
    for lib, pinned in pins.items():
        version = found.get(lib)
        if version is None:
            notes.append(f"{image} image: {lib} is not installed (pinned {pinned})")
        elif release(version) != release(pinned):
            notes.append(f"{image} image: {lib} {version} (requirements-kaggle.txt: {pinned})")
    acc = probe.get("accelerator", {})
    if image == "gpu":
        if acc.get("gpu_count") != EXPECTED_GPUS:
            notes.append(f"gpu image: {acc.get('gpu_count')} GPUs, planned for {EXPECTED_GPUS}")
        caps = sorted({g["capability"] for g in acc.get("gpus", [])})
        if caps and caps != [EXPECTED_CAPABILITY]:
            notes.append(f"gpu image: compute capability {caps}, planned {EXPECTED_CAPABILITY}")
    return [f"{image} image: {line}" for line in blocking], notes
