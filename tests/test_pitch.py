"""Pitch features: frame alignment with fbank, f0 contours recovered from synthetic voices, voicing, and the
pitch path through prepare, training and decoding from audio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from prepare_helpers import good_kaldi_dir
from typer.testing import CliRunner

from data.features import (
    NUM_MEL_BINS,
    PITCH_DIM,
    SAMPLE_RATE,
    compute_fbank,
    compute_features,
    compute_pitch,
    feature_dim,
    feature_width_mismatch,
    has_pitch,
    num_frames,
)
from data.loader import FrequencyWarp
from data.store import SplitReader, read_cmvn
from gmot_cli.app import app

runner = CliRunner()


def _voice(f0: np.ndarray, seed: int = 0, noise: float = 0.02) -> np.ndarray:
    """A harmonic (T,) wave whose fundamental follows `f0` (Hz per sample), 8 harmonics falling off as 1/k."""
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 9))
    wave = 0.2 * wave + noise * np.random.default_rng(seed).standard_normal(f0.shape[0])
    return wave.astype(np.float32)


@pytest.mark.parametrize("samples", [0, 399, 400, 559, 560, 16_037])
def test_pitch_frames_match_fbank_frames(samples: int) -> None:
    wave = _voice(np.full(samples, 150.0))
    pitch = compute_pitch(wave)
    assert pitch.shape == (num_frames(samples), PITCH_DIM)
    assert pitch.shape[0] == compute_fbank(wave).shape[0]
    assert pitch.dtype == np.float32 and np.isfinite(pitch).all()
    legacy = compute_pitch(wave, "kaldi-snip")
    assert (
        legacy.shape
        == (num_frames(samples, "kaldi-snip"), PITCH_DIM)
        == (compute_fbank(wave, "kaldi-snip").shape[0], PITCH_DIM)
    )


@pytest.mark.parametrize("f0", [75.0, 140.0, 250.0, 380.0])
def test_steady_voice_is_voiced_and_flat(f0: float) -> None:
    pitch = compute_pitch(_voice(np.full(SAMPLE_RATE, f0)))
    inner = pitch[5:-5]
    assert np.median(inner[:, 0]) > 0.9  # voicing
    assert np.abs(inner[:, 1]).max() < 0.02  # log f0 minus its mean: flat
    assert np.abs(inner[:, 2]).max() < 0.01  # no change


def test_a_step_up_by_a_fifth_shows_in_normalised_log_f0() -> None:
    # two halves of 0.36 s: every frame's normalisation window covers the whole utterance, so the halves
    # differ by exactly ln(180 / 120) in normalised log f0
    half = int(0.36 * SAMPLE_RATE)
    pitch = compute_pitch(_voice(np.concatenate([np.full(half, 120.0), np.full(half, 180.0)])))
    t = pitch.shape[0]
    low, high = np.median(pitch[5 : t // 2 - 5, 1]), np.median(pitch[t // 2 + 5 : -5, 1])
    assert high - low == pytest.approx(np.log(1.5), abs=0.02)
    assert low < 0 < high


def test_a_glide_has_the_slope_of_its_log_f0() -> None:
    n = SAMPLE_RATE  # 1 s from 100 to 200 Hz, exponential: log f0 rises by ln 2 over 98 frames
    f0 = 100.0 * 2.0 ** (np.arange(n) / n)
    pitch = compute_pitch(_voice(f0))
    per_frame = np.log(2.0) / (n / 160)
    assert np.median(pitch[5:-5, 2]) == pytest.approx(per_frame, rel=0.1)


def test_the_contour_does_not_drift_through_a_pause() -> None:
    # 100 Hz, half a second of faint noise, 100 Hz again: the preference for short periods must not pull the
    # path up towards 400 Hz (+1.39 in normalised log f0) through the pause; it did by +0.6 when that
    # preference did not fade with the correlation
    voiced = _voice(np.full(int(0.3 * SAMPLE_RATE), 100.0))
    pause = 0.002 * np.random.default_rng(2).standard_normal(int(0.5 * SAMPLE_RATE)).astype(np.float32)
    pitch = compute_pitch(np.concatenate([voiced, pause, voiced]))
    middle = pitch[40:70]
    assert np.median(middle[:, 0]) < 0.5  # the pause is unvoiced
    assert middle[:, 1].max() < 0.2


def test_noise_and_silence_are_unvoiced() -> None:
    noise = 0.1 * np.random.default_rng(1).standard_normal(SAMPLE_RATE).astype(np.float32)
    assert np.median(compute_pitch(noise)[:, 0]) < 0.5
    silence = compute_pitch(np.zeros(SAMPLE_RATE, dtype=np.float32))
    assert np.isfinite(silence).all()


def test_features_with_pitch_append_three_columns() -> None:
    wave = _voice(np.full(8000, 200.0))
    both = compute_features(wave, pitch=True)
    assert both.shape == (num_frames(8000), feature_dim(True)) == (50, NUM_MEL_BINS + PITCH_DIM)
    np.testing.assert_array_equal(both[:, :NUM_MEL_BINS], compute_fbank(wave))
    np.testing.assert_array_equal(both[:, NUM_MEL_BINS:], compute_pitch(wave))
    np.testing.assert_array_equal(compute_features(wave), compute_fbank(wave))
    assert has_pitch(83) and not has_pitch(80)
    with pytest.raises(ValueError, match="83 with pitch; got 40"):
        has_pitch(40)


def test_frequency_warp_leaves_pitch_columns_alone() -> None:
    torch.manual_seed(0)
    feats = torch.randn(3, 20, NUM_MEL_BINS + PITCH_DIM)
    lengths = torch.tensor([20, 15, 9])
    out = FrequencyWarp(0.2)(feats, lengths)
    assert out.shape == feats.shape
    torch.testing.assert_close(out[..., NUM_MEL_BINS:], feats[..., NUM_MEL_BINS:])
    assert not torch.allclose(out[0, :, :NUM_MEL_BINS], feats[0, :, :NUM_MEL_BINS])


@pytest.mark.slow
def test_pitch_through_prepare_pretrain_and_decode(tmp_path: Path) -> None:
    texts = ["你好世界", "我们学习中文", "今天天气很好", "你们好", "学习很好"]
    train = good_kaldi_dir(tmp_path / "corpus", "train", texts)
    dev = good_kaldi_dir(tmp_path / "corpus", "dev", texts[:2], seed=7)
    data = tmp_path / "data"
    res = runner.invoke(app, ["prepare", "kaldi", str(data), "--split", f"train={train}",
                              "--split", f"dev={dev}", "--no-plm-cache", "--pitch"])  # fmt: skip
    assert res.exit_code == 0, res.output
    mean, std = read_cmvn(data / "lang")
    assert mean.shape == std.shape == (83,)
    reader = SplitReader(data / "train")
    rec = reader.records[0]
    stored = reader.features(rec)
    assert stored.shape == (rec.num_frames, 83)
    wav = tmp_path / "corpus" / "wav" / "train" / f"{rec.id}.wav"
    from data.features import load_audio

    np.testing.assert_allclose(stored, compute_features(load_audio(wav), pitch=True), atol=0.02, rtol=2e-3)
    # a test split prepared against this lang folder gets pitch without asking for it
    more = tmp_path / "more"
    res = runner.invoke(app, ["prepare", "kaldi", str(more), "--split", f"test={dev}",
                              "--lang", str(data / "lang"), "--no-plm-cache"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert SplitReader(more / "test").features(SplitReader(more / "test").records[0]).shape[1] == 83
    # training takes its input width from the data; decoding audio files computes the same features
    exp = tmp_path / "exp"
    res = runner.invoke(app, ["pretrain", str(data), str(exp), "--preset", "tiny", "--epochs", "1",
                              "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "input_dim: 83" in (exp / "config.yaml").read_text(encoding="utf-8")
    out = tmp_path / "hyp"
    res = runner.invoke(app, ["decode", str(exp), "--wav", str(wav), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "details.jsonl").read_text(encoding="utf-8").splitlines()[0])["id"] == rec.id
    # the same model on a folder prepared without pitch: a clear error, not a shape crash
    plain = tmp_path / "plain"
    res = runner.invoke(app, ["prepare", "kaldi", str(plain), "--split", f"train={train}", "--no-plm-cache"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["decode", str(exp), str(plain), "--split", "train",
                              "--out", str(tmp_path / "x"), "--no-progress"])  # fmt: skip
    assert res.exit_code == 2
    assert "80-dim features but the model takes 83" in res.output
    assert "--pitch" in res.output
    # ... and in the other commands that put prepared features through a model
    res = runner.invoke(app, ["plot-alignment", str(exp), str(plain), "--split", "train", "--worst", "1",
                              "--out", str(tmp_path / "p.png")])  # fmt: skip
    assert res.exit_code == 2
    assert "80-dim features but the model takes 83" in res.output
    res = runner.invoke(app, ["pretrain", str(plain), str(tmp_path / "exp80"), "--preset", "tiny", "--epochs",
                              "1", "--init-from", str(exp / "avg.pt"), "--no-progress"])  # fmt: skip
    assert res.exit_code == 2  # a checkpoint that does not fit the data: a usage error, as in decode
    assert "80-dim features but the model takes 83" in res.output


def test_width_mismatch_messages_name_both_sides_and_the_fix() -> None:
    assert feature_width_mismatch(83, 83) is None
    assert feature_width_mismatch(80, 83) == (
        "the data has 80-dim features but the model takes 83 (fbank against fbank + pitch): "
        "prepare the data with --pitch, as for training"
    )
    assert feature_width_mismatch(83, 80).endswith("prepare the data without --pitch, as for training")
    assert feature_width_mismatch(80, 40) == (
        "the data has 80-dim features but the model takes 40 (fbank against unknown kind)"
    )
