"""The training engine and the pretrain / distill commands on the tiny prepared folder (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import models.engine.training as training
from gmot_cli.app import app
from models.engine.checkpoint import list_checkpoints, load_checkpoint, load_model
from models.engine.config import resolve_config
from models.engine.precision import autocast_bf16, cpu_has_native_bf16
from models.engine.schedule import lr_at
from models.engine.training import train


def _metrics(exp: Path) -> list[dict]:
    return [json.loads(line) for line in (exp / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = resolve_config("tiny", overrides=["train.lr=0.01", "train.warmup_steps=4", "train.schedule=noam"])
    lrs = [lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert lrs[15] == pytest.approx(0.01 * (4 / 16) ** 0.5)
    cfg.train.schedule = "cosine"
    assert lr_at(19, cfg, 20) == pytest.approx(cfg.train.min_lr_ratio * 0.01)
    cfg.train.schedule = "linear"
    assert lr_at(3, cfg, 20) > lr_at(10, cfg, 20) > lr_at(19, cfg, 20)
    cfg.train.schedule = "constant"
    assert lr_at(17, cfg, 20) == 0.01


def test_bf16_autocast_on_cpu_only_where_the_cpu_has_it() -> None:
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with autocast_bf16(torch.device("cpu"), enabled=True):
        y = layer(x)
    assert y.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    with autocast_bf16(torch.device("cpu"), enabled=False):
        assert layer(x).dtype == torch.float32


@pytest.mark.slow
def test_pretrain_then_distill_both_modes_from_the_cli(tiny_prepared: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    pre = tmp_path / "pre"
    common = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--epochs", "2"]
    result = runner.invoke(
        app, ["pretrain", str(tiny_prepared), str(pre), *common, "--set", "train.lr=0.003"]
    )
    assert result.exit_code == 0, result.output
    assert "best dev CER" in result.output
    for name in ("config.yaml", "command.txt", "metrics.jsonl", "avg.pt", "checkpoints.json"):
        assert (pre / name).is_file(), name
    assert (
        "train.lr=0.003" in (pre / "config.yaml").read_text() or "0.003" in (pre / "config.yaml").read_text()
    )
    events = _metrics(pre)
    assert {e["event"] for e in events} >= {"train", "epoch", "average"}
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(0.0 <= e["dev_cer"] <= 5.0 and e["loss"] > 0 for e in epochs)
    assert epochs[1]["loss"] < epochs[0]["loss"]  # it learns
    # where the time went: waiting for batches is part of the epoch's training, itself part of the epoch
    assert all(0.0 <= e["data_seconds"] <= e["train_seconds"] <= e["seconds"] for e in epochs)
    windows = [e for e in events if e["event"] == "train"]
    assert all(e["window_seconds"] > 0.0 and 0.0 <= e["data_share"] <= 1.0 for e in windows)
    state = load_checkpoint(list_checkpoints(pre)[-1])
    for key in (
        "model",
        "config",
        "vocab",
        "cmvn",
        "plm",
        "epoch",
        "step",
        "optimizer",
        "scheduler",
        "sampler",
        "rng",
    ):
        assert key in state, key
    assert state["config"]["gmot"]["mode"] == "none"
    assert not any(k.startswith("adapter.") for k in state["model"])
    assert load_model(pre).model.adapter is None  # avg.pt rebuilds for decoding

    for mode in ("wd", "fgw"):
        exp = tmp_path / mode
        args = [
            "distill",
            str(tiny_prepared),
            str(exp),
            *common,
            "--mode",
            mode,
            "--init-from",
            str(pre / "avg.pt"),
            "--kt-weight",
            "0.7",
            "--epsilon",
            "0.2",
            "--structure",
            "temporal",
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        state = load_checkpoint(exp / "avg.pt")
        assert state["config"]["gmot"]["mode"] == mode
        assert state["config"]["gmot"]["structure"] == "temporal"
        assert state["config"]["train"]["kt_weight"] == 0.7
        assert any(k.startswith("adapter.") for k in state["model"])
        train_events = [e for e in _metrics(exp) if e["event"] == "train"]
        assert all(e["kt"] > 0 and "kt_ot" in e and "kt_align" in e for e in train_events)
        first = train_events[0]
        assert first["loss"] == pytest.approx(first["ctc"] + 0.7 * first["kt"], rel=1e-4)
        # initialised from the pretrained encoder: the first CTC loss is that of the pretrained model
        assert first["ctc"] < _metrics(pre)[0]["ctc"]


def _tiny(*extra: str):
    return resolve_config("tiny", overrides=["train.max_utts=3", "train.epochs=2", *extra])


class _Crash(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("where", ["epoch", "mid-epoch"])
def test_interrupted_run_resumes_to_the_same_weights(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # dropout and SpecAugment on: resuming must redraw the same masks
    # mid-epoch: DataLoader workers prefetch ahead of training, the resume point must not move with them
    workers = 2 if where == "mid-epoch" else 0
    # one thread in every run: with train.threads=0 a resumed run could take 2 free cores and round otherwise
    extra = ("model.dropout=0.1", "train.save_every_steps=1", "gmot.mode=fgw", f"train.num_workers={workers}",
             "train.threads=1")  # fmt: skip
    straight = train(tiny_prepared, tmp_path / "a", _tiny(*extra), device="cpu", progress=False)
    assert straight.resumed_from is None

    original = training.Trainer._save
    calls = {"n": 0}

    def crashing_save(self, epoch_complete, consumed, dev_cer=None):
        original(self, epoch_complete, consumed, dev_cer)
        calls["n"] += 1
        if (where == "epoch" and epoch_complete) or (where == "mid-epoch" and calls["n"] == 2):
            raise _Crash

    monkeypatch.setattr(training.Trainer, "_save", crashing_save)
    with pytest.raises(_Crash):
        train(tiny_prepared, tmp_path / "b", _tiny(*extra), device="cpu", progress=False)
    monkeypatch.setattr(training.Trainer, "_save", original)
    last = load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
    assert last["epoch_complete"] is (where == "epoch")
    resumed = train(tiny_prepared, tmp_path / "b", _tiny(*extra), device="cpu", progress=False)
    assert resumed.resumed_from is not None and resumed.resumed_from.name.endswith(f"{last['step']:09d}.pt")
    assert resumed.step == straight.step
    a, b = _params(list_checkpoints(tmp_path / "a")[-1]), _params(list_checkpoints(tmp_path / "b")[-1])
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    la = [e for e in _metrics(tmp_path / "a") if e["event"] == "train"]
    lb = [e for e in _metrics(tmp_path / "b") if e["event"] == "train"]
    assert [e["step"] for e in lb] == [e["step"] for e in la]
    assert [e["loss"] for e in lb] == pytest.approx([e["loss"] for e in la], rel=1e-5)
    # the command line is recorded once per run
    assert len((tmp_path / "b" / "command.txt").read_text().splitlines()) == 2


@pytest.mark.slow
def test_keep_last_and_average_best(tiny_prepared: Path, tmp_path: Path) -> None:
    cfg = _tiny("train.epochs=4", "train.keep_last=1", "train.average_best=2")
    out = train(tiny_prepared, tmp_path / "e", cfg, device="cpu", progress=False)
    index = json.loads((tmp_path / "e" / "checkpoints.json").read_text())
    best = sorted((e for e in index if e["epoch_complete"]), key=lambda e: (e["dev_cer"], -e["step"]))[:2]
    kept = {p.name for p in list_checkpoints(tmp_path / "e")}
    assert kept == {e["file"] for e in index}
    assert len(kept) <= 3  # the last one + the best two
    avg = load_checkpoint(tmp_path / "e" / "avg.pt")
    assert sorted(avg["averaged_from"]) == sorted(e["file"] for e in best)
    assert set(out.dev_cer) == {1, 2, 3, 4}
    # re-running a finished run trains nothing more and keeps the weights, and avg.pt is left untouched
    before = _params(list_checkpoints(tmp_path / "e")[-1])
    avg_written = (tmp_path / "e" / "avg.pt").stat().st_mtime_ns
    again = train(tiny_prepared, tmp_path / "e", cfg, device="cpu", progress=False)
    assert again.step == out.step
    after = _params(list_checkpoints(tmp_path / "e")[-1])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "e" / "avg.pt").stat().st_mtime_ns == avg_written
    assert (again.average, again.average_cer) == (out.average, out.average_cer)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*no PLM feature cache")
def test_distill_without_a_plm_cache_warns_and_runs_the_teacher_online(
    tiny_prepared: Path, tmp_path: Path
) -> None:
    import shutil

    from tiny_plm import make_tiny_bert_dir

    data = tmp_path / "data"
    shutil.copytree(tiny_prepared, data)
    (data / "lang" / "plm.json").unlink()
    for split in ("train", "dev", "test"):
        manifest = data / split / "manifest.jsonl"
        records = [json.loads(x) for x in manifest.read_text(encoding="utf-8").splitlines()]
        for r in records:
            r.pop("plm", None)
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        manifest.write_text("".join(lines), encoding="utf-8")
    bert = make_tiny_bert_dir(tmp_path / "bert", width=24)
    cfg = _tiny("train.epochs=1", "gmot.mode=wd", f"train.plm={bert}")
    assert cfg.gmot.standardise  # asked for, but an online teacher has no corpus statistics
    with pytest.warns(UserWarning, match="no PLM feature cache"):
        train(data, tmp_path / "exp", cfg, device="cpu", progress=False)
    state = load_checkpoint(list_checkpoints(tmp_path / "exp")[-1])
    assert state["model"]["adapter.weight"].shape[0] == 24  # the online teacher's width
    # config.yaml and the checkpoint record what ran: no standardisation
    recorded = yaml.safe_load((tmp_path / "exp" / "config.yaml").read_text(encoding="utf-8"))
    assert recorded["gmot"]["standardise"] is False and state["config"]["gmot"]["standardise"] is False
    events = [e for e in _metrics(tmp_path / "exp") if e["event"] == "train"]
    assert events and all(e["kt"] > 0 for e in events)
    # without train.plm the missing cache is an error, not a silent online e5 teacher
    with pytest.raises(training.TrainingError, match="no complete PLM feature cache"):
        train(data, tmp_path / "exp3", _tiny("train.epochs=1", "gmot.mode=wd"), device="cpu", progress=False)
    bad = _tiny("train.epochs=1", "gmot.mode=wd", f"train.plm={tmp_path / 'nowhere'}")
    with pytest.raises(training.TrainingError, match="no PLM cache"):
        train(data, tmp_path / "exp2", bad, device="cpu", progress=False)


def test_average_falls_back_to_fewer_checkpoints_when_the_mean_is_worse(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dev CER per epoch 0.5, 0.4, 0.3; then the mean of the best 3 scores 0.6 and of the best 2 0.35, both
    # worse than the best single checkpoint (0.3): avg.pt must end as the best epoch alone.
    scores = iter([0.5, 0.4, 0.3, 0.6, 0.35, 0.3])
    monkeypatch.setattr(training.Trainer, "_dev_cer", lambda self: (next(scores), 1.0))
    cfg = _tiny("train.epochs=3", "train.keep_last=3", "train.average_best=3")
    out = train(tiny_prepared, tmp_path / "e", cfg, device="cpu", progress=False)
    avg = load_checkpoint(tmp_path / "e" / "avg.pt")
    index = json.loads((tmp_path / "e" / "checkpoints.json").read_text())
    best = min(index, key=lambda e: e["dev_cer"])
    assert avg["averaged_from"] == [best["file"]] and best["epoch"] == 3
    assert out.average_cer == pytest.approx(0.3)
    tried = [e["files"] for e in _metrics(tmp_path / "e") if e["event"] == "average"]
    assert [len(f) for f in tried] == [3, 2, 1]
    assert torch.equal(
        avg["model"]["ctc_head.weight"], _params(tmp_path / "e" / best["file"])["ctc_head.weight"]
    )


def test_pretrain_init_from_starts_from_the_given_weights(tiny_prepared: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--epochs", "1"]
    assert runner.invoke(app, ["pretrain", str(tiny_prepared), str(tmp_path / "a"), *common]).exit_code == 0
    start = tmp_path / "a" / "avg.pt"
    zero_lr = [*common, "--set", "train.lr=1e-9", "--set", "train.average_best=0"]
    result = runner.invoke(
        app, ["pretrain", str(tiny_prepared), str(tmp_path / "b"), "--init-from", str(start), *zero_lr]
    )
    assert result.exit_code == 0, result.output
    a, b = _params(start), _params(list_checkpoints(tmp_path / "b")[-1])
    conv = [k for k in a if "running" not in k and "num_batches" not in k]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in conv)  # lr ~0: it kept the initial weights
    missing = runner.invoke(
        app,
        [
            "pretrain",
            str(tiny_prepared),
            str(tmp_path / "c"),
            "--init-from",
            str(tmp_path / "no.pt"),
            *common,
        ],
    )
    assert missing.exit_code != 0 and "no.pt" in missing.output


def test_training_leaves_the_process_subnormal_setting_as_it_found_it(
    tiny_prepared: Path, tmp_path: Path
) -> None:
    def flushes() -> bool:
        return bool((torch.tensor([1e-38]) * 1e-3).item() == 0.0)

    assert not flushes()
    train(tiny_prepared, tmp_path / "e", _tiny("train.epochs=1"), device="cpu", progress=False)
    assert not flushes()


@pytest.mark.slow
def test_extending_a_finished_cosine_run_keeps_its_schedule(tiny_prepared: Path, tmp_path: Path) -> None:
    sets = ["train.schedule=cosine", "train.warmup_steps=2", "train.log_interval=1", "train.lr=0.002"]
    exp = tmp_path / "exp"
    train(tiny_prepared, exp, _tiny(*sets, "train.epochs=1"), device="cpu", progress=False)
    first = [r for r in _metrics(exp) if r["event"] == "train"]
    train(tiny_prepared, exp, _tiny(*sets, "train.epochs=2"), device="cpu", progress=False)
    second = [r for r in _metrics(exp) if r["event"] == "train" and r["epoch"] == 2]
    floor = 0.01 * 0.002  # min_lr_ratio * lr
    assert second and all(r["lr"] == pytest.approx(floor) for r in second)
    assert max(r["lr"] for r in second) <= min(r["lr"] for r in first)


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def test_without_tensorboard_only_the_metrics_log_is_written(tiny_prepared: Path, tmp_path: Path) -> None:
    if _has_tensorboard():
        pytest.skip("tensorboard is installed here: test_tensorboard_scalars_are_the_logged_metrics runs")
    exp = tmp_path / "exp"
    train(tiny_prepared, exp, _tiny("train.epochs=1"), device="cpu", progress=False)
    assert any(e["event"] == "train" for e in _metrics(exp))
    assert not (exp / "tensorboard").exists()


def test_tensorboard_scalars_are_the_logged_metrics(tiny_prepared: Path, tmp_path: Path) -> None:
    """docs/usage.md: EXP_DIR/tensorboard holds event files when the tensorboard package is installed; every
    number of metrics.jsonl is there as the scalar EVENT/KEY at its step."""
    if not _has_tensorboard():
        pytest.skip("tensorboard is not installed (an optional package): training writes metrics.jsonl only")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = tmp_path / "exp"
    train(tiny_prepared, exp, _tiny("train.epochs=1", "gmot.mode=fgw"), device="cpu", progress=False)
    events = EventAccumulator(str(exp / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged: dict[str, list[tuple[int, float]]] = {}
    for record in _metrics(exp):
        for key, value in record.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and key not in ("step", "time", "epoch"):
                logged.setdefault(f"{record['event']}/{key}", []).append((record["step"], value))
    assert {"train/loss", "train/kt", "epoch/dev_cer"} <= set(logged)
    assert sorted(events.Tags()["scalars"]) == sorted(logged)
    for tag, points in logged.items():
        scalars = [(s.step, s.value) for s in events.Scalars(tag)]
        assert [s for s, _ in scalars] == [s for s, _ in points], tag
        assert [v for _, v in scalars] == pytest.approx([v for _, v in points], rel=1e-6), tag
