"""On a CPU, fp32 or bf16 by what is faster on this machine: a short matmul calibration, cached per machine.

The instruction flags do not decide it: an Intel Xeon with AVX512-BF16 but no AMX multiplies bf16 matrices at half
its fp32 speed (198 against 364 GFLOP/s), while an AMD EPYC with AVX512-BF16 runs bf16 faster. So where the CPU
has native bf16 instructions both precisions are timed once, and the result is kept in the user cache under the
CPU model, its flags, torch's version and the thread count. Without native bf16 instructions bf16 is emulated
(slow, and not worth timing): fp32. `RBRM_CPU_PRECISION=fp32|bf16` forces the choice.
"""

from __future__ import annotations

import datetime
import logging
import os
import time

import torch

from .errors import ConfigError
from .files import cache_dir, json_digest, read_json_file, write_json

ENV = "RBRM_CPU_PRECISION"
CHOICES = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The feature extractor's typical product (512 tokens x a 576-wide state -> a 1536-wide MLP), and a large square one.
SHAPES = ((512, 576, 1536), (2048, 2048, 2048))
# bf16 rounds more: chosen only where it is clearly faster, so timing noise does not flip the choice.
BF16_MARGIN = 1.10
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CACHE_FILE = "cpu_precision.json"


def cpu_identity() -> dict:
    """The CPU's model name and all its flags, from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return {"cpu": None, "flags": []}
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return {"cpu": name, "flags": sorted(set(flags))}


def has_bf16_instructions(flags: list[str] | None = None) -> bool:
    """Native bf16 matrix instructions (AVX512-BF16 or AMX): without them torch emulates bf16."""
    flags = cpu_identity()["flags"] if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def matmul_gflops(dtype: torch.dtype, shapes=SHAPES, repeats: int = 3, budget_s: float = 0.25) -> dict[str, float]:
    """GFLOP/s of `[m,k] x [k,n]` in `dtype` per shape (best of up to `repeats` after a warm-up, each shape
    stopping after `budget_s`), and over all of them ("all": total FLOPs / the best times' sum). Shapes after
    4 `budget_s` are skipped: a precision that slow has lost already."""
    g = torch.Generator().manual_seed(0)
    out, flops, seconds, began = {}, 0.0, 0.0, time.perf_counter()
    for m, k, n in shapes:
        if out and time.perf_counter() - began > 4 * budget_s:
            break
        a = torch.randn(m, k, generator=g).to(dtype)
        b = torch.randn(k, n, generator=g).to(dtype)
        torch.mm(a, b)  # warm-up: kernel selection, page faults
        best, spent = float("inf"), 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
            if spent > budget_s:
                break
        out[f"{m}x{k}x{n}"] = float(f"{2 * m * k * n / best / 1e9:.4g}")
        flops, seconds = flops + 2 * m * k * n, seconds + best
    out["all"] = float(f"{flops / seconds / 1e9:.4g}")
    return out


def machine_key(identity: dict | None = None) -> dict:
    """What the measured speeds depend on; a change in any of these measures again."""
    identity = identity or cpu_identity()
    return {"cpu": identity["cpu"], "flags": identity["flags"], "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def cpu_precision() -> dict:
    """{"choice": "fp32" | "bf16", "source": why, "gflops": {"fp32": .., "bf16": ..} where measured}.

    `source`: the environment variable, "no bf16 instructions", "cached" or "measured" (a few hundred ms, once
    per machine, CPU, torch version and thread count)."""
    forced = _forced()
    if forced:
        return {"choice": forced, "source": ENV}
    identity = cpu_identity()
    if not has_bf16_instructions(identity["flags"]):
        return {"choice": "fp32", "source": "no bf16 instructions"}
    key = machine_key(identity)
    digest = json_digest(key)
    path = cache_dir() / CACHE_FILE
    cached = _read_cache(path)
    record = cached.get(digest)
    if isinstance(record, dict) and record.get("choice") in CHOICES:
        return {"choice": record["choice"], "source": "cached", "gflops": record.get("gflops")}
    gflops = {name: matmul_gflops(dtype) for name, dtype in DTYPES.items()}
    choice = "bf16" if gflops["bf16"]["all"] >= BF16_MARGIN * gflops["fp32"]["all"] else "fp32"
    cached[digest] = {"choice": choice, "gflops": gflops, "cpu": key["cpu"], "threads": key["threads"],
                      "torch": key["torch"], "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(
                          timespec="seconds")}
    try:
        write_json(path, _read_cache(path) | {digest: cached[digest]})  # another process's entries are kept
    except OSError as err:  # a read-only cache: measured again next time, the choice stands
        logging.getLogger(__name__).warning("could not cache the CPU precision in %s: %s", path, err)
    return {"choice": choice, "source": "measured", "gflops": gflops}


def cpu_prefers_bf16() -> bool:
    """True where bf16 is this CPU's faster precision (see `cpu_precision`)."""
    return cpu_precision()["choice"] == "bf16"


def _forced() -> str | None:
    value = (os.environ.get(ENV) or "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in CHOICES:
        raise ConfigError(f"{ENV}={value!r}: expected fp32, bf16 or auto")
    return value


def _read_cache(path) -> dict:
    """The cache's entries; an unreadable or foreign file counts as empty (it is only a cache)."""
    try:
        data = read_json_file(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
