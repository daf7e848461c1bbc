"""Corpus readers: Kaldi data dirs, AISHELL-1, JSONL manifests -> one normalised utterance record type
(lhotse manifests and Hugging Face datasets: data/lhotse_source.py, data/hf_source.py).

Readers never raise on a bad entry: they return the records they could build and a list of `Skip`s naming
each dropped utterance (or file line) and the reason. They raise `CorpusError` only when the input as a whole
is unusable (a missing folder or file), with a message naming it.
"""

from __future__ import annotations

import json
import re
import shlex
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Skip reasons (stable strings: they are the keys of prepare_report.json "skipped").
MISSING_AUDIO = "missing_audio"  # the audio file does not exist
UNREADABLE_AUDIO = "unreadable_audio"  # soundfile cannot decode it (truncated, wrong format)
EMPTY_AUDIO = "empty_audio"  # zero samples (or fewer than one 25 ms frame)
EMPTY_TRANSCRIPT = "empty_transcript"  # nothing left after normalisation (empty or all punctuation)
NON_UTF8 = "non_utf8_text"  # a transcript / list line that is not valid UTF-8
BAD_LINE = "malformed_line"  # a line that cannot be parsed (no id, invalid JSON, missing field)
DUPLICATE_ID = "duplicate_id"  # the same utterance id on several lines
NO_AUDIO_ENTRY = "no_audio_entry"  # id in text but not in wav.scp / segments
NO_TRANSCRIPT = "no_transcript"  # id in wav.scp / segments (or an AISHELL wav) but not in text
UNSUPPORTED_AUDIO_ENTRY = "unsupported_audio_entry"  # a `cmd |` pipe or ark entry we do not run
TOO_SHORT_FOR_TEXT = "too_short_for_transcript"  # fewer frames after x4 subsampling than characters
TOO_LONG = "too_long"  # longer than --max-duration
MULTIPLE_SUPERVISIONS = "multiple_supervisions"  # a lhotse cut with more than one supervision


class CorpusError(Exception):
    """An input that is unusable as a whole (missing folder / file); the message names it."""


@dataclass
class UtteranceRecord:
    """One utterance of any corpus.

    `audio` is a file path; `start` / `end` (seconds) select a segment, None = whole file; `text` is the raw
    transcript (normalised later); `duration` is known for segments and JSONL entries that give it.
    """

    id: str
    audio: str
    text: str
    speaker: str | None = None
    start: float | None = None
    end: float | None = None
    duration: float | None = None


@dataclass
class Skip:
    """A dropped utterance (or unreadable line): `id` (or "file:line" when no id is known), reason, detail."""

    id: str
    reason: str
    detail: str

    def to_dict(self) -> dict:
        """JSON form used in reports."""
        return {"id": self.id, "reason": self.reason, "detail": self.detail}


def drop_duplicate_ids(
    entries: Sequence[tuple[str, int, UtteranceRecord | Skip]], where: str, unit: str = "on lines"
) -> tuple[list[UtteranceRecord], list[Skip]]:
    """Entries (id, position, record or skip) in input order -> (records, skips). Every entry whose id occurs
    more than once is dropped, and each such id becomes one `duplicate_id` skip listing its positions
    ("{where}: id appears {unit} 3, 7"); the skips among the other entries pass through."""
    positions: dict[str, list[int]] = defaultdict(list)
    for uid, pos, _ in entries:
        positions[uid].append(pos)
    records: list[UtteranceRecord] = []
    skips: list[Skip] = []
    for uid, _, got in entries:
        if len(positions[uid]) > 1:
            continue
        if isinstance(got, Skip):
            skips.append(got)
        else:
            records.append(got)
    for uid, pos in positions.items():
        if len(pos) > 1:
            listed = ", ".join(str(n) for n in pos)
            skips.append(Skip(uid, DUPLICATE_ID, f"{where}: id appears {unit} {listed}"))
    return records, skips


def _read_table(path: Path, skips: list[Skip], *, need_value: bool = True) -> dict[str, tuple[str, int]]:
    """Read a Kaldi table file ("id value..." per line) -> {id: (value, line number)}.

    Non-UTF-8 lines, lines without a value and duplicate ids are reported in `skips` (duplicates drop every
    occurrence of the id). Blank lines are ignored.
    """
    entries: dict[str, tuple[str, int]] = {}
    lines_of: dict[str, list[int]] = defaultdict(list)
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            uid = raw.split(maxsplit=1)[0].decode("utf-8", errors="replace")
            skips.append(
                Skip(uid, NON_UTF8, f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
            )
            lines_of[uid].append(lineno)
            continue
        parts = line.strip().split(maxsplit=1)
        uid = parts[0]
        value = parts[1] if len(parts) > 1 else ""
        if need_value and not value:
            skips.append(Skip(uid, BAD_LINE, f"{path}:{lineno}: no value after the id"))
            continue
        lines_of[uid].append(lineno)
        entries.setdefault(uid, (value, lineno))
    for uid, linenos in lines_of.items():
        if len(linenos) > 1:
            entries.pop(uid, None)
            where = ", ".join(str(n) for n in linenos)
            skips.append(Skip(uid, DUPLICATE_ID, f"{path}: id appears on lines {where}"))
    return entries


# `cmd |` entries simple enough to read the file directly: `cat F |`, `flac -c -d -s F |`, `sox F -t wav - |`.
_TRIVIAL_PIPES = (
    re.compile(r"^cat\s+(?P<f>\S+)$"),
    re.compile(r"^flac\s+(?:-[cds]\s+)*(?P<f>\S+)(?:\s+-[cds])*$"),
    re.compile(r"^sox\s+(?P<f>\S+)\s+-t\s+wav\s+-$"),
)


def _resolve_wav_entry(value: str, base: Path) -> tuple[str | None, str]:
    """Interpret a wav.scp value: (path, "") when usable, (None, why) for unsupported entries."""
    value = value.strip()
    if value.endswith("|"):
        cmd = value[:-1].strip()
        for pattern in _TRIVIAL_PIPES:
            m = pattern.match(cmd)
            if m:
                return str(_abs(m.group("f"), base)), ""
        return None, f"pipe command not supported ({value!r}); convert to audio files first"
    if re.search(r"\.ark:\d+$", value):
        return None, f"Kaldi ark entry not supported ({value!r}); convert to audio files first"
    try:
        tokens = shlex.split(value)
    except ValueError:
        tokens = [value]
    if len(tokens) != 1:
        return None, f"not a single file path ({value!r})"
    return str(_abs(tokens[0], base)), ""


def _abs(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def read_kaldi_dir(data_dir: Path) -> tuple[list[UtteranceRecord], list[Skip]]:
    """Read a Kaldi data dir: wav.scp and text (required), utt2spk and segments (optional).

    Relative audio paths are taken relative to the current directory first, then to the data dir.
    With `segments`, records are segments ("utt rec start end") of the wav.scp recordings.
    Returns (records sorted by id, skips).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CorpusError(f"Kaldi data dir not found: {data_dir}")
    for name in ("wav.scp", "text"):
        if not (data_dir / name).is_file():
            raise CorpusError(f"{data_dir} has no {name} (a Kaldi data dir needs wav.scp and text)")
    skips: list[Skip] = []
    wavs = _read_table(data_dir / "wav.scp", skips)
    texts = _read_table(data_dir / "text", skips, need_value=False)
    spk = _read_table(data_dir / "utt2spk", skips) if (data_dir / "utt2spk").is_file() else {}

    def locate(value: str) -> tuple[str | None, str]:
        path, why = _resolve_wav_entry(value, Path.cwd())
        if path is not None and not Path(path).exists():
            alt, _ = _resolve_wav_entry(value, data_dir)
            if alt is not None and Path(alt).exists():
                return alt, ""
        return path, why

    # audio entries keyed by utterance id: (path or None, why, start, end, duration, where)
    audio: dict[str, tuple[str | None, str, float | None, float | None]] = {}
    if (data_dir / "segments").is_file():
        segments = _read_table(data_dir / "segments", skips)
        for uid, (value, lineno) in segments.items():
            fields = value.split()
            try:
                rec_id, start, end = fields[0], float(fields[1]), float(fields[2])
            except (IndexError, ValueError):
                skips.append(
                    Skip(uid, BAD_LINE, f"{data_dir / 'segments'}:{lineno}: expected 'utt rec start end'")
                )
                continue
            if rec_id not in wavs:
                skips.append(
                    Skip(uid, NO_AUDIO_ENTRY, f"recording {rec_id!r} of this segment is not in wav.scp")
                )
                continue
            path, why = locate(wavs[rec_id][0])
            audio[uid] = (path, why, start, end)
    else:
        for uid, (value, _) in wavs.items():
            path, why = locate(value)
            audio[uid] = (path, why, None, None)

    already = {s.id for s in skips}  # reported while reading (bad line, duplicate ...): one reason each
    records = []
    for uid in sorted((set(audio) | set(texts)) - already):
        if uid not in audio:
            src = "segments" if (data_dir / "segments").is_file() else "wav.scp"
            skips.append(Skip(uid, NO_AUDIO_ENTRY, f"in {data_dir / 'text'} but not in {data_dir / src}"))
            continue
        if uid not in texts:
            skips.append(Skip(uid, NO_TRANSCRIPT, f"has audio but no line in {data_dir / 'text'}"))
            continue
        path, why, start, end = audio[uid]
        if path is None:
            skips.append(Skip(uid, UNSUPPORTED_AUDIO_ENTRY, why))
            continue
        duration = (end - start) if start is not None and end is not None and end > 0 else None
        speaker = spk[uid][0] if uid in spk else None
        records.append(UtteranceRecord(uid, path, texts[uid][0], speaker, start, end, duration))
    return records, skips


AISHELL_SPLITS = ("train", "dev", "test")
AISHELL_TRANSCRIPT = "transcript/aishell_transcript_v0.8.txt"


def find_aishell_root(corpus_dir: Path) -> Path:
    """The `data_aishell` folder inside (or equal to) `corpus_dir`; CorpusError with a hint when absent."""
    corpus_dir = Path(corpus_dir)
    for cand in (corpus_dir / "data_aishell", corpus_dir):
        if (cand / AISHELL_TRANSCRIPT).is_file():
            return cand
    raise CorpusError(
        f"no AISHELL-1 transcript under {corpus_dir} (expected data_aishell/{AISHELL_TRANSCRIPT}; "
        "download and extract data_aishell.tgz from openslr.org/33)"
    )


def read_aishell1(corpus_dir: Path) -> dict[str, tuple[list[UtteranceRecord], list[Skip]]]:
    """Read AISHELL-1: data_aishell/wav/{train,dev,test}/S*/*.wav + transcript/aishell_transcript_v0.8.txt.

    The transcript has spaces between words (removed by normalisation later). Speaker = the S* folder.
    Wavs without a transcript line are skipped (`no_transcript`); transcript lines without a wav are ignored
    (the transcript covers all three splits). Returns {split: (records sorted by id, skips)}.
    """
    root = find_aishell_root(corpus_dir)
    wav_root = root / "wav"
    if not any((wav_root / s).is_dir() for s in AISHELL_SPLITS):
        hint = ""
        if list(wav_root.glob("*.tar.gz")):
            hint = " (the per-speaker archives in data_aishell/wav/*.tar.gz must be extracted first)"
        raise CorpusError(f"no {wav_root}/{{train,dev,test}} folders{hint}")
    transcript_skips: list[Skip] = []
    texts = _read_table(root / AISHELL_TRANSCRIPT, transcript_skips, need_value=False)
    out: dict[str, tuple[list[UtteranceRecord], list[Skip]]] = {}
    for split in AISHELL_SPLITS:
        split_dir = wav_root / split
        if not split_dir.is_dir():
            continue
        wavs = sorted(split_dir.glob("S*/*.wav"))
        ids = {w.stem for w in wavs}
        skips = [s for s in transcript_skips if s.id in ids]
        skipped_ids = {s.id for s in skips}
        records = []
        for wav in wavs:
            uid = wav.stem
            if uid in skipped_ids:
                continue
            if uid not in texts:
                skips.append(Skip(uid, NO_TRANSCRIPT, f"{wav} has no line in {root / AISHELL_TRANSCRIPT}"))
                continue
            records.append(UtteranceRecord(uid, str(wav), texts[uid][0], wav.parent.name))
        out[split] = (records, skips)
    return out


def read_jsonl(path: Path) -> tuple[list[UtteranceRecord], list[Skip]]:
    """Read a JSONL manifest: one {"audio_filepath", "text", "duration"?, "id"?, "speaker"?} per line.

    Relative audio paths are relative to the JSONL file's folder. The id is "id" if given, else the audio
    file's stem. Returns (records in file order, skips).
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"JSONL manifest not found: {path}")
    skips: list[Skip] = []
    entries: list[tuple[UtteranceRecord, int]] = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            skips.append(
                Skip(where, NON_UTF8, f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
            )
            continue
        except json.JSONDecodeError as exc:
            skips.append(Skip(where, BAD_LINE, f"{where}: invalid JSON ({exc.msg})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("audio_filepath"), str) or "text" not in obj:
            skips.append(Skip(where, BAD_LINE, f"{where}: needs string 'audio_filepath' and 'text'"))
            continue
        audio = _abs(obj["audio_filepath"], path.parent)
        uid = str(obj.get("id") or Path(obj["audio_filepath"]).stem)
        duration = obj.get("duration")
        duration = float(duration) if isinstance(duration, (int, float)) else None
        speaker = obj.get("speaker")
        entries.append(
            (
                UtteranceRecord(
                    uid, str(audio), str(obj["text"]), speaker and str(speaker), duration=duration
                ),
                lineno,
            )
        )
    records, repeated = drop_duplicate_ids([(rec.id, lineno, rec) for rec, lineno in entries], str(path))
    return records, skips + repeated
