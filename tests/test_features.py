"""data.features: audio loading at any rate / channel count, Kaldi fbank, CMVN."""

from pathlib import Path

import numpy as np
import pytest
import soundfile

from data.features import AudioError, CMVNStats, apply_cmvn, compute_fbank, load_audio, num_frames


def _tone(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_48k_stereo_becomes_16k_mono(tmp_path: Path) -> None:
    left = _tone(48_000, 0.5)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    soundfile.write(tmp_path / "s.wav", stereo, 48_000, subtype="PCM_16")
    wave = load_audio(tmp_path / "s.wav")
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.shape[0] == 8000
    # channel mean halves the amplitude of the tone
    assert 0.12 < np.abs(wave[1000:7000]).max() < 0.18


def test_segment_selection(tmp_path: Path) -> None:
    soundfile.write(tmp_path / "a.wav", _tone(16_000, 2.0), 16_000)
    assert load_audio(tmp_path / "a.wav", start=0.5, end=1.25).shape[0] == 12_000
    assert load_audio(tmp_path / "a.wav", start=1.5, end=-1).shape[0] == 8000


def test_missing_and_garbage_files_raise_audio_error(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(AudioError, match=r"bad\.wav"):
        load_audio(tmp_path / "bad.wav")


def test_fbank_shape_and_frame_count() -> None:
    wave = _tone(16_000, 1.0)
    feats = compute_fbank(wave)  # the default front end centres its windows: one frame per 10 ms
    assert feats.shape == (100, 80) == (num_frames(16_000), 80)
    assert feats.dtype == np.float32
    # the 440 Hz tone puts most energy in the low Mel bins
    assert feats[:, :20].mean() > feats[:, 60:].mean()
    assert compute_fbank(np.zeros(300, dtype=np.float32)).shape == (num_frames(300), 80) == (2, 80)
    assert compute_fbank(np.zeros(70, dtype=np.float32)).shape == (0, 80)


def test_legacy_front_end_keeps_its_frames_and_values() -> None:
    """Folders prepared before front ends were named hold torchaudio's kaldi.fbank at its defaults on
    int16-scaled samples: "kaldi-snip" must go on computing exactly that, so that decoding audio with an old
    model sees the features it was trained on."""
    import torch
    import torchaudio.compliance.kaldi

    wave = _tone(16_000, 1.0)
    legacy = compute_fbank(wave, "kaldi-snip")
    assert legacy.shape == (98, 80) == (num_frames(16_000, "kaldi-snip"), 80)
    old = torchaudio.compliance.kaldi.fbank(
        torch.from_numpy(wave)[None] * 32768.0, num_mel_bins=80, dither=0.0, energy_floor=0.0
    ).numpy()
    np.testing.assert_array_equal(legacy, old)
    assert compute_fbank(np.zeros(300, dtype=np.float32), "kaldi-snip").shape == (0, 80)


def test_unknown_front_end_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown feature front end 'htk'.*sherpa-onnx"):
        compute_fbank(_tone(16_000, 0.1), "htk")


def test_default_front_end_matches_kaldi_native_fbank() -> None:
    """sherpa-onnx computes features with kaldi-native-fbank: ours must be the same, silence (exact zeros,
    where both floor the log), both ends of the signal and a signal shorter than one window included."""
    knf = pytest.importorskip("kaldi_native_fbank", reason="pip install 'gmot[export]'")
    rng = np.random.default_rng(0)
    wave = np.concatenate([np.zeros(3000), 0.1 * rng.standard_normal(20_000), _tone(16_000, 0.5)])
    wave = wave.astype(np.float32)
    opts = knf.FbankOptions()  # set as sherpa-onnx's FeatureExtractorConfig defaults set it
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = False
    opts.mel_opts.num_bins = 80
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = -400.0
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16_000, wave.tolist())
    fbank.input_finished()
    theirs = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])
    ours = compute_fbank(wave)
    assert ours.shape == theirs.shape == (num_frames(len(wave)), 80)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    short = wave[3000:3300]
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16_000, short.tolist())
    fbank.input_finished()
    theirs = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])
    np.testing.assert_allclose(compute_fbank(short), theirs, atol=2e-3)


def test_cmvn_stats_and_apply() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(3.0, 2.0, (500, 80)), rng.normal(3.0, 2.0, (700, 80))
    s1, s2 = CMVNStats(), CMVNStats()
    s1.update(a)
    s2.update(b)
    s1.merge(CMVNStats.from_dict(s2.to_dict()))
    mean, std = s1.mean_std()
    both = np.concatenate([a, b])
    np.testing.assert_allclose(mean, both.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, both.std(0), rtol=1e-7)
    normed = apply_cmvn(both, mean, std)
    np.testing.assert_allclose(normed.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(normed.std(0), 1.0, atol=1e-7)
