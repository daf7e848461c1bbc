"""`gmot pretrain DATA_DIR EXP_DIR`: train the conformer-CTC baseline (no knowledge transfer).

The options shared with `gmot distill` and the error handling live here too (`run_training`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from data.store import StoreError
from gmot_cli.errors import error_exit
from models.engine.checkpoint import CheckpointError
from models.engine.config import PRESET_NAMES, ConfigError, ExperimentConfig, resolve_config
from models.engine.preemption import Preempted
from models.engine.training import TrainingError, TrainOutcome, train

PRESET_HELP = f"Starting configuration: {' | '.join(PRESET_NAMES)} (tiny is for tests)."
SET_HELP = "Override one config key, e.g. --set train.lr=0.002 --set model.num_layers=8 (repeatable)."


def fail(console: Console, message: str, code: int = 1) -> None:
    """Print `error: message` in red (no markup interpretation) and exit with `code`."""
    raise error_exit(console, message, code)


def run_training(
    data_dir: Path,
    exp_dir: Path,
    *,
    preset: str,
    config_file: Path | None,
    overrides: list[str] | None,
    extra: dict[str, Any],
    device: str,
    init_from: Path | None = None,
    check: Any = None,
    progress: bool = True,
) -> TrainOutcome:
    """Resolve the config (preset, file, --set, named options), train, and turn our errors into messages.

    `check(cfg, console)` may reject a resolved config (it calls `fail`). ConfigError exits 2, other known
    errors exit 1; SIGTERM exits 143 and Ctrl-C (SIGINT) 130 after a checkpoint of the current step, a
    second Ctrl-C 130 at once, each with a hint to resume.
    """
    console = Console(stderr=True)
    try:
        cfg: ExperimentConfig = resolve_config(preset, config_file, overrides or [], extra)
    except ConfigError as err:
        fail(console, str(err), 2)
    if check is not None:
        check(cfg, console)
    try:
        outcome = train(
            data_dir, exp_dir, cfg, init_from=init_from, device=device, console=console, progress=progress
        )
    except (TrainingError, CheckpointError, StoreError) as err:
        fail(console, str(err))
    except Preempted as err:
        if int(os.environ.get("RANK", "0")) == 0:
            console.print(Text(str(err), style="yellow"))
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        console.print(
            Text("interrupted; re-run the same command to resume from the last checkpoint", style="yellow")
        )
        raise typer.Exit(130) from None
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone reports
        return outcome
    out = Console()
    if outcome.dev_cer:
        best = min(outcome.dev_cer, key=lambda e: outcome.dev_cer[e])
        out.print(f"best dev CER {100 * outcome.dev_cer[best]:.2f} % at epoch {best}", markup=False)
    if outcome.average is not None:
        cer = "" if outcome.average_cer is None else f" (dev CER {100 * outcome.average_cer:.2f} %)"
        out.print(f"model: {outcome.average}{cer}", markup=False)
    if outcome.skipped_inf or outcome.skipped_nan:
        out.print(
            f"skipped batches: {outcome.skipped_inf} with infinite CTC loss, {outcome.skipped_nan} NaN",
            markup=False,
        )
    return outcome


def pretrain(
    data_dir: Path = typer.Argument(..., help="Prepared data folder (written by `gmot prepare`)."),
    exp_dir: Path = typer.Argument(..., help="Experiment folder; re-running the same command resumes it."),
    init_from: Path | None = typer.Option(
        None,
        "--init-from",
        help="Checkpoint whose weights start the run (continue a baseline with a fresh schedule, "
        "the no-transfer control of a distill run).",
    ),
    preset: str = typer.Option("demo", "--preset", help=PRESET_HELP),
    config: Path | None = typer.Option(None, "--config", help="YAML file merged over the preset."),
    overrides: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    epochs: int | None = typer.Option(None, "--epochs", help="Number of epochs (train.epochs)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (train.seed)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train a conformer-CTC recogniser without knowledge transfer (the baseline and stage one of distill)."""

    def check(cfg: ExperimentConfig, console: Console) -> None:
        if cfg.gmot.mode != "none":
            if int(os.environ.get("RANK", "0")) == 0:
                console.print(
                    Text(
                        f"note: pretrain trains without transfer; gmot.mode {cfg.gmot.mode!r} set to 'none' "
                        "(use `gmot distill` for transfer)",
                        style="yellow",
                    )
                )
            cfg.gmot.mode = "none"

    extra = {"train.epochs": epochs, "train.seed": seed}
    overrides = [*(overrides or [])]
    cfg_has_mode = any(o.split("=", 1)[0].strip() == "gmot.mode" for o in overrides)
    if not cfg_has_mode and config is None:
        extra["gmot.mode"] = "none"
    run_training(
        data_dir,
        exp_dir,
        preset=preset,
        config_file=config,
        overrides=overrides,
        extra=extra,
        init_from=init_from,
        device=device,
        check=check,
        progress=progress,
    )


def register(app: typer.Typer) -> None:
    """Add `pretrain` to the app."""
    app.command("pretrain")(pretrain)
