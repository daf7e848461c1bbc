"""Shared pytest fixtures.

`tiny_prepared`: a tiny prepared data folder (docs/design.md section 4.1) written through data.store, with no
audio and no espeak: lang/ (vocab.txt, cmvn.json, plm.json) and train/dev/test splits of 12 utterances each,
fbank-like features of 40-120 frames, texts over a 10-character vocabulary, and a PLM cache of width 16.
Features are built from one prototype vector per character (plus noise), so a model can actually fit them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.store import REPORT, write_cmvn, write_json_atomic, write_plm_info, write_split, write_vocab
from data.vocab import Vocabulary

TINY_CHARS = "你好我们学习中文天气"
TINY_PLM_WIDTH = 16
TINY_UTTERANCES = 12

torch.set_num_threads(1)
# Training with train.threads=0 takes the cores free at that moment, which under `pytest -n 2` depends on what
# the other worker is doing; two runs of one test could then use 1 and 2 threads and round differently. With
# OMP_NUM_THREADS set, training (and every gmot subprocess, which inherits it) keeps one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def build_tiny_prepared(root: Path, seed: int = 0) -> Path:
    """Write a tiny prepared folder under `root` and return `root`.

    Splits train/dev/test with TINY_UTTERANCES utterances each; every text uses only TINY_CHARS (all of them
    occur in train); features (T, 80) float with 40 <= T <= 120; PLM tokens are pairs of characters with
    random (M, 16) features.
    """
    rng = np.random.default_rng(seed)
    protos = rng.normal(0.0, 2.0, size=(len(TINY_CHARS), 80)) + np.linspace(8.0, 14.0, 80)
    vocab = Vocabulary.build([TINY_CHARS])
    write_vocab(root / "lang", vocab)
    all_train = []
    for split in ("train", "dev", "test"):
        utts = []
        for i in range(TINY_UTTERANCES):
            n_chars = int(rng.integers(3, 9))
            if split == "train" and i == 0:
                text = TINY_CHARS  # every character occurs in train
            else:
                text = "".join(rng.choice(list(TINY_CHARS), size=n_chars))
            total = int(rng.integers(max(40, 4 * len(text) + 4), 121))
            bounds = np.linspace(0, total, len(text) + 1).astype(int)
            feats = np.empty((total, 80), dtype=np.float32)
            for k, ch in enumerate(text):
                seg = slice(bounds[k], bounds[k + 1])
                n = bounds[k + 1] - bounds[k]
                feats[seg] = protos[TINY_CHARS.index(ch)] + rng.normal(0.0, 0.5, size=(n, 80))
            tokens = [text[j : j + 2] for j in range(0, len(text), 2)]
            plm = rng.normal(0.3, 1.0, size=(len(tokens), TINY_PLM_WIDTH)).astype(np.float32)
            utts.append(
                {
                    "id": f"{split}-spk{i % 3}-{i:04d}",
                    "text": text,
                    "feats": feats,
                    "speaker": f"spk{i % 3}",
                    "plm_tokens": tokens,
                    "plm_feats": plm,
                }
            )
        # small shards so that readers see more than one shard per split
        write_split(root / split, utts, vocab=vocab, shard_frames=400)
        write_json_atomic(
            root / split / REPORT,
            {"split": split, "utterances": len(utts), "skipped": {}, "hours": 0.0},
        )
        if split == "train":
            all_train = utts
    feats = np.concatenate([u["feats"] for u in all_train]).astype(np.float16).astype(np.float64)
    write_cmvn(root / "lang", feats.mean(0), feats.std(0), len(feats), "sherpa-onnx")
    plm = np.concatenate([u["plm_feats"] for u in all_train]).astype(np.float16).astype(np.float64)
    write_plm_info(
        root / "lang",
        name="tiny-random-bert",
        source="tests/conftest.py",
        width=TINY_PLM_WIDTH,
        layer=-1,
        mean=plm.mean(0),
        std=plm.std(0),
    )
    return root


def copy_without_plm_cache(prepared: Path, dest: Path) -> Path:
    """Copy the prepared folder `prepared` to `dest` without its PLM cache (no lang/plm.json, no `plm` in any
    manifest record; the PLM shards stay, unreferenced), as `gmot prepare --no-plm-cache` leaves it, for
    runs with an online teacher. Returns `dest`."""
    shutil.copytree(prepared, dest)
    (dest / "lang" / "plm.json").unlink()
    for manifest in dest.glob("*/manifest.jsonl"):
        records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
        for r in records:
            r.pop("plm", None)
        manifest.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
        )
    return dest


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a tiny prepared folder (lang/ + train/dev/test, PLM cache of width 16); treat as read-only."""
    return build_tiny_prepared(tmp_path_factory.mktemp("tiny_prepared"))
