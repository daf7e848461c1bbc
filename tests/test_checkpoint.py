"""Checkpoints: weights_only round trip, atomic writes, clear errors, averaging, load_model, --init-from."""

from pathlib import Path

import numpy as np
import pytest
import torch

from models.engine.checkpoint import (
    CheckpointError,
    average_checkpoints,
    checkpoint_path,
    init_from_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from models.nn.encoder import PRESETS, ConformerCTC, ModelConfig

torch.set_num_threads(1)
VOCAB = ["<blank>", "<unk>", "你", "好", "我", "们"]


def _state(model: ConformerCTC, step: int = 10, vocab: list[str] = VOCAB) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 30, 80), torch.tensor([30, 20]))["log_probs"].sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "config": {"model": model.cfg.to_dict(), "train": {"lr": 1e-3}},
        "vocab": vocab,
        "cmvn": {"mean": torch.zeros(80), "std": torch.ones(80)},
        "plm": {"name": "tiny", "width": 16, "layer": -1},
        "epoch": 1,
        "step": step,
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)},
    }


def _model(plm_width: int | None = 16, **overrides) -> ConformerCTC:
    cfg = ModelConfig(**{**PRESETS["tiny"].to_dict(), **overrides})
    return ConformerCTC(cfg, len(VOCAB), plm_width)


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _model()
    state = _state(model)
    path = tmp_path / "exp" / "ckpt-000000010.pt"
    save_checkpoint(path, state)
    assert not path.with_name(path.name + ".tmp").exists()
    torch.load(path, weights_only=True)  # loads with the safe unpickler
    back = load_checkpoint(path)
    assert back["vocab"] == VOCAB and back["step"] == 10 and back["config"] == state["config"]
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])


def test_unsafe_contents_are_refused_at_save_time(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\].*ndarray"):
        save_checkpoint(tmp_path / "x.pt", {"model": {}, "rng": {"numpy": np.zeros(3)}})
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.pt.tmp").exists()


def test_a_failed_save_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt-000000001.pt"
    save_checkpoint(path, _state(_model(), step=1))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(_model(), step=2))
    assert load_checkpoint(path)["step"] == 1
    assert not path.with_name(path.name + ".tmp").exists()


def test_missing_truncated_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=f"checkpoint {missing} does not exist"):
        load_checkpoint(missing)
    good = tmp_path / "good.pt"
    save_checkpoint(good, _state(_model()))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {truncated} is truncated or corrupt"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(garbage)
    plain = tmp_path / "plain.pt"
    torch.save(_model().state_dict(), plain)
    with pytest.raises(CheckpointError, match=f"{plain} is not a gmot checkpoint"):
        load_checkpoint(plain)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": {}, "format": "gmot-checkpoint", "obj": Path("x")}, pickled)
    with pytest.raises(CheckpointError, match=f"checkpoint {pickled} holds objects that cannot be loaded"):
        load_checkpoint(pickled)


def test_average_of_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(1)
    paths = []
    states = []
    for step in (1, 2, 3):
        st = _state(_model(), step=step)
        states.append(st)
        paths.append(checkpoint_path(tmp_path, step))
        save_checkpoint(paths[-1], st)
    avg = average_checkpoints(paths)
    key = "ctc_head.weight"
    expected = sum(s["model"][key] for s in states) / 3
    assert torch.allclose(avg[key], expected, atol=1e-6)
    counter = "layers.0.conv_module.sequential.3.num_batches_tracked"
    assert avg[counter].dtype == torch.int64
    other = tmp_path / "other.pt"
    save_checkpoint(other, _state(_model(d_model=16, num_heads=2)))
    with pytest.raises(CheckpointError, match="cannot average"):
        average_checkpoints([paths[0], other])


def test_load_model_from_a_folder_prefers_avg_then_newest_step(tmp_path: Path) -> None:
    torch.manual_seed(2)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(tmp_path)
    states = {}
    for step in (90, 1000, 200):
        states[step] = _state(_model(), step=step)
        save_checkpoint(checkpoint_path(tmp_path, step), states[step])
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-000000090.pt",
        "ckpt-000000200.pt",
        "ckpt-000001000.pt",
    ]
    loaded = load_model(tmp_path)
    assert loaded.path.name == "ckpt-000001000.pt" and not loaded.model.training
    assert loaded.vocab == VOCAB and loaded.cmvn_mean.shape == (80,)
    assert torch.equal(loaded.model.ctc_head.weight, states[1000]["model"]["ctc_head.weight"])
    assert loaded.model.adapter is not None and loaded.model.adapter.out_features == 16
    save_checkpoint(tmp_path / "avg.pt", states[90])
    loaded = load_model(tmp_path)
    assert loaded.path.name == "avg.pt"
    assert torch.equal(loaded.model.ctc_head.weight, states[90]["model"]["ctc_head.weight"])
    out = loaded.model(torch.randn(1, 30, 80), torch.tensor([30]))
    assert out["log_probs"].shape == (1, 6, len(VOCAB))


def test_load_model_rejects_vocab_that_disagrees_with_the_weights(tmp_path: Path) -> None:
    st = _state(_model())
    st["vocab"] = [*VOCAB, "他"]
    path = tmp_path / "bad.pt"
    save_checkpoint(path, st)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} was trained with a vocabulary of 6 units"):
        load_model(path)


def test_init_from_checks_vocab_and_widths(tmp_path: Path) -> None:
    torch.manual_seed(3)
    pre = _model(plm_width=None)
    path = tmp_path / "pre.pt"
    save_checkpoint(path, _state(pre))
    student = _model(plm_width=16)
    adapter_before = student.adapter.weight.clone()
    init_from_checkpoint(student, path, VOCAB)  # pretrain -> distill: adapter stays fresh
    assert torch.equal(student.ctc_head.weight, pre.ctc_head.weight)
    assert torch.equal(student.adapter.weight, adapter_before)
    with pytest.raises(CheckpointError, match=f"{path} was trained with a vocabulary of 6 units but"):
        init_from_checkpoint(_model(), path, [*VOCAB, "他"])
    with pytest.raises(CheckpointError, match="different vocabulary of the same size: unit 2"):
        init_from_checkpoint(_model(), path, ["<blank>", "<unk>", "他", "好", "我", "们"])
    with pytest.raises(CheckpointError, match="different encoder widths"):
        init_from_checkpoint(_model(d_model=16, num_heads=2), path, VOCAB)
    with pytest.raises(CheckpointError, match="does not exist"):
        init_from_checkpoint(_model(), tmp_path / "missing.pt", VOCAB)
