"""Experiment configuration: presets, YAML files, --set overrides with type conversion and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from models.engine.config import (
    ConfigError,
    ExperimentConfig,
    all_keys,
    config_from_dict,
    config_to_dict,
    dump_config,
    preset_config,
    resolve_config,
)
from models.nn.encoder import PRESETS as MODEL_PRESETS


@pytest.mark.parametrize("name", ["tiny", "demo", "aishell1"])
def test_presets_use_the_encoder_presets(name: str) -> None:
    cfg = preset_config(name)
    assert cfg.model == MODEL_PRESETS[name]
    assert cfg.model is not MODEL_PRESETS[name]  # a copy: overrides never change the shared preset


def test_aishell1_preset_is_the_paper_line_encoder() -> None:
    m = preset_config("aishell1").model
    assert (m.num_layers, m.d_model, m.num_heads, m.ffn_dim, m.conv_kernel) == (12, 256, 4, 2048, 15)


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="tiny, demo, aishell1"):
        preset_config("huge")


def test_set_converts_each_type() -> None:
    cfg = resolve_config(
        "tiny",
        overrides=[
            "train.lr=1e-3", "train.epochs=7", "train.shuffle=false", "train.betas=0.8,0.95",
            "gmot.tol=none", "gmot.mode=wd", "model.adapter=mlp", "train.plm=/some/folder", "gmot.alpha=1",
        ],
    )  # fmt: skip
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.train.shuffle is False
    assert cfg.train.betas == (0.8, 0.95)
    assert cfg.gmot.tol is None
    assert cfg.gmot.mode == "wd"
    assert cfg.model.adapter == "mlp"
    assert cfg.train.plm == "/some/folder"
    assert cfg.gmot.alpha == 1.0 and isinstance(cfg.gmot.alpha, float)
    assert resolve_config("tiny", overrides=["gmot.tol=0.001"]).gmot.tol == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=0.1", "train.lr"),
        ("trian.lr=0.1", "train.lr"),
        ("model.dmodel=64", "model.d_model"),
        ("train.kt_wieght=1", "train.kt_weight"),
        ("gmot.epsilonn=0.1", "gmot.epsilon"),
        ("train.learning_rate=0.1", "train.lr"),
        ("lr=0.1", "train.lr"),
        ("model.layers=2", "model.num_layers"),
    ],
)
def test_unknown_key_lists_close_matches(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="unknown config key") as err:
        resolve_config("tiny", overrides=[override])
    assert expected in str(err.value)
    assert "did you mean" in str(err.value)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.epochs=many", "expected an integer"),
        ("train.epochs=2.5", "expected an integer"),
        ("train.lr=fast", "expected a number"),
        ("train.shuffle=maybe", "true or false"),
        ("gmot.mode=ot", "none, wd, fgw"),
        ("gmot.alpha=2", "alpha"),
        ("model.num_heads=3", "divisible"),
        ("train.accum_grad=0", "accum_grad"),
        ("train.freq_warp=1.5", "freq_warp must be in"),
        ("train.lr", "key=value"),
        ("train=1", "section"),
    ],
)
def test_bad_values_are_clear_errors(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        resolve_config("tiny", overrides=[override])


def test_yaml_file_then_set_then_named_options(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 0.005\n  epochs: 9\nmodel:\n  num_layers: 3\n", encoding="utf-8")
    cfg = resolve_config("tiny", path, ["train.epochs=4"], {"train.seed": 11, "gmot.alpha": None})
    assert cfg.train.lr == pytest.approx(0.005)
    assert cfg.model.num_layers == 3
    assert cfg.train.epochs == 4  # --set wins over the file
    assert cfg.train.seed == 11  # named options win over --set
    assert cfg.gmot.alpha == preset_config("tiny").gmot.alpha  # None = not given


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("train:\n  warmup: 10\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.warmup_steps"):
        resolve_config("tiny", bad_key)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config("tiny", broken)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config("tiny", tmp_path / "missing.yaml")


def test_dump_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = resolve_config("demo", overrides=["train.betas=0.85,0.99", "gmot.mode=wd", "train.lr=0.0007"])
    dump_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8"))
    assert set(data) == {"model", "gmot", "train"}
    again = config_from_dict(data)
    assert again == cfg
    # the dumped file is itself a valid --config
    assert resolve_config("tiny", tmp_path / "config.yaml") == cfg
    assert config_to_dict(again)["train"]["betas"] == [0.85, 0.99]


def test_every_key_is_settable_to_its_own_value() -> None:
    cfg = preset_config("demo")
    plain = config_to_dict(cfg)
    overrides = []
    for key in all_keys(cfg):
        section, name = key.split(".")
        value = plain[section][name]
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        overrides.append(f"{key}={text}")
    assert resolve_config("demo", overrides=overrides) == cfg
    assert isinstance(cfg, ExperimentConfig)
