"""`make demo`'s recipe (recipes/demo/run.sh) runs end to end at a tiny size and prints its summary table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_demo(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """recipes/demo/run.sh into `out` at a tiny size (1 voice, the tiny preset, one thread; `env` overrides
    or adds the script's variables) -> the finished process, its output captured as text."""
    full = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OUT": str(out),
        "VOICES": "1",
        "PRESET": "tiny",
        "JOBS": "1",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    script = str(ROOT / "recipes" / "demo" / "run.sh")
    return subprocess.run(["bash", script], env=full, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng (make sysdeps)")
def test_demo_recipe_runs_end_to_end_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    sizes = {"TRAIN_SENTENCES": "24", "EPOCHS": "2", "EXTRA": "--no-progress --device cpu"}
    run = run_demo(out, **sizes)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "gmot demo: test set" in run.stdout
    assert (out / "data" / "lang" / "char_3gram.arpa").is_file()
    for name in ("baseline", "gmot"):
        for dec in ("decode_test", "decode_test_lm"):
            rtf = json.loads((out / "exp" / name / dec / "rtf.json").read_text())
            score = json.loads((out / "exp" / name / dec / "score.json").read_text())
            assert rtf["cer"] == pytest.approx(score["cer"])  # decode's CER is the scorer's
            assert rtf["utterances"] == score["sentences"] > 0
        lm_run = json.loads((out / "exp" / name / "decode_test_lm" / "rtf.json").read_text())
        assert lm_run["method"] == "beam" and lm_run["lm"].endswith("char_3gram.arpa")
        dev_cers = {
            json.loads(p.read_text())["lm_weight"]: json.loads(p.read_text())["cer"]
            for p in (out / "exp" / name / "decode_dev_lm").glob("w*/rtf.json")
        }
        assert sorted(dev_cers) == [0.5, 1.0, 1.5, 2.0]
        assert dev_cers[lm_run["lm_weight"]] == min(dev_cers.values())  # the weight was chosen on dev
    # both runs trained from scratch at the same budget; GM-OT in the study's setting
    import yaml

    base_cfg = yaml.safe_load((out / "exp" / "baseline" / "config.yaml").read_text())
    gmot_cfg = yaml.safe_load((out / "exp" / "gmot" / "config.yaml").read_text())
    assert base_cfg["gmot"]["mode"] == "none" and gmot_cfg["gmot"]["mode"] == "fgw"
    assert gmot_cfg["gmot"]["centre"] is True and gmot_cfg["gmot"]["tot_weight"] == 0.5
    assert base_cfg["train"]["epochs"] == gmot_cfg["train"]["epochs"] == 2
    gains = [100 * (json.loads((out / "exp" / r / "decode_test" / "rtf.json").read_text())["cer"]) for r in
             ("baseline", "gmot")]  # fmt: skip
    assert f"{gains[0] - gains[1]:+.2f}" in run.stdout  # the gain row of the closing table
    gmot_state = out / "exp" / "gmot" / "avg.pt"
    assert gmot_state.is_file() and (out / "exp" / "baseline" / "avg.pt").is_file()
    assert len(list((out / "plots").glob("*.png"))) == 3
    # the GM-OT model exported for sherpa-onnx, which transcribes every test wav as gmot does
    assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / "tokens.txt").is_file()
    flat = " ".join(run.stdout.split())
    assert "sherpa-onnx transcribes" in flat and "exactly as gmot does" in flat
    # the corpus folder records the sentences' licence
    assert "CC-BY-SA-4.0" in (out / "data" / "corpus" / "LICENSE-sentences.txt").read_text()
    # re-running skips finished stages and ends with the same table
    again = run_demo(out, **sizes)
    assert again.returncode == 0, again.stderr[-3000:]
    assert run.stdout.splitlines()[-6:] == again.stdout.splitlines()[-6:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng (make sysdeps)")
def test_demo_recipe_stops_with_exit_1_and_the_failing_log_when_a_stage_fails(tmp_path: Path) -> None:
    out = tmp_path / "demo"

    def demo(**env: str) -> subprocess.CompletedProcess[str]:
        return run_demo(out, TRAIN_SENTENCES="8", EPOCHS="1", **env)

    # a training option neither command knows: both runs refuse it, the script says training failed
    bad_training = demo(EXTRA="--no-progress --device cpu --set train.no_such_key=1")
    assert bad_training.returncode == 1, bad_training.stdout[-3000:] + bad_training.stderr[-3000:]
    assert "training failed; the logs:" in bad_training.stdout
    assert "no_such_key" in bad_training.stdout  # the tail of the failing run's log is shown
    assert not (out / "exp" / "baseline" / "avg.pt").exists()
    # training works, then the baseline's decoding fails (an LM weight that is not a number)
    bad_decode = demo(EXTRA="--no-progress --device cpu", LM_WEIGHTS="heavy")
    assert bad_decode.returncode == 1, bad_decode.stdout[-3000:] + bad_decode.stderr[-3000:]
    assert "training failed" not in bad_decode.stdout
    assert "decoding the baseline failed; its log:" in bad_decode.stdout
    assert (out / "exp" / "baseline" / "avg.pt").is_file() and (out / "exp" / "gmot" / "avg.pt").is_file()
    assert not (out / "exp" / "baseline" / "decode_test_lm").exists()  # nothing after the failure was written
