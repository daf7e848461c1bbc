"""The embedded demo corpus: deterministic, held-out voices, covered characters, well-formed Kaldi folders."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data import demo
from data.demo import (
    DEV_VOICES,
    SPLITS,
    TEST_VOICES,
    TRAIN_VOICES,
    DemoCorpusError,
    EspeakNotFoundError,
    espeak_available,
    espeak_wave,
    load_sentences,
    plan_utterances,
    split_sentences,
    synthesize_demo_corpus,
)

SMALL = 20  # train sentences in the small test corpora


def _table(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text("utf-8").splitlines():
        key, _, value = line.partition(" ")
        rows.append((key, value))
    return rows


def _wav_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "wav").rglob("*.wav"))
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "seed0"
    calls: list[tuple[int, int]] = []
    dirs = synthesize_demo_corpus(
        out, seed=0, train_sentences=SMALL, jobs=1, progress=lambda d, t: calls.append((d, t))
    )
    assert dirs == {s: out.resolve() / s for s in SPLITS}
    total = calls[-1][1]
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert total == sum(len(_table(out / s / "text")) for s in SPLITS)
    return out


def test_missing_espeak_raises_with_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no espeak-ng anywhere on PATH
    assert not espeak_available()
    with pytest.raises(EspeakNotFoundError, match=r"apt-get install espeak-ng"):
        synthesize_demo_corpus(tmp_path / "out", train_sentences=SMALL)
    assert not (tmp_path / "out").exists()


def test_same_seed_identical_bytes_other_seed_differs(corpus: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synthesize_demo_corpus(again, seed=0, train_sentences=SMALL, jobs=2)  # parallel: same bytes as jobs=1
    for split in SPLITS:
        for name in ("text", "utt2spk", "spk2utt"):
            assert (again / split / name).read_bytes() == (corpus / split / name).read_bytes()
        rel = lambda root, s=split: (root / s / "wav.scp").read_text().replace(str(root.resolve()), "ROOT")  # noqa: E731
        assert rel(again) == rel(corpus)
    digests = _wav_digests(corpus)
    assert len(digests) == sum(len(_table(corpus / s / "text")) for s in SPLITS)
    assert _wav_digests(again) == digests

    other = tmp_path / "other"
    synthesize_demo_corpus(other, seed=1, train_sentences=SMALL)
    assert (other / "train" / "text").read_text() != (corpus / "train" / "text").read_text()
    assert set(_wav_digests(other).values()).isdisjoint(digests.values())


def test_voices_held_out_and_speakers_are_utterance_prefixes(corpus: Path) -> None:
    speakers = {}
    for split in SPLITS:
        rows = _table(corpus / split / "utt2spk")
        assert all(utt.startswith(f"{spk}-") for utt, spk in rows)
        speakers[split] = {spk for _, spk in rows}
    assert speakers["train"] <= set(TRAIN_VOICES)
    assert speakers["dev"] <= set(DEV_VOICES)
    assert speakers["test"] <= set(TEST_VOICES)
    assert speakers["test"].isdisjoint(speakers["train"] | speakers["dev"])
    assert speakers["dev"].isdisjoint(speakers["train"])
    # two distinct training voices per train sentence (the default)
    per_sentence: dict[str, set[str]] = {}
    for utt, spk in _table(corpus / "train" / "utt2spk"):
        per_sentence.setdefault(utt.split("-", 1)[1], set()).add(spk)
    assert len(per_sentence) == SMALL
    assert all(len(v) == 2 for v in per_sentence.values())


def test_held_out_characters_covered_by_train_and_no_shared_sentence(corpus: Path) -> None:
    texts = {s: dict(_table(corpus / s / "text")) for s in SPLITS}
    train_chars = set("".join(texts["train"].values()))
    sentence_ids = {s: {u.split("-", 1)[1] for u in texts[s]} for s in SPLITS}
    for split in ("dev", "test"):
        assert texts[split]
        assert set("".join(texts[split].values())) <= train_chars
        assert sentence_ids[split].isdisjoint(sentence_ids["train"])
        assert set(texts[split].values()).isdisjoint(texts["train"].values())
    assert sentence_ids["dev"].isdisjoint(sentence_ids["test"])


def test_kaldi_files_well_formed_and_sorted(corpus: Path) -> None:
    for split in SPLITS:
        d = corpus / split
        ids = None
        for name in ("wav.scp", "text", "utt2spk"):
            rows = _table(d / name)
            keys = [k for k, _ in rows]
            assert keys == sorted(keys), f"{name} not sorted"
            assert len(set(keys)) == len(keys)
            assert all(v and " " not in v for _, v in rows)
            ids = ids or keys
            assert keys == ids
        for utt, text in _table(d / "text"):
            assert re.fullmatch(r"[\u3400-\u9fff]+", text), (utt, text)
        for utt, wav in _table(d / "wav.scp"):
            assert Path(wav).is_absolute() and Path(wav).is_file() and Path(wav).stem == utt
        spk2utt = _table(d / "spk2utt")
        assert [s for s, _ in spk2utt] == sorted(s for s, _ in spk2utt)
        assert sorted(u for _, us in spk2utt for u in us.split()) == ids
        assert {s: set(us.split()) for s, us in spk2utt} == {
            s: {u for u, sp in _table(d / "utt2spk") if sp == s} for s, _ in spk2utt
        }


def test_wavs_readable_with_plausible_length(corpus: Path) -> None:
    for split in SPLITS:
        texts = dict(_table(corpus / split / "text"))
        for utt, wav in _table(corpus / split / "wav.scp"):
            x, sr = sf.read(wav, dtype="float32")
            assert sr == demo.SAMPLE_RATE and x.ndim == 1
            seconds, chars = len(x) / sr, len(texts[utt])
            # bounds hold with 0.25 s to spare on all 8,198 utterances of the default corpus (seed 0)
            assert 0.12 * chars + 0.2 < seconds < 0.45 * chars + 0.8, (utt, seconds, chars)
            assert float(np.sqrt(np.mean(x**2))) > 0.01
    assert not list(corpus.rglob("*.tmp"))


def test_licence_and_readme_written(corpus: Path) -> None:
    licence = (corpus / "LICENSE-sentences.txt").read_text("utf-8")
    assert "CC-BY-SA-4.0" in licence and "hsk-sentences-audio" in licence
    readme = (corpus / "README.md").read_text("utf-8")
    assert "cmn-latn-pinyin" in readme and "| test |" in readme


def test_rerun_resumes_and_refuses_other_settings(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    synthesize_demo_corpus(out, seed=0, train_sentences=SMALL)
    digests = _wav_digests(out)
    victim = out / next(iter(digests))
    victim.unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "wav").rglob("*.wav")}
    calls: list[tuple[int, int]] = []
    synthesize_demo_corpus(out, seed=0, train_sentences=SMALL, progress=lambda d, t: calls.append((d, t)))
    total = len(digests)
    assert calls[0] == (total - 1, total) and calls[-1] == (total, total)  # only the missing one was redone
    assert _wav_digests(out) == digests
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    with pytest.raises(DemoCorpusError, match="seed"):
        synthesize_demo_corpus(out, seed=5, train_sentences=SMALL)


def test_default_split_sizes_and_coverage() -> None:
    sentences = load_sentences()
    assert len(sentences) > 4000 and len({s.text for s in sentences}) == len(sentences)
    splits = split_sentences(sentences, seed=0)
    assert (len(splits["dev"]), len(splits["test"])) == (200, 300)
    assert len(splits["train"]) == len(sentences) - 500
    train_chars = {c for s in splits["train"] for c in s.text}
    assert all(set(s.text) <= train_chars for s in splits["dev"] + splits["test"])
    assert split_sentences(sentences, seed=0) == splits
    assert split_sentences(sentences, seed=1)["test"] != splits["test"]


def test_plan_voices_rates_and_bounds() -> None:
    splits = split_sentences(load_sentences(), seed=0, train_sentences=50)
    plan = plan_utterances(splits, seed=0, voices_per_sentence=3, noise=True)
    assert len(plan["train"]) == 150 and len(plan["test"]) == len(splits["test"])
    for utts in plan.values():
        for u in utts:
            assert demo.RATE_RANGE[0] <= u.rate <= demo.RATE_RANGE[1]
            assert demo.PITCH_RANGE[0] <= u.pitch <= demo.PITCH_RANGE[1]
            assert u.snr_db is not None and demo.SNR_RANGE_DB[0] <= u.snr_db <= demo.SNR_RANGE_DB[1]
    assert len({u.rate for u in plan["train"]}) > 20 and len({u.speaker for u in plan["train"]}) == 8
    # an utterance's settings depend only on (seed, id): a bigger plan keeps them
    bigger = plan_utterances(split_sentences(load_sentences(), 0, 60), 0, 3, True)
    assert set(plan["train"]) <= set(bigger["train"])
    assert [s.id for s in splits["train"]] == [
        s.id for s in split_sentences(load_sentences(), 0, 60)["train"][:50]
    ]
    for bad in (0, len(TRAIN_VOICES) + 1):
        with pytest.raises(ValueError):
            plan_utterances(splits, seed=0, voices_per_sentence=bad, noise=False)


def test_noise_snr_in_range() -> None:
    rng = np.random.default_rng(0)
    clean = (np.sin(np.arange(22050) * 0.05) * 8000).astype(np.int16)
    noisy = demo._add_noise(clean, 25.0, rng)
    assert noisy.dtype == np.int16 and noisy.shape == clean.shape
    diff = noisy.astype(np.float64) - clean
    snr = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(diff**2))
    assert 24.0 < snr < 26.0


def test_espeak_duration_grows_with_length_and_reads_one_syllable_per_hanzi() -> None:
    espeak = demo._espeak_path()
    texts = [
        "好",
        "你好吗",
        "我们明天去北京",
        "老师说我们明天早上八点在学校门口见面",
        "老师说我们明天早上八点在学校门口见面然后一起坐火车去北京看长城",
    ]
    lengths = [len(espeak_wave(espeak, t, "m2", 170, 50)) for t in texts]
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)
    assert lengths[-1] > 8 * lengths[0]
    # the pinyin voice gives one toned syllable per character (the plain `cmn` voice in 1.51 does not)
    sentences = load_sentences()
    assert not [s.text for s in sentences if any(w in s.text for w in demo.MISREAD_WORDS)]
    sample = sentences[::200]
    for sent in sample:
        phonemes = subprocess.run(
            [espeak, "-q", "-x", "-v", demo.ESPEAK_VOICE, sent.spoken],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert len(re.findall(r"\d+", phonemes)) == len(sent.text), (sent.text, phonemes)


@pytest.mark.parametrize("n", [3, 5, 10, 20])
def test_small_train_still_covers_held_out(n: int) -> None:
    sentences = load_sentences()
    for seed in range(3):
        splits = split_sentences(sentences, seed=seed, train_sentences=n)
        assert len(splits["train"]) == n and splits["dev"] and splits["test"]
        train_chars = {c for s in splits["train"] for c in s.text}
        assert all(set(s.text) <= train_chars for s in splits["dev"] + splits["test"])
        ids = [s.id for split in SPLITS for s in splits[split]]
        assert len(set(ids)) == len(ids)


def test_too_small_train_is_a_clear_error() -> None:
    with pytest.raises(DemoCorpusError, match="train_sentences=1"):
        split_sentences(load_sentences(), seed=0, train_sentences=1)


def test_noise_flag_clean_audio_is_espeak_output(corpus: Path, tmp_path: Path) -> None:
    clean_dir = tmp_path / "clean"
    synthesize_demo_corpus(clean_dir, seed=0, train_sentences=SMALL, noise=False)
    plan = plan_utterances(split_sentences(load_sentences(), 0, SMALL), 0, 2, noise=False)
    utt = plan["test"][0]
    clean, _ = sf.read(clean_dir / "wav" / "test" / utt.speaker / f"{utt.utt_id}.wav", dtype="int16")
    expected = espeak_wave(demo._espeak_path(), utt.sentence.spoken, utt.speaker, utt.rate, utt.pitch)
    assert np.array_equal(clean, expected)
    noisy, _ = sf.read(corpus / "wav" / "test" / utt.speaker / f"{utt.utt_id}.wav", dtype="int16")
    assert noisy.shape == clean.shape and not np.array_equal(noisy, clean)
    assert "white noise" not in (clean_dir / "README.md").read_text("utf-8")
