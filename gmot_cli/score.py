"""`gmot score REF HYP`: CER / WER with jiwer, a Kaldi compute-wer line and an ESPnet-style table."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from data.homophones import KINDS, ErrorBreakdown, homophone_breakdown
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
    err = Console(stderr=True)
    if unit not in UNITS:
        err.print(f"[red]error:[/red] --unit must be one of {', '.join(UNITS)}, not {unit!r}")
        raise typer.Exit(2)
    if by_homophone and unit != "char":
        err.print("[red]error:[/red] --by-homophone needs character units (--unit char)")
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
