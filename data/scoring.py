"""Character / word error rates with jiwer, Kaldi `compute-wer` style summaries and per-utterance alignments.

Inputs are Kaldi-style `text` files (one utterance per line: id, one space, the transcript; an id alone on a
line is an empty transcript), prepared split folders (their `manifest.jsonl`) or decode output folders (their
`text` file). Scoring pairs utterances by id:

- ids present in the reference but absent from the hypothesis count as empty hypotheses (every reference unit
  is a deletion) and are listed in `ScoreResult.missing_in_hyp`;
- ids present only in the hypothesis are reported in `ScoreResult.missing_in_ref` and ignored;
- no id in common raises `ScoringError`.

Units: `char` (Mandarin CER) removes every whitespace character and compares characters; `word` splits on
whitespace. Counts come from jiwer 4 (`process_words` on our unit lists), so the figures here are jiwer's.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jiwer

UNITS = ("char", "word")


class ScoringError(Exception):
    """A reference / hypothesis input that cannot be scored; the message names the file and line."""


@dataclass
class UtteranceScore:
    """Edit counts and the aligned unit sequences of one utterance (`None` marks a gap in the alignment)."""

    id: str
    ref_len: int
    hits: int
    substitutions: int
    deletions: int
    insertions: int
    ref_aligned: list[str | None] = field(default_factory=list)
    hyp_aligned: list[str | None] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)  # per aligned column: C, S, D or I

    @property
    def errors(self) -> int:
        """Substitutions + deletions + insertions."""
        return self.substitutions + self.deletions + self.insertions


@dataclass
class ScoreResult:
    """Corpus-level figures; `rate` is errors / ref_len as a fraction (CER for char, WER for word units)."""

    unit: str
    sentences: int
    ref_len: int
    hits: int
    substitutions: int
    deletions: int
    insertions: int
    sentence_errors: int
    missing_in_hyp: list[str]
    missing_in_ref: list[str]
    utterances: list[UtteranceScore]

    @property
    def errors(self) -> int:
        """Substitutions + deletions + insertions over the corpus."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """Error rate as a fraction (0.05 = 5 %); 0 / 0 is 0 and k > 0 errors over 0 units is inf."""
        if self.ref_len == 0:
            return 0.0 if self.errors == 0 else float("inf")
        return self.errors / self.ref_len

    @property
    def metric(self) -> str:
        """`cer` for character units, `wer` for word units."""
        return "cer" if self.unit == "char" else "wer"

    def to_json(self) -> dict:
        """A JSON-serialisable summary (no per-utterance alignments)."""
        return {
            self.metric: self.rate,
            "unit": self.unit,
            "errors": self.errors,
            "ref_len": self.ref_len,
            "hits": self.hits,
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
            "sentences": self.sentences,
            "sentence_errors": self.sentence_errors,
            "ser": self.sentence_errors / self.sentences if self.sentences else 0.0,
            "missing_in_hyp": list(self.missing_in_hyp),
            "missing_in_ref": list(self.missing_in_ref),
        }

    def kaldi_summary(self) -> str:
        """Kaldi `compute-wer` style lines: `%CER 4.27 [ 45 / 1054, 3 ins, 7 del, 35 sub ]` and `%SER ...`."""
        name = self.metric.upper()
        pct = 100.0 * self.rate
        ser = 100.0 * self.sentence_errors / self.sentences if self.sentences else 0.0
        return (
            f"%{name} {pct:.2f} [ {self.errors} / {self.ref_len}, {self.insertions} ins, "
            f"{self.deletions} del, {self.substitutions} sub ]\n"
            f"%SER {ser:.2f} [ {self.sentence_errors} / {self.sentences} ]"
        )


def _check_text(raw: bytes, path: Path) -> list[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = raw[: err.start].count(b"\n") + 1
        raise ScoringError(f"{path}:{line_no}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.splitlines()


def read_kaldi_text(path: Path) -> dict[str, str]:
    """Read a Kaldi-style `text` file into {utterance id: transcript} (insertion order kept).

    Blank lines are skipped. A line that starts with whitespace (no id), contains a control character, or
    repeats an id raises `ScoringError` naming `file:line`.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ScoringError(f"cannot read {path}: {err.strerror or err}") from None
    out: dict[str, str] = {}
    for line_no, line in enumerate(_check_text(raw, path), start=1):
        if not line.strip():
            continue
        if line[0].isspace():
            raise ScoringError(f"{path}:{line_no}: malformed line (starts with whitespace, no utterance id)")
        if any(unicodedata.category(ch) == "Cc" and ch != "\t" for ch in line):
            raise ScoringError(f"{path}:{line_no}: malformed line (contains a control character)")
        parts = line.split(maxsplit=1)
        utt_id = parts[0]
        if utt_id in out:
            raise ScoringError(f"{path}:{line_no}: duplicate utterance id {utt_id!r}")
        out[utt_id] = parts[1].strip() if len(parts) > 1 else ""
    return out


def _read_manifest_texts(manifest: Path) -> dict[str, str]:
    try:
        raw = manifest.read_bytes()
    except OSError as err:
        raise ScoringError(f"cannot read {manifest}: {err.strerror or err}") from None
    out: dict[str, str] = {}
    for line_no, line in enumerate(_check_text(raw, manifest), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            utt_id, text = str(record["id"]), str(record.get("text") or "")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ScoringError(f"{manifest}:{line_no}: malformed manifest line ({err})") from None
        if utt_id in out:
            raise ScoringError(f"{manifest}:{line_no}: duplicate utterance id {utt_id!r}")
        out[utt_id] = text
    return out


def read_transcripts(path: Path) -> dict[str, str]:
    """Read transcripts from a Kaldi `text` file, a prepared split folder or a decode output folder.

    A folder with `manifest.jsonl` is a prepared split (its `text` fields are used); a folder with a `text`
    file is a decode output (or a Kaldi data dir). Returns {id: transcript}; raises `ScoringError`.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "manifest.jsonl").is_file():
            return _read_manifest_texts(path / "manifest.jsonl")
        if (path / "text").is_file():
            return read_kaldi_text(path / "text")
        raise ScoringError(
            f"{path} is a folder with neither manifest.jsonl (a prepared split) nor a text file"
        )
    if not path.exists():
        raise ScoringError(f"{path} does not exist")
    return read_kaldi_text(path)


def split_units(text: str, unit: str) -> list[str]:
    """Split a transcript into scoring units: characters with all whitespace removed, or whitespace words."""
    if unit == "char":
        return [ch for ch in text if not ch.isspace()]
    if unit == "word":
        return text.split()
    raise ValueError(f"unknown unit {unit!r}; choose one of {UNITS}")


def _utterance_from_chunks(utt_id: str, ref: list[str], hyp: list[str], chunks: list) -> UtteranceScore:
    score = UtteranceScore(utt_id, len(ref), 0, 0, 0, 0)
    for chunk in chunks:
        r = ref[chunk.ref_start_idx : chunk.ref_end_idx]
        h = hyp[chunk.hyp_start_idx : chunk.hyp_end_idx]
        if chunk.type == "equal":
            score.hits += len(r)
            score.ref_aligned += r
            score.hyp_aligned += h
            score.ops += ["C"] * len(r)
        elif chunk.type == "substitute":
            score.substitutions += len(r)
            score.ref_aligned += r
            score.hyp_aligned += h
            score.ops += ["S"] * len(r)
        elif chunk.type == "delete":
            score.deletions += len(r)
            score.ref_aligned += r
            score.hyp_aligned += [None] * len(r)
            score.ops += ["D"] * len(r)
        elif chunk.type == "insert":
            score.insertions += len(h)
            score.ref_aligned += [None] * len(h)
            score.hyp_aligned += h
            score.ops += ["I"] * len(h)
        else:  # pragma: no cover - jiwer 4 has exactly the four chunk types above
            raise ValueError(f"unknown alignment chunk {chunk.type!r}")
    return score


def score_pairs(pairs: list[tuple[str, str, str]], unit: str = "char") -> list[UtteranceScore]:
    """Align each (id, reference, hypothesis) with jiwer and return per-utterance counts and alignments."""
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; choose one of {UNITS}")
    if not pairs:
        return []
    refs = [split_units(r, unit) for _, r, _ in pairs]
    hyps = [split_units(h, unit) for _, _, h in pairs]
    # jiwer takes strings; join the units with single spaces and let it split them back as words, so
    # both units use the same (word-level) alignment on exactly our unit lists.
    out = jiwer.process_words([" ".join(r) for r in refs], [" ".join(h) for h in hyps])
    return [
        _utterance_from_chunks(utt_id, ref, hyp, chunks)
        for (utt_id, _, _), ref, hyp, chunks in zip(pairs, refs, hyps, out.alignments, strict=True)
    ]


def score_transcripts(refs: Mapping[str, str], hyps: Mapping[str, str], unit: str = "char") -> ScoreResult:
    """Score hypotheses against references paired by id (see the module docstring for missing ids).

    Returns a `ScoreResult` whose utterances follow the reference order. Raises `ScoringError` when the two
    share no id.
    """
    common = [utt for utt in refs if utt in hyps]
    if not common:
        sample_r = ", ".join(list(refs)[:3]) or "none"
        sample_h = ", ".join(list(hyps)[:3]) or "none"
        raise ScoringError(
            f"reference and hypothesis have no utterance id in common (reference ids: {sample_r}; "
            f"hypothesis ids: {sample_h})"
        )
    missing_in_hyp = [utt for utt in refs if utt not in hyps]
    missing_in_ref = [utt for utt in hyps if utt not in refs]
    pairs = [(utt, refs[utt], hyps.get(utt, "")) for utt in refs]
    utts = score_pairs(pairs, unit)
    return ScoreResult(
        unit=unit,
        sentences=len(utts),
        ref_len=sum(u.ref_len for u in utts),
        hits=sum(u.hits for u in utts),
        substitutions=sum(u.substitutions for u in utts),
        deletions=sum(u.deletions for u in utts),
        insertions=sum(u.insertions for u in utts),
        sentence_errors=sum(1 for u in utts if u.errors > 0),
        missing_in_hyp=missing_in_hyp,
        missing_in_ref=missing_in_ref,
        utterances=utts,
    )


def display_width(text: str) -> int:
    """Terminal columns taken by `text` (East Asian wide / full-width characters count 2)."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def format_alignment(utt: UtteranceScore, gap: str = "*") -> str:
    """sclite / ESPnet `result.txt` style block for one utterance: id, ref, hyp, op rows and #csid counts.

    Columns are padded to the display width of their widest entry; gaps are shown as `gap` repeated.
    """
    refs, hyps, ops = [], [], []
    for r, h, op in zip(utt.ref_aligned, utt.hyp_aligned, utt.ops, strict=True):
        width = max(display_width(r or ""), display_width(h or ""), 1)
        r_txt = r if r is not None else gap * width
        h_txt = h if h is not None else gap * width
        refs.append(r_txt + " " * (width - display_width(r_txt)))
        hyps.append(h_txt + " " * (width - display_width(h_txt)))
        ops.append(op + " " * (width - 1))
    return (
        f"id: ({utt.id})\n"
        f"Scores: (#C #S #D #I) {utt.hits} {utt.substitutions} {utt.deletions} {utt.insertions}\n"
        f"REF:  {' '.join(refs)}\n"
        f"HYP:  {' '.join(hyps)}\n"
        f"Eval: {' '.join(ops)}\n"
    )


def write_details(result: ScoreResult, path: Path) -> None:
    """Write every utterance's alignment block (see `format_alignment`) to `path`, atomically."""
    path = Path(path)
    body = "\n".join(format_alignment(u) for u in result.utterances)
    if result.missing_in_hyp:
        body += "\n# ids missing from the hypothesis (scored as deletions): " + " ".join(
            result.missing_in_hyp
        )
    if result.missing_in_ref:
        body += "\n# ids missing from the reference (ignored): " + " ".join(result.missing_in_ref)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(body + "\n", encoding="utf-8")
    tmp.replace(path)


def utterance_dict(utt: UtteranceScore) -> dict:
    """A JSON-serialisable view of one utterance's score (counts and aligned sequences)."""
    return asdict(utt) | {"errors": utt.errors}
