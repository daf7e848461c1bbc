"""`gmot export EXP OUT_DIR`: the trained CTC model as ONNX (CMVN folded in) + tokens.txt for sherpa-onnx."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from data.features import NUM_MEL_BINS, SHERPA_ONNX_FRONTEND, AudioError
from gmot_cli.common import RUN_FAILED, err_console, error_exit
from models.engine.checkpoint import CheckpointError, load_model
from models.tasks.export import (
    CHECK_MODULES,
    COMPARE_MODULES,
    DEFAULT_OPSET,
    EXPORT_MODULES,
    ExportError,
    compare_with_sherpa,
    export_onnx,
    require_modules,
    sherpa_onnx_command,
)


def export(
    model: Path = typer.Argument(
        ..., help="Experiment folder (uses avg.pt, else the newest checkpoint) or .pt."
    ),
    out_dir: Path = typer.Argument(..., help="Output folder for model.onnx and tokens.txt."),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", help="ONNX opset version."),
    check: bool = typer.Option(
        True, "--check/--no-check", help="Run the export with onnxruntime and compare it with torch."
    ),
    compare: Path | None = typer.Option(
        None,
        "--compare",
        help="A folder of audio files (.wav, .flac; searched recursively): transcribe them with sherpa-onnx "
        "and with gmot (greedy) and count identical transcripts; exit code 1 if any differ.",
    ),
) -> None:
    """Export a trained model as ONNX for sherpa-onnx (offline CTC) or onnxruntime, with its tokens.txt."""
    console = Console()
    try:
        needed = (
            EXPORT_MODULES
            + (CHECK_MODULES if check else ())
            + (COMPARE_MODULES if compare is not None else ())
        )
        require_modules(needed, "gmot export" + (" --compare" if compare is not None else ""))
        loaded = load_model(model)
        result = export_onnx(loaded, out_dir, opset=opset, check=check)
    except (CheckpointError, ExportError) as e:
        raise error_exit(str(e)) from None
    except OSError as e:
        raise error_exit(f"cannot write to {out_dir}: {e.strerror or e}", RUN_FAILED) from None
    size_mb = result.model_path.stat().st_size / 1e6
    console.print(
        f"wrote {escape(str(result.model_path))} ({size_mb:.1f} MB) and {escape(str(result.tokens_path))} "
        f"({len(loaded.vocab)} units, x{loaded.model.cfg.subsampling} subsampling)",
        highlight=False,
    )
    if result.max_abs_diff is not None:
        console.print(
            f"onnxruntime against torch: largest log-probability difference {result.max_abs_diff:.2e}"
        )
    sherpa_ready = loaded.frontend == SHERPA_ONNX_FRONTEND and loaded.model.cfg.input_dim == NUM_MEL_BINS
    if loaded.frontend != SHERPA_ONNX_FRONTEND:
        err_console.print(
            f"[yellow]warning:[/yellow] this model was trained on {escape(loaded.frontend)!r} features; "
            f"sherpa-onnx computes {SHERPA_ONNX_FRONTEND!r} features, so it would not decode as "
            "`gmot decode` does. Train on data prepared with the default --frontend to deploy with "
            "sherpa-onnx.",
            highlight=False,
        )
    elif loaded.model.cfg.input_dim != NUM_MEL_BINS:
        err_console.print(
            "[yellow]warning:[/yellow] this model takes fbank + pitch features, which sherpa-onnx does not "
            "compute; use the ONNX file with your own features (onnxruntime).",
            highlight=False,
        )
    if sherpa_ready:
        console.print("decode a wav with sherpa-onnx (pip install sherpa-onnx):", highlight=False)
        command = sherpa_onnx_command(result.model_path, result.tokens_path)
        console.print(command, markup=False, highlight=False, soft_wrap=True)
    if compare is not None:
        wavs = sorted(p for p in compare.rglob("*") if p.suffix.lower() in (".wav", ".flac"))
        if not wavs:
            raise error_exit(f"--compare {compare}: no .wav or .flac files there")
        try:
            cmp = compare_with_sherpa(loaded, result, wavs)
        except (ExportError, AudioError) as e:
            raise error_exit(str(e)) from None
        console.print(
            f"sherpa-onnx transcribes {cmp.identical} of {cmp.files} files in {escape(str(compare))} exactly "
            f"as gmot does (greedy; gmot {cmp.gmot_seconds:.1f} s, sherpa-onnx {cmp.sherpa_seconds:.1f} s)",
            highlight=False,
        )
        for wav, ours, theirs in cmp.differing[:10]:
            console.print(f"  {wav}: gmot {ours!r}, sherpa-onnx {theirs!r}", markup=False, highlight=False)
        if cmp.differing:
            raise typer.Exit(RUN_FAILED)


def register(app: typer.Typer) -> None:
    """Add the `export` command to the app."""
    app.command("export")(export)
