"""Audio loading (any rate / channel count -> 16 kHz mono), 80-dim Kaldi fbank, optional 3-dim pitch and
global CMVN."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import soundfile

if TYPE_CHECKING:  # torch is imported inside the functions so that `gmot --help` stays fast
    import torch
    import torchaudio

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, "torch.Tensor")

SAMPLE_RATE = 16_000
NUM_MEL_BINS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
FRAME_SHIFT_S = FRAME_SHIFT_MS / 1000.0
_WINDOW = int(SAMPLE_RATE * FRAME_LENGTH_MS / 1000)  # 400 samples
_SHIFT = int(SAMPLE_RATE * FRAME_SHIFT_MS / 1000)  # 160 samples


class AudioError(Exception):
    """Audio that cannot be read (missing, truncated, unknown format). The message names the file."""


def resample(wave: np.ndarray, orig_rate: int, new_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono float32 wave (N,) from `orig_rate` to `new_rate` (torchaudio's sinc interpolation)."""
    if orig_rate == new_rate:
        return wave
    import torch

    with torch.no_grad():
        out = _resampler(orig_rate, new_rate)(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)))
    return out.numpy().astype(np.float32, copy=False)


def speed_perturb(wave: np.ndarray, factor: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Play a mono wave (N,) `factor` times as fast (tempo and pitch together, as Kaldi's speed
    perturbation): resampled from rate * factor to rate, about N / factor samples."""
    if factor == 1.0:
        return wave
    return resample(wave, round(rate * factor), rate)


def speed_prefix(factor: float) -> str:
    """The id and speaker prefix of a speed-perturbed copy: "sp0.9-" (Kaldi's convention)."""
    return f"sp{factor:g}-"


@functools.lru_cache(maxsize=16)
def _resampler(orig_rate: int, new_rate: int) -> torchaudio.transforms.Resample:
    """A Resample module per rate pair (its sinc kernel is computed once)."""
    import torchaudio

    return torchaudio.transforms.Resample(orig_rate, new_rate)


def wav_truncation(path: Path) -> str | None:
    """For a RIFF/WAVE file, a description of the truncation when its data chunk declares more bytes than the
    file holds (libsndfile silently reads what is there); None for complete or non-WAV files."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            size = path.stat().st_size
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                chunk = f.read(8)
                declared = int.from_bytes(chunk[4:8], "little")
                if chunk[:4] == b"data":
                    have = size - pos - 8
                    # 0 and 0xFFFFFFFF are placeholders written by streaming encoders
                    if declared not in (0, 0xFFFFFFFF) and declared > have:
                        return (
                            f"truncated: its header declares {declared} bytes of audio, the file holds {have}"
                        )
                    return None
                pos += 8 + declared + (declared & 1)
    except OSError:
        return None
    return None


def load_audio(path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray:
    """Read an audio file with soundfile and return (N,) float32 mono samples at 16 kHz in [-1, 1].

    Multi-channel audio is averaged over channels; other sample rates are resampled. `start` / `end`
    (seconds, optional) select a segment (Kaldi `segments`); `end` None or <= 0 means to the end of the file.
    Raises AudioError with the file name for a missing, unreadable or truncated file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    truncated = wav_truncation(path)
    if truncated:
        raise AudioError(f"cannot read audio {path}: {truncated}")
    try:
        with soundfile.SoundFile(str(path)) as f:
            rate = f.samplerate
            first = round((start or 0.0) * rate)
            last = f.frames if end is None or end <= 0 else min(round(end * rate), f.frames)
            if first > 0:
                f.seek(min(first, f.frames))
            data = f.read(max(last - first, 0), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as exc:
        raise AudioError(f"cannot read audio {path}: {exc}") from exc
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return resample(np.ascontiguousarray(wave, dtype=np.float32), rate)


@dataclass(frozen=True)
class FrontEnd:
    """The options of the 80-bin Kaldi-style fbank that differ between the front ends gmot knows. All share
    25 ms povey windows, a 10 ms shift, pre-emphasis 0.97, DC removal, power spectra, dither 0 and a 20 Hz
    lower edge (see docs/design.md, section 4.5)."""

    name: str
    snip_edges: bool
    """True: frame t covers samples [160 t, 160 t + 400), only whole windows (Kaldi's default). False: frame t
    is centred on sample 160 t + 80, the signal mirrored at its ends (sherpa-onnx, lhotse, icefall)."""
    high_freq: float
    """Upper edge of the Mel filterbank in Hz; <= 0 is an offset from the Nyquist frequency (8 kHz)."""
    sample_scale: float
    """What samples in [-1, 1] are multiplied by before the fbank: 32768 (Kaldi's int16 range) or 1."""


FRONTENDS: dict[str, FrontEnd] = {
    # What sherpa-onnx computes for a zipformer2_ctc model (its defaults), and lhotse's Fbank: an exported
    # model then needs no front end of its own.
    "sherpa-onnx": FrontEnd("sherpa-onnx", snip_edges=False, high_freq=-400.0, sample_scale=1.0),
    # gmot's front end before 0.2 (torchaudio's kaldi.fbank defaults on int16-scaled samples). Prepared
    # folders and checkpoints that do not name a front end were made with it.
    "kaldi-snip": FrontEnd("kaldi-snip", snip_edges=True, high_freq=0.0, sample_scale=32768.0),
}
SHERPA_ONNX_FRONTEND = "sherpa-onnx"
"""The front end sherpa-onnx computes, which an exported model must be trained on to decode there alike."""
DEFAULT_FRONTEND = SHERPA_ONNX_FRONTEND
LEGACY_FRONTEND = "kaldi-snip"


def frontend(name: str | None) -> FrontEnd:
    """The FrontEnd called `name` (None: the legacy front end of folders and checkpoints that name none).
    ValueError naming the known front ends for any other name."""
    key = LEGACY_FRONTEND if name is None else name
    if key not in FRONTENDS:
        raise ValueError(f"unknown feature front end {name!r}; known: {', '.join(FRONTENDS)}")
    return FRONTENDS[key]


def num_frames(num_samples: int, front: str | None = DEFAULT_FRONTEND) -> int:
    """Number of fbank frames for `num_samples` samples at 16 kHz with front end `front`: with snip edges
    1 + (N - 400) // 160 (0 when N < 400), without (N + 80) // 160."""
    if frontend(front).snip_edges:
        return 0 if num_samples < _WINDOW else 1 + (num_samples - _WINDOW) // _SHIFT
    return (num_samples + _SHIFT // 2) // _SHIFT


def duration_to_frames(seconds: float, front: str | None = DEFAULT_FRONTEND) -> int:
    """Number of fbank frames for a duration in seconds (same rule as `num_frames`)."""
    return num_frames(math.floor(seconds * SAMPLE_RATE), front)


def compute_fbank(wave: np.ndarray, front: str | None = DEFAULT_FRONTEND) -> np.ndarray:
    """80-dim log Mel filterbank of a (N,) float32 16 kHz wave in [-1, 1] -> (T, 80) float32,
    T = num_frames(N, front) (an empty (0, 80) array when T is 0).

    torchaudio.compliance.kaldi.fbank with the options of `FRONTENDS[front]`; with "sherpa-onnx" the result
    equals kaldi-native-fbank's (the library sherpa-onnx computes features with) to about 1e-4.
    """
    fe = frontend(front)
    t = num_frames(wave.shape[0], fe.name)
    if t == 0:
        return np.zeros((0, NUM_MEL_BINS), dtype=np.float32)
    import torch
    import torchaudio.compliance.kaldi

    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if not fe.snip_edges:
        # Kaldi's centred frames are whole windows of the signal mirrored at its ends; torchaudio's own
        # snip_edges=False refuses signals shorter than one window, so the mirroring is done here
        wave = _mirror_for_centred_frames(wave, t)
    signal = torch.from_numpy(wave).unsqueeze(0) * fe.sample_scale
    feats = torchaudio.compliance.kaldi.fbank(
        signal,
        num_mel_bins=NUM_MEL_BINS,
        frame_length=FRAME_LENGTH_MS,
        frame_shift=FRAME_SHIFT_MS,
        dither=0.0,
        energy_floor=0.0,
        snip_edges=True,
        high_freq=fe.high_freq,
        sample_frequency=float(SAMPLE_RATE),
    )
    return feats[:t].numpy()


def _mirror_for_centred_frames(wave: np.ndarray, t: int) -> np.ndarray:
    """(N,) wave -> the wave extended by mirror images (sample -1 is sample 0, N is N - 1, as Kaldi does)
    so that `t` whole windows from its start are the centred frames: 120 samples before, enough after."""
    lead = (_WINDOW - _SHIFT) // 2
    tail = (t - 1) * _SHIFT + _WINDOW - lead - wave.shape[0]
    return np.pad(wave, (lead, max(tail, 0)), mode="symmetric")


def apply_cmvn(feats: ArrayOrTensor, mean: ArrayOrTensor, std: ArrayOrTensor) -> ArrayOrTensor:
    """Global CMVN: (feats - mean) / std.

    feats (T, 80) or (B, T, 80), mean and std (80,); works for numpy arrays and torch tensors alike
    (all three of the same kind). Returns the same kind and shape as `feats`.
    """
    return (feats - mean) / std


class CMVNStats:
    """Running per-dimension sums for global CMVN (float64), mergeable across workers."""

    def __init__(self, dim: int = NUM_MEL_BINS):
        self.frames = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.sumsq = np.zeros(dim, dtype=np.float64)

    def update(self, feats: np.ndarray) -> None:
        """Add the frames of a (T, dim) array."""
        f = feats.astype(np.float64, copy=False)
        self.frames += f.shape[0]
        self.sum += f.sum(axis=0)
        self.sumsq += np.square(f).sum(axis=0)

    def merge(self, other: CMVNStats) -> None:
        """Add another accumulator's sums into this one."""
        self.frames += other.frames
        self.sum += other.sum
        self.sumsq += other.sumsq

    def to_dict(self) -> dict:
        """JSON-able form (used in shard part files so resumed runs need not re-read features)."""
        return {"frames": self.frames, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> CMVNStats:
        """Inverse of `to_dict`."""
        s = cls(len(d["sum"]))
        s.frames = int(d["frames"])
        s.sum = np.asarray(d["sum"], dtype=np.float64)
        s.sumsq = np.asarray(d["sumsq"], dtype=np.float64)
        return s

    def mean_std(self, floor: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
        """(mean (dim,), std (dim,)) as float64; std floored at `floor`. Raises ValueError with no frames."""
        if self.frames == 0:
            raise ValueError("no frames to compute statistics from")
        mean = self.sum / self.frames
        var = np.maximum(self.sumsq / self.frames - np.square(mean), 0.0)
        return mean, np.maximum(np.sqrt(var), floor)


# Pitch: normalised cross-correlation (NCCF) at 8 kHz, a Viterbi path over lags, Kaldi-style output features.
PITCH_DIM = 3
PITCH_RATE = 8_000
PITCH_MIN_HZ = 60.0
PITCH_MAX_HZ = 400.0
PITCH_JUMP_COST = 1.0
"""Viterbi cost per unit of |ln(f0 ratio)| between neighbouring frames: an octave jump costs 0.35, about what
a clearly better correlation peak is worth, while a 5 % glide (a tone contour over 10 ms) costs 0.025."""
PITCH_LAG_COST = 0.1
"""Cost added per frame in proportion to lag / longest lag, times the frame's best correlation: a periodic
wave correlates as well at two or three periods as at one, and this settles such ties on the true period
(0.03 to 0.06 per frame between a period and its double for 100-400 Hz voices), while in unvoiced frames
(no correlation) it fades out, so the path does not drift towards short periods through silence."""
PITCH_NORM_WINDOW = 151
"""Frames (1.5 s) of the voicing-weighted moving mean subtracted from log f0: what remains is the contour
relative to the speaker's current register, which is what separates Mandarin tones across voices."""


def compute_pitch(wave: np.ndarray, front: str | None = DEFAULT_FRONTEND) -> np.ndarray:
    """Pitch features of a (N,) float32 16 kHz wave -> (T, 3) float32, T = num_frames(N, front): frame t
    analyses the same 25 ms window as fbank frame t of that front end.

    Columns: voicing (the NCCF at the chosen lag, high for voiced frames), log f0 minus its voicing-weighted
    moving mean over PITCH_NORM_WINDOW frames, and the frame-to-frame change of log f0. Frame t analyses the
    fbank frame's 25 ms window against the same window shifted by each lag for 60-400 Hz (the NCCF), and a
    Viterbi search over lags trades correlation against jumps (PITCH_JUMP_COST), which bridges unvoiced
    stretches with a smooth contour, and a small cost per unit lag (PITCH_LAG_COST) settles the tie between a
    period and its multiples.
    """
    t = num_frames(wave.shape[0], front)
    if t == 0:
        return np.zeros((0, PITCH_DIM), dtype=np.float32)
    import torch

    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if not frontend(front).snip_edges:
        wave = _mirror_for_centred_frames(wave, t)
    x = torch.from_numpy(resample(wave, SAMPLE_RATE, PITCH_RATE))
    x = x - x.mean()
    ratio = SAMPLE_RATE // PITCH_RATE
    win, shift = _WINDOW // ratio, _SHIFT // ratio  # 200, 80 samples at 8 kHz
    lag_min = int(PITCH_RATE / PITCH_MAX_HZ)  # 20
    lag_max = math.ceil(PITCH_RATE / PITCH_MIN_HZ)  # 134
    span = win + lag_max + 1
    x = torch.nn.functional.pad(x, (0, max(0, (t - 1) * shift + span - x.shape[0])))
    seg = x.unfold(0, span, shift)[:t].double()  # (T, span)
    base = seg[:, :win]
    n_fft = 1 << (span + win).bit_length()
    corr = torch.fft.irfft(torch.fft.rfft(seg, n_fft) * torch.fft.rfft(base, n_fft).conj(), n_fft)[
        :, lag_min : lag_max + 2
    ]  # (T, L + 1): sum_n base[n] seg[n + lag]
    sq = torch.nn.functional.pad(seg.square().cumsum(1), (1, 0))
    lags = torch.arange(lag_min, lag_max + 2)
    energy = sq[:, lags + win] - sq[:, lags]  # (T, L + 1) energy of each shifted window
    e0 = sq[:, win : win + 1]
    nccf = corr / (e0 * energy + 1e-20).sqrt()
    # a ballast term makes quiet frames look unvoiced in the voicing feature (not in the lag choice)
    ballast = (e0.mean() * 1e-2) ** 2 + 1e-20
    nccf_pov = corr / (e0 * energy + ballast).sqrt()
    strength = nccf[:, :-1].max(dim=1, keepdim=True).values.clamp(0.0, 1.0)  # (T, 1)
    local = (1.0 - nccf[:, :-1] + PITCH_LAG_COST * strength * lags[None, :-1] / lag_max).numpy()  # (T, L)
    log_lag = np.log(lags[:-1].numpy().astype(np.float64))
    jump = PITCH_JUMP_COST * np.abs(log_lag[:, None] - log_lag[None, :])  # (L_prev, L)
    path = _viterbi(local, jump)  # (T,) lag index
    rows = np.arange(t)
    c = nccf.numpy()
    # parabolic refinement of the integer lag from its neighbours
    left = c[rows, np.maximum(path - 1, 0)]
    mid = c[rows, path]
    right = c[rows, path + 1]
    curvature = left - 2 * mid + right  # a flat top (0) gives no offset
    offset = 0.5 * (left - right) / np.where(np.abs(curvature) > 1e-9, curvature, np.inf)
    lag = lags[path].numpy() + np.clip(offset, -0.5, 0.5)
    log_f0 = np.log(PITCH_RATE / lag)
    voicing = np.clip(nccf_pov.numpy()[rows, path], -1.0, 1.0)
    weight = np.maximum(voicing, 0.0) ** 2 + 1e-3
    mean = _moving_sum(weight * log_f0, PITCH_NORM_WINDOW) / _moving_sum(weight, PITCH_NORM_WINDOW)
    delta = np.gradient(log_f0) if t > 1 else np.zeros(1)
    return np.stack([voicing, log_f0 - mean, delta], axis=1).astype(np.float32)


def feature_dim(pitch: bool) -> int:
    """Width of the prepared features: 80 fbank bins, plus PITCH_DIM with pitch."""
    return NUM_MEL_BINS + (PITCH_DIM if pitch else 0)


def has_pitch(dim: int) -> bool:
    """Whether features of width `dim` carry pitch (83) or not (80); ValueError for any other width."""
    if dim not in (NUM_MEL_BINS, NUM_MEL_BINS + PITCH_DIM):
        raise ValueError(
            f"features are {NUM_MEL_BINS} fbank bins, or {NUM_MEL_BINS + PITCH_DIM} with pitch; got {dim}"
        )
    return dim != NUM_MEL_BINS


def feature_width_mismatch(data_width: int, model_width: int) -> str | None:
    """None when features of `data_width` columns fit a model taking `model_width`; else a sentence saying
    what each side is and how to prepare the data to match."""
    if data_width == model_width:
        return None

    def kind(dim: int) -> str:
        return {NUM_MEL_BINS: "fbank", NUM_MEL_BINS + PITCH_DIM: "fbank + pitch"}.get(dim, "unknown kind")

    advice = ""
    if model_width in (NUM_MEL_BINS, NUM_MEL_BINS + PITCH_DIM):
        needed = "with" if model_width != NUM_MEL_BINS else "without"
        advice = f": prepare the data {needed} --pitch, as for training"
    return (
        f"the data has {data_width}-dim features but the model takes {model_width} ({kind(data_width)} "
        f"against {kind(model_width)}){advice}"
    )


def compute_features(
    wave: np.ndarray, pitch: bool = False, front: str | None = DEFAULT_FRONTEND
) -> np.ndarray:
    """The prepared features of a (N,) float32 16 kHz wave -> (T, feature_dim(pitch)) float32: fbank of front
    end `front`, and with `pitch` the compute_pitch columns appended (same frames)."""
    fbank = compute_fbank(wave, front)
    if not pitch:
        return fbank
    return np.concatenate([fbank, compute_pitch(wave, front)], axis=1)


def _moving_sum(x: np.ndarray, window: int) -> np.ndarray:
    """Sum of (T,) `x` over a centred window of `window` frames, cut at the edges -> (T,)."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(x.shape[0])
    lo = np.maximum(idx - window // 2, 0)
    hi = np.minimum(idx + window // 2 + 1, x.shape[0])
    return c[hi] - c[lo]


def _viterbi(local: np.ndarray, jump: np.ndarray) -> np.ndarray:
    """Cheapest path through a (T, L) local cost with a (L, L) transition cost -> (T,) int state indices."""
    t, n = local.shape
    back = np.empty((t, n), dtype=np.int64)
    acc = local[0].copy()
    for i in range(1, t):
        total = acc[:, None] + jump  # (prev, next)
        back[i] = total.argmin(0)
        acc = total[back[i], np.arange(n)] + local[i]
    path = np.empty(t, dtype=np.int64)
    path[-1] = int(acc.argmin())
    for i in range(t - 1, 0, -1):
        path[i - 1] = back[i, path[i]]
    return path
