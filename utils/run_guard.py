"""What keeps a pipeline run to itself: one run per work dir, and a stop on Ctrl-C / SIGTERM.

`work_dir_lock` takes an exclusive `fcntl.flock` on `<work dir>/pipeline.lock` and writes the
holder's pid and start time in it; the kernel drops a flock when its process ends, however it
ends, so a lock file left by a killed run is simply taken over. A second run on the same work
dir stops at once with `WorkDirBusy`, naming the holder.

`stop_on_signals` turns SIGINT and SIGTERM into `Stopped` in the main thread, and
`run_stoppable` runs a stage in a worker thread so the signal is seen at once: papermill's
client (nbclient) installs its own SIGINT/SIGTERM handlers when it runs in the main thread, and
those only schedule the kernel's clean-up, after which the pipeline would carry on. In a worker
thread it cannot install them (asyncio allows signal handlers in the main thread only), so
ours stay in force; on a stop the caller's `on_stop` shuts the kernel down.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from utils.manifest import read_json_object

LOCK_FILE = "pipeline.lock"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
JOIN_POLL_S = 0.2  # how often the main thread wakes to run a pending signal handler
STOP_WAIT_S = 30.0  # how long a stopped stage's thread may take to wind down

T = TypeVar("T")


class WorkDirBusy(RuntimeError):
    """Another live process holds the work dir's lock (message names its pid and start time)."""


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived; `exit_code` is the shell's 128 + signal number.

    A BaseException, like KeyboardInterrupt, so an `except Exception` on the way up does not
    swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum


@contextlib.contextmanager
def work_dir_lock(work_dir: Path) -> Iterator[Path]:
    """Hold `<work_dir>/pipeline.lock` for the block; WorkDirBusy when a live process holds it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / LOCK_FILE
    with path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_json_object(path)
            raise WorkDirBusy(
                f"work dir {work_dir} is in use by another pipeline run (pid "
                f"{holder.get('pid', '?')}, started {holder.get('started', '?')}); wait for it to "
                f"end or stop it, or choose another --work-dir"
            ) from None
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        lock.truncate(0)
        lock.write(json.dumps({"pid": os.getpid(), "started": started}))
        lock.flush()
        try:
            yield path
        finally:
            lock.truncate(0)
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise Stopped in the main thread (elsewhere: no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_stopped(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    previous = {s: signal.signal(s, raise_stopped) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_stoppable(work: Callable[[], T], on_stop: Callable[[], None]) -> T:
    """`work()` in a worker thread while the main thread waits for a signal; on Stopped,
    `on_stop()` (shut the kernel down), wait for the thread to wind down, then re-raise."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = work()
        except BaseException as err:  # handed to the main thread, which raises it
            result["error"] = err

    thread = threading.Thread(target=target, name="stage", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(JOIN_POLL_S)
    except Stopped:
        on_stop()
        thread.join(STOP_WAIT_S)
        raise
    if "error" in result:
        raise result["error"]
    return result["value"]


def kill_process_group(process: subprocess.Popen | None, wait_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `wait_s`, to the process group led by `process` (a kernel
    started in its own session, with its DataLoader workers); a gone process is fine."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait_s)


def tracked_kernel_manager(found: list) -> type:
    """A jupyter_client kernel manager class (papermill's `kernel_manager_class`) that appends
    each instance to `found`, so the pipeline can reach the kernel papermill starts."""
    from jupyter_client.manager import AsyncKernelManager

    class TrackedKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            found.append(self)

    return TrackedKernelManager


def shut_down_kernels(managers: list) -> None:
    """Stop the kernel process (group) of every manager in `managers` that started one."""
    for manager in managers:
        provisioner = getattr(manager, "provisioner", None)
        kill_process_group(getattr(provisioner, "process", None))
