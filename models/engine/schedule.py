"""Schedules over optimiser steps: the learning rate (warm-up, then noam / cosine / linear / constant) and
the transfer weight's ramp and decay."""

from __future__ import annotations

import math

from models.engine.config import ExperimentConfig, TrainConfig


def _decay_fraction(s: int, warm: int, total_steps: int) -> float:
    """How far 1-based step `s` is through the decay that follows `warm` warm-up steps: 0 until the
    warm-up ends, 1 at step `total_steps` and after."""
    return min(max((s - warm) / max(total_steps - warm, 1), 0.0), 1.0)


def lr_at(step: int, cfg: ExperimentConfig, total_steps: int) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warm-up to train.lr, then train.schedule."""
    t = cfg.train
    warm = max(t.warmup_steps, 0)
    s = step + 1
    if s <= warm:
        return t.lr * s / warm
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "noam":
        return t.lr * math.sqrt(max(warm, 1) / s)
    frac = _decay_fraction(s, warm, total_steps)
    floor = t.min_lr_ratio * t.lr
    if t.schedule == "linear":
        return floor + (t.lr - floor) * (1.0 - frac)
    return floor + (t.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def kt_weight_at(step: int, t: TrainConfig, total_steps: int) -> float:
    """The transfer weight at optimiser step `step` (0-based) of a run of `total_steps` steps: kt_weight,
    ramped linearly from 0 over the first kt_warmup_steps steps when that is set, and with
    `kt_decay: cosine` multiplied by a cosine from 1 (the end of the learning rate's warm-up) to 0 (the
    last step)."""
    s = step + 1
    weight = t.kt_weight
    if t.kt_warmup_steps > 0:
        weight *= min(1.0, s / t.kt_warmup_steps)
    if t.kt_decay == "cosine":
        frac = _decay_fraction(s, max(t.warmup_steps, 0), total_steps)
        weight *= 0.5 * (1.0 + math.cos(math.pi * frac))
    return weight
