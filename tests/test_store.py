"""data.store: the prepared-folder format, through the tiny_prepared fixture and direct writes."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from data.store import (
    ManifestEntry,
    PLMInfo,
    SplitReader,
    StoreError,
    read_cmvn,
    read_manifest,
    read_plm_info,
    read_vocab,
    write_manifest,
    write_shard,
)

ENTRY = {
    "id": "u1",
    "duration": 0.52,
    "num_frames": 52,
    "text": "你好",
    "token_ids": [2, 3],
    "speaker": None,
    "feats": {"shard": "feats/shard-00000.npy", "offset": 0},
    "plm": {"shard": "plm/shard-00000.npy", "offset": 4, "num_tokens": 2, "tokens": ["你", "好"]},
}


def test_tiny_prepared_layout(tiny_prepared: Path) -> None:
    vocab = read_vocab(tiny_prepared / "lang")
    assert vocab[:2] == ["<blank>", "<unk>"] and len(vocab) == 12
    mean, std = read_cmvn(tiny_prepared / "lang")
    assert mean.shape == std.shape == (80,) and (std > 0).all()
    info = read_plm_info(tiny_prepared / "lang")
    assert info is not None and info.width == 16 and len(info.mean) == 16
    for split in ("train", "dev", "test"):
        reader = SplitReader(tiny_prepared / split)
        assert len(reader) == 12
        shards = {r.feats.shard for r in reader.records}
        assert len(shards) > 1
        for rec in reader.records:
            feats = reader.features(rec)
            assert feats.dtype == np.float32 and feats.shape == (rec.num_frames, 80)
            assert 40 <= rec.num_frames <= 120
            assert [vocab[i] for i in rec.token_ids] == list(rec.text)
            plm = reader.plm_features(rec)
            assert plm is not None and plm.shape == (rec.plm.num_tokens, 16)
            assert len(rec.plm.tokens) == rec.plm.num_tokens


def test_offsets_are_contiguous_within_a_shard(tiny_prepared: Path) -> None:
    records = read_manifest(tiny_prepared / "train")
    by_shard: dict[str, list[dict]] = {}
    for r in records:
        by_shard.setdefault(r.feats.shard, []).append(r)
    for rel, recs in by_shard.items():
        arr = np.load(tiny_prepared / "train" / rel, mmap_mode="r")
        assert arr.dtype == np.float16
        expected = 0
        for r in recs:
            assert r.feats.offset == expected
            expected += r.num_frames
        assert arr.shape == (expected, 80)


def test_reader_pickles_without_open_maps(tiny_prepared: Path) -> None:
    reader = SplitReader(tiny_prepared / "dev")
    first = reader.features(reader.records[0])
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._maps == {}
    np.testing.assert_array_equal(clone.features(clone.records[0]), first)


def test_write_shard_is_atomic_and_float16(tmp_path: Path) -> None:
    arrays = [np.ones((3, 4)), np.zeros((0, 4)), np.full((2, 4), 2.5)]
    offsets = write_shard(tmp_path / "s" / "shard-00000.npy", arrays, 4)
    assert offsets == [0, 3, 3]
    arr = np.load(tmp_path / "s" / "shard-00000.npy")
    assert arr.dtype == np.float16 and arr.shape == (5, 4) and arr[4, 0] == 2.5
    assert list((tmp_path / "s").iterdir()) == [tmp_path / "s" / "shard-00000.npy"]
    with pytest.raises(ValueError):
        write_shard(tmp_path / "x.npy", [np.ones((2, 3))], 4)


def test_missing_files_raise_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="manifest"):
        read_manifest(tmp_path)
    with pytest.raises(StoreError, match="vocab"):
        read_vocab(tmp_path)
    with pytest.raises(StoreError, match="cmvn"):
        read_cmvn(tmp_path)
    assert read_plm_info(tmp_path) is None
    (tmp_path / "manifest.jsonl").write_text(json.dumps(ENTRY) + "\n{broken\n")
    with pytest.raises(StoreError, match=":2: invalid JSON"):
        read_manifest(tmp_path)


def _damage(path: Path, how: str) -> None:
    """Damage a shard file as a full disk, a killed copy or a stale rewrite would."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif how == "header":
        path.write_bytes(data[:60])
    elif how == "garbage":
        path.write_bytes(b"\0" * len(data))
    else:  # "short": a valid .npy with fewer rows than the manifest says
        np.save(path, np.load(path)[:1])


@pytest.mark.parametrize("kind", ["feats", "plm"])
@pytest.mark.parametrize("how", ["truncated", "header", "garbage", "short"])
def test_a_damaged_shard_names_itself_the_utterance_and_the_fix(
    tiny_prepared: Path, tmp_path: Path, kind: str, how: str
) -> None:
    split = tmp_path / "dev"
    shutil.copytree(tiny_prepared / "dev", split)
    reader = SplitReader(split)
    rec = next(r for r in reader.records if getattr(r, kind).offset > 0)  # past the short shard's one row
    _damage(split / getattr(rec, kind).shard, how)
    read = reader.features if kind == "feats" else reader.plm_features
    with pytest.raises(StoreError) as caught:
        read(rec)
    message = str(caught.value)
    assert str(split / getattr(rec, kind).shard) in message and repr(rec.id) in message
    assert "Re-run `gmot prepare` with the same arguments" in message
    assert ("truncated or corrupt" if how != "short" else "where the manifest needs") in message


def test_a_damaged_shard_read_in_a_dataloader_worker_keeps_its_message(
    tiny_prepared: Path, tmp_path: Path
) -> None:
    split = tmp_path / "dev"
    shutil.copytree(tiny_prepared / "dev", split)
    first = read_manifest(split)[0]
    _damage(split / first.feats.shard, "truncated")
    reader = SplitReader(split)
    with pytest.raises(StoreError) as direct:
        reader.features(first)
    loader = DataLoader(
        reader.records, batch_size=1, num_workers=1, collate_fn=lambda rs: reader.features(rs[0])
    )
    with pytest.raises(StoreError) as caught:
        next(iter(loader))
    # the same one line, not "Caught StoreError in DataLoader worker process 0" and the worker's traceback
    assert str(caught.value) == str(direct.value) and "\n" not in str(caught.value)


def test_records_write_back_the_files_they_were_read_from(tiny_prepared: Path, tmp_path: Path) -> None:
    for split in ("train", "dev"):
        text = (tiny_prepared / split / "manifest.jsonl").read_text(encoding="utf-8")
        write_manifest(tmp_path / split, read_manifest(tiny_prepared / split))
        assert (tmp_path / split / "manifest.jsonl").read_text(encoding="utf-8") == text
    info = read_plm_info(tiny_prepared / "lang")
    assert info is not None and info.name == "tiny-random-bert" and info.layer == -1
    written = json.dumps(info.to_json(), ensure_ascii=False, indent=1) + "\n"
    assert written == (tiny_prepared / "lang" / "plm.json").read_text(encoding="utf-8")


def test_unknown_keys_round_trip_after_the_known_ones(tmp_path: Path) -> None:
    newer = {**ENTRY, "emotion": "calm", "feats": {**ENTRY["feats"], "codec": "f16"}}
    newer["plm"] = {**ENTRY["plm"], "model_rev": 3}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(newer, ensure_ascii=False) + "\n", encoding="utf-8")
    (entry,) = read_manifest(tmp_path)
    assert entry.extra == {"emotion": "calm"} and entry.feats.extra == {"codec": "f16"}
    assert entry.plm is not None and entry.plm.extra == {"model_rev": 3} and entry.plm.tokens == ["你", "好"]
    assert json.dumps(entry.to_json(), ensure_ascii=False) == json.dumps(newer, ensure_ascii=False)
    without_plm = {k: v for k, v in ENTRY.items() if k != "plm"}
    plain = ManifestEntry.from_json(without_plm, "here")
    assert plain.plm is None and list(plain.to_json()) == list(without_plm)
    info = {"name": "t", "source": "s", "width": 2, "layer": 0, "mean": [0.5, 1], "std": [1.0, 2.0], "x": [1]}
    assert PLMInfo.from_json(info, "here").to_json() == info


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_frames": None}, r"manifest.jsonl:2: missing key 'num_frames'"),
        ({"num_frames": "52"}, r"manifest.jsonl:2: invalid 'num_frames': \"52\" is not int"),
        ({"duration": True}, r"manifest.jsonl:2: invalid 'duration'"),
        ({"token_ids": [2, "3"]}, r"manifest.jsonl:2: invalid 'token_ids': not a list of int"),
        ({"speaker": 7}, r"manifest.jsonl:2: invalid 'speaker': 7 is not str or null"),
        ({"feats": {"shard": "feats/shard-00000.npy"}}, r"manifest.jsonl:2: feats: missing key 'offset'"),
        ({"plm": {**ENTRY["plm"], "tokens": None}}, r"manifest.jsonl:2: plm: invalid 'tokens'"),
        ({"feats": [0]}, r"manifest.jsonl:2: invalid 'feats'"),
    ],
)
def test_a_bad_manifest_entry_names_the_file_line_and_key(tmp_path: Path, change: dict, message: str) -> None:
    bad = {k: v for k, v in {**ENTRY, **change}.items() if v is not None or k == "speaker"}
    lines = [json.dumps(ENTRY), json.dumps(bad)]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(StoreError, match=message):
        read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text(json.dumps(ENTRY) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(StoreError, match=r"manifest.jsonl:2: not a JSON object"):
        read_manifest(tmp_path)


def test_a_bad_plm_json_names_the_file_and_key(tmp_path: Path) -> None:
    info = {"name": "t", "source": "s", "width": 2, "layer": 0, "mean": [0.5, 1.0], "std": [1.0, 2.0]}
    (tmp_path / "plm.json").write_text(json.dumps({**info, "width": "2"}))
    with pytest.raises(StoreError, match=r"plm.json: invalid 'width'"):
        read_plm_info(tmp_path)
    (tmp_path / "plm.json").write_text(json.dumps({k: v for k, v in info.items() if k != "std"}))
    with pytest.raises(StoreError, match=r"plm.json: missing key 'std'"):
        read_plm_info(tmp_path)
    (tmp_path / "plm.json").write_text("{")
    with pytest.raises(StoreError, match=r"plm.json: invalid JSON"):
        read_plm_info(tmp_path)
