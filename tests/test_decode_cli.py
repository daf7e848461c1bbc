"""`gmot decode` end to end on a tiny fitted model, audio input handling and the bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from tiny_model import build_tiny_checkpoint
from typer.testing import CliRunner

from data.features import compute_fbank, load_audio
from data.scoring import read_kaldi_text, read_transcripts, score_transcripts
from gmot_cli.app import app
from models.tasks.decoding import wav_utterances

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_exp(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An experiment folder with avg.pt of a tiny model fitted on tiny_prepared/train."""
    return build_tiny_checkpoint(tiny_prepared, tmp_path_factory.mktemp("tiny_exp"))


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_decode_split_writes_text_details_rtf_and_scores(
    tiny_exp: Path, tiny_prepared: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hyp"
    res = _invoke(
        "decode", tiny_exp, tiny_prepared, "--split", "train", "--out", out, "--batch-frames", "300"
    )
    assert res.exit_code == 0, res.output
    hyps = read_kaldi_text(out / "text")
    refs = read_transcripts(tiny_prepared / "train")
    assert list(hyps) == list(refs)  # every utterance, manifest order
    details = [json.loads(line) for line in (out / "details.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [d["id"] for d in details] == list(refs)
    assert all(d["duration"] > 0 and d["decode_time"] > 0 for d in details)
    assert [d["hyp"] for d in details] == list(hyps.values())
    summary = json.loads((out / "rtf.json").read_text(encoding="utf-8"))
    assert summary["rtf"] == pytest.approx(
        sum(d["decode_time"] for d in details) / sum(d["duration"] for d in details), rel=1e-3
    )
    # the fitted model transcribes its training data well; the printed CER is the scorer's
    cer = score_transcripts(refs, hyps).rate
    assert cer < 0.3
    assert summary["cer"] == pytest.approx(cer)
    assert f"%CER {100 * cer:.2f}" in res.output
    assert "RTF" in res.output


@pytest.mark.slow
def test_beam_decode_matches_greedy_on_a_fitted_model(
    tiny_exp: Path, tiny_prepared: Path, tmp_path: Path
) -> None:
    for method in ("greedy", "beam"):
        res = _invoke("decode", tiny_exp, tiny_prepared, "--split", "dev", "--out", tmp_path / method,
                      "--method", method, "--beam-size", "4")  # fmt: skip
        assert res.exit_code == 0, res.output
    greedy = score_transcripts(
        read_transcripts(tiny_prepared / "dev"), read_kaldi_text(tmp_path / "greedy/text")
    )
    beam = score_transcripts(read_transcripts(tiny_prepared / "dev"), read_kaldi_text(tmp_path / "beam/text"))
    assert beam.rate <= greedy.rate + 0.05
    assert json.loads((tmp_path / "beam/rtf.json").read_text())["beam_size"] == 4


def _tone(rate: int, seconds: float = 0.6) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 1200 * t)).astype(np.float32)


def test_wav_input_resamples_and_mixes_stereo_down(tmp_path: Path) -> None:
    mono16 = tmp_path / "mono16.wav"
    soundfile.write(mono16, _tone(16000), 16000)
    other = tmp_path / "tone22k.wav"
    soundfile.write(other, _tone(22050), 22050)
    stereo = tmp_path / "stereo.wav"
    soundfile.write(stereo, np.stack([_tone(16000), _tone(16000)], axis=1), 16000)
    utts = wav_utterances([mono16, other, stereo])
    assert [u.id for u in utts] == ["mono16", "tone22k", "stereo"]
    # 0.6 s at any rate -> 0.6 s at 16 kHz -> 60 centred frames, one every 10 ms
    assert [u.feats.shape for u in utts] == [(60, 80)] * 3
    assert [round(u.duration, 3) for u in utts] == [0.6, 0.6, 0.6]
    assert np.allclose(utts[2].feats, utts[0].feats, atol=1e-4)  # stereo of identical channels == mono
    # the resampled tone has its energy in the same Mel bins as the native 16 kHz one
    assert np.argmax(utts[1].feats.mean(0)) == np.argmax(utts[0].feats.mean(0))
    assert np.allclose(compute_fbank(load_audio(other)), utts[1].feats)


@pytest.mark.slow
def test_decode_wav_files_prints_one_line_each(tiny_exp: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    soundfile.write(a, _tone(22050, 1.0), 22050)
    soundfile.write(b, np.stack([_tone(8000, 0.8)] * 2, axis=1), 8000)
    res = _invoke("decode", tiny_exp, "--wav", a, b, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    lines = read_kaldi_text(tmp_path / "out" / "text")
    assert list(lines) == ["a", "b"]
    for utt_id in ("a", "b"):
        assert any(line.split(" ")[0] == utt_id for line in res.output.splitlines())
    summary = json.loads((tmp_path / "out" / "rtf.json").read_text())
    assert summary["audio_seconds"] == pytest.approx(1.8, abs=0.01)


def test_missing_and_corrupt_checkpoints_are_clear_errors(tiny_prepared: Path, tmp_path: Path) -> None:
    res = _invoke("decode", tmp_path / "nope.pt", tiny_prepared, "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert "nope.pt does not exist" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02not a checkpoint at all")
    res = _invoke("decode", bad, tiny_prepared, "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert "bad.pt" in res.output and "corrupt" in res.output
    empty_exp = tmp_path / "exp"
    empty_exp.mkdir()
    res = _invoke("decode", empty_exp, tiny_prepared)
    assert res.exit_code == 2 and "holds no checkpoint" in res.output


def test_unprepared_split_unreadable_lm_and_bad_audio(
    tiny_exp: Path, tiny_prepared: Path, tmp_path: Path
) -> None:
    res = _invoke("decode", tiny_exp, tiny_prepared, "--split", "eval2000", "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert "split 'eval2000' is not prepared" in res.output
    assert "dev, test, train" in res.output
    lm = tmp_path / "lm.arpa"
    lm.write_text("not an arpa file\n", encoding="utf-8")
    res = _invoke("decode", tiny_exp, tiny_prepared, "--method", "beam", "--lm", lm, "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert "cannot read language model" in res.output and "lm.arpa" in res.output
    res = _invoke("decode", tiny_exp, "--wav", tmp_path / "missing.wav")
    assert res.exit_code == 2 and "missing.wav" in res.output
    assert not (tmp_path / "o").exists()


def test_default_decode_folders_differ_by_method_beam_and_lm(tmp_path: Path) -> None:
    from gmot_cli.decode import default_out

    exp = tmp_path / "exp"
    exp.mkdir()
    lm = tmp_path / "lang" / "char_3gram.arpa"
    names = {
        default_out(exp, "test", "greedy", 10, None, 1.0).name,
        default_out(exp, "test", "beam", 10, None, 1.0).name,
        default_out(exp, "test", "beam", 20, None, 1.0).name,
        default_out(exp, "test", "beam", 10, lm, 0.5).name,
        default_out(exp, "test", "beam", 10, lm, 1.0).name,
        default_out(exp, "dev", "greedy", 10, None, 1.0).name,
        default_out(exp / "ckpt-000000010.pt", "test", "greedy", 10, None, 1.0).name,
    }
    assert len(names) == 7
    assert default_out(exp, "test", "beam", 10, lm, 0.5).name == "decode_test_beam_b10_char_3gram_w0.5"
    assert default_out(exp / "avg.pt", "test", "greedy", 10, None, 1.0) == exp / "decode_test_greedy"


def test_ctc_times_follow_the_frames_around_known_silences() -> None:
    import math

    import torch

    from models.engine.diagnostics import ctc_token_spans

    # 20 encoder frames over 3 units (0 = blank): silence, "A" on frames 5-7, silence, "B" on 13-14, silence
    lp = torch.full((20, 3), -8.0)
    lp[:, 0] = -0.01
    lp[5:8, 1], lp[5:8, 0] = -0.05, -4.0
    lp[13:15, 2], lp[13:15, 0] = -0.2, -2.0
    spans = ctc_token_spans(lp, [1, 2])
    assert [(s, e) for s, e, _ in spans] == [(5, 8), (13, 15)]
    assert spans[0][2] == pytest.approx(math.exp(-0.05), rel=1e-4)  # the mean posterior on its frames
    assert spans[1][2] < spans[0][2]
    assert ctc_token_spans(lp[:2], [1, 1, 1]) is None  # cannot fit


@pytest.mark.slow
def test_decode_writes_times_confidence_and_nbest(
    tiny_exp: Path, tiny_prepared: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nb"
    res = _invoke("decode", tiny_exp, tiny_prepared, "--split", "dev", "--out", out, "--method", "beam",
                  "--beam-size", "8", "--nbest", "3", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    details = [json.loads(line) for line in (out / "details.jsonl").read_text(encoding="utf-8").splitlines()]
    # the 1-best of the same beam search without --nbest
    res = _invoke("decode", tiny_exp, tiny_prepared, "--split", "dev", "--out", tmp_path / "one", "--method",
                  "beam", "--beam-size", "8", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    one_best = read_kaldi_text(tmp_path / "one" / "text")
    assert [d["id"] for d in details] == list(one_best)
    for d in details:
        assert [t[0] for t in d["times"]] == list(d["hyp"])  # one entry per character, in order
        ends = [0.0] + [x for _, s, e in d["times"] for x in (s, e)]
        assert ends == sorted(ends) and ends[-1] <= d["duration"] + 0.08  # within the audio (80 ms frames)
        if d["hyp"]:
            assert 0.0 < d["confidence"] <= 1.0  # a mean of posteriors
        else:
            assert "confidence" not in d  # no character to be confident about
        # utterances of 40-120 frames: a beam of 8 holds more than 3 distinct texts at the last frame
        assert len(d["nbest"]) == 3
        assert len({n["hyp"] for n in d["nbest"]}) == 3  # distinct texts
        assert d["nbest"][0]["hyp"] == d["hyp"] == one_best[d["id"]]
        scores = [n["score"] for n in d["nbest"]]
        assert scores == sorted(scores, reverse=True)
    bad = _invoke(
        "decode", tiny_exp, tiny_prepared, "--split", "dev", "--out", tmp_path / "x", "--nbest", "2"
    )
    assert bad.exit_code == 2 and "needs --method beam" in bad.output


@pytest.mark.slow
def test_no_timestamps_leaves_times_and_confidence_out(
    tiny_exp: Path, tiny_prepared: Path, tmp_path: Path
) -> None:
    details = {}
    for name, extra in (("with", []), ("without", ["--no-timestamps"])):
        res = _invoke("decode", tiny_exp, tiny_prepared, "--split", "dev", "--out", tmp_path / name,
                      "--no-progress", *extra)  # fmt: skip
        assert res.exit_code == 0, res.output
        lines = (tmp_path / name / "details.jsonl").read_text(encoding="utf-8").splitlines()
        details[name] = [json.loads(line) for line in lines]
    assert all("times" in d for d in details["with"])
    assert any("confidence" in d for d in details["with"])
    for d in details["without"]:
        assert "times" not in d and "confidence" not in d
    # the same transcripts: only the alignment is left out
    assert [(d["id"], d["hyp"]) for d in details["without"]] == [(d["id"], d["hyp"]) for d in details["with"]]


def _decode_with_model_front_end(tiny_prepared: Path, tmp_path: Path, frontend: str):
    """`gmot decode` of the tiny data with a checkpoint whose recorded front end is ``frontend``."""
    exp = build_tiny_checkpoint(tiny_prepared, tmp_path / "exp", steps=1)
    state = torch.load(exp / "avg.pt", weights_only=True)
    state["cmvn"]["frontend"] = frontend
    torch.save(state, exp / "avg.pt")
    return _invoke("decode", exp, tiny_prepared, "--split", "dev", "--out", tmp_path / "hyp")


def test_data_of_another_front_end_is_refused(tiny_prepared: Path, tmp_path: Path) -> None:
    res = _decode_with_model_front_end(tiny_prepared, tmp_path, "kaldi-snip")
    assert res.exit_code == 2
    assert "'sherpa-onnx' features but the model was trained on 'kaldi-snip'" in res.output
    assert not (tmp_path / "hyp").exists()


def test_a_checkpoint_of_an_unknown_front_end_is_named(tiny_prepared: Path, tmp_path: Path) -> None:
    res = _decode_with_model_front_end(tiny_prepared, tmp_path, "future-fbank")
    assert res.exit_code == 2
    assert "avg.pt" in res.output and "unknown feature front end 'future-fbank'" in res.output


def test_wav_features_follow_the_model_front_end(tmp_path: Path) -> None:
    """`gmot decode --wav` with a model trained before front ends were named computes its features."""
    wav = tmp_path / "tone.wav"
    soundfile.write(wav, _tone(16000), 16000)
    (legacy,) = wav_utterances([wav], 80, "kaldi-snip")
    (default,) = wav_utterances([wav], 80)
    assert legacy.feats.shape == (58, 80) and default.feats.shape == (60, 80)  # whole vs centred windows
    assert np.array_equal(legacy.feats, compute_fbank(load_audio(wav), "kaldi-snip"))
