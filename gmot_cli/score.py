"""`gmot score REF HYP`: CER / WER with jiwer, a Kaldi compute-wer line and an ESPnet-style table."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from data.scoring import UNITS, ScoreResult, ScoringError, read_transcripts, score_transcripts, write_details


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


def score(
    ref: Path = typer.Argument(..., help="Reference: Kaldi-style text file or prepared split folder."),
    hyp: Path = typer.Argument(..., help="Hypothesis: Kaldi-style text file or a decode output folder."),
    unit: str = typer.Option(
        "char", "--unit", help="Scoring unit: char (CER, spaces ignored) or word (WER)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the tables."),
    details: Path | None = typer.Option(
        None, "--details", help="Write per-utterance alignments to this file."
    ),
) -> None:
    """Score hypotheses against references (CER for characters, WER for words)."""
    console = Console()
    err = Console(stderr=True)
    if unit not in UNITS:
        err.print(f"[red]error:[/red] --unit must be one of {', '.join(UNITS)}, not {unit!r}")
        raise typer.Exit(2)
    try:
        result = score_transcripts(read_transcripts(ref), read_transcripts(hyp), unit)
        if details is not None:
            write_details(result, details)
    except ScoringError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as e:
        err.print(f"[red]error:[/red] cannot write {escape(str(details))}: {e.strerror or e}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print_score(result, console)


def register(app: typer.Typer) -> None:
    """Add the `score` command to the app."""
    app.command("score")(score)
