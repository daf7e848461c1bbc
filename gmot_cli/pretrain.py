"""`gmot pretrain DATA_DIR EXP_DIR`: train the conformer-CTC baseline (no knowledge transfer)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from gmot_cli.common import ExpDirArg, TrainOptions, is_main_rank, run_training, with_options
from models.engine.config import ExperimentConfig


@with_options(TrainOptions, "opts")
def pretrain(
    data_dir: Path = typer.Argument(..., help="Prepared data folder (written by `gmot prepare`)."),
    exp_dir: ExpDirArg = ...,
    init_from: Path | None = typer.Option(
        None,
        "--init-from",
        help="Checkpoint whose weights start the run (continue a baseline with a fresh schedule, "
        "the no-transfer control of a distill run).",
    ),
    *,
    opts: TrainOptions,
) -> None:
    """Train a conformer-CTC recogniser without knowledge transfer (the baseline and stage one of distill)."""

    def check(cfg: ExperimentConfig, console: Console) -> None:
        if cfg.gmot.mode != "none":
            if is_main_rank():
                console.print(
                    Text(
                        f"note: pretrain trains without transfer; gmot.mode {cfg.gmot.mode!r} set to 'none' "
                        "(use `gmot distill` for transfer)",
                        style="yellow",
                    )
                )
            cfg.gmot.mode = "none"

    cfg_has_mode = any(o.split("=", 1)[0].strip() == "gmot.mode" for o in opts.overrides or [])
    extra = {"gmot.mode": "none"} if not cfg_has_mode and opts.config is None else {}
    run_training(data_dir, exp_dir, opts, extra=extra, init_from=init_from, check=check)


def register(app: typer.Typer) -> None:
    """Add `pretrain` to the app."""
    app.command("pretrain")(pretrain)
