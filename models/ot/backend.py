"""Which loop computes the CPU projections and square products of `models.ot`: the numba-compiled kernels
(`models.ot._sinkhorn_cpu`) or batched torch operations (as on a GPU and under ``grad="unrolled"``).

`CPU_LOOP` is "compiled" (the default; falls back to "torch" with a warning when numba cannot be imported)
or "torch"; the environment variable GMOT_CPU_LOOP sets it at import, and assigning
``models.ot.backend.CPU_LOOP`` changes it afterwards.
"""

from __future__ import annotations

import functools
import os
import types
import warnings

import torch
from torch import Tensor

__all__ = ["CPU_LOOP", "compiled_kernels", "compiled_loop_for"]

_CPU_LOOPS = ("compiled", "torch")
CPU_LOOP = os.environ.get("GMOT_CPU_LOOP", "compiled")


def compiled_loop_for(kernel: Tensor) -> bool:
    """Whether the projections and square products of ``kernel``'s problem run in `models.ot._sinkhorn_cpu`
    (CPU, float32/64, numba importable, `CPU_LOOP` "compiled") rather than as torch operations."""
    if CPU_LOOP not in _CPU_LOOPS:
        raise ValueError(
            f"GMOT_CPU_LOOP / models.ot.backend.CPU_LOOP: must be one of {_CPU_LOOPS}, got {CPU_LOOP!r}"
        )
    if CPU_LOOP != "compiled" or kernel.device.type != "cpu":
        return False
    return kernel.dtype in (torch.float32, torch.float64) and compiled_kernels() is not None


@functools.cache
def compiled_kernels() -> types.ModuleType | None:
    """models.ot._sinkhorn_cpu, or None (with a warning, once) where numba cannot be imported."""
    try:
        from . import _sinkhorn_cpu as sinkhorn_cpu
    except ImportError as err:
        warnings.warn(
            f"numba is not importable ({err}); the CPU Sinkhorn projections run as torch operations, "
            "and an FGW call takes up to 1.7x as long",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return sinkhorn_cpu
