"""The attributes that the parts of `models.engine.training.Trainer` share, declared once: the Trainer is the
loop (models.engine.training) and four mixins (train_data, run_state, step, evaluation), each a subclass of
`TrainerBase`, which read and set these attributes on the one Trainer object.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from rich.console import Console
    from torch import Tensor, nn

    from data.loader import BucketBatchSampler, FrequencyWarp, SpecAugment, SpeechDataset
    from data.store import PLMInfo
    from models.engine.config import ExperimentConfig
    from models.engine.distributed import DistInfo
    from models.engine.outcome import TrainOutcome
    from models.engine.preemption import StopSignals
    from models.engine.run_log import MetricsLogger
    from models.nn.plm import PLMTeacher
    from models.nn.transfer_loss import GMOTLoss


class TrainerBase:
    """Declarations only (no behaviour): who sets each attribute is said above its group."""

    # Trainer.__init__ (the arguments, the process and its device)
    data_dir: Path
    exp_dir: Path
    cfg: ExperimentConfig
    init_from: Path | None
    command: list[str] | None
    console: Console
    show_progress: bool
    dd: DistInfo
    device: torch.device
    mode: str
    use_kt: bool
    outcome: TrainOutcome

    # train_data._load_data
    vocab: list[str]
    cmvn: tuple[np.ndarray, np.ndarray]
    frontend: str
    plm_info: PLMInfo | None
    train_set: SpeechDataset
    dev_set: SpeechDataset | None
    teacher: PLMTeacher | None
    """The online PLM teacher when there is no feature cache."""
    plm_width: int | None
    sampler: BucketBatchSampler
    steps_per_epoch: int

    # run_state._build and _resume_or_init; the counters are updated by the step
    model: nn.Module
    optimizer: torch.optim.Optimizer
    kt_loss: GMOTLoss | None
    precision: str
    scaler: torch.amp.GradScaler
    freq_warp: FrequencyWarp
    spec_augment: SpecAugment
    step: int
    epoch: int
    total_steps: int
    micro: int
    """The micro-batch's position in its accumulation (0 for the first)."""
    nan_streak: int
    overflow_streak: int
    grad_ratio: Tensor | None
    halt: str | None
    """Set by a step when the ranks are to stop: "write" (a failed write) or "signal"."""
    epoch_sums: dict[str, float]
    dev_alignment: dict[str, float]

    # Trainer._run, _train_epoch and the step's log window
    logger: MetricsLogger
    stop: StopSignals
    window: dict[str, float]
    window_n: int
    window_ratio: float | None
    window_wait: float
    """Seconds spent waiting for batches since the last train record (the data loader's share)."""
    window_started: float
    """time.perf_counter() at the last train record."""
    epoch_wait: float
    """Seconds spent waiting for batches in this epoch."""

    # methods one part calls on another
    _say: Callable[[str], None]
    _best: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
    _agree_on_writes: Callable[[tuple[OSError, Path] | None], None]
