"""ONNX export of a trained model for sherpa-onnx and onnxruntime (`gmot export`).

What is written (docs/design.md, section 4.5 "Features and deployment"):

- `model.onnx`: inputs `x` (N, T, 80) float32 fbank of the model's front end (before CMVN: the global CMVN
  is folded into the graph) and `x_lens` (N,) int64; outputs `log_probs` (N, T', V) float32 CTC
  log-probabilities and `log_probs_len` (N,) int64 valid output frames. N and T are dynamic, V is fixed.
  Output frames are 40 ms apart, as sherpa-onnx assumes for this model type: an x8 model's frames are each
  given twice (`output_repeat`), which leaves the greedy transcript unchanged.
  Its metadata names the model type sherpa-onnx loads it as (`zipformer2_ctc`, whose features are the
  "sherpa-onnx" front end), the vocabulary size, the subsampling factor and the front end.
- `tokens.txt`: one "unit id" line per CTC unit, id 0 = `<blank>`, as sherpa-onnx reads it.

The PLM adapter is part of the graph only when the CTC head reads it (`model.ctc_from=adapter`); otherwise
it is unused at decode time and left out.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import tempfile
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from models.engine.checkpoint import LoadedModel

SHERPA_MODEL_TYPE = "zipformer2_ctc"
"""The sherpa-onnx offline CTC model type the export is loaded as: its front end defaults (no snip edges,
samples in [-1, 1], 20-7600 Hz, dither 0) are gmot's "sherpa-onnx" front end, and it reads the vocabulary
size from the output shape."""
DEFAULT_OPSET = 18
"""The opset torch's exporter writes natively (asking for an older one makes it convert, which fails for
Split); tested with onnxruntime 1.32 and with the onnxruntime inside sherpa-onnx 2.0.1."""


class ExportError(Exception):
    """A model that cannot be exported as asked; the message says why."""


EXPORT_MODULES = ("onnx", "onnxscript")
"""What writing model.onnx imports: torch's exporter (`dynamo=True`) translates the graph with onnxscript,
and onnx checks the model and stores its metadata."""
CHECK_MODULES = ("onnxruntime",)
"""What `check` (running the export against torch) imports."""
COMPARE_MODULES = ("sherpa_onnx",)
"""What comparing transcripts with sherpa-onnx (`gmot export --compare`) imports."""
INSTALL_HINT = "pip install 'gmot[export]'"


def require_modules(names: tuple[str, ...], purpose: str) -> None:
    """Import each module of `names`; ExportError naming those that are missing (or fail to import) and the
    `export` extra that installs them, so that nothing fails half-way for want of one."""
    problems = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            problems.append(name)
        except Exception as err:  # installed but broken, e.g. built against another onnx
            problems.append(f"{name} ({type(err).__name__}: {err})")
    if problems:
        verb = "is" if len(problems) == 1 else "are"
        raise ExportError(f"{purpose} needs {', '.join(problems)}, which {verb} not usable: {INSTALL_HINT}")


SHERPA_SUBSAMPLING = 4
"""The frame rate sherpa-onnx assumes for `zipformer2_ctc` outputs (40 ms): its times are frame x 40 ms."""


def output_repeat(subsampling: int) -> int:
    """How many times the export repeats each output frame, so that its frames are 40 ms apart as sherpa-onnx
    assumes: 2 for x8 models, 1 for x4. Greedy CTC reads the same text from repeated frames (a repeated frame
    only repeats a symbol, which CTC's collapse removes), and sherpa-onnx's times come out right."""
    return max(1, subsampling // SHERPA_SUBSAMPLING)


class _ExportGraph(nn.Module):
    """CMVN + the model's CTC path: (x (N, T, F) raw fbank, x_lens (N,)) -> (log_probs, log_probs_len), each
    output frame repeated `output_repeat(subsampling)` times."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.model = loaded.model
        self.repeat = output_repeat(loaded.model.cfg.subsampling)
        self.register_buffer("mean", loaded.cmvn_mean.detach().float().cpu().clone())
        self.register_buffer("inv_std", 1.0 / loaded.cmvn_std.detach().float().cpu().clamp_min(1e-5))

    def forward(self, x: Tensor, x_lens: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.forward_unchecked((x - self.mean) * self.inv_std, x_lens)
        log_probs, lengths = out["log_probs"], out["lengths"].to(torch.int64)
        if self.repeat > 1:
            log_probs = log_probs.repeat_interleave(self.repeat, dim=1)
            lengths = lengths * self.repeat
        return log_probs, lengths


@dataclass
class ExportResult:
    """What `export_onnx` wrote and how closely onnxruntime reproduced torch."""

    model_path: Path
    tokens_path: Path
    max_abs_diff: float | None
    """Largest |log_prob| difference between onnxruntime and torch on the check batch (None: not checked)."""
    metadata: dict[str, str]


def tokens_text(vocab: list[str]) -> str:
    """The tokens.txt content for `vocab` (index = CTC id): "unit id" per line. ExportError for a unit that
    sherpa-onnx could not read back (empty, or holding whitespace)."""
    lines = []
    for i, unit in enumerate(vocab):
        if not unit or any(ch.isspace() for ch in unit):
            raise ExportError(
                f"vocabulary unit {i} ({unit!r}) is empty or holds whitespace, which tokens.txt cannot hold"
            )
        lines.append(f"{unit} {i}")
    return "\n".join(lines) + "\n"


def export_metadata(loaded: LoadedModel) -> dict[str, str]:
    """The key/value metadata stored in model.onnx (all values strings, as ONNX keeps them)."""
    from models import __version__

    cfg = loaded.model.cfg
    return {
        "model_type": SHERPA_MODEL_TYPE,
        "model_author": "gmot",
        "gmot_version": __version__,
        "vocab_size": str(len(loaded.vocab)),
        "subsampling_factor": str(cfg.subsampling),
        "output_frame_repeat": str(output_repeat(cfg.subsampling)),
        "output_frame_shift_ms": str(10 * cfg.subsampling // output_repeat(cfg.subsampling)),
        "feature_dim": str(cfg.input_dim),
        "frontend": loaded.frontend,
        "ctc_from": cfg.ctc_from,
        "comment": f"gmot conformer-CTC exported from {loaded.path.name}; CMVN folded in",
    }


def _check_batch(input_dim: int, min_frames: int) -> tuple[Tensor, Tensor]:
    """A padded batch of two utterances of different lengths (seeded): x (2, T, F), x_lens (2,)."""
    gen = torch.Generator().manual_seed(0)
    t = max(4 * min_frames, 120)
    x = torch.randn(2, t, input_dim, generator=gen) * 3.0 + 10.0
    return x, torch.tensor([t, t - 2 * min_frames], dtype=torch.int64)


def export_onnx(
    loaded: LoadedModel, out_dir: Path, *, opset: int = DEFAULT_OPSET, check: bool = True
) -> ExportResult:
    """Write `out_dir/model.onnx` and `out_dir/tokens.txt` for the model in `loaded` (see the module doc).

    Each file is written to a temporary name in `out_dir` and renamed, so an interrupted export leaves no
    half-written model. With `check`, onnxruntime runs a padded batch and its log-probabilities are compared
    with torch's (`ExportResult.max_abs_diff`); onnxruntime must then be installed. Raises ExportError for a
    vocabulary that tokens.txt cannot hold, or, before anything is written, when a module the export needs
    (EXPORT_MODULES, and CHECK_MODULES with `check`) is missing.
    """
    require_modules(EXPORT_MODULES + (CHECK_MODULES if check else ()), "ONNX export")
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = tokens_text(loaded.vocab)
    graph = _ExportGraph(loaded).eval().cpu()
    x, x_lens = _check_batch(loaded.model.cfg.input_dim, loaded.model.cfg.min_input_frames)
    model_path, tokens_path = out_dir / "model.onnx", out_dir / "tokens.txt"
    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".onnx.tmp", dir=out_dir)
    os.close(fd)
    try:
        with warnings.catch_warnings(), _quiet_exporter_logs():
            warnings.simplefilter("ignore")
            batch, frames = torch.export.Dim("N", min=1), torch.export.Dim("T", min=16)
            torch.onnx.export(
                graph,
                (x, x_lens),
                tmp,
                input_names=["x", "x_lens"],
                output_names=["log_probs", "log_probs_len"],
                dynamic_shapes={"x": {0: batch, 1: frames}, "x_lens": {0: batch}},
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        proto = onnx.load(tmp)
        written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if written != opset:
            raise ExportError(
                f"torch's exporter could not write opset {opset} (it wrote {written}); use --opset {written}"
            )
        meta = export_metadata(loaded)
        del proto.metadata_props[:]
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        diff = _compare_with_torch(tmp, graph, x, x_lens) if check else None
        os.replace(tmp, model_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    tmp_tokens = tokens_path.with_name(".tokens.txt.tmp")
    tmp_tokens.write_text(tokens, encoding="utf-8")
    os.replace(tmp_tokens, tokens_path)
    return ExportResult(model_path, tokens_path, diff, meta)


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """Silence the exporter's own progress lines and warnings about operator sets gmot does not use (e.g.
    torchvision's) while it runs; errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _compare_with_torch(path: str, graph: nn.Module, x: Tensor, x_lens: Tensor) -> float:
    """Largest |log_prob| difference of onnxruntime against torch over the valid frames of (x, x_lens)."""
    ort = onnxruntime_module()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got, got_lens = session.run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
    with torch.no_grad():
        want, want_lens = graph(x, x_lens)
    if not np.array_equal(got_lens, want_lens.numpy()):
        raise ExportError(f"onnxruntime gives output lengths {got_lens.tolist()}, torch {want_lens.tolist()}")
    diff = 0.0
    for i, n in enumerate(want_lens.tolist()):
        diff = max(diff, float(np.abs(got[i, :n] - want[i, :n].numpy()).max()))
    return diff


def sherpa_onnx_command(model_path: Path, tokens_path: Path, wav: str = "audio.wav") -> str:
    """A shell command that transcribes `wav` with sherpa-onnx's Python package (`pip install sherpa-onnx`)
    from an export, printing the text: what `gmot export` prints and docs/deploy.md shows."""
    code = (
        "import sys, soundfile, sherpa_onnx; "
        "r = sherpa_onnx.OfflineRecognizer.from_zipformer_ctc("
        f"model='{model_path}', tokens='{tokens_path}'); "
        "s = r.create_stream(); w, sr = soundfile.read(sys.argv[1], dtype='float32'); "
        "s.accept_waveform(sr, w); r.decode_stream(s); print(s.result.text)"
    )
    return f'python -c "{code}" {wav}'


@dataclass
class SherpaComparison:
    """How sherpa-onnx's transcripts of some audio files compare with gmot's greedy ones."""

    files: int
    differing: list[tuple[Path, str, str]]
    """(file, gmot's text, sherpa-onnx's text) for each file where they differ."""
    gmot_seconds: float
    sherpa_seconds: float

    @property
    def identical(self) -> int:
        """Number of files both transcribe alike."""
        return self.files - len(self.differing)


def compare_with_sherpa(
    loaded: LoadedModel, result: ExportResult, wavs: list[Path], threads: int = 1
) -> SherpaComparison:
    """Transcribe `wavs` with the torch model (gmot's greedy CTC on its own front end) and with sherpa-onnx's
    offline recogniser on the export in `result`, and compare the texts. ExportError without sherpa-onnx;
    data.features.AudioError naming a file that cannot be read."""
    import time

    import soundfile

    from models.nn.ctc import greedy_ctc
    from models.tasks.decoding import transcribe, wav_utterances
    from models.tasks.search import quiet_stderr

    try:
        import sherpa_onnx
    except ImportError:
        raise ExportError("comparing with sherpa-onnx needs it: pip install 'gmot[export]'") from None
    start = time.perf_counter()
    utts = wav_utterances(wavs, loaded.cmvn_mean.shape[0], loaded.frontend)
    ours = transcribe(loaded.model, loaded.vocab, loaded.cmvn_mean, loaded.cmvn_std, utts, greedy_ctc)
    ours_s = time.perf_counter() - start
    recogniser = sherpa_onnx.OfflineRecognizer.from_zipformer_ctc(
        model=str(result.model_path), tokens=str(result.tokens_path), num_threads=threads
    )
    start = time.perf_counter()
    theirs = []
    for wav in wavs:
        wave, rate = soundfile.read(str(wav), dtype="float32", always_2d=True)
        stream = recogniser.create_stream()
        with quiet_stderr():  # sherpa-onnx notes every resampler it creates
            stream.accept_waveform(rate, wave.mean(axis=1))
        recogniser.decode_stream(stream)
        theirs.append(stream.result.text)
    sherpa_s = time.perf_counter() - start
    differing = [(w, h.text, t) for w, h, t in zip(wavs, ours, theirs, strict=True) if h.text != t]
    return SherpaComparison(len(wavs), differing, ours_s, sherpa_s)


def onnxruntime_module() -> types.ModuleType:
    """The onnxruntime module, or ExportError with the install hint."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("checking the export needs onnxruntime: pip install 'gmot[export]'") from None
    return onnxruntime


def onnx_log_probs(model_path: Path, feats: np.ndarray) -> np.ndarray:
    """Run an exported model on one utterance's raw fbank (T, F) float32 -> (T', V) log-probabilities."""
    ort = onnxruntime_module()
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(feats, dtype=np.float32)[None]
    log_probs, lens = session.run(None, {"x": x, "x_lens": np.array([x.shape[1]], dtype=np.int64)})
    return log_probs[0, : int(lens[0])]
