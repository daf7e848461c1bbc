"""`gmot distill DATA_DIR EXP_DIR`: train with GM-OT knowledge transfer from the PLM (from scratch or from a
pretrained checkpoint with --init-from: the two-stage schedule)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from gmot_cli.common import ExpDirArg, TrainOptions, error_exit, run_training, with_options
from models.engine.config import ExperimentConfig


@with_options(TrainOptions, "opts")
def distill(
    data_dir: Path = typer.Argument(
        ..., help="Prepared data folder (written by `gmot prepare`, with a PLM cache)."
    ),
    exp_dir: ExpDirArg = ...,
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
    *,
    opts: TrainOptions,
) -> None:
    """Train with the GM-OT (fgw) or Wasserstein (wd) knowledge-transfer loss; loss = ctc + kt_weight * kt."""
    if mode is not None and mode not in ("wd", "fgw"):
        raise error_exit(f"--mode must be wd or fgw, got {mode!r}")

    def check(cfg: ExperimentConfig, console: Console) -> None:
        if cfg.gmot.mode == "none":
            raise error_exit("distill needs a transfer mode: --mode wd or --mode fgw (gmot.mode is 'none')")

    extra = {
        "gmot.mode": mode,
        "gmot.alpha": alpha,
        "gmot.epsilon": epsilon,
        "gmot.structure": structure,
        "train.kt_weight": kt_weight,
    }
    run_training(data_dir, exp_dir, opts, extra=extra, init_from=init_from, check=check)


def register(app: typer.Typer) -> None:
    """Add `distill` to the app."""
    app.command("distill")(distill)
