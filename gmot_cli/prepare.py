"""`gmot prepare {demo,aishell1,kaldi,jsonl,lhotse,hf}`: corpora -> prepared folders (data/preparation.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from data.corpora import CorpusError, Skip, UtteranceRecord, read_aishell1, read_jsonl, read_kaldi_dir
from data.features import DEFAULT_FRONTEND, FRONTENDS, frontend
from data.preparation import (
    DEFAULT_MAX_DURATION,
    DEFAULT_SHARD_FRAMES,
    PrepareError,
    PrepareOptions,
    PrepareResult,
    SplitInput,
    prepare,
)
from gmot_cli.common import RUN_FAILED, err_console, error_exit, with_options
from gmot_cli.line_progress import LineProgress

prepare_app = typer.Typer(
    name="prepare",
    help="Turn a corpus into a prepared folder: fbank shards, CMVN, vocabulary, PLM cache, reports.",
    no_args_is_help=True,
)


LANG_NOTE = " With --lang the lang folder decides."
LANG_NOTES = {"pitch": LANG_NOTE, "frontend": LANG_NOTE}
"""Help added to the shared options that a --lang folder decides, in the sources that take --lang."""


@dataclass
class SharedOptions:
    """The options every `gmot prepare` source takes, declared once: each field's type carries its typer
    option, its default is the option's; `options` is what data.preparation reads.

    Built by keyword from the parsed options (gmot_cli.common.with_options); an invalid --speed-perturb or
    --frontend raises typer.BadParameter (exit 2) when it is built.
    """

    plm: Annotated[
        str | None,
        typer.Option(
            "--plm",
            help="PLM teacher: e5-small (default), a local model folder or a cached hub id; "
            "untrained:SPEC is SPEC with random weights (a knowledge control).",
        ),
    ] = None
    plm_layer: Annotated[
        int, typer.Option("--plm-layer", help="Teacher hidden state to cache (0 = embeddings, -1 = last).")
    ] = -1
    plm_device: Annotated[
        str,
        typer.Option("--plm-device", help="Device for the PLM teacher's forward pass: cpu, cuda, cuda:N."),
    ] = "cpu"
    no_plm_cache: Annotated[
        bool, typer.Option("--no-plm-cache", help="Do not compute PLM token features (pretrain only).")
    ] = False
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Parallel feature-extraction processes.")] = 1
    max_duration: Annotated[
        float,
        typer.Option("--max-duration", help="Skip utterances longer than this (seconds; 0 = no limit)."),
    ] = DEFAULT_MAX_DURATION
    shard_frames: Annotated[int, typer.Option("--shard-frames", help="Frames (10 ms) per feature shard.")] = (
        DEFAULT_SHARD_FRAMES
    )
    pitch: Annotated[
        bool,
        typer.Option(
            "--pitch/--no-pitch",
            help="Append 3 pitch features (voicing, normalised log f0, its change) to the 80 fbank bins, "
            "meant for tonal languages (on the demo corpus it did not help: see docs/usage.md).",
        ),
    ] = False
    speed_perturb: Annotated[
        str,
        typer.Option(
            "--speed-perturb",
            help="Speed factors for the train split, e.g. 0.9,1.0,1.1 (copies with ids sp0.9-...; default "
            "none).",
        ),
    ] = ""
    frontend: Annotated[
        str,
        typer.Option(
            "--frontend",
            help=f"Fbank front end: {', '.join(FRONTENDS)}. The default computes what sherpa-onnx computes, "
            "so an exported model decodes there as it does here; kaldi-snip is gmot's front end before 0.2.",
        ),
    ] = DEFAULT_FRONTEND
    options: PrepareOptions = field(init=False)

    def __post_init__(self) -> None:
        self.options = PrepareOptions(
            max_duration=self.max_duration if self.max_duration and self.max_duration > 0 else None,
            jobs=max(1, self.jobs),
            shard_frames=self.shard_frames,
            pitch=self.pitch,
            speed_perturb=parse_speed_factors(self.speed_perturb),
            frontend=parse_frontend(self.frontend),
        )


def parse_frontend(name: str) -> str:
    """A known front end name (data.features.FRONTENDS), else typer.BadParameter listing them."""
    try:
        return frontend(name).name
    except ValueError:
        raise typer.BadParameter(f"--frontend must be one of {', '.join(FRONTENDS)}, not {name!r}") from None


def parse_speed_factors(text: str) -> tuple[float, ...]:
    """Parse "0.9,1.0,1.1" -> (0.9, 1.0, 1.1); typer.BadParameter otherwise (distinct factors in [0.5, 2])."""
    if not text.strip():
        return ()
    try:
        factors = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated numbers such as 0.9,1.0,1.1, got {text!r}"
        ) from None
    if not factors or any(not 0.5 <= f <= 2.0 for f in factors) or len(set(factors)) != len(factors):
        raise typer.BadParameter(f"speed factors must be distinct numbers in [0.5, 2], got {text!r}")
    return factors


LangOpt = Annotated[
    Path | None,
    typer.Option(
        "--lang", help="Existing prepared lang folder (vocab, CMVN) for runs without a train split."
    ),
]


def _load_teacher(shared: SharedOptions):
    """The PLM teacher (or None with --no-plm-cache); a clear error and exit 2 for an unknown --plm."""
    if shared.no_plm_cache:
        return None
    from models.nn.plm import PLMError, load_teacher

    if shared.plm_device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise error_exit(
                f"--plm-device {shared.plm_device}: no CUDA device is visible here (use --plm-device cpu)"
            )
    try:
        with err_console.status(f"loading the PLM teacher {shared.plm or 'e5-small'} ..."):
            return load_teacher(shared.plm, shared.plm_layer, device=shared.plm_device)
    except PLMError as exc:
        raise error_exit(f"{exc} (or pass --no-plm-cache to prepare without a PLM cache)") from None


def _summary_table(result: PrepareResult) -> Table:
    table = Table(title=f"prepared {result.out_dir}")
    for col in ("split", "utterances", "hours", "PLM tokens", "skipped", "skipped by reason"):
        table.add_column(col, justify="left" if col in ("split", "skipped by reason") else "right")
    for s in result.splits:
        reasons = "\n".join(f"{r}: {len(v)}" for r, v in s.skipped_by_reason().items())
        table.add_row(
            s.name,
            str(s.utterances),
            f"{s.hours:.3f}",
            "-" if s.plm_tokens is None else str(s.plm_tokens),
            str(len(s.skipped)),
            reasons or "-",
        )
    return table


def _progress(*columns) -> Progress | LineProgress:
    """Live bars on a terminal; elsewhere (a log file, CI) a line per stage and a count every 30 s."""
    if err_console.is_terminal:
        return Progress(*columns, console=err_console, transient=True)
    return LineProgress(err_console)


def _run(
    out_dir: Path, splits: list[SplitInput], shared: SharedOptions, teacher, lang: Path | None = None
) -> None:
    """Run the pipeline with a progress bar, print the summary; exit 1 when a split ends empty."""
    console = Console()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        with _progress(*columns) as progress:
            result = prepare(
                out_dir, splits, teacher=teacher, lang_dir=lang, options=shared.options, progress=progress
            )
    except (PrepareError, CorpusError) as exc:
        raise error_exit(str(exc)) from None
    console.print(_summary_table(result))
    for s in result.splits:
        shown = s.skipped[:5]
        for skip in shown:
            console.print(
                f"  [yellow]skipped[/yellow] {escape(s.name)}/{escape(skip.id)}: {escape(skip.detail)}"
            )
        if len(s.skipped) > len(shown):
            console.print(
                f"  ... {len(s.skipped) - len(shown)} more in {out_dir / s.name / 'prepare_report.json'}"
            )
    if result.error:
        raise error_exit(result.error, RUN_FAILED)
    if result.empty_splits:
        raise error_exit(f"split(s) ended empty: {', '.join(result.empty_splits)}", RUN_FAILED)


def _parse_splits(values: list[str], what: str) -> list[tuple[str, Path]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise error_exit(f"--split expects NAME={what}, got {v!r}")
        out.append((name, Path(path)))
    return out


def _read_splits(
    split: list[str],
    what: str,
    reader: Callable[[str, Path], tuple[list[UtteranceRecord], list[Skip]]],
    source: Callable[[Path], str],
) -> list[SplitInput]:
    """The NAME=VALUE `--split` options read with `reader(name, value)`; a CorpusError ends the command with
    exit code 2 and its message."""
    splits = []
    try:
        for name, path in _parse_splits(split, what):
            records, skips = reader(name, path)
            splits.append(SplitInput(name, records, skips, source=source(path)))
    except CorpusError as exc:
        raise error_exit(str(exc)) from None
    return splits


@prepare_app.command("kaldi")
@with_options(SharedOptions, "shared", LANG_NOTES)
def kaldi(
    out_dir: Path = typer.Argument(..., help="Output folder."),
    split: list[str] = typer.Option(..., "--split", help="NAME=DIR, a Kaldi data dir (repeatable)."),
    lang: LangOpt = None,
    *,
    shared: SharedOptions,
) -> None:
    """Prepare Kaldi data dirs (wav.scp + text, optional utt2spk and segments)."""
    splits = _read_splits(split, "DIR", lambda name, path: read_kaldi_dir(path), str)
    _run(out_dir, splits, shared, _load_teacher(shared), lang)


@prepare_app.command("jsonl")
@with_options(SharedOptions, "shared", LANG_NOTES)
def jsonl(
    out_dir: Path = typer.Argument(..., help="Output folder."),
    split: list[str] = typer.Option(..., "--split", help="NAME=FILE, a JSONL manifest (repeatable)."),
    lang: LangOpt = None,
    *,
    shared: SharedOptions,
) -> None:
    """Prepare JSONL manifests ({"audio_filepath", "text", "duration"?, "id"?, "speaker"?} per line)."""
    splits = _read_splits(split, "FILE", lambda name, path: read_jsonl(path), str)
    _run(out_dir, splits, shared, _load_teacher(shared), lang)


@prepare_app.command("lhotse")
@with_options(SharedOptions, "shared", LANG_NOTES)
def lhotse(
    out_dir: Path = typer.Argument(..., help="Output folder."),
    split: list[str] = typer.Option(
        ...,
        "--split",
        help="NAME=CUTS (a lhotse CutSet .jsonl[.gz]) or NAME=RECORDINGS,SUPERVISIONS (repeatable).",
    ),
    lang: LangOpt = None,
    *,
    shared: SharedOptions,
) -> None:
    """Prepare lhotse manifests: one utterance per supervision of a mono audio file (needs gmot[lhotse])."""
    from data.lhotse_source import read_lhotse

    def read(name: str, path: Path) -> tuple[list, list]:
        return read_lhotse([Path(p) for p in str(path).split(",")])

    splits = _read_splits(split, "CUTS", read, "lhotse {}".format)
    _run(out_dir, splits, shared, _load_teacher(shared), lang)


@prepare_app.command("hf")
@with_options(SharedOptions, "shared", LANG_NOTES)
def hf(
    out_dir: Path = typer.Argument(..., help="Output folder (audio bytes are written to OUT_DIR/corpus/hf)."),
    split: list[str] = typer.Option(
        ...,
        "--split",
        help="NAME=DIR or NAME=DIR:SUBSET: a dataset saved by save_to_disk, or an audiofolder (repeatable).",
    ),
    audio_column: str = typer.Option("audio", "--audio-column", help="Column holding the audio."),
    text_column: str = typer.Option("text", "--text-column", help="Column holding the transcript."),
    id_column: str | None = typer.Option(
        None, "--id-column", help="Column holding utterance ids (default: 'id' if present, else row-NNNNNN)."
    ),
    speaker_column: str | None = typer.Option(None, "--speaker-column", help="Column holding speaker ids."),
    lang: LangOpt = None,
    *,
    shared: SharedOptions,
) -> None:
    """Prepare Hugging Face datasets saved on disk, or audiofolders (offline; saved ones need gmot[hf])."""
    from data.hf_source import HFColumns, read_hf

    columns = HFColumns(audio_column, text_column, id_column, speaker_column)

    def read(name: str, path: Path) -> tuple[list, list]:
        if "/" in name or name.startswith("."):  # it names the folder the audio bytes are written to
            raise CorpusError(f"invalid split name {name!r}")
        return read_hf(str(path), name, columns, out_dir / "corpus" / "hf" / name)

    splits = _read_splits(split, "DIR", read, "Hugging Face {}".format)
    _run(out_dir, splits, shared, _load_teacher(shared), lang)


@prepare_app.command("aishell1")
@with_options(SharedOptions, "shared")
def aishell1(
    corpus_dir: Path = typer.Argument(..., help="Folder holding data_aishell/ (or data_aishell itself)."),
    out_dir: Path = typer.Argument(..., help="Output folder."),
    *,
    shared: SharedOptions,
) -> None:
    """Prepare AISHELL-1 (data_aishell/wav/{train,dev,test}/S*/*.wav + transcript v0.8)."""
    try:
        found = read_aishell1(corpus_dir)
    except CorpusError as exc:
        raise error_exit(str(exc)) from None
    splits = [
        SplitInput(name, recs, skips, source=f"AISHELL-1 {name}") for name, (recs, skips) in found.items()
    ]
    _run(out_dir, splits, shared, _load_teacher(shared))


@prepare_app.command("demo")
@with_options(SharedOptions, "shared")
def demo(
    out_dir: Path = typer.Argument(
        ..., help="Output folder (the synthesized corpus goes to OUT_DIR/corpus)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for sentences, voices, rates, pitches and noise."),
    train_sentences: int | None = typer.Option(
        None, "--train-sentences", help="Number of train sentences (default: the corpus default)."
    ),
    voices_per_sentence: int = typer.Option(2, "--voices-per-sentence", help="Training voices per sentence."),
    *,
    shared: SharedOptions,
) -> None:
    """Synthesize the embedded Mandarin demo corpus with espeak-ng and prepare it (offline)."""
    from data import demo as demo_corpus

    if not demo_corpus.espeak_available():
        raise error_exit(
            "espeak-ng was not found on PATH; the demo corpus needs it: install it with "
            "`apt-get install espeak-ng` (Debian/Ubuntu; `make sysdeps` does this)"
        )
    teacher = _load_teacher(shared)  # fail fast on an unknown --plm before synthesis
    try:
        with _progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as progress:
            task = progress.add_task("espeak-ng", total=None)
            dirs = demo_corpus.synthesize_demo_corpus(
                out_dir / "corpus",
                seed=seed,
                train_sentences=train_sentences,
                voices_per_sentence=voices_per_sentence,
                jobs=max(1, shared.jobs),
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    except demo_corpus.DemoCorpusError as exc:
        raise error_exit(str(exc), RUN_FAILED) from None
    splits = []
    for name, path in dirs.items():
        records, skips = read_kaldi_dir(path)
        splits.append(SplitInput(name, records, skips, source=f"demo corpus {path}"))
    _run(out_dir, splits, shared, teacher)


def register(app: typer.Typer) -> None:
    """Add the `prepare` command group to the gmot app."""
    app.add_typer(prepare_app, name="prepare")
