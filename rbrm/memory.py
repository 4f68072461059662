"""Keep freed memory in the process: glibc's malloc otherwise hands it back to the kernel after every step.

A DPO step or a generation step frees and allocates the same large blocks again and again. By default glibc
serves blocks above its mmap threshold with fresh mappings and trims the heap's free top, so each step takes
fresh zeroed pages from the kernel: 88 million page faults and 8% of the CPU time in the kernel in one
`make compare` (docs/results/README.md, "Page faults"). `benchmarks/bench_allocator.py` measures the effect.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "RBRM_KEEP_FREED_MEMORY"  # "0" keeps glibc's defaults
# mallopt(3) parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only when 2 GiB lie free at the heap's top
TOP_PAD = 256 * 2**20  # grow the heap in steps of 256 MiB


def glibc():
    """The process's C library when it is glibc (which has mallopt), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Serve every block from the heap and keep freed ones for reuse (no mmap, no trimming); True if it took.

    The process's resident memory then stays near its peak instead of shrinking between steps. Off where
    RBRM_KEEP_FREED_MEMORY=0, and a no-op on other C libraries.
    """
    libc = None if os.environ.get(ENV, "1") == "0" else glibc()
    if libc is None:
        return False
    return all(libc.mallopt(option, value) == 1
               for option, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
