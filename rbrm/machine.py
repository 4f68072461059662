"""The machine a run's figures came from, and how much of its CPU other work took while a stage ran.

Float results differ across CPUs and thread counts in the last digits, and wall seconds mean little when other
processes share the cores: the report records both so a reader knows which figures are speed figures.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

import torch

from .precision import cpu_identity, cpu_precision

# Libraries whose versions change the numbers (kernels, sampling, training, judging); the report records them.
VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "numpy", "scikit-learn", "sentence-transformers",
             "tokenizers", "safetensors")


def matrix_flags(info: dict) -> list[str]:
    """The CPU's bf16 and AMX instructions among `machine()`'s flags: what the matmul kernels can use."""
    return [f for f in info.get("cpu_flags", []) if "bf16" in f or "amx" in f]


def machine_summary(info: dict | None = None) -> str:
    """One line for benchmarks: the CPU, threads, kernels and the bf16/AMX instructions it has."""
    info = info or machine()
    flags = matrix_flags(info)
    return (f"{info.get('cpu') or info['platform']}; {info['torch_threads']} threads; {info['cpu_capability']} "
            "kernels" + (f" ({', '.join(flags)})" if flags else ", no bf16/AMX instructions")
            + f"; {precision_summary(info.get('cpu_precision'))}" + (f"; GPU {info['gpu']}" if info.get("gpu") else ""))


def precision_summary(choice: dict | None) -> str:
    """`CPU precision bf16 (measured: fp32 364, bf16 198 GFLOP/s)`: what `auto` runs on the CPU, and why."""
    if not choice:
        return "CPU precision unknown"
    gflops = choice.get("gflops") or {}
    speeds = ", ".join(f"{name} {v['all']:.0f}" for name, v in gflops.items())
    return f"CPU precision {choice['choice']} ({choice.get('source')}" + (f": {speeds} GFLOP/s)" if speeds else ")")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """At most `n` torch intra-op threads inside, restored after: for many small ops (a 600 x 600 eigh, L-BFGS
    on [32, 600] probes), whose threads mostly wait on each other. Where other processes share the cores each
    wait can last a scheduler slice: on 2 shared cores the staged probe fit of 602 x 32 x 4096 took 94 s with
    2 threads and 6 s with 1 (a 602 x 602 eigh: 8.6 s against 0.06 s)."""
    before = torch.get_num_threads()
    if n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine() -> dict:
    """What the figures of a run depend on beyond its config: CPU (and its matrix instructions), threads, versions,
    and the precision `auto` picks on this CPU with the matmul speeds it was picked by.

    Float results differ across CPUs and thread counts in the last digits (docs/results/README.md measures it).
    """
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    identity = cpu_identity()
    if identity["cpu"] is not None or identity["flags"]:
        info["cpu"] = identity["cpu"]
        info["cpu_flags"] = sorted(set(identity["flags"]) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    info["cpu_precision"] = cpu_precision()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE"):
        if os.environ.get(name):
            info[name] = os.environ[name]
    info["versions"] = {}
    for package in VERSIONED:
        try:
            info["versions"][package] = version(package)
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# Above this share of the machine's CPU time going to other processes, a stage's wall seconds are not a speed figure.
SHARED_CPU_THRESHOLD = 0.05


def cpu_counters() -> tuple[float, float, float] | None:
    """(busy CPU seconds of the whole machine, all its CPU seconds, this process's own CPU seconds) now.

    From /proc/stat and os.times (threads and waited-for children included); None where /proc/stat is missing.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    t = os.times()
    return (sum(fields) - idle) / tick, sum(fields) / tick, t.user + t.system + t.children_user + t.children_system


def other_cpu_seconds(before: tuple | None, after: tuple | None) -> tuple[float, float] | None:
    """(CPU seconds other processes used, all CPU seconds the machine had) between two `cpu_counters()` readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    total = after[1] - before[1]
    others = (after[0] - before[0]) - (after[2] - before[2])  # clock ticks: clamp the rounding at 0 and at all
    return min(max(0.0, others), total), total
