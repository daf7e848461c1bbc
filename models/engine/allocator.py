"""Keep freed memory in the process instead of handing it back to the kernel after every training step.

glibc's malloc serves large requests (above a threshold that starts at 128 KiB and adapts up to 32 MiB) with
their own mmap and returns them with munmap on free, and trims the heap top once 128 KiB are free. A training
step allocates and frees the same activations every time, so each step maps them afresh and the kernel zeroes
every page on its first touch: about 17,000 minor page faults a step on the demo preset here (1.17 M in a
44-step epoch), and on some machines a quarter of the step's time in the kernel. With mmap off and trimming
only above 1 GiB, freed blocks stay in the heap and the next step reuses them: the faults that remain are the
first touch of the working set while the heap grows to the largest step's size.

Why mmap off and not only a higher threshold: glibc caps its mmap threshold at 32 MiB, and the aishell1
preset's larger activations (a 4,000-frame batch's subsampling output is about 37 MiB in bf16) went on being
mapped and unmapped every step, 26,000-97,000 faults a step at that preset. With mmap off they come from the
heap too, and glibc still maps a block when the heap cannot grow. Only where memory comes from changes:
results are bitwise the same (tested).

`keep_freed_memory()` is called by the training engine; `GMOT_MALLOC=default` leaves glibc's defaults.
Where the C library is not glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
MMAP_MAX = 0  # no request is mapped on its own, however large (the heap serves it)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free memory at the heap top
ENV = "GMOT_MALLOC"

_state: str | None = None


def keep_freed_memory() -> str:
    """Turn glibc's per-request mmap off and set its trim threshold to 1 GiB, once per process.

    Returns what is in effect, for the run's log: "glibc: freed memory kept (no mmap, trim 1 GiB)",
    "glibc defaults (GMOT_MALLOC=default)" or "not glibc: allocator unchanged".
    """
    global _state
    if _state is not None:
        return _state
    if os.environ.get(ENV, "").strip().lower() == "default":
        _state = f"glibc defaults ({ENV}=default)"
        return _state
    if platform.libc_ver()[0] != "glibc":
        _state = "not glibc: allocator unchanged"
        return _state
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_MMAP_MAX, MMAP_MAX) == 1 and ok
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        ok = False
    _state = (
        "glibc: freed memory kept (no mmap, trim 1 GiB)"
        if ok
        else "glibc: mallopt refused, allocator unchanged"
    )
    return _state
