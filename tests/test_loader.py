"""Dataset, duration bucketing, the DDP-aware resumable batch sampler, collate, SpecAugment, warping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.loader import BucketBatchSampler, FrequencyWarp, SpecAugment, SpeechDataset, bucket_batches, collate
from data.store import read_cmvn, read_manifest


def test_buckets_respect_the_frame_budget_and_cover_everything() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 400, size=200).tolist()
    batches, dropped = bucket_batches(lengths, max_frames=1000, max_utts=6, min_frames=7)
    assert sorted(dropped) == [i for i, n in enumerate(lengths) if n < 7]
    flat = [i for b in batches for i in b]
    assert sorted(flat + dropped) == list(range(200))
    for b in batches:
        assert len(b) <= 6
        assert max(lengths[i] for i in b) * len(b) <= 1000
    # sorted by length: batches hold similar durations
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert maxima == sorted(maxima)


def test_an_utterance_over_the_budget_gets_its_own_batch() -> None:
    batches, dropped = bucket_batches([50, 5000, 60], max_frames=200, max_utts=10)
    assert [1] in batches and not dropped
    with pytest.raises(ValueError, match="positive"):
        bucket_batches([10], max_frames=0, max_utts=1)


def _batches(n: int) -> list[list[int]]:
    return [[2 * i, 2 * i + 1] for i in range(n)]


def test_sampler_shuffles_per_epoch_deterministically() -> None:
    s = BucketBatchSampler(_batches(20), seed=3)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(2)
    e2 = list(s)
    assert sorted(map(tuple, e1)) == sorted(map(tuple, _batches(20)))
    assert e1 != e2
    again = BucketBatchSampler(_batches(20), seed=3)
    again.set_epoch(2)
    assert list(again) == e2
    fixed = BucketBatchSampler(_batches(5), shuffle=False)
    fixed.set_epoch(4)
    assert list(fixed) == _batches(5)


@pytest.mark.parametrize("n", [7, 8])
def test_ranks_split_the_global_order(n: int) -> None:
    single = BucketBatchSampler(_batches(n), seed=5)
    single.set_epoch(3)
    ranks = [BucketBatchSampler(_batches(n), seed=5, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(3)
    mine = [list(r) for r in ranks]
    assert len(mine[0]) == len(mine[1]) == len(ranks[0]) == (n + 1) // 2
    interleaved = [b for pair in zip(*mine, strict=True) for b in pair]
    order = single.global_order()
    assert interleaved[:n] == order  # rank r takes positions r, r + 2, ...
    if n % 2:
        assert interleaved[n] == order[0]  # padded by repeating the head
    assert not set(map(tuple, mine[0])) & set(map(tuple, mine[1][: n // 2]))


def test_sampler_state_resumes_mid_epoch_exactly() -> None:
    s = BucketBatchSampler(_batches(10), seed=1, rank=1, world_size=2)
    s.set_epoch(4)
    full = list(s)
    state = s.state_dict(consumed=2)
    resumed = BucketBatchSampler(_batches(10), seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # the same epoch keeps the offset
    assert list(resumed) == full[2:]
    resumed.set_epoch(5)  # the next epoch starts from its beginning
    assert len(list(resumed)) == len(full)
    other = BucketBatchSampler(_batches(10), seed=1, world_size=1)
    other.load_state_dict(state)  # another world size cannot continue mid-epoch: restart the epoch
    assert other.consumed == 0


def test_dataset_applies_cmvn_and_reads_tokens_and_plm(tiny_prepared: Path) -> None:
    mean, std = read_cmvn(tiny_prepared / "lang")
    ds = SpeechDataset(tiny_prepared / "train", mean, std)
    records = read_manifest(tiny_prepared / "train")
    assert len(ds) == len(records) and ds.has_plm
    feats = torch.cat([ds[i]["feats"] for i in range(len(ds))])
    assert feats.mean(0).abs().max() < 0.05  # train statistics normalise the train split
    assert (feats.std(0) - 1).abs().max() < 0.05
    item = ds[3]
    assert item["tokens"].tolist() == records[3].token_ids
    assert item["feats"].shape == (records[3].num_frames, 80)
    assert item["plm"].shape == (records[3].plm.num_tokens, 16)
    assert SpeechDataset(tiny_prepared / "train", mean, std, use_plm=False)[3]["plm"] is None


def test_collate_pads_with_lengths(tiny_prepared: Path) -> None:
    mean, std = read_cmvn(tiny_prepared / "lang")
    ds = SpeechDataset(tiny_prepared / "train", mean, std)
    items = [ds[i] for i in (0, 5, 7)]
    batch = collate(items)
    lens = [len(it["feats"]) for it in items]
    assert batch["feats"].shape == (3, max(lens), 80)
    assert batch["feat_lens"].tolist() == lens
    for k, it in enumerate(items):
        assert torch.equal(batch["feats"][k, : lens[k]], it["feats"])
        assert batch["feats"][k, lens[k] :].abs().sum() == 0
        assert batch["tokens"][k, : len(it["tokens"])].tolist() == it["tokens"].tolist()
        assert torch.equal(batch["plm"][k, : batch["plm_lens"][k]], it["plm"])
    assert batch["token_lens"].tolist() == [len(it["tokens"]) for it in items]
    assert batch["ids"] == [it["id"] for it in items]


def test_spec_augment_masks_reproducibly_and_keeps_padding_zero() -> None:
    feats = torch.randn(4, 100, 80) + 5.0
    lengths = torch.tensor([100, 80, 60, 30])
    feats[1, 80:] = 0
    feats[2, 60:] = 0
    feats[3, 30:] = 0
    aug = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width=20, time_ratio=0.2)
    torch.manual_seed(0)
    a = aug(feats, lengths)
    torch.manual_seed(0)
    b = aug(feats, lengths)
    assert torch.equal(a, b)
    assert a.shape == feats.shape
    assert (a == 0).sum() > (feats == 0).sum()  # something was masked
    masked = (a == 0) & (feats != 0)
    assert masked.any(dim=(1, 2)).all()  # every utterance got its own masks
    assert a[3, 30:].abs().sum() == 0
    kept = a != 0
    assert torch.equal(a[kept], feats[kept])  # masking only zeroes values


def test_frequency_warp_scales_the_bin_axis_by_one_factor_per_utterance() -> None:
    n_bins, max_warp = 80, 0.15
    ramp = torch.arange(n_bins, dtype=torch.float32)
    feats = ramp.expand(6, 50, n_bins).clone()  # every frame holds its bin index
    lengths = torch.tensor([50, 50, 40, 30, 50, 10])
    for i, n in enumerate(lengths.tolist()):
        feats[i, n:] = 0
    torch.manual_seed(3)
    out = FrequencyWarp(max_warp)(feats, lengths)
    torch.manual_seed(3)
    assert torch.equal(out, FrequencyWarp(max_warp)(feats, lengths))  # reproducible from the seed
    factors = []
    for i, n in enumerate(lengths.tolist()):
        assert out[i, n:].abs().sum() == 0  # padding stays zero
        frame = out[i, 0]
        assert torch.equal(out[i, :n], frame.expand(n, n_bins))  # the same warp on every frame
        factor = 1.0 / float(frame[1])  # bin f now holds the content of bin f / factor
        factors.append(factor)
        assert 1 - max_warp - 1e-5 <= factor <= 1 + max_warp + 1e-5
        expected = (ramp / factor).clamp(max=n_bins - 1)
        torch.testing.assert_close(frame, expected, rtol=0, atol=1e-4)
    assert len({round(f, 4) for f in factors}) == len(factors)  # drawn per utterance


def test_frequency_warp_zero_is_the_identity_and_bad_widths_are_refused() -> None:
    feats = torch.randn(2, 7, 80)
    assert torch.equal(FrequencyWarp(0.0)(feats, torch.tensor([7, 7])), feats)
    with pytest.raises(ValueError, match="max_warp"):
        FrequencyWarp(1.0)
