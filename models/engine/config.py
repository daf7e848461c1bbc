"""One experiment configuration: model, GM-OT loss and training options in nested dataclasses.

An experiment starts from a preset (`tiny`, `demo`, `aishell1`), optionally merges a YAML file, then applies
`key.sub=value` overrides (`--set` on the command line). Every option is documented where it is defined: the
model options in `models.nn.encoder.ModelConfig`, the GM-OT options in `models.nn.transfer_loss.GMOTConfig`,
the training options in `TrainConfig` below. The resolved configuration is written to `EXP_DIR/config.yaml`
and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from models.nn.encoder import PRESETS as MODEL_PRESETS
from models.nn.encoder import ModelConfig
from models.nn.transfer_loss import GMOTConfig


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied; the message says which key and why."""


@dataclass
class TrainConfig:
    """Options of the training engine (`models.engine.training`), shared by `gmot pretrain` and `gmot
    distill`."""

    epochs: int = 30
    """Number of passes over the training split. Raising it and re-running continues a finished run."""
    lr: float = 1e-3
    """Peak learning rate of AdamW, reached at the end of the warm-up."""
    warmup_steps: int = 500
    """Optimiser steps of linear warm-up from 0 to `lr`."""
    schedule: Literal["noam", "cosine", "linear", "constant"] = "noam"
    """Decay after warm-up: `noam` = lr * sqrt(warmup / step) (WeNet/ESPnet), `cosine` and `linear` decay to
    `min_lr_ratio * lr` at the last step, `constant` keeps `lr`."""
    min_lr_ratio: float = 0.01
    """Floor of the `cosine` and `linear` schedules as a fraction of `lr`."""
    weight_decay: float = 1e-3
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    grad_clip: float = 5.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    accum_grad: int = 1
    """Gradient accumulation: batches per optimiser step. Under DDP each rank accumulates its own batches."""
    max_frames: int = 20000
    """Frames-per-batch budget: padded input frames (longest utterance x utterances) of one batch. Lower it
    when the GPU runs out of memory."""
    max_utts: int = 128
    """At most this many utterances per batch, whatever the frame budget allows."""
    shuffle: bool = True
    """Shuffle the order of the duration buckets each epoch (from seed + epoch)."""
    spec_augment: bool = True
    """Apply SpecAugment (frequency and time masks) to training batches."""
    freq_warp: float = 0.0
    """Frequency warp (vocal tract length perturbation on the fbank axis, before the masks): each training
    utterance's bins are scaled by a factor from [1 - freq_warp, 1 + freq_warp]; 0 turns it off."""
    freq_masks: int = 2
    """SpecAugment: number of frequency masks per utterance."""
    freq_mask_width: int = 27
    """SpecAugment: maximum width of a frequency mask in feature columns (80 fbank bins, 83 with pitch)."""
    time_masks: int = 2
    """SpecAugment: number of time masks per utterance."""
    time_mask_width: int = 40
    """SpecAugment: maximum width of a time mask in frames (10 ms each)."""
    time_mask_ratio: float = 0.2
    """SpecAugment: a time mask covers at most this fraction of the batch's frames."""
    kt_weight: float = 0.5
    """lambda in loss = ctc + lambda * kt (the knowledge-transfer term; unused when gmot.mode is `none`)."""
    kt_warmup_steps: int = 0
    """Ramp the transfer weight linearly from 0 to `kt_weight` over this many optimiser steps (0: no ramp),
    so that a fresh adapter on a converged encoder (--init-from) does not push random gradients into it."""
    kt_decay: Literal["none", "cosine"] = "none"
    """`cosine`: after the learning rate's warm-up the transfer weight falls with a cosine from `kt_weight`
    to 0 at the run's last step (the transfer acts early and fades while the model anneals); `none` keeps
    it constant. Applied after the `kt_warmup_steps` ramp."""
    grad_ratio: bool = True
    """Log ||d(lambda kt)/dh|| / ||d ctc/dh|| at the block feeding the adapter (metrics.jsonl `grad_ratio`,
    the progress line and the epoch line). Measured on the first batch of each logged step (every
    `log_interval` steps), at the cost of two partial backward passes on that batch."""
    align_max_utts: int = 100
    """Dev utterances whose transport plans are scored each epoch against the CTC forced alignment
    (metrics.jsonl `align_lift`, `align_order`, `align_entropy`; models.engine.diagnostics). 0 turns it
    off."""
    plm: str | None = None
    """PLM teacher used online when the prepared folder has no PLM cache (None: the embedded e5-small)."""
    plm_layer: int = -1
    """Layer of the online PLM teacher (only used without a PLM cache)."""
    seed: int = 1234
    """Seed of parameter initialisation, data order and every random draw (reseeded per epoch and batch)."""
    keep_last: int = 5
    """Keep the last k checkpoints (the best `average_best` epochs by dev CER are always kept too)."""
    average_best: int = 3
    """Average the weights of the best n epoch checkpoints by dev CER into avg.pt at the end (0 disables)."""
    save_every_steps: int = 0
    """Also write a checkpoint every N optimiser steps inside an epoch (0: only at the end of each epoch)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 loads in the training process)."""
    log_interval: int = 10
    """Write a train record to metrics.jsonl every N optimiser steps."""
    max_nan_steps: int = 5
    """Stop with an error after this many consecutive steps whose loss or gradient is NaN."""
    dev_split: str = "dev"
    """Name of the split under DATA_DIR used for the dev pass (skipped with a warning when missing)."""
    dev_max_utts: int = 0
    """Score at most this many dev utterances per epoch (0: all)."""
    threads: int = 0
    """Torch CPU threads for training (CPU device only): 0 = the cores not busy when the run starts (the
    1-minute load average), shared by the node's ranks, unless OMP_NUM_THREADS is set; N = exactly N."""
    bf16: bool = True
    """bfloat16 autocast for the encoder on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX); ignored on
    other CPUs. Losses stay float32."""


@dataclass
class ExperimentConfig:
    """Everything that defines an experiment; written to config.yaml and into every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder, subsampling, CTC head and adapter (models.nn.encoder.ModelConfig)."""
    gmot: GMOTConfig = field(default_factory=GMOTConfig)
    """Knowledge-transfer loss (models.nn.transfer_loss.GMOTConfig); its mode is `none` for pretrain."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimiser, schedule, batching, augmentation, checkpoints (TrainConfig)."""


# Training options that differ from the TrainConfig defaults, per preset.
_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "epochs": 2,
        "lr": 2e-3,
        "warmup_steps": 2,
        "max_frames": 3000,
        "max_utts": 8,
        "keep_last": 3,
        "average_best": 2,
        "log_interval": 1,
        "time_mask_width": 10,
        "freq_mask_width": 10,
    },
    # cosine to 1 % over the run: dev CER 24.1 % after epoch 8 of 12 and 22.1 % at the end, where noam
    # (1/sqrt decay, an 8-epoch run) was at 30.3 % after epoch 8 (26.9 % with checkpoint averaging).
    "demo": {
        "epochs": 14,
        "lr": 2e-3,
        "warmup_steps": 300,
        "schedule": "cosine",
        "max_frames": 12000,
        "max_utts": 64,
    },
    "aishell1": {
        "epochs": 80,
        "lr": 1e-3,
        "warmup_steps": 25000,
        "max_frames": 40000,
        "max_utts": 256,
        "num_workers": 4,
        "log_interval": 100,
        "average_best": 10,
    },
}

PRESET_NAMES: tuple[str, ...] = ("tiny", "demo", "aishell1")


def preset_config(name: str) -> ExperimentConfig:
    """The experiment configuration of a named preset (`tiny`, `demo` or `aishell1`)."""
    if name not in _TRAIN_PRESETS or name not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    model = dataclasses.replace(MODEL_PRESETS[name])
    return ExperimentConfig(model=model, gmot=GMOTConfig(), train=TrainConfig(**_TRAIN_PRESETS[name]))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A nested plain dict (lists instead of tuples) of a dataclass config, safe for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def dump_config(cfg: ExperimentConfig, path: Path) -> None:
    """Write the resolved configuration as YAML to `path`, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)


def all_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of a dataclass config, e.g. `train.lr`, `model.d_model`."""
    keys: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(all_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


# Names users bring from other toolkits, mapped to ours (suggested first for an unknown key).
_ALIASES: dict[str, str] = {
    "learning_rate": "train.lr", "batch_size": "train.max_frames", "batch_frames": "train.max_frames",
    "max_epoch": "train.epochs", "num_epochs": "train.epochs", "warmup": "train.warmup_steps",
    "clip": "train.grad_clip", "accum": "train.accum_grad", "lambda": "train.kt_weight",
    "weight": "train.kt_weight", "layers": "model.num_layers", "heads": "model.num_heads",
}  # fmt: skip


def _unknown_key(key: str, cfg: Any) -> ConfigError:
    keys = all_keys(cfg)
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1] for k in keys}
    close = [_ALIASES[leaf]] if leaf in _ALIASES else []
    close += difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    close_leaves = difflib.get_close_matches(leaf, leaves, n=3, cutoff=0.6)
    close += [k for name in close_leaves for k in keys if k.rsplit(".", 1)[-1] == name]
    close = list(dict.fromkeys(close))[:5]
    hint = (
        f"; did you mean: {', '.join(close)}?" if close else f"; known sections: {', '.join(_sections(cfg))}"
    )
    return ConfigError(f"unknown config key {key!r}{hint}")


def _sections(cfg: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg)]


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (a string from --set, or a YAML value) to the annotated type `tp` of `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (
            isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")
        )
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: cannot convert {value!r}")
    if origin is Literal:
        text = value if not isinstance(value, str) else value.strip()
        for choice in args:
            if text == choice or str(choice) == str(text):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            parsed = (
                yaml.safe_load(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
            )
            value = parsed
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_convert(v, a, key) for v, a in zip(value, args, strict=True))
        item = args[0] if args else str
        items = [_convert(v, item, key) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(str(value).strip())
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    return value


def _field_types(obj: Any) -> dict[str, Any]:
    module = __import__(type(obj).__module__, fromlist=["_"])
    return typing.get_type_hints(type(obj), vars(module))


def set_value(cfg: ExperimentConfig, key: str, value: Any) -> None:
    """Set the dotted `key` of `cfg` in place, converting `value` to the field's type.

    Raises ConfigError for an unknown key (listing close matches) or a value of the wrong type.
    """
    parts = key.strip().split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise _unknown_key(key, cfg)
        if i == len(parts) - 1:
            current = getattr(node, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{key} is a section; set one of its keys, e.g. {all_keys(cfg, '')[0]}")
                for sub, sub_value in value.items():
                    set_value(cfg, f"{key}.{sub}", sub_value)
                return
            setattr(node, part, _convert(value, _field_types(node)[part], key))
        else:
            node = getattr(node, part)


def merge_dict(cfg: ExperimentConfig, data: dict[str, Any], prefix: str = "") -> None:
    """Merge a nested dict (e.g. a YAML file) into `cfg` in place; unknown keys raise ConfigError."""
    for k, v in data.items():
        key = f"{prefix}{k}"
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part, None) if dataclasses.is_dataclass(node) else None
        if isinstance(v, dict) and dataclasses.is_dataclass(node):
            merge_dict(cfg, v, key + ".")
        else:
            set_value(cfg, key, v)


def load_yaml(cfg: ExperimentConfig, path: Path) -> None:
    """Merge the YAML file `path` into `cfg` in place (ConfigError naming the file on any problem)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections (model, gmot, train)")
    try:
        merge_dict(cfg, data)
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from None


def parse_override(text: str) -> tuple[str, str]:
    """Split a `key.sub=value` override into key and value (ConfigError when there is no '=')."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. train.lr=0.001), got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild an ExperimentConfig from `config_to_dict` output (e.g. a checkpoint's "config")."""
    cfg = ExperimentConfig()
    merge_dict(cfg, data)
    return cfg


def resolve_config(
    preset: str = "demo",
    config_file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Preset, then the YAML file, then `--set` overrides, then `extra` (dotted keys from named CLI options).

    Returns the resolved configuration; raises ConfigError on any unknown key or bad value.
    """
    cfg = preset_config(preset)
    if config_file is not None:
        load_yaml(cfg, config_file)
    for text in overrides:
        key, value = parse_override(text)
        set_value(cfg, key, value)
    for key, value in (extra or {}).items():
        if value is not None:
            set_value(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Re-run each section's own checks (dataclass __post_init__) and the training options' ranges."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        try:
            type(section)(**{g.name: getattr(section, g.name) for g in dataclasses.fields(section)})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{f.name}: {err}") from None
    t = cfg.train
    for name in (
        "epochs",
        "accum_grad",
        "max_frames",
        "max_utts",
        "log_interval",
        "max_nan_steps",
        "keep_last",
    ):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1, got {getattr(t, name)}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    for name in ("kt_warmup_steps", "align_max_utts", "threads"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if not 0.0 <= t.freq_warp < 1.0:
        raise ConfigError(f"train.freq_warp must be in [0, 1), got {t.freq_warp}")
