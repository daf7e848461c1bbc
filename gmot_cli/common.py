"""What the gmot commands share: the exit-code rule and its one error helper, the training runner of
`gmot pretrain` and `gmot distill` with their common options, and the printing of a score (`gmot score`,
`gmot decode`).

The exit-code rule (EXIT_CODES_HELP, shown under `gmot --help`): USAGE_ERROR (2) when a command refuses to
start because of what it was given, RUN_FAILED (1) when the work started and failed. Every command ends a
user-facing error with `raise error_exit(message, code)`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, get_args, get_type_hints

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from data.scoring import ScoreResult
from data.store import StoreError
from models.engine.checkpoint import CheckpointError
from models.engine.config import PRESET_NAMES, ConfigError, ExperimentConfig, resolve_config
from models.engine.preemption import Preempted
from models.engine.training import TrainingError, TrainingSetupError, TrainOutcome, train

RUN_FAILED = 1
USAGE_ERROR = 2
EXIT_CODES_HELP = (
    "Exit codes: 0 done. 2 a usage error, the command refused to start: a bad option value or combination, "
    "an unknown preset or config key, an input that is missing or cannot be used (a data folder or split "
    "that is not prepared, a file, a checkpoint that is missing, corrupt or of another model), a missing "
    "optional package or tool. 1 a failed run, the work started and failed: training stopped (NaN, out of "
    "memory, broken data found while training), a prepared split ended empty, output could not be written, "
    "export --compare found differing transcripts. 130 / 143 training stopped by Ctrl-C / SIGTERM after a "
    "checkpoint (re-run the same command to resume)."
)

err_console = Console(stderr=True)
"""Where every command prints its errors, warnings and progress."""


def error_exit(message: str, code: int = USAGE_ERROR) -> typer.Exit:
    """Print `error: message` in red on stderr (markup in `message` is not interpreted) and return the
    typer.Exit to raise; `code` is USAGE_ERROR (2) or RUN_FAILED (1) by the rule of EXIT_CODES_HELP."""
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def require_device(device: str) -> None:
    """A usage error (exit 2) when `device` (cpu, auto, cuda, cuda:N) asks for CUDA and there is none."""
    if device.lower().startswith("cuda") and not torch.cuda.is_available():
        raise error_exit(f"--device {device} asked for CUDA but no CUDA device is available")


def is_main_rank() -> bool:
    """True unless this process is a torchrun rank other than 0 (only rank 0 reports)."""
    return int(os.environ.get("RANK", "0")) == 0


# --- the options and the runner of `gmot pretrain` and `gmot distill` ---------------------------------------

ExpDirArg = Annotated[Path, typer.Argument(help="Experiment folder; re-running the same command resumes it.")]


@dataclass
class TrainOptions:
    """The options `gmot pretrain` and `gmot distill` share, declared once (see with_options)."""

    preset: Annotated[
        str,
        typer.Option(
            "--preset", help=f"Starting configuration: {' | '.join(PRESET_NAMES)} (tiny is for tests)."
        ),
    ] = "demo"
    config: Annotated[Path | None, typer.Option("--config", help="YAML file merged over the preset.")] = None
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override one config key, e.g. --set train.lr=0.002 --set model.num_layers=8 (repeatable).",
        ),
    ] = None
    epochs: Annotated[int | None, typer.Option("--epochs", help="Number of epochs (train.epochs).")] = None
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed (train.seed).")] = None
    device: Annotated[
        str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")
    ] = "auto"
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True


def with_options(
    options_cls: type, name: str, notes: dict[str, str] | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate a command `f(..., *, <name>: options_cls)`, options_cls a dataclass whose fields are typed
    `Annotated[type, typer.Option(...)]` with the option's default: typer sees those fields as the command's
    last options, in field order, and `f` gets them as one options_cls built by keyword. `notes` maps a field
    name to text added to its help."""
    hints = get_type_hints(options_cls, include_extras=True)
    shared = []
    for f in fields(options_cls):
        if f.init:
            kind, option = get_args(hints[f.name])
            if notes and f.name in notes:
                option = copy.copy(option)
                option.help = f"{option.help}{notes[f.name]}"
            annotation = Annotated[kind, option]
            shared.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=annotation
                )
            )

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != name]

        @functools.wraps(command)
        def run(**values: Any) -> None:
            options = options_cls(**{p.name: values.pop(p.name) for p in shared})
            command(**values, **{name: options})

        params = own + shared
        run.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def run_training(
    data_dir: Path,
    exp_dir: Path,
    opts: TrainOptions,
    *,
    extra: dict[str, Any],
    init_from: Path | None = None,
    check: Callable[[ExperimentConfig, Console], None] | None = None,
) -> TrainOutcome:
    """Resolve the config (preset, file, --set, --epochs, --seed, the command's options in `extra`), train,
    print the outcome.

    `check(cfg, console)` may adjust or refuse (raise error_exit) the resolved config. Usage errors (exit 2):
    a ConfigError, a CUDA device that is not there, a DATA_DIR without a prepared train split, a checkpoint
    (--init-from, or the one EXP_DIR resumes from) that is missing, corrupt or of another model, and what the
    engine refuses before it starts (TrainingSetupError: a broken lang folder, no PLM cache for distill, no
    usable utterance). Failed runs (exit 1): TrainingError and data found broken while training
    (StoreError). SIGTERM exits 143 and Ctrl-C (SIGINT) 130 after a checkpoint of the current step, a second
    Ctrl-C 130 at once, each with a hint to resume. Returns what `train` did.
    """
    console = err_console
    try:
        extra = {**extra, "train.epochs": opts.epochs, "train.seed": opts.seed}
        cfg: ExperimentConfig = resolve_config(opts.preset, opts.config, opts.overrides or [], extra)
    except ConfigError as err:
        raise error_exit(str(err)) from None
    if check is not None:
        check(cfg, console)
    require_device(opts.device)
    manifest = data_dir / "train" / "manifest.jsonl"
    if not manifest.is_file():
        raise error_exit(f"{manifest} not found: is {data_dir} a folder written by `gmot prepare`?")
    try:
        outcome = train(
            data_dir,
            exp_dir,
            cfg,
            init_from=init_from,
            device=opts.device,
            console=console,
            progress=opts.progress,
        )
    except (CheckpointError, TrainingSetupError) as err:
        raise error_exit(str(err)) from None
    except (TrainingError, StoreError) as err:
        raise error_exit(str(err), RUN_FAILED) from None
    except Preempted as err:
        if is_main_rank():
            console.print(Text(str(err), style="yellow"))
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        console.print(
            Text("interrupted; re-run the same command to resume from the last checkpoint", style="yellow")
        )
        raise typer.Exit(130) from None
    if is_main_rank():  # under torchrun, rank 0 alone reports
        _print_outcome(outcome)
    return outcome


def _print_outcome(outcome: TrainOutcome) -> None:
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


# --- score printing ----------------------------------------------------------------------------------------


def score_table(result: ScoreResult, title: str = "") -> Table:
    """An ESPnet `result.txt` style summary table (percentages of the reference length)."""
    unit_name = "Chr" if result.unit == "char" else "Wrd"
    table = Table(title=title or None)
    for col in ("SPKR", "# Snt", f"# {unit_name}", "Corr", "Sub", "Del", "Ins", "Err", "S.Err"):
        table.add_column(col, justify="right")
    n = max(result.ref_len, 1)
    snt = max(result.sentences, 1)
    table.add_row(
        "Sum/Avg",
        str(result.sentences),
        str(result.ref_len),
        *(
            f"{100.0 * v / n:.1f}"
            for v in (result.hits, result.substitutions, result.deletions, result.insertions)
        ),
        f"{100.0 * result.errors / n:.1f}",
        f"{100.0 * result.sentence_errors / snt:.1f}",
    )
    return table


def print_score(result: ScoreResult, console: Console, title: str = "") -> None:
    """Print the Kaldi summary lines, the table and any missing ids."""
    console.print(result.kaldi_summary(), markup=False, highlight=False)
    console.print(score_table(result, title))
    if result.missing_in_hyp:
        shown = " ".join(result.missing_in_hyp[:10]) + (" ..." if len(result.missing_in_hyp) > 10 else "")
        console.print(
            f"[yellow]{len(result.missing_in_hyp)} id(s) missing from the hypothesis, "
            f"scored as deletions:[/yellow] {shown}"
        )
    if result.missing_in_ref:
        shown = " ".join(result.missing_in_ref[:10]) + (" ..." if len(result.missing_in_ref) > 10 else "")
        console.print(
            f"[yellow]{len(result.missing_in_ref)} id(s) not in the reference, ignored:[/yellow] {shown}"
        )
