"""What every bench script prints: the machine and its load, and per step wall seconds, CPU
seconds (user + sys, this process and its finished children) and peak resident memory.

On a shared machine wall time grows with other people's load; CPU time barely does, so both are
printed. Peak RSS per step: the kernel's high-water mark (VmHWM) is reset before each step where
Linux allows it (`/proc/self/clear_refs`); otherwise it is the process's peak so far.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or platform's guess."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def memory_gib() -> float:
    """Total memory of the machine in GiB (0 where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def load_average() -> str:
    """The 1/5/15-minute load averages, or "n/a"."""
    try:
        return "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def print_machine(extra: str = "") -> None:
    """One block naming the CPU, cores, memory, Python and the load at the start."""
    print(
        f"machine: {cpu_model()}; {usable_cores()} usable of {os.cpu_count()} cores; "
        f"{memory_gib():.0f} GiB RAM; Python {sys.version.split()[0]} on {platform.system()}"
    )
    if extra:
        print(extra)
    print(f"load average (1/5/15 min) at start: {load_average()}", flush=True)


def print_end() -> None:
    """The load at the end, to judge how far other processes inflated the wall times."""
    print(f"load average (1/5/15 min) at end:   {load_average()}", flush=True)


def cpu_seconds() -> float:
    """User + sys CPU seconds of this process (all threads) and of its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _status_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_gib() -> float:
    """Peak RSS in GiB since the last reset (VmHWM), else since the start (ru_maxrss)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Steps:
    """Times consecutive steps: `with steps("label"):` prints wall, CPU and peak RSS of each."""

    def __init__(self, width: int = 44):
        self.width = width
        self.results: dict[str, tuple[float, float, float]] = {}
        self._label = ""

    def __call__(self, label: str) -> Steps:
        self._label = label
        return self

    def __enter__(self) -> Steps:
        reset_peak_rss()
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        cpu = cpu_seconds() - self._cpu
        peak = peak_rss_gib()
        self.results[self._label] = (wall, cpu, peak)
        print(
            f"{self._label:<{self.width}} wall {wall:7.1f} s  cpu {cpu:7.1f} s  "
            f"peak RSS {peak:5.2f} GiB",
            flush=True,
        )
