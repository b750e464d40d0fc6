"""Peak resident memory of a block of code on CPU, for the benchmarks (Linux only).

torch's CPU allocator keeps no statistics, so the benchmarks read the kernel's high-water mark of the process's
resident set (``VmHWM``), reset it before the measured block (``/proc/self/clear_refs`` = 5) and report its growth
over the resident set at the start. Unlike wall time, this does not depend on the machine's load.

glibc returns a freed block to the kernel only if it was mmap-ed, and it raises its mmap threshold after each such
free (up to 32 MiB), after which freed tensors stay in the heap: then the resident set stops tracking live tensors
and the measured peaks depend on the order of the measurements. :func:`fix_malloc` re-executes the script once with
``MALLOC_MMAP_THRESHOLD_`` set, which fixes the threshold at 128 KiB (every tensor above it is mmap-ed and returned
when freed), so that the resident set follows the live tensors.
"""

from __future__ import annotations

import os
import sys

THRESHOLD = "131072"


def fix_malloc() -> None:
    """Re-execute this script with a fixed glibc mmap threshold (once; no-op if it is already set)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != THRESHOLD:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = THRESHOLD
        os.execv(sys.executable, [sys.executable, *sys.argv])


def _status(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_growth_mib(fn) -> tuple[float, object]:
    """Run ``fn()``; return (peak resident set during it minus the resident set before it, in MiB; fn's result)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status("VmRSS")
    result = fn()
    return _status("VmHWM") - before, result
