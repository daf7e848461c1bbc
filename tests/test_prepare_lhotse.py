"""`gmot prepare lhotse`: CutSets and recordings + supervisions manifests through the CLI."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
from prepare_helpers import write_wav
from typer.testing import CliRunner

from data.features import duration_to_frames
from data.store import read_manifest
from gmot_cli.app import app

lhotse = pytest.importorskip("lhotse")
runner = CliRunner()


def _reasons(out: Path, split: str) -> dict[str, list[str]]:
    report = json.loads((out / split / "prepare_report.json").read_text(encoding="utf-8"))
    return {reason: [i["id"] for i in items] for reason, items in report["skipped"].items()}


def _details(out: Path, split: str) -> dict[str, list[str]]:
    report = json.loads((out / split / "prepare_report.json").read_text(encoding="utf-8"))
    return {reason: [i["detail"] for i in items] for reason, items in report["skipped"].items()}


def _recording(path: Path, rid: str) -> lhotse.Recording:
    return lhotse.Recording.from_file(path, recording_id=rid)


def _sup(sid: str, rid: str, start: float, duration: float, text: str) -> lhotse.SupervisionSegment:
    return lhotse.SupervisionSegment(
        id=sid, recording_id=rid, start=start, duration=duration, text=text, speaker=f"spk-{rid}"
    )


def _invoke(out: Path, *splits: str):
    args = ["prepare", "lhotse", str(out), "--no-plm-cache"]
    for s in splits:
        args += ["--split", s]
    return runner.invoke(app, args)


def _cutset(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """cuts.jsonl.gz: three good cuts and one cut of each bad kind, then a repeated and a malformed line.

    Returns (path, {recording id: cut id})."""
    audio = tmp_path / "audio"
    recs = [_recording(write_wav(audio / f"r{i}.wav", 1.0, seed=i), f"r{i}") for i in range(3)]
    # r0: the supervision covers 0.1-0.7 s of a 1.0 s file; r1 and r2 their whole file
    sups = [
        _sup("r0", "r0", 0.1, 0.6, "你好"),
        _sup("r1", "r1", 0.0, 1.0, "世界"),
        _sup("r2", "r2", 0, 1, "中文"),
    ]
    two = _recording(write_wav(audio / "two.wav", 1.0, seed=5), "two")
    sups += [_sup("two-a", "two", 0.0, 0.5, "你好"), _sup("two-b", "two", 0.5, 0.5, "世界")]
    stereo = _recording(write_wav(audio / "stereo.wav", 1.0, channels=2), "stereo")
    gone = _recording(write_wav(audio / "gone.wav", 1.0), "gone")
    (audio / "gone.wav").unlink()
    empty = _recording(write_wav(audio / "empty.wav", 1.0), "empty")
    dup = _recording(write_wav(audio / "dup.wav", 1.0), "dup")
    for rid in ("gone", "dup"):
        sups.append(_sup(rid, rid, 0.0, 1.0, "学习"))
    sups.append(_sup("empty", "empty", 0.0, 1.0, "，。"))
    url = lhotse.Recording(
        id="url",
        sources=[lhotse.audio.AudioSource(type="url", channels=[0], source="https://example.com/a.wav")],
        sampling_rate=16000,
        num_samples=16000,
        duration=1.0,
    )
    sups.append(_sup("url", "url", 0.0, 1.0, "你好"))
    recordings = lhotse.RecordingSet.from_recordings([*recs, two, stereo, gone, empty, dup, url])
    cuts = lhotse.CutSet.from_manifests(recordings, lhotse.SupervisionSet.from_segments(sups))
    # a stereo cut of channel 0 (CutSet.from_manifests would make a MultiCut of it)
    cuts = cuts.filter(lambda c: c.recording_id != "stereo") + lhotse.CutSet.from_cuts(
        [
            lhotse.MonoCut(
                "stereo-0", 0.0, 1.0, 0, recording=stereo, supervisions=[_sup("st", "stereo", 0, 1, "好")]
            )
        ]
    )
    ids = {c.recording_id: c.id for c in cuts}
    lines = [json.dumps(c.to_dict(), ensure_ascii=False) for c in cuts]
    dup_line = next(line for line in lines if '"dup' in line)
    lines += [dup_line, "{not json"]
    path = tmp_path / "cuts.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path, ids


def test_cutset_cli(tmp_path: Path) -> None:
    cuts, ids = _cutset(tmp_path)
    out = tmp_path / "out"
    res = _invoke(out, f"train={cuts}")
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out / "train")
    assert [r.id for r in manifest] == [ids["r0"], ids["r1"], ids["r2"]]
    assert [r.text for r in manifest] == ["你好", "世界", "中文"]
    assert [r.speaker for r in manifest] == ["spk-r0", "spk-r1", "spk-r2"]
    # the supervision's span is what gets featurised: 0.6 s of r0, the whole 1.0 s of r1 and r2
    assert [r.num_frames for r in manifest] == [duration_to_frames(0.6)] + [duration_to_frames(1.0)] * 2
    assert manifest[0].duration == pytest.approx(0.6, abs=1e-3)
    reasons = _reasons(out, "train")
    assert reasons["multiple_supervisions"] == [ids["two"]]
    assert reasons["unsupported_audio_entry"] == sorted(["stereo-0", ids["url"]])
    assert reasons["missing_audio"] == [ids["gone"]]
    assert reasons["empty_transcript"] == [ids["empty"]]
    assert reasons["duplicate_id"] == [ids["dup"]]
    assert reasons["malformed_line"] == [f"{cuts}:{len(ids) + 2}"]
    details = " ".join(d for ds in _details(out, "train").values() for d in ds)
    assert "'url' audio source" in details and "2 channels" in details and "gone.wav" in details


def test_recordings_and_supervisions(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    recs = [_recording(write_wav(audio / f"r{i}.wav", 1.2, seed=i), f"r{i}") for i in range(2)]
    # two utterances of r0 (Kaldi-segments style), one of r1, one of a recording that is not listed
    sups = [
        _sup("u0", "r0", 0.0, 0.5, "你好"),
        _sup("u1", "r0", 0.5, 0.7, "世界"),
        _sup("u2", "r1", 0.2, 0.8, "学习"),
        _sup("u3", "nowhere", 0.0, 1.0, "中文"),
    ]
    lhotse.RecordingSet.from_recordings(recs).to_file(tmp_path / "recordings.jsonl.gz")
    lhotse.SupervisionSet.from_segments(sups).to_file(tmp_path / "supervisions.jsonl.gz")
    out = tmp_path / "out"
    # supervisions first: the order does not matter
    res = _invoke(out, f"train={tmp_path / 'supervisions.jsonl.gz'},{tmp_path / 'recordings.jsonl.gz'}")
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out / "train")
    assert [r.id for r in manifest] == ["u0", "u1", "u2"]
    assert [r.num_frames for r in manifest] == [duration_to_frames(d) for d in (0.5, 0.7, 0.8)]
    assert _reasons(out, "train") == {"no_audio_entry": ["u3"]}


def test_unusable_manifests_are_errors(tmp_path: Path) -> None:
    rec = _recording(write_wav(tmp_path / "a.wav", 1.0), "a")
    lhotse.RecordingSet.from_recordings([rec]).to_file(tmp_path / "recordings.jsonl.gz")
    res = _invoke(tmp_path / "o", f"train={tmp_path / 'recordings.jsonl.gz'}")
    assert res.exit_code == 2 and "recordings.jsonl.gz is not a lhotse CutSet" in res.output
    res = _invoke(tmp_path / "o", f"train={tmp_path / 'missing.jsonl.gz'}")
    assert res.exit_code == 2 and "missing.jsonl.gz" in res.output and "Traceback" not in res.output
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    res = _invoke(tmp_path / "o", f"train={tmp_path / 'broken.jsonl.gz'}")
    assert res.exit_code == 2 and "broken.jsonl.gz" in res.output and "Traceback" not in res.output


def test_without_lhotse_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lhotse", None)  # `import lhotse` raises ImportError
    res = _invoke(tmp_path / "o", f"train={tmp_path / 'cuts.jsonl.gz'}")
    assert res.exit_code == 2 and "pip install 'gmot[lhotse]'" in res.output
