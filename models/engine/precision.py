"""Numeric precision of training: which autocast dtype a device gets, and the gradient scaler fp16 needs.

- CUDA with bfloat16 (Ampere and newer): bf16 autocast, no scaler;
- CUDA without it (Volta, Turing): fp16 autocast with a dynamic GradScaler (fp16's range needs loss scaling);
- CPU with native bf16 (AVX512-BF16 or AMX): bf16 autocast (1.7-1.9x faster per demo step on an EPYC here);
- anything else, or `train.bf16=false`: float32.
Losses are computed in float32 outside the autocast region either way.

The scaler takes every non-finite gradient for an fp16 overflow: it skips the step and halves its scale. A
real NaN (a diverging model, a bad batch) overflows at every scale, so the scale would fall until the
gradients underflow and training would stall without a word. `overflow_is_nan` says when an overflow is to
be counted as a NaN step instead (the engine then stops after train.max_nan_steps of them, as for any NaN).
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch

Precision = Literal["bf16", "fp16", "fp32"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 matmuls natively (AVX512-BF16 or AMX), where autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_has_bf16(device: torch.device) -> bool:
    """True when the CUDA device computes bfloat16 natively (compute capability 8.0 or newer)."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def choose_precision(device: torch.device, mixed: bool) -> Precision:
    """The precision of a training run on `device`; `mixed` is train.bf16 (False forces fp32)."""
    if not mixed:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if cuda_has_bf16(device) else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


SCALE_FLOOR = 1.0
"""Below this loss scale an fp16 overflow is taken for a NaN: the gradients are scaled down, not up, so they
overflow fp16's range (65,504) only when they are non-finite or huge whatever the scale."""
MAX_OVERFLOW_STREAK = 20
"""This many fp16 overflow skips in a row are taken for a NaN whatever the scale: a scale that is merely too
high is cured by a few halvings in a row (one after each doubling, a handful at the start), not twenty."""


def overflow_is_nan(streak: int, scale: float) -> bool:
    """Whether an fp16 overflow skip counts as a NaN step: `streak` overflow skips in a row (this one
    included) and `scale` the loss scale after the scaler's update; True from MAX_OVERFLOW_STREAK skips in a
    row or once the scale is below SCALE_FLOOR."""
    return streak >= MAX_OVERFLOW_STREAK or scale < SCALE_FLOOR


def autocast_for(device: torch.device, precision: Precision) -> AbstractContextManager[Any]:
    """The autocast context of `precision` on `device` (a no-op context for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def autocast_bf16(device: torch.device, enabled: bool) -> AbstractContextManager[Any]:
    """Autocast as `choose_precision(device, enabled)` picks it (used by evaluation passes)."""
    return autocast_for(device, choose_precision(device, enabled))


def grad_scaler(precision: Precision) -> torch.amp.GradScaler:
    """A dynamic loss scaler, enabled only for fp16 (a pass-through otherwise, so callers use it always)."""
    return torch.amp.GradScaler("cuda", enabled=precision == "fp16")
