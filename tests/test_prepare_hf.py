"""`gmot prepare hf`: datasets saved with save_to_disk (audio as bytes or paths) and audiofolders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from prepare_helpers import write_wav
from typer.testing import CliRunner

from data.features import duration_to_frames
from data.store import read_manifest
from gmot_cli.app import app

datasets = pytest.importorskip("datasets")
runner = CliRunner()

TEXTS = ["你好世界", "我们学习", "今天很好", "你们好"]
SECONDS = [0.6, 0.7, 0.8, 0.9]


def _report(out: Path, split: str) -> dict[str, list[dict]]:
    return json.loads((out / split / "prepare_report.json").read_text(encoding="utf-8"))["skipped"]


def _invoke(out: Path, *args: str):
    return runner.invoke(app, ["prepare", "hf", str(out), "--no-plm-cache", *args])


def _saved_dataset(tmp_path: Path) -> Path:
    """A Dataset with the audio as bytes (four good rows, then one bad row of each kind), saved to disk."""
    wavs = [write_wav(tmp_path / "src" / f"u{i}.wav", s, seed=i) for i, s in enumerate(SECONDS)]
    audio = [{"bytes": w.read_bytes(), "path": w.name} for w in wavs]
    rows = {
        "audio": [
            *audio,
            audio[0],
            {"bytes": b"not audio at all" * 8, "path": "bad.wav"},
            audio[1],
            audio[2],
        ],
        "sentence": [*TEXTS, None, "你好", "重复", "重复"],
        "utt": ["a", "b", "c", "d", "no-text", "garbage", "dup", "dup"],
        "spk": ["s1", "s1", "s2", "s2", "s3", "s3", "s3", "s3"],
    }
    ds = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def test_saved_dataset_with_audio_bytes(tmp_path: Path) -> None:
    saved = _saved_dataset(tmp_path)
    out = tmp_path / "out"
    cols = ["--text-column", "sentence", "--id-column", "utt", "--speaker-column", "spk"]
    res = _invoke(out, "--split", f"train={saved}", *cols)
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out / "train")
    assert [r.id for r in manifest] == ["a", "b", "c", "d"]
    assert [r.text for r in manifest] == TEXTS
    assert [r.speaker for r in manifest] == ["s1", "s1", "s2", "s2"]
    assert [r.num_frames for r in manifest] == [duration_to_frames(s) for s in SECONDS]
    skipped = _report(out, "train")
    assert {reason: [i["id"] for i in items] for reason, items in skipped.items()} == {
        "duplicate_id": ["dup"],
        "no_transcript": ["no-text"],
        "unreadable_audio": ["garbage"],
    }
    assert "row 4" in skipped["no_transcript"][0]["detail"]
    assert "row 5" in skipped["unreadable_audio"][0]["detail"]
    assert "rows 6, 7" in skipped["duplicate_id"][0]["detail"]
    # the bytes were written once per kept row, and a rerun keeps those files (and so its shards)
    written = sorted((out / "corpus" / "hf" / "train").iterdir())
    assert [p.name.split("-")[0] for p in written] == ["a", "b", "c", "d"]
    assert written[0].read_bytes() == (tmp_path / "src" / "u0.wav").read_bytes()
    res = _invoke(out, "--split", f"train={saved}", *cols)
    assert res.exit_code == 0, res.output
    assert sorted((out / "corpus" / "hf" / "train").iterdir()) == written


def test_dataset_dict_subsets_and_columns(tmp_path: Path) -> None:
    wavs = [write_wav(tmp_path / "src" / f"u{i}.wav", s, seed=i) for i, s in enumerate(SECONDS)]
    part = {"audio": [str(w) for w in wavs[:2]], "text": TEXTS[:2], "id": ["x", "y"]}
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(part), "validation": datasets.Dataset.from_dict(part)}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    out = tmp_path / "out"
    # train is found by name, dev by DIR:SUBSET; the audio is a column of paths, the ids the "id" column
    res = _invoke(out, "--split", f"train={tmp_path / 'dd'}", "--split", f"dev={tmp_path / 'dd'}:validation")
    assert res.exit_code == 0, res.output
    assert [r.id for r in read_manifest(out / "dev")] == ["x", "y"]
    assert [r.num_frames for r in read_manifest(out / "train")] == [
        duration_to_frames(s) for s in SECONDS[:2]
    ]
    res = _invoke(out, "--split", f"train={tmp_path / 'dd'}", "--text-column", "sentence")
    assert res.exit_code == 2 and "no column 'sentence'" in res.output and "audio, text, id" in res.output
    res = _invoke(out, "--split", f"test={tmp_path / 'dd'}")
    assert res.exit_code == 2 and "train, validation" in res.output and "DIR:SUBSET" in res.output


def test_audiofolder(tmp_path: Path) -> None:
    folder = tmp_path / "af"
    for i, s in enumerate(SECONDS):
        write_wav(folder / f"clip{i}.wav", s, seed=i)
    lines = ["file_name,transcription"] + [f"clip{i}.wav,{t}" for i, t in enumerate(TEXTS)]
    lines += ["gone.wav,你好", "clip0.wav,"]  # a missing file, an empty transcript
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    res = _invoke(out, "--split", f"train={folder}", "--text-column", "transcription")
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out / "train")
    assert [r.id for r in manifest] == [f"row-{i:06d}" for i in range(4)]
    assert [r.num_frames for r in manifest] == [duration_to_frames(s) for s in SECONDS]
    skipped = _report(out, "train")
    assert [i["id"] for i in skipped["missing_audio"]] == ["row-000004"]
    assert "gone.wav" in skipped["missing_audio"][0]["detail"]
    assert [i["id"] for i in skipped["empty_transcript"]] == ["row-000005"]
    assert not (out / "corpus").exists()  # audio given as files is read in place


def test_missing_folder_and_missing_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = _invoke(tmp_path / "o", "--split", f"train={tmp_path / 'nowhere'}")
    assert res.exit_code == 2 and "nowhere" in res.output and "Traceback" not in res.output
    datasets.Dataset.from_dict({"audio": ["a.wav"], "text": ["你好"]}).save_to_disk(str(tmp_path / "d"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    res = _invoke(tmp_path / "o", "--split", f"train={tmp_path / 'd'}")
    assert res.exit_code == 2 and "pip install 'gmot[hf]'" in res.output


def test_audiofolder_with_split_folders_and_jsonl_metadata(tmp_path: Path) -> None:
    root = tmp_path / "af"
    for split in ("train", "test"):
        lines = []
        for i, (s, t) in enumerate(zip(SECONDS[:2], TEXTS[:2], strict=True)):
            write_wav(root / split / f"{split}{i}.wav", s, seed=i)
            lines.append(json.dumps({"file_name": f"{split}{i}.wav", "text": t, "id": f"{split}{i}"}))
        (root / split / "metadata.jsonl").write_text("\n".join([*lines, "{oops"]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    res = _invoke(out, "--split", f"train={root}", "--split", f"dev={root}:test")
    assert res.exit_code == 0, res.output
    assert [r.id for r in read_manifest(out / "train")] == ["train0", "train1"]
    assert [r.id for r in read_manifest(out / "dev")] == ["test0", "test1"]
    bad = _report(out, "dev")["malformed_line"]
    assert [b["id"] for b in bad] == [f"{root / 'test' / 'metadata.jsonl'} row 2"]
    assert "metadata.jsonl:3" in bad[0]["detail"]
