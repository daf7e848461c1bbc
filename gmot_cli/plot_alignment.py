"""`gmot plot-alignment`: the transport plan(s) of one utterance (or the K worst) as a figure."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from data.store import StoreError, frontend_mismatch
from gmot_cli.common import RUN_FAILED, err_console, error_exit, require_device
from models.engine.checkpoint import CheckpointError, load_model
from models.engine.diagnostics import format_scores
from models.nn.ctc import greedy_ctc
from models.tasks.alignment_plot import (
    FIGURE_SUFFIXES,
    PLAN_MODES,
    AlignmentPlotError,
    compute_alignment,
    draw_alignment,
    find_cjk_font,
    save_figure,
    worst_utterances,
)
from models.tasks.decoding import split_utterances, transcribe
from models.tasks.search import DecodingError


def plot_alignment(
    model: Path = typer.Argument(..., help="Experiment folder (avg.pt, else the newest checkpoint) or .pt."),
    data_dir: Path = typer.Argument(..., help="Prepared data folder (with a PLM cache)."),
    split: str = typer.Option("test", "--split", help="Split of DATA_DIR."),
    utt: str | None = typer.Option(None, "--utt", help="Utterance id to draw."),
    out: Path | None = typer.Option(
        None, "--out", help="Figure file (.png, .svg or .pdf); default EXP/alignments/<utt>.png."
    ),
    compare: str = typer.Option(
        "fgw",
        "--compare",
        help="Plans to draw side by side: wd (alpha 0), fgw (checkpoint's alpha), or wd,fgw.",
    ),
    worst: int = typer.Option(
        0, "--worst", help="Draw the K utterances with the highest greedy CER instead."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Draw the GM-OT transport plan of an utterance with structures and the CTC forced alignment."""
    console = Console()
    modes = tuple(m.strip().lower() for m in compare.split(",") if m.strip())
    if not modes or any(m not in PLAN_MODES for m in modes) or len(set(modes)) != len(modes):
        raise error_exit(
            f"--compare takes {', '.join(PLAN_MODES)} or both separated by a comma, not {compare!r}"
        )
    if (utt is None) == (worst <= 0):
        raise error_exit("give exactly one of --utt ID or --worst K")
    if out is not None and out.suffix.lower() not in FIGURE_SUFFIXES:
        raise error_exit(f"--out must end in {', '.join(FIGURE_SUFFIXES)}: {out}")
    require_device(device)
    try:
        loaded = load_model(model, device=device)
        if not (data_dir / split / "manifest.jsonl").is_file():
            raise StoreError(
                f"split {split!r} is not prepared in {data_dir} (no {data_dir / split / 'manifest.jsonl'})"
            )
        front_mismatch = frontend_mismatch(data_dir, loaded.frontend)
        if front_mismatch:
            raise StoreError(front_mismatch)
        if worst > 0:
            utts, refs = split_utterances(data_dir / split)
            hyps = transcribe(
                loaded.model, loaded.vocab, loaded.cmvn_mean, loaded.cmvn_std, utts, greedy_ctc, device=device
            )
            targets = worst_utterances({h.id: h.text for h in hyps}, refs, worst)
        else:
            targets = [(utt, None)]
        font = find_cjk_font()
        if font is None:
            err_console.print(
                "[yellow]warning:[/yellow] no CJK font found (install fonts-noto-cjk or fonts-wqy-zenhei); "
                "Chinese token labels are shown as token indices"
            )
        exp_dir = model if model.is_dir() else model.parent
        written = []
        for rank, (utt_id, _) in enumerate(targets, start=1):
            data = compute_alignment(loaded, data_dir, split, utt_id, modes)
            fig = draw_alignment(data, font)
            if out is None:
                path = exp_dir / "alignments" / f"{utt_id}.png"
            elif worst > 0:
                path = out.with_name(f"{out.stem}_{rank:02d}_{utt_id}{out.suffix}")
            else:
                path = out
            written.append((save_figure(fig, path), data.cer, data.scores))
    except (CheckpointError, StoreError, AlignmentPlotError, DecodingError) as e:
        raise error_exit(str(e)) from None
    except OSError as e:
        raise error_exit(f"cannot write the figure: {e}", RUN_FAILED) from None
    for path, cer, scores in written:
        console.print(f"wrote {escape(str(path))} (CER {100 * cer:.1f} %)", highlight=False, soft_wrap=True)
        for mode, sc in scores.items():
            console.print(f"  {mode}: {format_scores(sc)}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the `plot-alignment` command to the app."""
    app.command("plot-alignment")(plot_alignment)
