"""What a `train` call ends with: `TrainOutcome` when it finishes, `TrainingError` when it cannot go on
(`TrainingSetupError`, a TrainingError, when it cannot start). All are part of models.engine.training's public
API (imported there)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class TrainingError(RuntimeError):
    """A run that cannot start or go on (bad data folder, NaN storm, GPU out of memory); says what to do."""


class TrainingSetupError(TrainingError):
    """A run that cannot start because of what it was given (a data folder that is not prepared or is
    broken, a teacher control the data cannot serve, no usable utterance, a device that is not there): the
    command line's usage error (exit 2), where a TrainingError met while training is a failed run (exit 1)."""


@dataclass
class TrainOutcome:
    """What a finished `train` call did (rank 0's view)."""

    exp_dir: Path
    epochs_done: int
    step: int
    resumed_from: Path | None
    dev_cer: dict[int, float] = field(default_factory=dict)
    """Dev CER (fraction) per epoch trained or found in the experiment's index."""
    skipped_inf: int = 0
    """Batches skipped because their CTC loss was infinite (this call)."""
    skipped_nan: int = 0
    """Steps skipped because the loss or gradient was NaN (this call)."""
    average: Path | None = None
    """avg.pt when it was written."""
    average_cer: float | None = None
