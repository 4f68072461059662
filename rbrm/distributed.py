"""The processes of one run under a launcher (`torchrun`, `accelerate launch`): which one this is, and the few
collectives a data-parallel stage needs. With one process every function here is a no-op, so a run takes the same
code path on one process as on many.

A stage that runs on every process (the probe's features, sampling, re-ranking, DPO, an evaluation's answers) does
so inside `data_parallel()`. There `generate_responses` and `extract_features` split their batches over the
processes (`my_turn`) and share the results (`gather`, `sum_tensor`), and only the main process writes files. Every other
stage runs on the main process alone while the others wait for its record (`RunContext.run`). DPO needs nothing
from here: TRL's trainer runs data-parallel under the same process group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

# A process that waits while the main one runs a stage alone (a probe, a judge) must not time out.
WAIT = datetime.timedelta(hours=12)
# Features are summed across processes in row blocks of this many, so a large feature matrix is never copied whole.
SUM_BLOCK_ROWS = 256

_data_parallel = [False]  # inside `data_parallel()`; a list so the context manager can set it


def launched() -> bool:
    """True in a process a launcher started as one of several (it sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the launcher's process group (gloo on CPUs, NCCL on GPUs), once; nothing without a launcher."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=WAIT)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(value: Any = None) -> Any:
    """The main process's `value`, on every process (JSON-like values: records and flags)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def data_parallel() -> Iterator[None]:
    """Every process runs the body together: generation and feature extraction split their batches."""
    _data_parallel[0] = True
    try:
        yield
    finally:
        _data_parallel[0] = False


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """The main process's own part of a parallel stage (judging the answers all processes made): nothing split."""
    was, _data_parallel[0] = _data_parallel[0], False
    try:
        yield
    finally:
        _data_parallel[0] = was


def splitting() -> bool:
    """True where work is split over several processes (inside `data_parallel()` of a launched run)."""
    return _data_parallel[0] and world_size() > 1


def split_ways() -> int:
    """Over how many processes a loop is split here: the world inside `data_parallel()`, else 1."""
    return world_size() if splitting() else 1


def my_turn(index: int) -> bool:
    """Whether the `index`-th batch of a split loop is this process's (round robin); always True unsplit."""
    return not splitting() or index % world_size() == rank()


def gather(value: Any) -> list:
    """Every process's `value`, in process order, on every process; `[value]` unsplit."""
    if not splitting():
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over the processes (a tensor each process filled in its own rows, zeros elsewhere:
    the sum is exact), block by block; `tensor` itself unsplit."""
    if not splitting():
        return tensor
    device, out = _collective_device(), torch.empty_like(tensor)
    for start in range(0, tensor.shape[0], SUM_BLOCK_ROWS):
        block = tensor[start:start + SUM_BLOCK_ROWS].to(device)
        dist.all_reduce(block)
        out[start:start + SUM_BLOCK_ROWS] = block.to(tensor.device)
    return out


def sum_numbers(*values: float) -> list[float]:
    """Each number summed over the processes (counts each process kept of its own work), also outside
    `data_parallel()` (DPO's token counts)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()
