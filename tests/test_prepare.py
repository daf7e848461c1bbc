"""`gmot prepare kaldi` end to end on tiny Kaldi dirs, every bad input, resuming, --lang, empty splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from prepare_helpers import GOOD_TEXTS, good_kaldi_dir, write_kaldi_dir, write_wav
from typer.testing import CliRunner

from data import feature_shards
from data.corpora import read_kaldi_dir
from data.features import compute_fbank, load_audio
from data.preparation import PrepareError, PrepareOptions, SplitInput, prepare
from data.store import SplitReader, read_cmvn, read_manifest, read_vocab
from gmot_cli.app import app

runner = CliRunner()


def _report(out: Path, split: str) -> dict:
    return json.loads((out / split / "prepare_report.json").read_text(encoding="utf-8"))


def _skip_reason(report: dict, uid: str) -> tuple[str, str] | None:
    for reason, items in report["skipped"].items():
        for item in items:
            if item["id"] == uid:
                return reason, item["detail"]
    return None


# ------------------------------------------------------------------------------------------ clean corpus


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clean")
    good_kaldi_dir(root, "train", GOOD_TEXTS)
    good_kaldi_dir(root, "dev", ["你好吗", "世界"], seed=10)  # 吗 is not in train
    out = root / "out"
    res = runner.invoke(
        app,
        [
            "prepare",
            "kaldi",
            str(out),
            "--split",
            f"train={root / 'train'}",
            "--split",
            f"dev={root / 'dev'}",
            "--no-plm-cache",
        ],
    )
    assert res.exit_code == 0, res.output
    return root, out


def test_clean_kaldi_layout_and_manifest(clean_run: tuple[Path, Path]) -> None:
    _, out = clean_run
    vocab = read_vocab(out / "lang")
    assert vocab[:2] == ["<blank>", "<unk>"]
    assert vocab[2:] == sorted(set("".join(GOOD_TEXTS)))
    mean, std = read_cmvn(out / "lang")
    assert mean.shape == (80,) and (std > 0.01).all()
    assert not (out / "lang" / "plm.json").exists()
    train = read_manifest(out / "train")
    assert [r.id for r in train] == sorted(r.id for r in train) and len(train) == 5
    for r in train:
        assert list(r.to_json()) == ["id", "duration", "num_frames", "text", "token_ids", "speaker", "feats"]
        assert r.plm is None and r.extra == {} and r.feats.extra == {}
        assert r.speaker in ("spk0", "spk1")
        assert abs(r.duration - r.num_frames * 0.01) <= 0.005 + 1e-9  # centred 10 ms frames
    dev = {r.id: r for r in read_manifest(out / "dev")}
    assert dev["dev-spk0-000"].token_ids[2] == 1  # 吗 -> <unk>
    assert 1 not in dev["dev-spk1-001"].token_ids
    report = _report(out, "train")
    assert report["utterances"] == 5 and report["skipped_total"] == 0
    assert report["hours"] == pytest.approx(sum(r.duration for r in train) / 3600, abs=1e-4)


def test_stored_features_equal_fresh_fbank(clean_run: tuple[Path, Path]) -> None:
    root, out = clean_run
    reader = SplitReader(out / "train")
    rec = reader.records[3]
    fresh = compute_fbank(load_audio(root / "wav" / "train" / f"{rec.id}.wav"))
    np.testing.assert_allclose(reader.features(rec), fresh, atol=0.02, rtol=2e-3)
    # CMVN is the statistics of what was computed (float32, before float16 storage)
    allf = np.concatenate([reader.features(r) for r in reader.records]).astype(np.float64)
    mean, _ = read_cmvn(out / "lang")
    np.testing.assert_allclose(mean, allf.mean(0), atol=0.01)


# ------------------------------------------------------------------------------------------ bad input

BAD_CASES = {
    # id: (expected reason or None when kept, a word the detail must contain)
    "bad-missing": ("missing_audio", "nowhere.wav"),
    "bad-garbage": ("unreadable_audio", "garbage.wav"),
    "bad-truncated": ("unreadable_audio", "truncated"),
    "bad-zero": ("empty_audio", "zero.wav"),
    "bad-emptytext": ("empty_transcript", "empty"),
    "bad-punct": ("empty_transcript", "punctuation"),
    "bad-nonutf8": ("non_utf8_text", "text:"),
    "bad-dup": ("duplicate_id", "lines"),
    "bad-textonly": ("no_audio_entry", "wav.scp"),
    "bad-wavonly": ("no_transcript", "text"),
    "bad-tooshort": ("too_short_for_transcript", "subsampling"),
    "bad-toolong": ("too_long", "--max-duration"),
    "bad-pipe": ("unsupported_audio_entry", "pipe"),
    "ok-stereo48k": (None, ""),
    "ok-catpipe": (None, ""),
}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("bad")
    w = root / "wav"
    wavs = {f"ok-{i}": str(write_wav(w / f"ok{i}.wav", 0.8, seed=i)) for i in range(3)}
    texts: list[tuple[str, str]] = [(f"ok-{i}", GOOD_TEXTS[i]) for i in range(3)]

    def add(uid: str, wav: str | None, text: str | None) -> None:
        if wav is not None:
            wavs[uid] = wav
        if text is not None:
            texts.append((uid, text))

    add("bad-missing", str(w / "nowhere.wav"), "你好")
    (w / "garbage.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunk")
    add("bad-garbage", str(w / "garbage.wav"), "你好")
    full = write_wav(w / "full.wav", 1.0).read_bytes()
    (w / "cut.wav").write_bytes(full[: len(full) // 2])
    add("bad-truncated", str(w / "cut.wav"), "你好")
    soundfile.write(str(w / "zero.wav"), np.zeros(0, dtype=np.float32), 16_000)
    add("bad-zero", str(w / "zero.wav"), "你好")
    add("bad-emptytext", wavs["ok-0"], "")
    add("bad-punct", wavs["ok-0"], "，。！？ ……")
    add("bad-nonutf8", wavs["ok-0"], None)
    add("bad-dup", wavs["ok-1"], "你好")
    texts.append(("bad-dup", "世界"))
    add("bad-textonly", None, "你好")
    add("bad-wavonly", wavs["ok-2"], None)
    add("bad-tooshort", str(write_wav(w / "short.wav", 0.1)), "我们学习中文你们好")
    add("bad-toolong", str(write_wav(w / "long.wav", 2.5)), "你好")
    add("bad-pipe", f"sox {wavs['ok-0']} -r 8000 -t wav - |", "你好")
    add("ok-stereo48k", str(write_wav(w / "stereo.wav", 0.9, rate=48_000, channels=2)), "世界")
    add("ok-catpipe", f"cat {wavs['ok-1']} |", "学习")
    write_kaldi_dir(root / "train", wavs, texts)
    with open(root / "train" / "text", "ab") as f:
        f.write(b"bad-nonutf8 \xff\xfe\xe4\xbd\n")
    out = root / "out"
    res = runner.invoke(
        app,
        [
            "prepare",
            "kaldi",
            str(out),
            "--split",
            f"train={root / 'train'}",
            "--no-plm-cache",
            "--max-duration",
            "2.0",
        ],
    )
    return root, out, res.output + f"\nexit={res.exit_code}"


def test_bad_input_run_finishes_with_exit_zero(bad_run: tuple[Path, Path, str]) -> None:
    output = bad_run[2]
    assert output.endswith("exit=0"), output
    assert "Traceback" not in output
    assert "too_long" in output and "skipped" in output  # the summary table names reasons


@pytest.mark.parametrize("uid", sorted(BAD_CASES))
def test_each_bad_input_is_skipped_with_its_reason(bad_run: tuple[Path, Path, str], uid: str) -> None:
    _, out, _ = bad_run
    reason, word = BAD_CASES[uid]
    kept = {r.id: r for r in read_manifest(out / "train")}
    found = _skip_reason(_report(out, "train"), uid)
    if reason is None:
        assert uid in kept and found is None
    else:
        assert uid not in kept
        assert found is not None, f"{uid} not reported"
        assert found[0] == reason
        assert word in found[1]


def test_stereo_48k_is_converted_not_skipped(bad_run: tuple[Path, Path, str]) -> None:
    _, out, _ = bad_run
    rec = {r.id: r for r in read_manifest(out / "train")}["ok-stereo48k"]
    assert rec.duration == pytest.approx(0.9, abs=1e-3)
    assert rec.num_frames == 90  # 0.9 s of centred 10 ms frames
    feats = SplitReader(out / "train").features(rec)
    assert np.isfinite(feats).all() and feats.shape == (90, 80)


def test_non_utf8_skip_names_file_and_line(bad_run: tuple[Path, Path, str]) -> None:
    root, out, _ = bad_run
    _, detail = _skip_reason(_report(out, "train"), "bad-nonutf8")
    n_lines = len((root / "train" / "text").read_bytes().rstrip(b"\n").split(b"\n"))
    assert f"{root / 'train' / 'text'}:{n_lines}" in detail


def test_report_counts_match(bad_run: tuple[Path, Path, str]) -> None:
    _, out, _ = bad_run
    report = _report(out, "train")
    assert report["utterances"] == 5
    assert report["skipped_total"] == sum(report["skipped_counts"].values()) == 13


# ------------------------------------------------------------------------------- flac and sox pipe entries

# the pipe commands of wav.scp entries that docs/usage.md says are read without running them
PIPES = {"flac": "flac -c -d -s {flac} |", "sox": "sox {wav} -t wav - |"}


def _pipe_corpus(root: Path) -> tuple[Path, Path]:
    """One utterance as a .wav and the same samples as a .flac (lossless from 16-bit PCM)."""
    wav = write_wav(root / "audio" / "u.wav", 0.9, seed=3)
    wave, rate = soundfile.read(wav, dtype="int16")
    flac = root / "audio" / "u.flac"
    soundfile.write(flac, wave, rate, subtype="PCM_16")
    return wav, flac


def test_flac_and_sox_pipe_entries_read_the_named_file(tmp_path: Path) -> None:
    """Without running flac or sox: the entries are read as the file they name, as a plain path is."""
    wav, flac = _pipe_corpus(tmp_path)
    entries = {"plain": str(wav), **{k: v.format(wav=wav, flac=flac) for k, v in PIPES.items()}}
    write_kaldi_dir(tmp_path / "train", entries, dict.fromkeys(entries, "你好世界"))
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["prepare", "kaldi", str(out), "--split", f"train={tmp_path / 'train'}", "--no-plm-cache"]
    )
    assert res.exit_code == 0, res.output
    report = _report(out, "train")
    assert report["skipped_total"] == 0, report["skipped"]
    reader = SplitReader(out / "train")
    feats = {r.id: reader.features(r) for r in reader.records}
    assert sorted(feats) == ["flac", "plain", "sox"]
    assert np.array_equal(feats["flac"], feats["plain"]) and np.array_equal(feats["sox"], feats["plain"])


@pytest.mark.parametrize("tool", sorted(PIPES))
def test_flac_and_sox_pipes_give_what_their_files_hold(tmp_path: Path, tool: str) -> None:
    """Where the tool is installed: its pipe's output holds the samples that reading the file directly
    gives, so reading it directly is what running the entry would give."""
    import io
    import shutil
    import subprocess

    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian package {tool}): its pipe's output cannot be compared")
    wav, flac = _pipe_corpus(tmp_path)
    command = PIPES[tool].format(wav=wav, flac=flac).removesuffix("|")
    run = subprocess.run(command, shell=True, capture_output=True, timeout=60, check=True)
    piped, rate = soundfile.read(io.BytesIO(run.stdout), dtype="float32")
    assert rate == 16_000
    np.testing.assert_array_equal(piped, load_audio(flac if tool == "flac" else wav))


# ------------------------------------------------------------------------------- empty splits, --lang


def test_empty_dev_split_gives_exit_code_1(tmp_path: Path) -> None:
    good_kaldi_dir(tmp_path, "train", GOOD_TEXTS[:2])
    write_kaldi_dir(tmp_path / "dev", {"d1": str(tmp_path / "none.wav")}, {"d1": "你好"})
    res = runner.invoke(
        app,
        [
            "prepare",
            "kaldi",
            str(tmp_path / "out"),
            "--split",
            f"train={tmp_path / 'train'}",
            "--split",
            f"dev={tmp_path / 'dev'}",
            "--no-plm-cache",
        ],
    )
    assert res.exit_code == 1
    assert "dev" in res.output and "ended empty" in res.output
    assert _report(tmp_path / "out", "dev")["skipped"]["missing_audio"][0]["id"] == "d1"
    assert len(read_manifest(tmp_path / "out" / "train")) == 2


def test_empty_train_gives_exit_code_1_and_no_lang(tmp_path: Path) -> None:
    good_kaldi_dir(tmp_path, "good", GOOD_TEXTS[:1])  # an earlier successful run into the same folder
    prepare(tmp_path / "out", [_split_input(tmp_path / "good")])
    assert (tmp_path / "out" / "lang" / "vocab.txt").exists()
    lm = tmp_path / "out" / "lang" / "char_3gram.arpa"
    assert "\\3-grams:" in lm.read_text(encoding="utf-8")  # the train transcripts' character LM
    write_kaldi_dir(tmp_path / "train", {"t1": str(tmp_path / "none.wav")}, {"t1": "你好"})
    res = runner.invoke(
        app,
        [
            "prepare",
            "kaldi",
            str(tmp_path / "out"),
            "--split",
            f"train={tmp_path / 'train'}",
            "--no-plm-cache",
        ],
    )
    assert res.exit_code == 1
    assert "train split ended empty" in res.output
    assert not (tmp_path / "out" / "lang" / "vocab.txt").exists()
    assert not lm.exists()


def test_without_train_needs_lang_then_adds_a_split(tmp_path: Path, clean_run: tuple[Path, Path]) -> None:
    _, first = clean_run
    good_kaldi_dir(tmp_path, "test", ["你好", "天气"], seed=30)
    res = runner.invoke(
        app,
        ["prepare", "kaldi", str(tmp_path / "o1"), "--split", f"test={tmp_path / 'test'}", "--no-plm-cache"],
    )
    assert res.exit_code == 2 and "--lang" in res.output and "Traceback" not in res.output
    res = runner.invoke(
        app,
        [
            "prepare",
            "kaldi",
            str(tmp_path / "o2"),
            "--split",
            f"test={tmp_path / 'test'}",
            "--no-plm-cache",
            "--lang",
            str(first / "lang"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert read_vocab(tmp_path / "o2" / "lang") == read_vocab(first / "lang")
    recs = read_manifest(tmp_path / "o2" / "test")
    assert [r.text for r in recs] == ["你好", "天气"]


def test_missing_kaldi_dir_is_a_clear_error(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        ["prepare", "kaldi", str(tmp_path / "o"), "--split", f"train={tmp_path / 'nope'}", "--no-plm-cache"],
    )
    assert res.exit_code == 2 and "nope" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["prepare", "kaldi", str(tmp_path / "o"), "--split", "train", "--no-plm-cache"])
    assert res.exit_code == 2 and "NAME=DIR" in res.output


# ------------------------------------------------------------------------------------------ resume, segments


def _split_input(data_dir: Path, name: str = "train") -> SplitInput:
    records, skips = read_kaldi_dir(data_dir)
    return SplitInput(name, records, skips)


def _count_featurised_shards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that collects the index of every shard `prepare` featurises from now on."""
    calls: list[int] = []
    real = feature_shards.featurise_shard

    def counting(task: dict) -> dict:
        calls.append(task["index"])
        return real(task)

    monkeypatch.setattr(feature_shards, "featurise_shard", counting)
    return calls


def test_resume_redoes_only_unfinished_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good_kaldi_dir(tmp_path, "train", GOOD_TEXTS)
    opts = PrepareOptions(shard_frames=150)  # about 2 utterances per shard
    out = tmp_path / "out"
    calls = _count_featurised_shards(monkeypatch)
    prepare(out, [_split_input(tmp_path / "train")], options=opts)
    n_shards = len(list((out / "train" / "feats").glob("shard-*.npy")))
    assert n_shards >= 3 and sorted(calls) == list(range(n_shards))
    first_manifest = (out / "train" / "manifest.jsonl").read_text()
    calls.clear()
    prepare(out, [_split_input(tmp_path / "train")], options=opts)
    assert calls == []  # everything was done
    (out / "train" / "parts" / "feats-00001.json").unlink()  # as if killed before shard 1 finished
    prepare(out, [_split_input(tmp_path / "train")], options=opts)
    assert calls == [1]
    assert (out / "train" / "manifest.jsonl").read_text() == first_manifest
    assert not list(out.rglob("*.tmp"))
    # a changed transcript invalidates its shard only
    text = (tmp_path / "train" / "text").read_text(encoding="utf-8").replace("你们好", "你们好好")
    (tmp_path / "train" / "text").write_text(text, encoding="utf-8")
    calls.clear()
    prepare(out, [_split_input(tmp_path / "train")], options=opts)
    assert len(calls) == 1


def test_resume_redoes_a_truncated_or_short_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the reader's damaged-shard message promises: a re-run rebuilds that shard, and only it."""
    good_kaldi_dir(tmp_path, "train", GOOD_TEXTS)
    opts = PrepareOptions(shard_frames=150)
    out = tmp_path / "out"
    prepare(out, [_split_input(tmp_path / "train")], options=opts)
    first_manifest = (out / "train" / "manifest.jsonl").read_text()
    calls = _count_featurised_shards(monkeypatch)
    shard1, shard2 = (out / "train" / "feats" / f"shard-0000{i}.npy" for i in (1, 2))
    shard1.write_bytes(shard1.read_bytes()[:-200])  # a copy cut short
    np.save(shard2, np.load(shard2)[:3])  # a valid array with fewer rows than its part says
    prepare(out, [_split_input(tmp_path / "train")], options=opts)
    assert sorted(calls) == [1, 2]
    assert (out / "train" / "manifest.jsonl").read_text() == first_manifest
    reader = SplitReader(out / "train")
    assert all(reader.features(r).shape == (r.num_frames, 80) for r in reader.records)


def test_segments_cut_recordings(tmp_path: Path) -> None:
    rec = write_wav(tmp_path / "rec.wav", 3.0)
    d = write_kaldi_dir(tmp_path / "train", {"rec1": str(rec)}, {"u1": "你好", "u2": "世界你好"})
    (d / "segments").write_text("u1 rec1 0.0 1.0\nu2 rec1 1.5 2.75\n", encoding="utf-8")
    result = prepare(tmp_path / "out", [_split_input(d)])
    assert [s.utterances for s in result.splits] == [2]
    recs = {r.id: r for r in read_manifest(tmp_path / "out" / "train")}
    assert recs["u1"].duration == pytest.approx(1.0) and recs["u1"].num_frames == 100
    assert recs["u2"].duration == pytest.approx(1.25)


def test_prepare_refuses_run_without_train(tmp_path: Path) -> None:
    good_kaldi_dir(tmp_path, "dev", ["你好"])
    with pytest.raises(PrepareError, match="train"):
        prepare(tmp_path / "out", [_split_input(tmp_path / "dev", "dev")])
    with pytest.raises(PrepareError, match="not a prepared lang"):
        prepare(tmp_path / "out", [_split_input(tmp_path / "dev", "dev")], lang_dir=tmp_path)


@pytest.mark.slow
def test_two_jobs_give_the_same_result(tmp_path: Path) -> None:
    good_kaldi_dir(tmp_path, "train", GOOD_TEXTS)
    for jobs in (1, 2):
        prepare(
            tmp_path / f"o{jobs}",
            [_split_input(tmp_path / "train")],
            options=PrepareOptions(jobs=jobs, shard_frames=150),
        )
    assert (tmp_path / "o1" / "train" / "manifest.jsonl").read_text() == (
        tmp_path / "o2" / "train" / "manifest.jsonl"
    ).read_text()
    a, b = SplitReader(tmp_path / "o1" / "train"), SplitReader(tmp_path / "o2" / "train")
    for r in a.records:
        np.testing.assert_array_equal(a.features(r), b.features(r))
    assert (tmp_path / "o1" / "lang" / "cmvn.json").read_text() == (
        tmp_path / "o2" / "lang" / "cmvn.json"
    ).read_text()
