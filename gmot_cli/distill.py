"""`gmot distill DATA_DIR EXP_DIR`: train with GM-OT knowledge transfer from the PLM (from scratch or from a
pretrained checkpoint with --init-from: the two-stage schedule)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from gmot_cli.pretrain import PRESET_HELP, SET_HELP, fail, run_training
from models.engine.config import ExperimentConfig


def distill(
    data_dir: Path = typer.Argument(
        ..., help="Prepared data folder (written by `gmot prepare`, with a PLM cache)."
    ),
    exp_dir: Path = typer.Argument(..., help="Experiment folder; re-running the same command resumes it."),
    init_from: Path | None = typer.Option(
        None, "--init-from", help="Checkpoint (e.g. a pretrain avg.pt) whose encoder initialises the model."
    ),
    mode: str | None = typer.Option(
        None, "--mode", help="wd (Wasserstein only, alpha 0) or fgw (GM-OT) [gmot.mode]."
    ),
    alpha: float | None = typer.Option(None, "--alpha", help="FGW trade-off in [0, 1] [gmot.alpha]."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="Entropic regularisation [gmot.epsilon]."),
    structure: str | None = typer.Option(
        None, "--structure", help="Graph edges: cosine | temporal | hybrid [gmot.structure]."
    ),
    kt_weight: float | None = typer.Option(
        None, "--kt-weight", help="Weight of the transfer loss [train.kt_weight]."
    ),
    preset: str = typer.Option("demo", "--preset", help=PRESET_HELP),
    config: Path | None = typer.Option(None, "--config", help="YAML file merged over the preset."),
    overrides: list[str] | None = typer.Option(None, "--set", help=SET_HELP),
    epochs: int | None = typer.Option(None, "--epochs", help="Number of epochs (train.epochs)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (train.seed)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train with the GM-OT (fgw) or Wasserstein (wd) knowledge-transfer loss; loss = ctc + kt_weight * kt."""
    if mode is not None and mode not in ("wd", "fgw"):
        fail(Console(stderr=True), f"--mode must be wd or fgw, got {mode!r}", 2)

    def check(cfg: ExperimentConfig, console: Console) -> None:
        if cfg.gmot.mode == "none":
            fail(console, "distill needs a transfer mode: --mode wd or --mode fgw (gmot.mode is 'none')", 2)

    extra = {
        "gmot.mode": mode,
        "gmot.alpha": alpha,
        "gmot.epsilon": epsilon,
        "gmot.structure": structure,
        "train.kt_weight": kt_weight,
        "train.epochs": epochs,
        "train.seed": seed,
    }
    run_training(
        data_dir,
        exp_dir,
        preset=preset,
        config_file=config,
        overrides=overrides,
        extra=extra,
        device=device,
        init_from=init_from,
        check=check,
        progress=progress,
    )


def register(app: typer.Typer) -> None:
    """Add `distill` to the app."""
    app.command("distill")(distill)
