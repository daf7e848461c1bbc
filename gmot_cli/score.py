"""`gmot score REF HYP`: CER / WER with jiwer, a Kaldi compute-wer line and an ESPnet-style table."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from data.homophones import KINDS, ErrorBreakdown, homophone_breakdown
from data.scoring import UNITS, ScoringError, read_transcripts, score_transcripts, write_details
from gmot_cli.common import RUN_FAILED, error_exit, print_score


def breakdown_table(breakdown: ErrorBreakdown) -> Table:
    """The errors by kind: count, per cent of the reference characters, share of all errors."""
    table = Table(title="errors by kind (pinyin with tone from pypinyin)")
    for col in ("kind", "count", "% of ref chars", "% of errors"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    total = max(breakdown.errors, 1)
    for kind in KINDS:
        n = breakdown.counts[kind]
        table.add_row(kind, str(n), f"{100 * breakdown.rate(kind):.2f}", f"{100 * n / total:.1f}")
    if breakdown.top_homophones:
        pairs = ", ".join(f"{r}->{h} {n}" for r, h, n in breakdown.top_homophones)
        table.caption = f"most frequent homophones (ref->hyp count): {pairs}"
    return table


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
    by_homophone: bool = typer.Option(
        False,
        "--by-homophone",
        help="Mandarin: also sort the errors into homophone substitutions (same pinyin and tone: only "
        "context tells them apart), same syllable with another tone, other substitutions, deletions and "
        "insertions (char units).",
    ),
) -> None:
    """Score hypotheses against references (CER for characters, WER for words)."""
    console = Console()
    if unit not in UNITS:
        raise error_exit(f"--unit must be one of {', '.join(UNITS)}, not {unit!r}")
    if by_homophone and unit != "char":
        raise error_exit("--by-homophone needs character units (--unit char)")
    try:
        result = score_transcripts(read_transcripts(ref), read_transcripts(hyp), unit)
        if details is not None:
            write_details(result, details)
    except ScoringError as e:
        raise error_exit(str(e)) from None
    except OSError as e:
        raise error_exit(f"cannot write {details}: {e.strerror or e}", RUN_FAILED) from None
    breakdown = homophone_breakdown(result) if by_homophone else None
    if as_json:
        out = result.to_json()
        if breakdown is not None:
            out["by_homophone"] = breakdown.to_json()
        typer.echo(json.dumps(out, ensure_ascii=False))
    else:
        print_score(result, console)
        if breakdown is not None:
            console.print(breakdown_table(breakdown))


def register(app: typer.Typer) -> None:
    """Add the `score` command to the app."""
    app.command("score")(score)
