"""`gmot prepare jsonl | aishell1 | demo` through the CLI, and the PLM cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from prepare_helpers import GOOD_TEXTS, TinyTeacher, good_kaldi_dir, write_wav
from typer.testing import CliRunner

from data.corpora import read_kaldi_dir
from data.preparation import PrepareError, SplitInput, prepare
from data.store import SplitReader, read_manifest, read_plm_info, read_vocab
from gmot_cli.app import app

runner = CliRunner()


def _reasons(out: Path, split: str) -> dict[str, list[str]]:
    report = json.loads((out / split / "prepare_report.json").read_text(encoding="utf-8"))
    return {reason: [i["id"] for i in items] for reason, items in report["skipped"].items()}


# ------------------------------------------------------------------------------------------ jsonl


def test_jsonl_cli(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    lines = []
    for i, text in enumerate(GOOD_TEXTS):
        write_wav(audio / f"utt{i}.wav", 0.8, seed=i)
        entry = {"audio_filepath": f"audio/utt{i}.wav", "text": text}  # relative to the JSONL file
        if i == 0:
            entry["duration"] = 0.8
        if i == 1:
            entry["id"] = "custom-id"
        lines.append(json.dumps(entry, ensure_ascii=False).encode())
    lines.append(b"{not json")
    lines.append(b'{"audio_filepath": "audio/utt0.wav", "text": "\xff\xfe"}')
    lines.append(json.dumps({"audio_filepath": "audio/utt0.wav", "text": "你好"}).encode())  # duplicate id
    lines.append(json.dumps({"text": "no audio field"}).encode())
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    dev = {"audio_filepath": str(write_wav(tmp_path / "d.wav", 0.7)), "text": "世界，你好！"}
    (tmp_path / "dev.jsonl").write_text(json.dumps(dev, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "prepare", "jsonl", str(out), "--split", f"train={tmp_path / 'train.jsonl'}",
            "--split", f"dev={tmp_path / 'dev.jsonl'}", "--no-plm-cache",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    # not a terminal: a line per stage instead of live bars (which would print nothing here)
    assert "fbank: started" in res.output and "fbank: done" in res.output
    ids = [r.id for r in read_manifest(out / "train")]
    assert ids == ["custom-id", "utt2", "utt3", "utt4"]  # utt0 is a duplicate id (line 1 and 8)
    reasons = _reasons(out, "train")
    jsonl = str(tmp_path / "train.jsonl")
    assert reasons["duplicate_id"] == ["utt0"]
    assert reasons["malformed_line"] == [f"{jsonl}:6", f"{jsonl}:9"]
    assert reasons["non_utf8_text"] == [f"{jsonl}:7"]
    assert read_manifest(out / "dev")[0].text == "世界你好"


def test_jsonl_missing_file(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        [
            "prepare",
            "jsonl",
            str(tmp_path / "o"),
            "--split",
            f"train={tmp_path / 'x.jsonl'}",
            "--no-plm-cache",
        ],
    )
    assert res.exit_code == 2 and "x.jsonl" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------ AISHELL-1


def _mini_aishell(root: Path) -> Path:
    """data_aishell/{wav/{train,dev,test}/S*/*.wav, transcript/aishell_transcript_v0.8.txt} in miniature."""
    base = root / "data_aishell"
    lines = []
    layout = {"train": ["S0002", "S0003"], "dev": ["S0724"], "test": ["S0764"]}
    words = ["而 对 楼市", "成交 抑制 作用", "最 大 的 限 购", "也 成为 地方 政府"]
    k = 0
    for split, speakers in layout.items():
        for spk in speakers:
            for j in range(2):
                uid = f"BAC009{spk}W{j:04d}"
                write_wav(base / "wav" / split / spk / f"{uid}.wav", 1.0, seed=k)
                lines.append(f"{uid} {words[k % len(words)]}")
                k += 1
    # a wav with no transcript line, and a transcript line for a wav that is not there
    write_wav(base / "wav" / "train" / "S0002" / "BAC009S0002W9999.wav", 1.0)
    lines.append("BAC009S0999W0001 不 在")
    (base / "transcript").mkdir(parents=True)
    (base / "transcript" / "aishell_transcript_v0.8.txt").write_text(
        "\n".join(lines) + "\n", encoding="utf-8"
    )
    return root


def test_aishell1_cli(tmp_path: Path) -> None:
    corpus = _mini_aishell(tmp_path / "corpus")
    out = tmp_path / "out"
    res = runner.invoke(app, ["prepare", "aishell1", str(corpus), str(out), "--no-plm-cache", "--jobs", "1"])
    assert res.exit_code == 0, res.output
    train = read_manifest(out / "train")
    assert len(train) == 4 and {r.speaker for r in train} == {"S0002", "S0003"}
    assert train[0].id == "BAC009S0002W0000" and train[0].text == "而对楼市"
    assert len(read_manifest(out / "dev")) == 2 and len(read_manifest(out / "test")) == 2
    assert _reasons(out, "train") == {"no_transcript": ["BAC009S0002W9999"]}
    assert "楼" in read_vocab(out / "lang")
    # data_aishell itself is accepted as CORPUS_DIR too
    res = runner.invoke(
        app, ["prepare", "aishell1", str(corpus / "data_aishell"), str(out), "--no-plm-cache"]
    )
    assert res.exit_code == 0, res.output


def test_aishell1_missing_tree(tmp_path: Path) -> None:
    res = runner.invoke(app, ["prepare", "aishell1", str(tmp_path), str(tmp_path / "o"), "--no-plm-cache"])
    assert res.exit_code == 2
    assert "aishell_transcript_v0.8.txt" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------ demo


def test_demo_without_espeak_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if "espeak" in name else real_which(name))
    res = runner.invoke(app, ["prepare", "demo", str(tmp_path / "o"), "--no-plm-cache"])
    assert res.exit_code == 2  # a missing tool, like a missing optional package: a usage error
    assert "apt-get install espeak-ng" in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert not (tmp_path / "o" / "corpus").exists()


# ------------------------------------------------------------------------------------------ PLM cache


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        from tiny_plm import make_tiny_bert_dir
    except ImportError:  # pragma: no cover - the helper belongs to another test module
        pytest.fail("tests/tiny_plm.py is required")
    return make_tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


def test_plm_cache_with_a_teacher_object(tmp_path: Path, tiny_bert: Path) -> None:
    good_kaldi_dir(tmp_path, "train", GOOD_TEXTS)
    good_kaldi_dir(tmp_path, "dev", ["你好吗"], seed=9)
    teacher = TinyTeacher(tiny_bert)
    splits = [SplitInput(n, *read_kaldi_dir(tmp_path / n)) for n in ("train", "dev")]
    out = tmp_path / "out"
    result = prepare(out, splits, teacher=teacher)
    assert result.splits[0].plm_tokens == sum(len(t) for t in GOOD_TEXTS)
    info = read_plm_info(out / "lang")
    assert info is not None
    assert (info.name, info.width, info.layer) == ("tiny-bert", 16, -1)
    reader = SplitReader(out / "train")
    stored = []
    for rec in reader.records:
        feats = reader.plm_features(rec)
        assert feats is not None and feats.shape == (len(rec.text), 16)
        tokens, fresh = teacher.encode([rec.text])[0]
        assert rec.plm.tokens == tokens and len(tokens) == len(rec.text)  # character-level tokenizer
        np.testing.assert_allclose(feats, fresh, atol=5e-3, rtol=5e-3)
        stored.append(feats)
    allf = np.concatenate(stored).astype(np.float64)
    np.testing.assert_allclose(info.mean, allf.mean(0), atol=1e-6)
    np.testing.assert_allclose(info.std, allf.std(0), rtol=1e-5)
    dev = SplitReader(out / "dev")
    assert dev.plm_features(dev.records[0]).shape == (3, 16)
    # resuming does not call the teacher again
    teacher.calls = 0
    prepare(out, splits, teacher=teacher)
    assert teacher.calls == 0
    # a truncated PLM shard is redone (that shard only), as the reader's message for it promises
    plm_shard = out / "train" / reader.records[0].plm.shard
    plm_shard.write_bytes(plm_shard.read_bytes()[:-64])
    prepare(out, splits, teacher=teacher)
    assert teacher.calls == 1
    np.testing.assert_array_equal(SplitReader(out / "train").plm_features(reader.records[0]), stored[0])
    # preparing again without a teacher removes the PLM entries and plm.json
    prepare(out, splits)
    assert read_manifest(out / "train")[0].plm is None
    assert read_plm_info(out / "lang") is None


def test_plm_cache_lang_mismatch_is_refused(tmp_path: Path, tiny_bert: Path) -> None:
    good_kaldi_dir(tmp_path, "train", GOOD_TEXTS[:2])
    prepare(tmp_path / "out", [SplitInput("train", *read_kaldi_dir(tmp_path / "train"))])  # no PLM
    good_kaldi_dir(tmp_path, "test", ["你好"], seed=3)
    with pytest.raises(PrepareError, match=r"no plm\.json"):
        prepare(
            tmp_path / "out2",
            [SplitInput("test", *read_kaldi_dir(tmp_path / "test"))],
            teacher=TinyTeacher(tiny_bert),
            lang_dir=tmp_path / "out" / "lang",
        )


@pytest.mark.slow
def test_plm_cli_with_a_local_folder(tmp_path: Path, tiny_bert: Path) -> None:
    good_kaldi_dir(tmp_path, "train", GOOD_TEXTS[:3])
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["prepare", "kaldi", str(out), "--split", f"train={tmp_path / 'train'}", "--plm", str(tiny_bert)]
    )
    assert res.exit_code == 0, res.output
    info = read_plm_info(out / "lang")
    assert info is not None and info.width == 16
    rec = read_manifest(out / "train")[0]
    assert rec.plm.num_tokens == len(rec.text)


def test_plm_untrained_through_the_cli_keeps_the_audio_and_tokens_and_changes_the_features(
    tmp_path: Path, tiny_bert: Path
) -> None:
    """`gmot prepare ... --plm untrained:FOLDER`, the untrained-teacher control, as a user runs it: the same
    features, vocabulary and teacher tokens as the trained teacher's folder, other teacher features, and the
    teacher recorded as untrained."""
    good_kaldi_dir(tmp_path, "train", GOOD_TEXTS[:3])
    split = ["--split", f"train={tmp_path / 'train'}"]
    for name, plm in (("trained", str(tiny_bert)), ("untrained", f"untrained:{tiny_bert}")):
        res = runner.invoke(app, ["prepare", "kaldi", str(tmp_path / name), *split, "--plm", plm])
        assert res.exit_code == 0, res.output
    trained, untrained = tmp_path / "trained", tmp_path / "untrained"
    info = read_plm_info(untrained / "lang")
    assert info is not None and info.name.startswith("untrained:") and info.width == 16
    assert (trained / "lang" / "vocab.txt").read_bytes() == (untrained / "lang" / "vocab.txt").read_bytes()
    for a, b in zip(read_manifest(trained / "train"), read_manifest(untrained / "train"), strict=True):
        assert (a.id, a.token_ids, a.plm.num_tokens, a.plm.tokens) == (
            b.id,
            b.token_ids,
            b.plm.num_tokens,
            b.plm.tokens,
        )
    feats = sorted((trained / "train" / "feats").glob("*.npy"))
    assert feats and all(
        f.read_bytes() == (untrained / "train" / "feats" / f.name).read_bytes() for f in feats
    )
    plm = sorted((trained / "train" / "plm").glob("*.npy"))
    assert plm and any(f.read_bytes() != (untrained / "train" / "plm" / f.name).read_bytes() for f in plm)


def test_unknown_plm_is_a_clear_error(tmp_path: Path) -> None:
    good_kaldi_dir(tmp_path, "train", GOOD_TEXTS[:1])
    res = runner.invoke(
        app,
        ["prepare", "kaldi", str(tmp_path / "o"), "--split", f"train={tmp_path / 'train'}", "--plm",
         "no-such-org/no-such-model-xyz"],
    )  # fmt: skip
    assert res.exit_code != 0
    assert "no-such-model-xyz" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "o" / "train").exists()  # nothing was computed


def test_plm_device_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    import shutil

    import torch

    if torch.cuda.is_available():
        pytest.skip("the message is for a machine without CUDA, and this one has a CUDA device")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (`gmot prepare demo` checks it before the teacher)")
    from typer.testing import CliRunner

    from gmot_cli.app import app

    result = CliRunner().invoke(app, ["prepare", "demo", str(tmp_path / "out"), "--plm-device", "cuda"])
    assert result.exit_code == 2
    assert "no CUDA device" in result.output
    assert not (tmp_path / "out" / "corpus").exists()  # nothing synthesised before the check


def test_line_progress_prints_stages_and_periodic_counts() -> None:
    import io

    from rich.console import Console

    from gmot_cli.line_progress import LineProgress

    buf = io.StringIO()
    with LineProgress(Console(file=buf, width=200), every_s=0.0) as progress:
        task = progress.add_task("PLM cache", total=10)
        progress.update(task, advance=4)
        progress.update(task, advance=6)
        progress.update(task, advance=1)  # past the end: nothing more
        other = progress.add_task("espeak-ng", total=None)
        progress.update(other, completed=3)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "PLM cache: started (of 10)"
    assert lines[1].startswith("PLM cache: running, 4 / 10")
    assert lines[2].startswith("PLM cache: done, 10 / 10")
    assert lines[3] == "espeak-ng: started"
    assert lines[4].startswith("espeak-ng: running, 3") and lines[5].startswith("espeak-ng: done, 3")
    assert len(lines) == 6


def test_speed_perturbation_of_the_train_split(tmp_path: Path, tiny_bert: Path) -> None:
    from data.features import speed_perturb

    wave = np.sin(np.linspace(0, 2000, 16000)).astype(np.float32)
    assert len(speed_perturb(wave, 1.1)) == pytest.approx(16000 / 1.1, abs=2)
    assert len(speed_perturb(wave, 0.9)) == pytest.approx(16000 / 0.9, abs=2)
    train = good_kaldi_dir(tmp_path, "train", GOOD_TEXTS[:3])
    dev = good_kaldi_dir(tmp_path, "dev", GOOD_TEXTS[3:5], seed=7)
    teacher = TinyTeacher(tiny_bert)
    out = tmp_path / "out"
    splits = [SplitInput(n, *read_kaldi_dir(d)) for n, d in (("train", train), ("dev", dev))]
    from data.preparation import PrepareOptions

    prepare(out, splits, teacher=teacher, options=PrepareOptions(speed_perturb=(0.9, 1.0, 1.1)))
    records = {r.id: r for r in read_manifest(out / "train")}
    originals = [r for r in records if not r.startswith("sp")]
    assert len(records) == 9 and len(originals) == 3
    for uid in originals:
        base = records[uid]
        slow, fast = records[f"sp0.9-{uid}"], records[f"sp1.1-{uid}"]
        assert slow.duration == pytest.approx(base.duration / 0.9, abs=0.002)
        assert fast.duration == pytest.approx(base.duration / 1.1, abs=0.002)
        assert slow.text == base.text and slow.token_ids == base.token_ids
        assert slow.speaker == f"sp0.9-{base.speaker}"
        assert slow.plm.tokens == base.plm.tokens  # the same transcript, the same teacher tokens
    assert len(read_manifest(out / "dev")) == 2  # only train is perturbed
    calls = teacher.calls
    assert calls <= 2  # one batch of the 3 distinct train transcripts (copies reuse them) and one for dev
    res = runner.invoke(app, ["prepare", "kaldi", str(tmp_path / "o2"), "--split", f"train={train}",
                              "--no-plm-cache", "--speed-perturb", "0.9,abc"])  # fmt: skip
    assert res.exit_code == 2 and "0.9,abc" in res.output


def test_speed_copies_in_other_shards_reuse_the_originals_rows(tmp_path: Path, tiny_bert: Path) -> None:
    from collections import Counter

    from data.preparation import PrepareOptions

    texts = GOOD_TEXTS[:3]
    train = good_kaldi_dir(tmp_path, "train", texts)
    teacher = TinyTeacher(tiny_bert)
    out = tmp_path / "out"
    options = PrepareOptions(speed_perturb=(0.9, 1.0, 1.1), shard_frames=1)  # one utterance a shard
    prepare(out, [SplitInput("train", *read_kaldi_dir(train))], teacher=teacher, options=options)
    assert Counter(teacher.encoded) == Counter(texts)  # each transcript once, not once per copy
    reader = SplitReader(out / "train")
    records = {r.id: r for r in read_manifest(out / "train")}
    assert len({r.feats.shard for r in records.values()}) == 9  # the copies really are in other shards
    for uid in [u for u in records if not u.startswith("sp")]:
        base = reader.plm_features(records[uid])
        for prefix in ("sp0.9-", "sp1.1-"):
            copy = records[prefix + uid]
            assert copy.plm.shard != records[uid].plm.shard and copy.plm.tokens == records[uid].plm.tokens
            np.testing.assert_array_equal(reader.plm_features(copy), base)
    # resume: a lost copy shard is rebuilt from the original's stored rows, without the teacher
    lost = records["sp1.1-" + next(u for u in records if not u.startswith("sp"))]
    (out / "train" / lost.plm.shard).unlink()
    teacher.encoded.clear()
    prepare(out, [SplitInput("train", *read_kaldi_dir(train))], teacher=teacher, options=options)
    assert teacher.encoded == []
    again = SplitReader(out / "train")
    original = records[lost.id.removeprefix("sp1.1-")]
    np.testing.assert_array_equal(again.plm_features(lost), reader.plm_features(original))


def test_front_end_option_is_recorded_and_followed_with_lang(tmp_path: Path) -> None:
    from data.store import read_frontend

    train = good_kaldi_dir(tmp_path, "train", GOOD_TEXTS[:2])
    dev = good_kaldi_dir(tmp_path, "dev", ["你好"], seed=4)
    out = tmp_path / "legacy"
    res = runner.invoke(app, ["prepare", "kaldi", str(out), "--split", f"train={train}", "--no-plm-cache",
                              "--frontend", "kaldi-snip"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert read_frontend(out / "lang") == "kaldi-snip"
    rec = read_manifest(out / "train")[0]
    assert rec.num_frames == 1 + (round(rec.duration * 16_000) - 400) // 160  # whole windows only
    # a split prepared later against this lang folder gets the lang folder's front end, not the default
    res = runner.invoke(app, ["prepare", "kaldi", str(tmp_path / "more"), "--split", f"dev={dev}",
                              "--lang", str(out / "lang"), "--no-plm-cache"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rec = read_manifest(tmp_path / "more" / "dev")[0]
    assert rec.num_frames == 1 + (round(rec.duration * 16_000) - 400) // 160
    res = runner.invoke(app, ["prepare", "kaldi", str(tmp_path / "x"), "--split", f"train={train}",
                              "--no-plm-cache", "--frontend", "htk"])  # fmt: skip
    assert res.exit_code == 2 and "--frontend must be one of sherpa-onnx, kaldi-snip" in res.output


def test_a_front_end_unknown_here_is_named(tmp_path: Path) -> None:
    """A lang folder written by a gmot that knows more front ends, and a library call with a wrong name."""
    import json as json_

    from data.preparation import PrepareOptions
    from data.store import StoreError, read_frontend

    train = good_kaldi_dir(tmp_path, "train", GOOD_TEXTS[:2])
    dev = good_kaldi_dir(tmp_path, "dev", ["你好"], seed=4)
    out = tmp_path / "out"
    res = runner.invoke(app, ["prepare", "kaldi", str(out), "--split", f"train={train}", "--no-plm-cache"])
    assert res.exit_code == 0, res.output
    cmvn = out / "lang" / "cmvn.json"
    cmvn.write_text(json_.dumps({**json_.loads(cmvn.read_text()), "frontend": "future-fbank"}))
    with pytest.raises(StoreError, match="unknown feature front end 'future-fbank'"):
        read_frontend(out / "lang")
    res = runner.invoke(app, ["prepare", "kaldi", str(tmp_path / "more"), "--split", f"dev={dev}",
                              "--lang", str(out / "lang"), "--no-plm-cache"])  # fmt: skip
    assert res.exit_code == 2 and "future-fbank" in res.output
    with pytest.raises(ValueError, match="unknown feature front end 'htk'"):
        PrepareOptions(frontend="htk")


def test_the_shared_options_are_declared_once_and_built_by_keyword() -> None:
    """Every source lists the fields of SharedOptions, in their order, after its own options; the --lang
    note is on --pitch and --frontend only where the source takes --lang."""
    import dataclasses

    import typer

    from gmot_cli.prepare import LANG_NOTES, SharedOptions, prepare_app

    names = [f.name for f in dataclasses.fields(SharedOptions) if f.init]
    group = typer.main.get_command(prepare_app)
    assert sorted(group.commands) == ["aishell1", "demo", "hf", "jsonl", "kaldi", "lhotse"]
    for source, command in group.commands.items():
        params = [p.name for p in command.params if p.name != "help"]
        assert params[-len(names) :] == names, source
        has_lang = "lang" in params
        assert has_lang == (source in ("kaldi", "jsonl", "lhotse", "hf"))
        helps = {p.name: p.help or "" for p in command.params}
        assert [n for n in names if any(helps[n].endswith(t) for t in LANG_NOTES.values())] == (
            list(LANG_NOTES) if has_lang else []
        ), source
    shared = SharedOptions(jobs=0, max_duration=0.0, speed_perturb="1.1,0.9", frontend="kaldi-snip")
    assert shared.options.jobs == 1 and shared.options.max_duration is None
    assert shared.options.speed_perturb == (1.1, 0.9) and shared.options.frontend == "kaldi-snip"
