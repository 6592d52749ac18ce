"""torch.distributed for the image stage: process groups, each rank's share of an epoch's draw
and of the ids to predict, and a launcher that spawns one process per GPU from a notebook.

A training run takes one of three forms (utils.image.train picks it; nothing to configure):
- one process (CPU, one GPU, or an explicit `cuda:k`): `Group()`, every collective a no-op;
- one machine, N GPUs (a notebook cell or a script): `launch` spawns N processes with
  torch.multiprocessing's "spawn" start method (a notebook kernel cannot fork safely; the
  children import their function from utils, found through the sys.path spawn passes on), one
  NCCL rank per GPU (gloo ranks on CPU), joined through a TCPStore the parent opens on port 0
  (a free port, no race). Rank 0's return value comes back to the parent;
- several machines: `torchrun` starts the processes (python -m utils.image.train_ddp) and
  `init_from_env` joins the group it describes.

Failure: a rank that raises writes its traceback and exits; the launcher then stops the other
ranks at once and raises RankFailed in the parent with the traceback of the rank that failed
first (a rank that only lost its peer fails later and is listed after it). Collectives time out
after `timeout_s` (30 min: far above a checkpoint save, the longest wait between two of them)
instead of hanging, which also bounds a torchrun rank whose peer vanished.

Sharding: `RankBatches` (training) and `gather_predictions` (prediction) below.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import pickle
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Sampler

DEFAULT_TIMEOUT_S = 1800.0
STOP_GRACE_S = 10.0  # how long stopped ranks get to exit before they are killed
RESULT_FILE = "result.pkl"


class RankFailed(RuntimeError):
    """A rank of a launched run raised or died; the message holds its traceback."""


@dataclass(frozen=True)
class Group:
    """This process's place in a run: rank, world size, process count on this machine, and the
    device it computes on. The default is a run of one process on the CPU."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            cuda = self.device.type == "cuda"
            dist.barrier(device_ids=[self.device.index] if cuda else None)

    def all_gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order (picklable objects; fine at the sizes of ids and
        predictions of a fold)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of `values` over the ranks."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def workers_per_process(num_workers: int, processes: int) -> int:
    """DataLoader workers of each of `processes` GPUs' loaders on one machine: `num_workers`
    shared out (the CPUs do not grow with the GPUs), at least one when any were asked for."""
    if num_workers <= 0:
        return 0
    return max(1, num_workers // processes)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items; shares differ by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


def current() -> Group | None:
    """The Group of an initialised torch.distributed run (launch, torchrun), else None. NCCL
    ranks compute on cuda:LOCAL_RANK, gloo ranks on the CPU."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", local_rank) if nccl else torch.device("cpu")
    return Group(rank, world, local_world, device)


def training_world(device: torch.device | None, world_size: int | None) -> tuple[int, str]:
    """Processes and device type of a training run: `world_size` if given, else every visible
    GPU when `device` is None or "cuda" without an index, else one. More processes than GPUs
    on a GPU device is an error; on the CPU any number of gloo ranks may run (tests)."""
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    device_type = "cuda" if cuda else "cpu"
    if world_size is None:
        every_gpu = cuda and (device is None or device.index is None)
        return (torch.cuda.device_count() if every_gpu else 1), device_type
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if cuda and world_size > torch.cuda.device_count():
        raise ValueError(
            f"world_size {world_size}: only {torch.cuda.device_count()} GPU(s) visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return world_size, device_type


@contextlib.contextmanager
def _child_env(rank: int) -> Iterator[None]:
    """os.environ as a spawned rank starts with (spawn copies it at Process.start): progress
    bars from rank 0 only (tqdm reads TQDM_* variables as its defaults when imported)."""
    saved = dict(os.environ)
    if rank != 0:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL on cuda:LOCAL_RANK when a GPU is visible (or `backend` says so), gloo on
    the CPU otherwise. Prints come from rank 0 only; torchrun --local-ranks-filter 0 also hides
    the other ranks' progress bars (imported with torch, tqdm is past its TQDM_* defaults)."""
    needed = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    missing = [v for v in needed if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_from_env: {missing} unset; start this with torchrun (docs/multi_gpu.md)"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s)
    )
    return current()


# ---------------------------------------------------------------------------------- launch


def _run_rank(
    rank: int,
    world_size: int,
    device_type: str,
    port: int,
    timeout_s: float,
    fn: Callable,
    args: tuple,
    out_dir: str,
) -> None:
    """Body of a launched process: join the group, run fn(*args), keep rank 0's result; on an
    exception write the traceback (and when) for the parent and exit with code 1."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        timeout = datetime.timedelta(seconds=timeout_s)
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            backend = "nccl"
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
            backend = "gloo"
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        result = fn(*args)
        if rank == 0:
            with open(Path(out_dir) / RESULT_FILE, "wb") as f:
                pickle.dump(result, f)
        dist.destroy_process_group()
    except BaseException:
        record = {"time": time.time(), "rank": rank, "traceback": traceback.format_exc()}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
        sys.exit(1)


def _failure_message(out_dir: Path, world_size: int, first: int, exitcode: int) -> str:
    """The failed ranks' tracebacks, earliest first; when none wrote one, rank `first` (the first
    to die) is named with its exit code (killed, e.g. out of memory)."""
    records = [json.loads(path.read_text()) for path in out_dir.glob("rank*.json")]
    if not records:
        return (
            f"rank {first} of {world_size} died with exit code {exitcode} and no Python traceback "
            "(killed by a signal: out of memory?)"
        )
    earliest, *later = sorted(records, key=lambda r: (r["time"], r["rank"]))
    lines = [f"rank {earliest['rank']} of {world_size} failed:\n{earliest['traceback'].rstrip()}"]
    for other in later:
        last = other["traceback"].rstrip().splitlines()[-1]
        lines.append(f"then rank {other['rank']} failed: {last}")
    return "\n".join(lines)


def _stop(processes: list) -> None:
    """Terminate the started processes still running; kill those that outlast the grace."""
    started = [p for p in processes if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in started:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def launch(
    fn: Callable,
    args: tuple = (),
    world_size: int = 2,
    device_type: str = "cuda",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Any:
    """Run fn(*args) on `world_size` spawned ranks of one machine (NCCL, one GPU each, or gloo
    on the CPU) and return rank 0's result. `fn` must be importable (a module-level function of
    a package on sys.path, e.g. image.train.train_rank). A rank that fails stops every rank and
    raises RankFailed here with its traceback; so does one that outlives `timeout_s` in a
    collective. Scripts need the usual `if __name__ == "__main__":` guard of any spawn."""
    ctx = mp.get_context("spawn")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timeout, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="fusionnetx-ranks-") as tmp:
        processes = [
            ctx.Process(
                target=_run_rank,
                args=(rank, world_size, device_type, store.port, timeout_s, fn, args, tmp),
                name=f"rank{rank}",
            )
            for rank in range(world_size)
        ]
        try:
            for rank, p in enumerate(processes):
                with _child_env(rank):
                    p.start()
            running = list(processes)
            while running:
                wait([p.sentinel for p in running])
                for p in [p for p in running if not p.is_alive()]:
                    p.join()
                    running.remove(p)
                    if p.exitcode != 0:
                        _stop(processes)
                        first = processes.index(p)
                        raise RankFailed(_failure_message(Path(tmp), world_size, first, p.exitcode))
        finally:
            _stop(processes)
        with open(Path(tmp) / RESULT_FILE, "rb") as f:
            return pickle.load(f)


# ---------------------------------------------------------------------------------- sharding


class RankBatches(Sampler[list[int]]):
    """This rank's piece of every global batch of `sampler`'s draw (a DataLoader batch_sampler).

    Global batch s is draw[s*B : (s+1)*B], exactly as one process with batch B takes it; rank r
    of W takes its contiguous piece (shard_bounds of the batch's size). So the ranks' pieces are
    disjoint and together are the whole draw, in order, nothing dropped or repeated, and every
    rank takes the same number of steps, ceil(L / B), as DDP needs. Only a last batch smaller
    than W leaves a rank without an image: that rank takes the batch's first image again with
    loss weight 0 (`loss_weights`), a padding that adds nothing to the gradient.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size < world_size:
            raise ValueError(
                f"batch_size {batch_size} is the global batch, shared by {world_size} processes: "
                "it must be at least the number of processes"
            )
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def _sizes(self) -> Iterator[tuple[int, int, int]]:
        """(start of the global batch, its size, start and stop of this rank's piece)."""
        total = len(self.sampler)
        for start in range(0, total, self.batch_size):
            size = min(self.batch_size, total - start)
            yield start, size, *shard_bounds(size, self.rank, self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        draw = list(self.sampler)
        if len(draw) != len(self.sampler):
            raise RuntimeError(f"RankBatches: the sampler drew {len(draw)}, not {len(self)}")
        for start, _, lo, hi in self._sizes():
            piece = draw[start + lo : start + hi]
            yield piece or draw[start : start + 1]

    def loss_weights(self) -> list[float]:
        """Per step, this rank's weight on its mean loss: n_r * W / m (n_r its images, m the
        global batch's). DDP averages the ranks' gradients, so the weighted mean losses give
        the gradient of the global batch's mean loss, as one process computes it: 1.0 for every
        batch that W divides, 0.0 for a padding piece."""
        return [(hi - lo) * self.world_size / size for _, size, lo, hi in self._sizes()]


def gather_predictions(
    group: Group, ids: Sequence[str], predict: Callable[[list[str]], np.ndarray]
) -> np.ndarray:
    """predict(ids) with the work split over the ranks: each predicts its contiguous share, the
    shares are gathered and put back in `ids` order by id; every rank gets the whole array."""
    ids = list(ids)
    if not group.distributed:
        return predict(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("gather_predictions: duplicate ids cannot be joined back by id")
    lo, hi = shard_bounds(len(ids), group.rank, group.world_size)
    share = ids[lo:hi]
    by_id: dict[str, float] = {}
    for part_ids, part_pred in group.all_gather((share, np.asarray(predict(share)))):
        by_id.update(zip(part_ids, part_pred.tolist(), strict=True))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise RuntimeError(
            f"gather_predictions: no rank predicted {len(missing)} id(s), {missing[:3]}"
        )
    return np.array([by_id[i] for i in ids], dtype=np.float64)
