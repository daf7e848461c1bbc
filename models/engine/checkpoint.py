"""Checkpoints: atomic saving, safe loading (`torch.load(weights_only=True)`), averaging, and rebuilding a
model for decoding.

A checkpoint is a dict (docs/design.md section 4.3): "model" (state_dict), "config" (resolved config;
config["model"] is a dict of `ModelConfig` fields), "vocab" (list[str]), "cmvn" ({"mean": Tensor (F,),
"std": Tensor (F,)}), "plm" (plm.json content or None), "epoch", "step", and whatever resuming needs
(optimiser, scheduler, scaler, sampler, RNG). `save_checkpoint` adds "format": "gmot-checkpoint" and
"format_version"; a file without them is refused as not ours. Contents must be weights_only-safe:
tensors, dicts, lists, tuples, str, int, float, bool, None (numpy arrays and other objects are refused at
save time, naming the key).

Files in an experiment folder: `checkpoint_path(exp_dir, step)` = EXP/ckpt-<step, 9 digits>.pt (one per
save, the engine keeps the last k) and EXP/avg.pt (average of the best n). `load_model(EXP)` takes avg.pt if
present, else the checkpoint with the largest step.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data.features import feature_width_mismatch, frontend
from models.nn.encoder import ConformerCTC, ModelConfig

FORMAT = "gmot-checkpoint"
FORMAT_VERSION = 1
AVERAGE_NAME = "avg.pt"
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, foreign or incompatible; the message names the file."""


def checkpoint_path(exp_dir: Path, step: int) -> Path:
    """The file name of the checkpoint saved at optimiser step `step`: EXP/ckpt-000001200.pt."""
    return Path(exp_dir) / f"ckpt-{step:09d}.pt"


def list_checkpoints(exp_dir: Path) -> list[Path]:
    """Checkpoints `ckpt-<step>.pt` of an experiment folder, sorted by step (oldest first)."""
    found = []
    for p in Path(exp_dir).iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def remove_temporaries(exp_dir: Path, others: Sequence[str] = ()) -> list[Path]:
    """Delete the temporary files an interrupted write left in `exp_dir` (`ckpt-<step>.pt.tmp`, `avg.pt.tmp`
    and `<name>.tmp` for each name in `others`); returns the paths deleted. Call it before a run writes."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return []
    names = {f"{AVERAGE_NAME}.tmp", *(f"{name}.tmp" for name in others)}
    stale = [
        p
        for p in sorted(exp_dir.iterdir())
        if p.is_file() and (p.name in names or (p.suffix == ".tmp" and _CKPT_RE.match(p.stem)))
    ]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _check_safe(obj: Any, where: str) -> None:
    """Raise TypeError (naming the key) if `obj` holds anything torch.load(weights_only=True) refuses."""
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor, torch.dtype, torch.device, torch.Size)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint key {where}[{k!r}] is a {type(k).__name__}; use str or int keys")
            _check_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_safe(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint entry {where} is a {type(obj).__module__}.{type(obj).__name__}, which is not "
        "weights_only-safe; convert it to tensors, dicts, lists, str, int, float, bool or None"
    )


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: `path.tmp` in the same folder, fsync, os.replace, fsync the folder.

    A crash at any moment leaves either the old file or the new one, never a truncated file at `path`.
    Raises TypeError (naming the key) if `state` holds an object that is not weights_only-safe.
    """
    path = Path(path)
    state = {**state, "format": FORMAT, "format_version": FORMAT_VERSION}
    _check_safe(state, "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a gmot checkpoint with torch.load(weights_only=True).

    Raises CheckpointError naming the file when it is missing, a folder, truncated or corrupt, holds objects
    that are not weights_only-safe, or is not a gmot checkpoint (no "format" marker / no "model").
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder, not a file (load_model takes experiment folders)"
        )
    # torch.save writes a zip archive; a cut-off one has no central directory
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a complete torch archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types here (RuntimeError, EOFError, UnpicklingError ...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Unsupported global" in str(e) or "Unsupported class" in str(e):
            raise CheckpointError(
                f"checkpoint {path} holds objects that cannot be loaded safely (weights_only=True); "
                "it was not written by gmot"
            ) from e
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {msg})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a gmot checkpoint (a plain state_dict or another tool's file?); "
            "expected a file written by gmot pretrain/distill"
        )
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['format_version']}, newer than this gmot "
            f"understands ({FORMAT_VERSION}); upgrade gmot"
        )
    for key in ("model", "config", "vocab"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry; it is incomplete")
    return state


def model_config_of(state: dict[str, Any], path: Path | str = "<checkpoint>") -> ModelConfig:
    """The ModelConfig stored in a checkpoint's config["model"]; CheckpointError if absent or invalid."""
    cfg = state.get("config", {})
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"checkpoint {path} has no config['model'] describing the encoder")
    try:
        return ModelConfig.from_dict(model_cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid model config: {e}") from e


def plm_width_of(state: dict[str, Any]) -> int | None:
    """The PLM width the checkpoint's adapter maps to (from its state dict), or None if it has no adapter."""
    sd = state["model"]
    outs = sorted(k for k in sd if k.startswith("adapter.") and k.endswith(".weight"))
    if not outs:
        return None
    last = "adapter.weight" if "adapter.weight" in sd else outs[-1]
    return int(sd[last].shape[0])


def _explain_mismatch(path: Path | str, key: str, ckpt_shape: tuple, model_shape: tuple) -> str:
    """A user-facing sentence for one parameter whose shape differs between a checkpoint and a model."""
    if key.startswith("ctc_head."):
        return (
            f"checkpoint {path} was trained with a vocabulary of {ckpt_shape[0]} units but the model expects "
            f"{model_shape[0]} units (a different prepared data folder?)"
        )
    if key.startswith("adapter."):
        return (
            f"checkpoint {path} has an adapter of shape {ckpt_shape} but the model expects {model_shape} "
            "(a different PLM width or adapter shape)"
        )
    return (
        f"checkpoint {path} does not match the model at {key}: {ckpt_shape} in the checkpoint, "
        f"{model_shape} in the model (different encoder widths, layers or kernel size)"
    )


def check_state_dict_compatible(
    path: Path | str, ckpt_sd: dict[str, Tensor], model: torch.nn.Module, allow_missing_adapter: bool = False
) -> None:
    """Raise CheckpointError (first problem, in plain words) unless `ckpt_sd` loads into `model`.

    With allow_missing_adapter, adapter weights may be absent on either side (a pretrain checkpoint used to
    initialise distillation, or a distill checkpoint used without its adapter).
    """
    model_sd = model.state_dict()
    for key, value in model_sd.items():
        if key not in ckpt_sd:
            if allow_missing_adapter and key.startswith("adapter."):
                continue
            raise CheckpointError(
                f"checkpoint {path} lacks parameter {key} (different number of layers or adapter shape?)"
            )
        if tuple(ckpt_sd[key].shape) != tuple(value.shape):
            raise CheckpointError(_explain_mismatch(path, key, tuple(ckpt_sd[key].shape), tuple(value.shape)))
    skip_adapter = allow_missing_adapter
    extra = [k for k in ckpt_sd if k not in model_sd and not (skip_adapter and k.startswith("adapter."))]
    if extra:
        raise CheckpointError(
            f"checkpoint {path} has parameters the model lacks ({', '.join(extra[:3])}"
            f"{' ...' if len(extra) > 3 else ''}); different number of layers or adapter?"
        )


def frontend_of(state: dict[str, Any], path: Path | str = "<checkpoint>") -> str:
    """The feature front end a checkpoint was trained on (data.features.FRONTENDS; checkpoints saved before
    front ends were named used "kaldi-snip"). CheckpointError naming `path` for a front end unknown here."""
    try:
        return frontend((state.get("cmvn") or {}).get("frontend")).name
    except ValueError as err:  # saved by a gmot that knows more front ends
        raise CheckpointError(f"checkpoint {path}: {err}") from None


def init_from_checkpoint(
    model: ConformerCTC, path: Path, vocab: Sequence[str], data_frontend: str | None = None
) -> dict[str, Any]:
    """Initialise `model` from checkpoint `path` (`--init-from`), checking it is compatible first.

    The checkpoint's vocabulary must equal `vocab` unit for unit, its input width (CMVN statistics) the
    model's, its front end `data_frontend` (when given), and every shared parameter must have the same
    shape; adapter weights may be missing (pretrain -> distill: the adapter keeps its fresh init) or extra.
    Returns the loaded checkpoint dict. Raises CheckpointError naming the file otherwise.
    """
    state = load_checkpoint(path)
    ckpt_vocab = list(state["vocab"])
    if len(ckpt_vocab) != len(vocab):
        raise CheckpointError(
            f"checkpoint {path} was trained with a vocabulary of {len(ckpt_vocab)} units but the data folder "
            f"has {len(vocab)} units"
        )
    if ckpt_vocab != list(vocab):
        diff = next(i for i, (a, b) in enumerate(zip(ckpt_vocab, vocab, strict=True)) if a != b)
        raise CheckpointError(
            f"checkpoint {path} was trained with a different vocabulary of the same size: unit {diff} is "
            f"{ckpt_vocab[diff]!r} there and {vocab[diff]!r} in the data folder"
        )
    ckpt_mean = (state.get("cmvn") or {}).get("mean")
    mismatch = ckpt_mean is not None and feature_width_mismatch(model.cfg.input_dim, len(ckpt_mean))
    if mismatch:
        raise CheckpointError(f"checkpoint {path}: {mismatch}")
    ckpt_front = frontend_of(state, path)
    if data_frontend is not None and ckpt_front != data_frontend:
        raise CheckpointError(
            f"checkpoint {path} was trained on {ckpt_front!r} features but the data folder has "
            f"{data_frontend!r} features: prepare the data with --frontend {ckpt_front}"
        )
    sd = state["model"]
    check_state_dict_compatible(path, sd, model, allow_missing_adapter=True)
    own = model.state_dict()
    own.update({k: v for k, v in sd.items() if k in own})
    model.load_state_dict(own)
    return state


def average_checkpoints(paths: Sequence[Path]) -> dict[str, Tensor]:
    """Average the "model" state dicts of `paths` -> a state dict.

    Floating-point tensors are averaged in float64 and cast back; integer tensors (BatchNorm counters) take
    the value of the last checkpoint. All checkpoints must have the same keys and shapes (CheckpointError).
    """
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    first = load_checkpoint(paths[0])["model"]
    acc = {k: v.double() if v.is_floating_point() else v.clone() for k, v in first.items()}
    for p in paths[1:]:
        sd = load_checkpoint(p)["model"]
        if set(sd) != set(acc):
            raise CheckpointError(f"checkpoint {p} has different parameters from {paths[0]}; cannot average")
        for k, v in sd.items():
            if v.shape != acc[k].shape:
                raise CheckpointError(f"checkpoint {p} differs at {k} from {paths[0]}; cannot average")
            if v.is_floating_point():
                acc[k] += v.double()
            else:
                acc[k] = v.clone()
    n = len(paths)
    return {k: (v / n).to(first[k].dtype) if first[k].is_floating_point() else v for k, v in acc.items()}


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint, ready for decoding."""

    model: ConformerCTC
    """In eval mode, on the requested device."""
    vocab: list[str]
    """Units, index = CTC id (0 = <blank>)."""
    cmvn_mean: Tensor
    """(input_dim,) global CMVN mean, float32."""
    cmvn_std: Tensor
    """(input_dim,) global CMVN std, float32."""
    frontend: str
    """The feature front end the model was trained on (a data.features.FRONTENDS key)."""
    config: dict[str, Any]
    """The checkpoint's resolved config (nested dict)."""
    path: Path
    """The checkpoint file that was loaded."""


def resolve_checkpoint(path_or_exp_dir: Path) -> Path:
    """A checkpoint file as given, or for an experiment folder its avg.pt if present, else the checkpoint with
    the largest step. CheckpointError if the folder holds none."""
    p = Path(path_or_exp_dir)
    if not p.is_dir():
        return p
    if (p / AVERAGE_NAME).is_file():
        return p / AVERAGE_NAME
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise CheckpointError(f"experiment folder {p} holds no checkpoint ({AVERAGE_NAME} or ckpt-<step>.pt)")
    return ckpts[-1]


def load_model(path_or_exp_dir: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the ConformerCTC of a checkpoint (file or experiment folder, see `resolve_checkpoint`).

    The adapter is rebuilt when the checkpoint has one (its width read from the weights). Raises
    CheckpointError naming the file when the file is unusable or its vocab / widths disagree with its weights.
    """
    path = resolve_checkpoint(path_or_exp_dir)
    state = load_checkpoint(path)
    cfg = model_config_of(state, path)
    vocab = [str(u) for u in state["vocab"]]
    model = ConformerCTC(cfg, len(vocab), plm_width_of(state))
    check_state_dict_compatible(path, state["model"], model)
    model.load_state_dict(state["model"])
    cmvn = state.get("cmvn")
    if not isinstance(cmvn, dict) or "mean" not in cmvn or "std" not in cmvn:
        raise CheckpointError(f"checkpoint {path} has no CMVN statistics ('cmvn' with 'mean' and 'std')")
    mean = torch.as_tensor(cmvn["mean"], dtype=torch.float32)
    std = torch.as_tensor(cmvn["std"], dtype=torch.float32)
    if mean.shape != (cfg.input_dim,) or std.shape != (cfg.input_dim,):
        raise CheckpointError(
            f"checkpoint {path} has CMVN of shape {tuple(mean.shape)} but the model takes "
            f"{cfg.input_dim}-dim input"
        )
    model.to(device).eval()
    return LoadedModel(
        model, vocab, mean.to(device), std.to(device), frontend_of(state, path), state["config"], path
    )
