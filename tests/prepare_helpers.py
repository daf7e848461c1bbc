"""Helpers for the prepare tests: tiny corpora written with soundfile, and a minimal PLM teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile


def write_wav(path: Path, seconds: float, rate: int = 16_000, channels: int = 1, seed: int = 0) -> Path:
    """Write a speech-like test signal (a few tones plus noise) of `seconds` seconds; returns `path`."""
    rng = np.random.default_rng(seed)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    wave = 0.2 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(n)
    data = np.stack([wave * (1.0 - 0.3 * c) for c in range(channels)], axis=1) if channels > 1 else wave
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), data.astype(np.float32), rate, subtype="PCM_16")
    return path


def write_kaldi_dir(
    data_dir: Path,
    wavs: dict[str, str],
    texts: dict[str, str] | list[tuple[str, str]],
    spk: dict[str, str] | None = None,
) -> Path:
    """Write wav.scp / text (/ utt2spk) from dicts (text may be a list of (id, transcript) lines)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "wav.scp").write_text("".join(f"{k} {v}\n" for k, v in wavs.items()), encoding="utf-8")
    lines = texts.items() if isinstance(texts, dict) else texts
    (data_dir / "text").write_text("".join(f"{k} {v}\n" for k, v in lines), encoding="utf-8")
    if spk is not None:
        (data_dir / "utt2spk").write_text("".join(f"{k} {v}\n" for k, v in spk.items()), encoding="utf-8")
    return data_dir


GOOD_TEXTS = ["你好世界", "我们学习中文", "今天天气很好", "你们好", "学习很好"]


def good_kaldi_dir(root: Path, name: str, texts: list[str], seed: int = 0) -> Path:
    """A clean Kaldi dir with one 16 kHz mono wav per transcript (0.6-1.0 s)."""
    wavs, txt, spk = {}, {}, {}
    for i, text in enumerate(texts):
        uid = f"{name}-spk{i % 2}-{i:03d}"
        path = write_wav(root / "wav" / name / f"{uid}.wav", 0.6 + 0.1 * (i % 5), seed=seed + i)
        wavs[uid], txt[uid], spk[uid] = str(path), text, f"spk{i % 2}"
    return write_kaldi_dir(root / name, wavs, txt, spk)


class TinyTeacher:
    """A minimal PLM teacher around a Hugging Face BERT folder (duck-types models.nn.plm.PLMTeacher)."""

    def __init__(self, folder: Path, layer: int = -1):
        import torch
        from transformers import AutoTokenizer, BertModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
        self.name = "tiny-bert"
        self.source = str(folder)
        self.width = int(self.model.config.hidden_size)
        self.layer = layer
        self.calls = 0
        self.encoded: list[str] = []  # every text passed to encode, in order
        self._torch = torch

    def encode(self, texts: list[str]) -> list[tuple[list[str], np.ndarray]]:
        """Per text: its tokens (specials dropped) and (M, width) float32 features of `layer`."""
        self.calls += 1
        self.encoded.extend(texts)
        out = []
        with self._torch.inference_mode():
            for text in texts:
                enc = self.tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
                special = enc.pop("special_tokens_mask")[0].bool()
                hidden = self.model(**enc, output_hidden_states=True).hidden_states[self.layer][0]
                ids = enc["input_ids"][0][~special].tolist()
                out.append(
                    (self.tokenizer.convert_ids_to_tokens(ids), hidden[~special].numpy().astype(np.float32))
                )
        return out
