"""`gmot export`: ONNX that onnxruntime runs as torch does, and that sherpa-onnx decodes as `gmot decode`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from tiny_model import build_tiny_checkpoint
from typer.testing import CliRunner

from gmot_cli.app import app
from models.engine.checkpoint import load_model
from models.nn.ctc import greedy_ctc
from models.tasks.decoding import padded_batch, wav_utterances
from models.tasks.export import ExportError, export_onnx, onnx_log_probs, sherpa_onnx_command, tokens_text

onnx = pytest.importorskip("onnx", reason="pip install 'gmot[export]'")
ort = pytest.importorskip("onnxruntime", reason="pip install 'gmot[export]'")

runner = CliRunner()


@pytest.fixture(scope="module", params=[("encoder", 4), ("adapter", 4), ("encoder", 8)], ids=str)
def exported(request, tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(experiment folder, export folder) for a tiny model whose CTC head reads `param[0]`, subsampling by
    `param[1]`."""
    exp = tmp_path_factory.mktemp("exp")
    ctc_from, subsampling = request.param
    build_tiny_checkpoint(tiny_prepared, exp, steps=20, ctc_from=ctc_from, subsampling=subsampling)
    # a tiny model fitted on synthetic features says "blank" to real audio; lowering the blank's bias makes
    # it emit characters, so that the decoders have text to agree on
    state = torch.load(exp / "avg.pt", weights_only=True)
    state["model"]["ctc_head.bias"][0] -= 4.0
    torch.save(state, exp / "avg.pt")
    out = tmp_path_factory.mktemp("onnx")
    res = runner.invoke(app, ["export", str(exp), str(out)])
    assert res.exit_code == 0, res.output
    assert "largest log-probability difference" in res.output
    return exp, out


def _speechy(seconds: float, seed: int) -> np.ndarray:
    """Tones with a moving pitch, noise, and digital silence at both ends."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * 16_000)) / 16_000
    f0 = 180 + 60 * np.sin(2 * np.pi * 1.5 * t)
    wave = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / 16_000) + 0.03 * rng.standard_normal(t.shape[0])
    wave[:2400] = 0.0
    wave[-1600:] = 0.0
    return wave.astype(np.float32)


def test_files_metadata_and_tokens(exported: tuple[Path, Path]) -> None:
    exp, out = exported
    loaded = load_model(exp)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "tokens.txt"]  # no temporary files left
    lines = (out / "tokens.txt").read_text(encoding="utf-8").splitlines()
    assert lines == [f"{u} {i}" for i, u in enumerate(loaded.vocab)] and lines[0] == "<blank> 0"
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert meta["model_type"] == "zipformer2_ctc"
    assert meta["vocab_size"] == str(len(loaded.vocab))
    assert meta["subsampling_factor"] == str(loaded.model.cfg.subsampling)
    assert meta["frontend"] == loaded.frontend == "sherpa-onnx"
    assert meta["ctc_from"] == loaded.model.cfg.ctc_from
    assert meta["output_frame_shift_ms"] == "40"  # what sherpa-onnx assumes, also for x8 models


def test_onnxruntime_matches_torch_on_a_padded_batch_of_other_lengths(exported: tuple[Path, Path]) -> None:
    """Dynamic batch and length: three utterances, none of the length the export was traced with; the
    graph takes raw fbank (CMVN folded in)."""
    exp, out = exported
    loaded = load_model(exp)
    rng = np.random.default_rng(3)
    feats = [rng.normal(8.0, 3.0, (n, 80)).astype(np.float32) for n in (301, 77, 150)]
    x = np.zeros((3, 301, 80), dtype=np.float32)
    for i, f in enumerate(feats):
        x[i, : len(f)] = f
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got, got_lens = session.run(None, {"x": x, "x_lens": np.array([301, 77, 150], dtype=np.int64)})
    with torch.no_grad():
        normed, lens = padded_batch(feats, loaded.cmvn_mean, loaded.cmvn_std, "cpu")
        want = loaded.model(normed, lens)
    repeat = (
        loaded.model.cfg.subsampling // 4
    )  # x8 frames are given twice (40 ms apart, as sherpa-onnx reads)
    assert got_lens.tolist() == [n * repeat for n in want["lengths"].tolist()]
    assert got.shape[2] == len(loaded.vocab)
    expected = want["log_probs"].repeat_interleave(repeat, dim=1).numpy()
    for i, n in enumerate(got_lens.tolist()):
        np.testing.assert_allclose(got[i, :n], expected[i, :n], atol=1e-4)


def test_sherpa_onnx_decodes_a_wav_as_gmot_decode_does(exported: tuple[Path, Path], tmp_path: Path) -> None:
    sherpa_onnx = pytest.importorskip("sherpa_onnx", reason="pip install 'gmot[export]'")
    exp, out = exported
    loaded = load_model(exp)
    recogniser = sherpa_onnx.OfflineRecognizer.from_zipformer_ctc(
        model=str(out / "model.onnx"), tokens=str(out / "tokens.txt"), num_threads=1
    )
    nonempty = 0
    for seed in range(3):
        wav = tmp_path / f"u{seed}.wav"
        soundfile.write(wav, _speechy(1.5 + 0.4 * seed, seed), 16_000)
        res = runner.invoke(app, ["decode", str(exp), "--wav", str(wav)])
        assert res.exit_code == 0, res.output
        ours = next(line for line in res.output.splitlines() if line.startswith(f"u{seed} "))
        ours_text = ours.split(" ", 1)[1].strip()
        wave, rate = soundfile.read(wav, dtype="float32")
        stream = recogniser.create_stream()
        stream.accept_waveform(rate, wave)
        recogniser.decode_stream(stream)
        assert stream.result.text == ours_text
        # and the exported graph on our own features gives the same greedy path
        utt = wav_utterances([wav], 80, loaded.frontend)[0]
        log_probs = torch.from_numpy(onnx_log_probs(out / "model.onnx", utt.feats))
        ids = greedy_ctc(log_probs[None], torch.tensor([log_probs.shape[0]]))
        assert "".join(loaded.vocab[i] for i in ids[0]) == ours_text
        # sherpa-onnx's times are the frames where the greedy path emits, in the model's own frame rate
        with torch.no_grad():
            feats, lens = padded_batch([utt.feats], loaded.cmvn_mean, loaded.cmvn_std, "cpu")
            path = loaded.model(feats, lens)["log_probs"][0].argmax(-1).tolist()
        emitted = [t for t, k in enumerate(path) if k != 0 and (t == 0 or path[t - 1] != k)]
        frame_s = 0.01 * loaded.model.cfg.subsampling
        assert list(stream.result.timestamps) == pytest.approx([t * frame_s for t in emitted], abs=1e-4)
        nonempty += bool(ours_text)
    assert nonempty == 3  # the comparison saw text each time


def test_legacy_front_end_model_exports_with_a_warning(tiny_prepared: Path, tmp_path: Path) -> None:
    exp = build_tiny_checkpoint(tiny_prepared, tmp_path / "exp", steps=2)
    state = torch.load(exp / "avg.pt", weights_only=True)
    state["cmvn"].pop("frontend")  # as saved before front ends were named
    torch.save(state, exp / "avg.pt")
    res = runner.invoke(app, ["export", str(exp), str(tmp_path / "onnx"), "--no-check"])
    assert res.exit_code == 0, res.output
    assert "'kaldi-snip' features" in res.output and "from_zipformer_ctc" not in res.output
    assert (tmp_path / "onnx" / "model.onnx").is_file()


def test_bad_inputs_exit_with_a_message(tmp_path: Path) -> None:
    res = runner.invoke(app, ["export", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert res.exit_code == 2 and "error:" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["export", str(empty), str(tmp_path / "out")])
    assert res.exit_code == 2 and "holds no checkpoint" in res.output
    with pytest.raises(ExportError, match="unit 2"):
        tokens_text(["<blank>", "<unk>", "a b"])


def test_export_onnx_leaves_an_existing_model_when_it_fails(tiny_prepared: Path, tmp_path: Path) -> None:
    loaded = load_model(build_tiny_checkpoint(tiny_prepared, tmp_path / "exp", steps=2))
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous export")
    loaded.vocab = [*loaded.vocab[:-1], "two words"]
    with pytest.raises(ExportError):
        export_onnx(loaded, out)
    assert (out / "model.onnx").read_bytes() == b"previous export"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]


def test_an_opset_the_exporter_cannot_write_is_refused(tiny_prepared: Path, tmp_path: Path) -> None:
    """torch's exporter writes opset 18 natively and cannot convert this graph to 17 (Split): say so instead
    of writing a model of another opset than asked."""
    exp = build_tiny_checkpoint(tiny_prepared, tmp_path / "exp", steps=1)
    res = runner.invoke(app, ["export", str(exp), str(tmp_path / "onnx"), "--opset", "17", "--no-check"])
    assert res.exit_code == 2 and "could not write opset 17" in res.output
    assert not (tmp_path / "onnx" / "model.onnx").exists()


def test_the_printed_sherpa_onnx_command_transcribes(exported: tuple[Path, Path], tmp_path: Path) -> None:
    """The command `gmot export` prints (and docs/deploy.md shows) runs as it stands and prints what
    `gmot decode --wav` prints."""
    import shlex
    import subprocess
    import sys

    pytest.importorskip("sherpa_onnx", reason="pip install 'gmot[export]'")
    exp, out = exported
    wav = tmp_path / "said.wav"
    soundfile.write(wav, _speechy(1.7, 5), 16_000)
    printed = sherpa_onnx_command(out / "model.onnx", out / "tokens.txt", str(wav))
    argv = shlex.split(printed)
    assert argv[0] == "python"
    run = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    res = runner.invoke(app, ["decode", str(exp), "--wav", str(wav)])
    ours = next(line for line in res.output.splitlines() if line.startswith("said "))
    assert run.stdout.strip() == ours.split(" ", 1)[1].strip() != ""


def test_compare_counts_files_transcribed_alike(exported: tuple[Path, Path], tmp_path: Path) -> None:
    exp, _ = exported
    audio = tmp_path / "audio" / "nested"
    audio.mkdir(parents=True)
    for seed in range(3):
        soundfile.write(audio / f"c{seed}.wav", _speechy(1.2 + 0.3 * seed, 10 + seed), 16_000)
    res = runner.invoke(
        app, ["export", str(exp), str(tmp_path / "onnx"), "--compare", str(tmp_path / "audio")]
    )
    assert res.exit_code == 0, res.output
    assert "transcribes 3 of 3 files" in " ".join(res.output.split())
    (tmp_path / "empty").mkdir()
    res = runner.invoke(
        app, ["export", str(exp), str(tmp_path / "onnx2"), "--compare", str(tmp_path / "empty")]
    )
    assert res.exit_code == 2 and "no .wav or .flac files" in res.output


@pytest.mark.parametrize(
    ("missing", "options"),
    [("onnxscript", []), ("onnx", ["--no-check"]), ("onnxruntime", []), ("sherpa_onnx", ["--compare", "."])],
)
def test_a_missing_module_is_named_with_the_extra_before_anything_is_written(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str, options: list[str]
) -> None:
    """What a user who ran only `pip install sherpa-onnx` meets: torch's exporter needs onnxscript too."""
    pytest.importorskip(missing)
    pytest.importorskip("onnxscript")  # imported whole first, so that hiding onnx cannot leave half of it
    exp = build_tiny_checkpoint(tiny_prepared, tmp_path / "exp", steps=1)
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ModuleNotFoundError
    res = runner.invoke(app, ["export", str(exp), str(tmp_path / "onnx"), *options])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    found = re.search(
        r"error: gmot export.* needs (.+?), which (?:is|are) not usable: pip install 'gmot\[export\]'", text
    )
    assert found and missing in found[1].split(", "), res.output  # (onnxscript cannot import without onnx)
    assert res.exception is None or isinstance(res.exception, SystemExit)  # a message, no traceback
    assert not (tmp_path / "onnx").exists()
    if missing != "sherpa_onnx":
        loaded = load_model(exp)
        with pytest.raises(ExportError, match=f"ONNX export needs {missing}\\b"):
            export_onnx(loaded, tmp_path / "lib", check="--no-check" not in options)
        assert not (tmp_path / "lib").exists()


def test_compare_exits_1_and_lists_the_files_that_differ(
    exported: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gmot's side of the comparison is made to add a character to one file's transcript: --compare counts
    that file as differing, names it with both texts, and exits 1."""
    import models.tasks.decoding as decoding

    sherpa_onnx = pytest.importorskip("sherpa_onnx", reason="pip install 'gmot[export]'")
    exp, _ = exported
    audio = tmp_path / "audio"
    audio.mkdir()
    for seed in range(3):  # the files test_compare_counts_files_transcribed_alike sees transcribed alike
        soundfile.write(audio / f"c{seed}.wav", _speechy(1.2 + 0.3 * seed, 10 + seed), 16_000)
    real_transcribe = decoding.transcribe

    def one_off(*args, **kwargs) -> list:
        hyps = real_transcribe(*args, **kwargs)
        for hyp in hyps:
            if hyp.id == "c1":
                hyp.text += "好"
        return hyps

    monkeypatch.setattr(decoding, "transcribe", one_off)
    monkeypatch.setenv("COLUMNS", "1000")  # one line per differing file, however long its path
    out = tmp_path / "onnx"
    res = runner.invoke(app, ["export", str(exp), str(out), "--no-check", "--compare", str(audio)])
    assert res.exit_code == 1, res.output
    assert "transcribes 2 of 3 files" in res.output
    recogniser = sherpa_onnx.OfflineRecognizer.from_zipformer_ctc(
        model=str(out / "model.onnx"), tokens=str(out / "tokens.txt"), num_threads=1
    )
    wave, rate = soundfile.read(audio / "c1.wav", dtype="float32")
    stream = recogniser.create_stream()
    stream.accept_waveform(rate, wave)
    recogniser.decode_stream(stream)
    theirs = stream.result.text
    listed = [line for line in res.output.splitlines() if line.startswith("  ")]
    assert listed == [f"  {audio / 'c1.wav'}: gmot {theirs + '好'!r}, sherpa-onnx {theirs!r}"]


def test_an_output_folder_that_cannot_be_made_exits_1(tiny_prepared: Path, tmp_path: Path) -> None:
    exp = build_tiny_checkpoint(tiny_prepared, tmp_path / "exp", steps=1)
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the folder should go")
    res = runner.invoke(app, ["export", str(exp), str(blocker / "onnx"), "--no-check"])
    assert res.exit_code == 1 and "cannot write to" in res.output
