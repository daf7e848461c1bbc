"""`gmot decode`: CTC transcripts of a prepared split or of audio files, with the real-time factor."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from data.features import AudioError, feature_width_mismatch
from data.scoring import ScoringError, score_transcripts
from data.store import StoreError, frontend_mismatch
from gmot_cli.common import RUN_FAILED, err_console, error_exit, print_score, require_device
from models.engine.checkpoint import CheckpointError, load_model
from models.tasks.decoding import (
    real_time_factor,
    split_utterances,
    transcribe,
    wav_utterances,
    write_hypotheses,
)
from models.tasks.search import METHODS, DecodingError, make_decoder


def default_out(
    model: Path, split: str, method: str, beam_size: int, lm: Path | None, lm_weight: float
) -> Path:
    """EXP/decode_<split>_<method>[_b<beam>][_<lm stem>_w<weight>], so that decodes with other settings do
    not overwrite each other (a checkpoint file other than avg.pt adds its stem too)."""
    exp_dir = model if model.is_dir() else model.parent
    name = f"decode_{split}_{method}"
    if not model.is_dir() and model.stem != "avg":
        name += f"_{model.stem}"
    if method == "beam":
        name += f"_b{beam_size}"
        if lm is not None:
            name += f"_{lm.stem}_w{lm_weight:g}"
    return exp_dir / name


def decode(
    model: Path = typer.Argument(
        ..., help="Experiment folder (uses avg.pt, else the newest checkpoint) or .pt."
    ),
    inputs: list[Path] = typer.Argument(
        None, help="DATA_DIR (a prepared folder), or audio files with --wav."
    ),
    wav: bool = typer.Option(False, "--wav", help="Treat the inputs after the model as audio files."),
    split: str = typer.Option("test", "--split", help="Split of DATA_DIR to decode."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Output folder (default: EXP/decode_<split>_<method>, plus _b<beam>, _<lm>_w<weight> for beam "
        "search; none for --wav).",
    ),
    method: str = typer.Option("greedy", "--method", help="greedy or beam."),
    beam_size: int = typer.Option(10, "--beam-size", help="Beam width for --method beam."),
    lm: Path | None = typer.Option(None, "--lm", help="KenLM n-gram over characters (ARPA or binary)."),
    lm_weight: float = typer.Option(
        1.0, "--lm-weight", help="Weight of the LM log10-probability (with --lm); tune it on dev."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    batch_frames: int = typer.Option(20000, "--batch-frames", help="Padded input frames per batch."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0: torch's default)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    nbest: int = typer.Option(
        1, "--nbest", help="Beam search: write the K best distinct hypotheses per utterance to details.jsonl."
    ),
    timestamps: bool = typer.Option(
        True,
        "--timestamps/--no-timestamps",
        help="Per-character start/end times and an utterance confidence in details.jsonl (CTC alignment).",
    ),
) -> None:
    """Decode a prepared split (or audio files) with greedy CTC or beam search; write text, details, RTF."""
    console = Console()
    inputs = list(inputs or [])
    if method not in METHODS:
        raise error_exit(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if not inputs:
        raise error_exit("give DATA_DIR (a prepared folder) or --wav with audio files after the model")
    if not wav and len(inputs) != 1:
        raise error_exit("give one DATA_DIR, or pass --wav to decode audio files")
    require_device(device)
    if batch_frames < 1:
        raise error_exit("--batch-frames must be positive")
    if nbest < 1 or (nbest > 1 and method != "beam"):
        raise error_exit(f"--nbest takes K >= 1, and K > 1 needs --method beam (got {nbest}, {method})")
    if nbest > beam_size:
        raise error_exit(f"--nbest {nbest} cannot exceed --beam-size {beam_size}")
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        loaded = load_model(model, device=device)
        decoder = make_decoder(method, loaded.vocab, beam_size, lm, lm_weight if lm is not None else 0.0)
        if wav:
            utts, refs = wav_utterances(inputs, loaded.cmvn_mean.shape[0], loaded.frontend), {}
        else:
            split_dir = inputs[0] / split
            if not split_dir.is_dir():
                found = sorted(m.parent.name for m in inputs[0].glob("*/manifest.jsonl"))
                raise error_exit(
                    f"split {split!r} is not prepared in {inputs[0]} (no folder {split_dir}); "
                    f"prepared splits: {', '.join(found) or 'none'} (run `gmot prepare` first)",
                )
            front_mismatch = frontend_mismatch(inputs[0], loaded.frontend)
            if front_mismatch:
                raise DecodingError(front_mismatch)
            utts, refs = split_utterances(split_dir)
            # checked before the progress bar starts (transcribe would raise it at the first batch)
            mismatch = utts and feature_width_mismatch(utts[0].feats.shape[1], loaded.cmvn_mean.shape[0])
            if mismatch:
                raise DecodingError(f"{split_dir}: {mismatch}")
    except (CheckpointError, DecodingError, StoreError, AudioError) as e:
        raise error_exit(str(e)) from None
    if not utts:
        raise error_exit("nothing to decode (the split is empty)")

    with Progress(
        TextColumn("decoding"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not progress,
    ) as bar:
        task = bar.add_task("decode", total=len(utts))
        hyps = transcribe(
            loaded.model,
            loaded.vocab,
            loaded.cmvn_mean,
            loaded.cmvn_std,
            utts,
            decoder,
            batch_frames=batch_frames,
            device=device,
            progress=lambda n: bar.advance(task, n),
            nbest=nbest,
            timestamps=timestamps,
        )
    rtf = real_time_factor(hyps)
    audio = sum(h.duration for h in hyps)
    summary = {
        "checkpoint": str(loaded.path),
        "input": [str(p) for p in inputs] if wav else str(inputs[0] / split),
        "method": method,
        "beam_size": beam_size if method == "beam" else None,
        "nbest": nbest,
        "lm": str(lm) if lm is not None else None,
        "lm_weight": lm_weight if lm is not None else None,
        "device": device,
        "threads": torch.get_num_threads(),
        "utterances": len(hyps),
        "audio_seconds": round(audio, 3),
        "decode_seconds": round(sum(h.decode_time for h in hyps), 4),
        "rtf": rtf,
    }
    result = None
    if refs:
        try:
            result = score_transcripts(refs, {h.id: h.text for h in hyps}, "char")
            summary.update({"cer": result.rate, "errors": result.errors, "ref_chars": result.ref_len})
        except ScoringError:  # no reference text in the manifest
            result = None
    if wav:
        for h in hyps:
            console.print(f"{h.id} {h.text}", markup=False, highlight=False)
    out_dir = out if out is not None or wav else default_out(model, split, method, beam_size, lm, lm_weight)
    if out_dir is not None:
        try:
            write_hypotheses(out_dir, hyps, summary)
        except OSError as e:
            raise error_exit(f"cannot write to {out_dir}: {e.strerror or e}", RUN_FAILED) from None
        console.print(f"wrote {escape(str(out_dir))}/text, details.jsonl, rtf.json", highlight=False)
    console.print(
        f"{len(hyps)} utterances, {audio:.1f} s of audio, RTF {rtf:.4f} ({method}, {device}, "
        f"{torch.get_num_threads()} threads)",
        highlight=False,
    )
    if result is not None:
        print_score(result, console, title=f"{split} ({method})")


def register(app: typer.Typer) -> None:
    """Add the `decode` command to the app."""
    app.command("decode")(decode)
