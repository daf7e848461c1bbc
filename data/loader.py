"""Training batches from a prepared split: dataset, duration bucketing under a frames budget, a DDP-aware
resumable batch sampler, padding collate and SpecAugment.

Batching: utterances are sorted by length and cut greedily into batches whose padded size (longest utterance
x number of utterances) stays within `max_frames`; the batches are fixed for a split. Each epoch the order of
the batches is shuffled from `seed + epoch`; under DDP the batch list is padded (by repeating its head) to a
multiple of the world size and rank r takes batches r, r + W, r + 2W ... so that, batch for batch, W ranks see
what one process sees with W-fold gradient accumulation. The sampler counts the batches it has handed out;
its `state_dict` lets a resumed run skip exactly those and continue mid-epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from data.features import NUM_MEL_BINS
from data.store import SplitReader
from data.teacher_controls import random_features


class SpeechDataset(Dataset):
    """Utterances of one prepared split: CMVN-normalised features, token ids and optional PLM token features.

    `cmvn_mean`/`cmvn_std` (F,) are the train statistics (F = 80 fbank bins, or 83 with pitch);
    `plm_mean`/`plm_std` (D,), when given, standardise the cached PLM features per dimension. `use_plm=False`
    never reads the PLM cache. `teacher_source` (one record index per record) reads each utterance's PLM
    features from another record (the `shuffle` control); `teacher_random` = (seed, mean, std) replaces them
    by fixed Gaussian vectors of the same shape (the `random` control); `teacher_units` = (seed, width) gives
    one fixed N(0, 1) vector of that width per token id instead, with no PLM cache (data.teacher_controls).
    Item: {"index": int, "id": str, "text": str, "feats": (T, F) float32, "tokens": (L,) int64,
    "plm": (M, D) float32 or None}.
    """

    def __init__(
        self,
        split_dir: Path,
        cmvn_mean: np.ndarray,
        cmvn_std: np.ndarray,
        *,
        plm_mean: np.ndarray | None = None,
        plm_std: np.ndarray | None = None,
        use_plm: bool = True,
        teacher_source: list[int] | None = None,
        teacher_random: tuple[int, np.ndarray | None, np.ndarray | None] | None = None,
        teacher_units: tuple[int, int] | None = None,
    ) -> None:
        self.reader = SplitReader(Path(split_dir))
        self.records = self.reader.records
        self.mean = np.asarray(cmvn_mean, dtype=np.float32)
        self.inv_std = 1.0 / np.maximum(np.asarray(cmvn_std, dtype=np.float32), 1e-5)
        self.plm_mean = None if plm_mean is None else np.asarray(plm_mean, dtype=np.float32)
        self.plm_inv_std = (
            None if plm_std is None else 1.0 / np.maximum(np.asarray(plm_std, np.float32), 1e-5)
        )
        self.use_plm = use_plm
        if teacher_source is not None and len(teacher_source) != len(self.records):
            raise ValueError("teacher_source needs one record index per record")
        self.teacher_source = teacher_source
        self.teacher_random = teacher_random
        self.teacher_units = teacher_units

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_plm(self) -> bool:
        """True when every record of the split has cached PLM features."""
        return bool(self.records) and all(r.plm is not None for r in self.records)

    def lengths(self) -> list[int]:
        """Number of fbank frames of each utterance, in manifest order."""
        return [r.num_frames for r in self.records]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        feats = (self.reader.features(rec) - self.mean) * self.inv_std
        plm = None
        if self.use_plm and self.teacher_units is not None:
            seed, width = self.teacher_units
            units = random_features((len(rec.token_ids), width), index, seed, None, None)
            plm = torch.from_numpy(units)
        elif self.use_plm:
            source = self.records[self.teacher_source[index]] if self.teacher_source is not None else rec
            raw = self.reader.plm_features(source)
            if raw is not None and self.teacher_random is not None:
                seed, mean, std = self.teacher_random
                raw = random_features(raw.shape, index, seed, mean, std)
            if raw is not None:
                if self.plm_mean is not None and self.plm_inv_std is not None:
                    raw = (raw - self.plm_mean) * self.plm_inv_std
                plm = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
        return {
            "index": index,
            "id": rec.id,
            "text": rec.text,
            "feats": torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
            "tokens": torch.tensor(rec.token_ids, dtype=torch.long),
            "plm": plm,
        }


def bucket_batches(
    lengths: Sequence[int], max_frames: int, max_utts: int, min_frames: int = 1
) -> tuple[list[list[int]], list[int]]:
    """Cut utterances, sorted by length, into batches of padded size (longest x count) <= `max_frames`.

    Returns (batches: lists of dataset indices, dropped: indices shorter than `min_frames`). An utterance
    longer than `max_frames` on its own still gets a batch of one (never silently dropped).
    """
    if max_frames <= 0 or max_utts <= 0:
        raise ValueError(f"max_frames and max_utts must be positive, got {max_frames} and {max_utts}")
    dropped = [i for i, n in enumerate(lengths) if n < min_frames]
    order = sorted((i for i, n in enumerate(lengths) if n >= min_frames), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted ascending: the new utterance is the longest
        if current and (longest * (len(current) + 1) > max_frames or len(current) >= max_utts):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches, dropped


class BucketBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches (lists of indices) of one epoch; reshuffled per epoch from `seed + epoch`.

    Call `set_epoch(e)` before iterating. `state_dict(consumed)` records the epoch and how many batches this
    rank has finished; after `load_state_dict`, the next iteration of that epoch skips those batches exactly.
    """

    def __init__(
        self,
        batches: list[list[int]],
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not batches:
            raise ValueError("no batches: the split is empty or every utterance is too short")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.batches = batches
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.consumed = 0  # resume offset: batches of this rank already finished in self.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle); resets the consumed count unless resuming that same epoch."""
        if epoch != self.epoch:
            self.consumed = 0
        self.epoch = epoch

    def global_order(self) -> list[list[int]]:
        """All batches of the epoch in order, padded to a multiple of the world size."""
        order = list(range(len(self.batches)))
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.batches), generator=gen).tolist()
        total = math.ceil(len(order) / self.world_size) * self.world_size
        order = order + order[: total - len(order)]
        return [self.batches[i] for i in order]

    def __len__(self) -> int:
        """Batches of this rank per epoch (the same on every rank)."""
        return math.ceil(len(self.batches) / self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches of the epoch, starting after the `consumed` batches of a resumed state."""
        mine = self.global_order()[self.rank :: self.world_size]
        yield from mine[self.consumed :]

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """{"epoch", "consumed", "seed", "world_size", "num_batches"} for checkpoints.

        `consumed`: batches of this epoch the caller has finished (counting any skipped on resume). A
        DataLoader prefetches ahead of training, so only the training loop knows this number; default: the
        resume offset.
        """
        return {
            "epoch": self.epoch,
            "consumed": self.consumed if consumed is None else int(consumed),
            "seed": self.seed,
            "world_size": self.world_size,
            "num_batches": len(self.batches),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the epoch and consumed count; a different world size or batch count restarts the epoch."""
        self.epoch = int(state["epoch"])
        same = state.get("world_size") == self.world_size and state.get("num_batches") == len(self.batches)
        self.consumed = int(state["consumed"]) if same else 0


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of dataset items into a batch.

    Returns {"ids": list[str], "texts": list[str], "indices": (B,) int64, "feats": (B, T, F) float32 (zeros
    at padding), "feat_lens": (B,) int64, "tokens": (B, L) int64 (0-padded), "token_lens": (B,) int64,
    "plm": (B, M, D) float32 or None, "plm_lens": (B,) int64 or None}.
    """
    feats = nn.utils.rnn.pad_sequence([it["feats"] for it in items], batch_first=True)
    tokens = nn.utils.rnn.pad_sequence([it["tokens"] for it in items], batch_first=True)
    batch: dict[str, Any] = {
        "ids": [it["id"] for it in items],
        "texts": [it["text"] for it in items],
        "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "feats": feats,
        "feat_lens": torch.tensor([len(it["feats"]) for it in items], dtype=torch.long),
        "tokens": tokens,
        "token_lens": torch.tensor([len(it["tokens"]) for it in items], dtype=torch.long),
        "plm": None,
        "plm_lens": None,
    }
    if all(it["plm"] is not None for it in items):
        batch["plm"] = nn.utils.rnn.pad_sequence([it["plm"] for it in items], batch_first=True)
        batch["plm_lens"] = torch.tensor([len(it["plm"]) for it in items], dtype=torch.long)
    return batch


class FrequencyWarp(nn.Module):
    """Speaker-like augmentation on the fbank axis: each utterance's bins are stretched or squeezed by a
    factor drawn uniformly from [1 - max_warp, 1 + max_warp] (linear interpolation, the top bin repeated
    past the edge). A factor a moves a bin's content from bin f to bin a * f, which is what a higher or lower
    voice (pitch harmonics and formants scaled by a) does to the low, nearly linear part of the mel axis:
    vocal tract length perturbation applied to the prepared features instead of the audio.

    forward(feats (B, T, F), lengths (B,)) -> (B, T, F); padded frames stay 0; max_warp = 0 returns feats.
    Only the first `bins` columns (the fbank) are warped; columns after them (pitch) pass through.
    Draws from torch's global RNG, so seed it for reproducible factors.
    """

    def __init__(self, max_warp: float = 0.1, bins: int = NUM_MEL_BINS) -> None:
        super().__init__()
        if not 0.0 <= max_warp < 1.0:
            raise ValueError(f"max_warp must be in [0, 1), got {max_warp}")
        self.max_warp = max_warp
        self.bins = bins

    def forward(self, feats: Tensor, lengths: Tensor) -> Tensor:
        """feats (B, T, F), lengths (B,) -> warped copy (B, T, F)."""
        if self.max_warp == 0.0:
            return feats
        rest = feats[..., self.bins :]
        feats = feats[..., : self.bins]
        b, t, f = feats.shape
        factor = 1.0 + self.max_warp * (2.0 * torch.rand(b, 1, device=feats.device) - 1.0)  # (B, 1)
        src = (torch.arange(f, device=feats.device, dtype=feats.dtype)[None, :] / factor).clamp(max=f - 1)
        lo = src.floor().long()  # (B, F)
        hi = (lo + 1).clamp(max=f - 1)
        frac = (src - lo.to(src.dtype))[:, None, :]  # (B, 1, F)
        x_lo = feats.gather(2, lo[:, None, :].expand(b, t, f))
        x_hi = feats.gather(2, hi[:, None, :].expand(b, t, f))
        out = x_lo + frac * (x_hi - x_lo)
        valid = torch.arange(t, device=feats.device)[None, :] < lengths[:, None]
        return torch.cat([out * valid.unsqueeze(-1), rest], dim=-1)


class SpecAugment(nn.Module):
    """Frequency and time masking (torchaudio.transforms) on a padded batch, a different mask per utterance.

    forward(feats (B, T, F), lengths (B,)) -> (B, T, F) with masked values set to 0 (the CMVN mean);
    padded frames stay 0. Draws from torch's global RNG, so seed it for reproducible masks.
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 27,
        time_masks: int = 2,
        time_width: int = 40,
        time_ratio: float = 0.2,
    ) -> None:
        super().__init__()
        import torchaudio.transforms as T

        self.freq = nn.ModuleList(T.FrequencyMasking(freq_width, iid_masks=True) for _ in range(freq_masks))
        self.time = nn.ModuleList(
            T.TimeMasking(time_width, iid_masks=True, p=time_ratio) for _ in range(time_masks)
        )

    def forward(self, feats: Tensor, lengths: Tensor) -> Tensor:
        """feats (B, T, F), lengths (B,) -> masked copy (B, T, F)."""
        x = feats.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        for mask in [*self.freq, *self.time]:
            x = mask(x)
        out = x.squeeze(1).transpose(1, 2)
        valid = torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None]
        return out * valid.unsqueeze(-1)
