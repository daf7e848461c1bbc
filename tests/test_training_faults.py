"""Bad input and faults: infinite CTC, NaN losses, SIGKILL and resume, incompatible or corrupt checkpoints,
unknown --set keys, GPU out of memory."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import models.engine.train_data as train_data
import models.engine.training as training
import models.nn.ctc as ctc_loss
from data.store import FeatureRef, ManifestEntry
from gmot_cli.app import app
from models.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from models.engine.config import config_to_dict, resolve_config
from models.engine.training import TrainingError, train
from models.nn.encoder import ConformerCTC

REPO = Path(__file__).resolve().parent.parent
CLI = ["--preset", "tiny", "--device", "cpu", "--no-progress"]


def _tiny(*extra: str):
    return resolve_config("tiny", overrides=["train.max_utts=3", "train.epochs=1", "gmot.mode=none", *extra])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _with_unalignable_utterance(tiny_prepared: Path, tmp_path: Path) -> tuple[Path, dict]:
    data = _copy(tiny_prepared, tmp_path / "data")
    manifest = data / "train" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    bad = records[4]
    bad["token_ids"] = [2, 3] * bad["num_frames"]  # far more labels than the ~T/4 output frames allow
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return data, bad


def test_unalignable_utterance_is_left_out_at_load_time_by_name(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, bad = _with_unalignable_utterance(tiny_prepared, tmp_path)
    out = train(data, tmp_path / "exp", _tiny("train.epochs=1"), device="cpu", progress=False)
    assert out.skipped_inf == 0 and out.step > 0
    err = capsys.readouterr().err
    assert "1 train utterances have more characters" in err and bad["id"] in err and "x4" in err


def test_ctc_required_frames_counts_repeats() -> None:
    assert ctc_loss.ctc_required_frames([2, 3, 4]) == 3
    assert ctc_loss.ctc_required_frames([2, 2, 3, 3, 3]) == 8
    assert ctc_loss.ctc_required_frames([]) == 0
    feats = FeatureRef("feats/shard-00000.npy", 0)
    records = [
        ManifestEntry("a", 0.4, 40, "xxxxx", [2] * 5, None, feats),
        ManifestEntry("b", 0.4, 40, "xyxy", [2, 3] * 2, None, feats),
    ]
    # 40 frames -> 4 after x8: five equal labels need 9, four alternating need 4
    assert ctc_loss.ctc_infeasible(records, 8) == [0]
    assert ctc_loss.ctc_infeasible(records, 4) == []  # 9 frames after x4


def test_infinite_ctc_drops_only_the_offending_utterance(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, bad = _with_unalignable_utterance(tiny_prepared, tmp_path)
    monkeypatch.setattr(train_data, "ctc_infeasible", lambda records, subsampling: [])  # let it through
    out = train(data, tmp_path / "exp", _tiny("train.epochs=2"), device="cpu", progress=False)
    assert out.skipped_inf == 2  # the one utterance, once per epoch
    assert out.skipped_nan == 0
    events = [json.loads(x) for x in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()]
    skips = [e for e in events if e["event"] == "skip"]
    assert len(skips) == 2 and all(e["utterances"] == [bad["id"]] and e["reason"] == "inf_ctc" for e in skips)
    assert [e["skipped_inf"] for e in events if e["event"] == "epoch"] == [1, 1]
    # its batch-mates were trained: every batch made an update
    state = load_checkpoint(list_checkpoints(tmp_path / "exp")[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert state["step"] == 2 * state["sampler"]["num_batches"]


def _nan_on(calls: set[int], monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make the training CTC loss NaN on the given (1-based) training forward calls."""
    original = training.Trainer._forward
    seen = {"n": 0}

    def forward(self, batch, train):
        terms, per_utt = original(self, batch, train)
        if train:
            seen["n"] += 1
            if seen["n"] in calls or -1 in calls:
                terms = {**terms, "loss": terms["loss"] * float("nan")}
        return terms, per_utt

    monkeypatch.setattr(training.Trainer, "_forward", forward)
    return seen


def test_nan_loss_skips_the_step_and_goes_on(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_on({2}, monkeypatch)
    out = train(tiny_prepared, tmp_path / "exp", _tiny(), device="cpu", progress=False)
    assert out.skipped_nan == 1 and out.skipped_inf == 0
    assert out.step == 3  # 4 batches, one skipped
    state = load_checkpoint(list_checkpoints(tmp_path / "exp")[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_storm_stops_with_a_clear_message(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_on({-1}, monkeypatch)
    with pytest.raises(TrainingError, match=r"NaN in 3 consecutive steps.*max_nan_steps=3.*learning rate"):
        train(tiny_prepared, tmp_path / "exp", _tiny("train.max_nan_steps=3"), device="cpu", progress=False)


def test_gpu_out_of_memory_names_the_budget(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(self, feats, lengths):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ConformerCTC, "forward", oom)
    with pytest.raises(TrainingError, match=r"out of memory.*train\.max_frames=1500 \(now 3000\)"):
        train(tiny_prepared, tmp_path / "exp", _tiny(), device="cpu", progress=False)


def _run_cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def test_unknown_set_key_lists_close_matches(tiny_prepared: Path, tmp_path: Path) -> None:
    code, output = _run_cli(["pretrain", str(tiny_prepared), str(tmp_path / "x"), "--preset", "tiny",
                             "--set", "train.lerning_rate=1", "--set", "train.epochs=1"])  # fmt: skip
    assert code == 2
    assert "unknown config key 'train.lerning_rate'" in output and "train.lr" in output
    code, output = _run_cli(["distill", str(tiny_prepared), str(tmp_path / "x"), "--preset", "tiny",
                             "--set", "gmot.alpah=0.3"])  # fmt: skip
    assert code == 2
    assert "unknown config key 'gmot.alpah'" in output and "gmot.alpha" in output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["missing", "corrupt", "truncated", "foreign"])
def test_init_from_missing_or_corrupt_is_a_clear_error(
    tiny_prepared: Path, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "init.pt"
    if kind == "corrupt":
        path.write_bytes(b"this is not a checkpoint" * 10)
    elif kind == "truncated":
        model = ConformerCTC(_tiny().model, 12)
        save_checkpoint(path, {"model": model.state_dict(), "config": {}, "vocab": []})
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "foreign":
        torch.save(ConformerCTC(_tiny().model, 12).state_dict(), path)
    code, output = _run_cli(
        ["distill", str(tiny_prepared), str(tmp_path / "x"), *CLI, "--init-from", str(path)]
    )
    assert code == 2  # an --init-from that cannot be used is a usage error
    expected = {"missing": "does not exist", "corrupt": "corrupt", "truncated": "truncated or corrupt",
                "foreign": "not a gmot checkpoint"}[kind]  # fmt: skip
    assert expected in " ".join(output.split()), output
    assert "Traceback" not in output


def test_a_truncated_shard_read_by_a_loader_worker_names_it_and_exits_1(
    tiny_prepared: Path, tmp_path: Path
) -> None:
    data = _copy(tiny_prepared, tmp_path / "data")
    for shard in (data / "train" / "feats").glob("shard-*.npy"):
        shard.write_bytes(shard.read_bytes()[:-100])
    code, output = _run_cli(["pretrain", str(data), str(tmp_path / "x"), *CLI,
                             "--set", "train.epochs=1", "--set", "train.num_workers=1"])  # fmt: skip
    text = " ".join(output.split())
    assert code == 1, output
    found = re.search(r"shard (\S+) is truncated or corrupt \(.*\); it holds utterance '([^']+)'", text)
    assert found, output
    records = [json.loads(x) for x in (data / "train" / "manifest.jsonl").read_text().splitlines()]
    holder = next(r for r in records if r["id"] == found[2])
    assert Path(found[1]) == data / "train" / holder["feats"]["shard"]
    assert "Re-run `gmot prepare` with the same arguments to rebuild it" in text
    assert "Traceback" not in output and "DataLoader worker" not in output
    # the worker was shut down: one left running would make the interpreter wait for it forever at exit
    assert multiprocessing.active_children() == []


def _fake_checkpoint(path: Path, vocab: list[str], frontend: str = "sherpa-onnx", **model_overrides) -> None:
    cfg = _tiny(*(f"model.{k}={v}" for k, v in model_overrides.items()))
    model = ConformerCTC(cfg.model, len(vocab))
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "config": config_to_dict(cfg),
            "vocab": vocab,
            "cmvn": {"mean": torch.zeros(80), "std": torch.ones(80), "frontend": frontend},
            "epoch": 1,
            "step": 1,
        },
    )


@pytest.mark.parametrize("problem", ["vocab-size", "vocab-units", "width", "frontend"])
def test_init_from_another_vocabulary_or_width(tiny_prepared: Path, tmp_path: Path, problem: str) -> None:
    vocab = (tiny_prepared / "lang" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "other.pt"
    if problem == "vocab-size":
        _fake_checkpoint(path, [*vocab, "多"])
    elif problem == "vocab-units":
        _fake_checkpoint(path, [*vocab[:-1], "多"])
    elif problem == "frontend":
        _fake_checkpoint(path, vocab, frontend="kaldi-snip")
    else:
        _fake_checkpoint(path, vocab, d_model=16)
    code, output = _run_cli(
        ["distill", str(tiny_prepared), str(tmp_path / "x"), *CLI, "--init-from", str(path)]
    )
    assert code == 2  # an --init-from that cannot be used is a usage error
    flat = " ".join(output.split())
    expected = {"vocab-size": "vocabulary of 13 units", "vocab-units": "different vocabulary",
                "width": "does not match the model",
                "frontend": "'kaldi-snip' features but the data folder has"}[problem]  # fmt: skip
    assert expected in flat, output


def test_resuming_into_a_folder_of_another_model_is_refused(tiny_prepared: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    train(tiny_prepared, exp, _tiny(), device="cpu", progress=False)
    code, output = _run_cli(["pretrain", str(tiny_prepared), str(exp), "--preset", "tiny", "--device", "cpu",
                             "--no-progress", "--set", "model.d_model=16"])  # fmt: skip
    assert code == 2  # EXP_DIR holds checkpoints of another model: a usage error
    assert "different model (model.d_model)" in " ".join(output.split())


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_resumes(tiny_prepared: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    # one thread in every run: the straight run below is compared weight for weight, and bf16 sums come out
    # differently with another thread count (train.threads=0 would pick the cores free at that moment)
    sets = ["train.max_utts=1", "train.epochs=2", "train.save_every_steps=1", "train.keep_last=2",
            "train.average_best=0", "train.threads=1"]  # fmt: skip
    cmd = [sys.executable, "-m", "gmot_cli", "pretrain", str(tiny_prepared), str(exp), "--preset", "tiny",
           "--device", "cpu", "--no-progress"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("GMOT_KILL_AFTER_STEP", None)
    # killed by the engine's own hook right after step 6 (mid-epoch 1 of 12 steps), before it is saved
    killed = subprocess.run(cmd, cwd=REPO, env={**env, "GMOT_KILL_AFTER_STEP": "6"}, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    killed_at = list_checkpoints(exp)
    assert [p.name for p in killed_at] == ["ckpt-000000004.pt", "ckpt-000000005.pt"]  # keep_last=2
    for path in killed_at:  # every checkpoint left behind is complete
        load_checkpoint(path)
    assert load_checkpoint(killed_at[-1])["step"] == 5
    logged = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    assert max(e["step"] for e in logged if e["event"] == "train") == 5  # step 6 was lost with the process

    # a wide console: the message on one line, however long the path
    rerun = subprocess.run(cmd, cwd=REPO, env={**env, "COLUMNS": "1000"}, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming from {killed_at[-1]} (epoch 1, step 5)" in rerun.stderr
    torch.set_num_threads(1)
    cfg = resolve_config("tiny", overrides=[*sets, "gmot.mode=none"])
    straight = train(tiny_prepared, tmp_path / "straight", cfg, device="cpu",
                     progress=False)  # fmt: skip
    a = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])
    b = load_checkpoint(list_checkpoints(exp)[-1])
    assert a["step"] == b["step"] == straight.step == 24
    for k, v in a["model"].items():
        assert torch.allclose(v, b["model"][k], atol=1e-5), k
    assert not list(exp.glob("*.tmp"))


def test_nan_adapter_output_is_a_skipped_nan_step_not_a_crash(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ConformerCTC.forward
    calls = {"n": 0}

    def poisoned(self, feats, lengths):
        out = original(self, feats, lengths)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2:  # the second training batch: the adapter output diverges
                out["adapted"] = out["adapted"] * float("nan")
        return out

    monkeypatch.setattr(ConformerCTC, "forward", poisoned)
    cfg = _tiny("gmot.mode=fgw", "train.epochs=1")
    out = train(tiny_prepared, tmp_path / "exp", cfg, device="cpu", progress=False)
    assert out.skipped_nan == 1 and out.epochs_done == 1
    events = [json.loads(x) for x in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in events if e["event"] == "skip"] == ["nan_loss"]
    state = load_checkpoint(list_checkpoints(tmp_path / "exp")[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _rewrite_manifest(data: Path, records: list[dict]) -> None:
    manifest = data / "train" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def test_train_records_without_teacher_tokens_are_left_out_by_name(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _copy(tiny_prepared, tmp_path / "data")
    records = [json.loads(x) for x in (data / "train" / "manifest.jsonl").read_text().splitlines()]
    for r in (records[3], records[7]):
        r["plm"]["num_tokens"], r["plm"]["tokens"] = 0, []
    _rewrite_manifest(data, records)
    out = train(data, tmp_path / "exp", _tiny("gmot.mode=fgw"), device="cpu", progress=False)
    assert out.epochs_done == 1 and out.skipped_nan == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"2 train utterances have no PLM teacher tokens and are left out ({records[3]['id']}, " in err
    assert records[7]["id"] in err


def test_non_finite_teacher_features_cost_their_item_only(tiny_prepared: Path, tmp_path: Path) -> None:
    """A float16 overflow in the PLM cache gives one utterance inf features: its batch still trains."""
    data = _copy(tiny_prepared, tmp_path / "data")
    bad = [json.loads(x) for x in (data / "train" / "manifest.jsonl").read_text().splitlines()][5]
    shard = data / "train" / bad["plm"]["shard"]
    feats = np.load(shard)
    feats[bad["plm"]["offset"] + 1, 2] = np.inf
    np.save(shard, feats)
    out = train(data, tmp_path / "exp", _tiny("gmot.mode=fgw"), device="cpu", progress=False)
    assert out.skipped_nan == 0 and out.skipped_inf == 0
    state = load_checkpoint(list_checkpoints(tmp_path / "exp")[-1])
    assert state["step"] == state["sampler"]["num_batches"]  # every batch made an update
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_partial_plm_cache_is_refused_without_an_explicit_teacher(tiny_prepared: Path, tmp_path: Path):
    data = _copy(tiny_prepared, tmp_path / "data")
    manifest = data / "train" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    for r in records[:3]:
        r.pop("plm")
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(TrainingError, match=f"3 of {len(records)} train utterances have no cached PLM"):
        train(data, tmp_path / "exp", _tiny("gmot.mode=fgw"), device="cpu", progress=False)
    assert not list_checkpoints(tmp_path / "exp") if (tmp_path / "exp").exists() else True


def test_a_checkpoint_from_before_the_cpu_attention_option_resumes(
    tiny_prepared: Path, tmp_path: Path
) -> None:
    exp = tmp_path / "exp"
    train(tiny_prepared, exp, _tiny(), device="cpu", progress=False)
    newest = list_checkpoints(exp)[-1]
    state = torch.load(newest, map_location="cpu", weights_only=True)
    del state["config"]["model"]["cpu_attention"]  # as older gmot wrote it
    torch.save(state, newest)
    code, output = _run_cli(["pretrain", str(tiny_prepared), str(exp), "--preset", "tiny", "--device", "cpu",
                             "--no-progress", "--epochs", "2"])  # fmt: skip
    assert code == 0, output
    assert "resuming with changed options: model.cpu_attention" in " ".join(output.split())
