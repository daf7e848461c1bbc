"""The training data of a run: the prepared folder read and checked, the train utterances CTC cannot align
(or with no teacher tokens, or too short) left out with a warning, the duration-bucketed batch sampler, and
the teacher: the PLM feature cache, a gmot.teacher control (data.teacher_controls) or an online PLM.

`TrainDataMixin` is part of `models.engine.training.Trainer`: it reads the Trainer's data_dir, cfg, dd,
device and use_kt, and sets vocab, cmvn, frontend, plm_info, train_set, dev_set, teacher, plm_width, sampler
and steps_per_epoch (and cfg.model.input_dim from the data); models.engine.trainer_base declares them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from data.features import has_pitch
from data.loader import BucketBatchSampler, SpeechDataset, bucket_batches
from data.store import StoreError, read_cmvn, read_frontend, read_plm_info, read_vocab
from data.teacher_controls import shuffle_sources
from models.engine.outcome import TrainingSetupError
from models.engine.trainer_base import TrainerBase
from models.nn.ctc import ctc_infeasible


class TrainDataMixin(TrainerBase):
    """Loads the training data into the Trainer (`_load_data`)."""

    def _load_data(self) -> None:
        lang = self.data_dir / "lang"
        train_dir = self.data_dir / "train"
        if not (train_dir / "manifest.jsonl").is_file():
            raise TrainingSetupError(
                f"{train_dir / 'manifest.jsonl'} not found: is {self.data_dir} a folder written by "
                "`gmot prepare`?"
            )
        try:
            self.vocab = read_vocab(lang)
            mean, std = read_cmvn(lang)
            self.frontend = read_frontend(lang)
            self.plm_info = read_plm_info(lang)
        except StoreError as err:
            raise TrainingSetupError(str(err)) from None
        self.cmvn = (mean, std)
        try:
            has_pitch(mean.shape[0])
        except ValueError as err:
            raise TrainingSetupError(f"{lang / 'cmvn.json'}: {err}") from None
        if self.cfg.model.input_dim != mean.shape[0]:  # the data decides: 80 fbank bins, or 83 with pitch
            model_cfg = dataclasses.replace(self.cfg.model, input_dim=int(mean.shape[0]))
            self.cfg = dataclasses.replace(self.cfg, model=model_cfg)
        t = self.cfg.train
        # raw PLM features: GMOTLoss standardises them itself (gmot.standardise) with plm.json's statistics
        self.train_set = SpeechDataset(train_dir, mean, std, use_plm=self.use_kt)
        dev_dir = self.data_dir / t.dev_split
        self.dev_set = (
            SpeechDataset(dev_dir, mean, std, use_plm=self.use_kt)
            if (dev_dir / "manifest.jsonl").is_file()
            else None
        )
        if self.dev_set is None:
            self._say(
                f"[yellow]warning:[/] no dev split at {dev_dir}: no dev CER, avg.pt averages the last epochs"
            )
        self.teacher = None
        self.plm_width: int | None = None
        if self.use_kt:
            if self.cfg.gmot.teacher == "random_units":  # no teacher at all
                self.plm_width = int(self.cfg.gmot.random_width)
                self._apply_teacher_control()
            elif self.train_set.has_plm and self.plm_info is not None:
                self.plm_width = self.plm_info.width
                self._apply_teacher_control()
            elif t.plm is None:
                # an online teacher may not be the one the (partial) cache was built with: only on request
                missing = sum(1 for r in self.train_set.records if r.plm is None)
                what = (
                    f"{missing} of {len(self.train_set.records)} train utterances have no cached PLM features"
                    if self.plm_info is not None
                    else f"{lang / 'plm.json'} is missing"
                )
                raise TrainingSetupError(
                    f"{self.data_dir} has no complete PLM feature cache ({what}); re-run `gmot prepare` with "
                    "a PLM (the default e5-small), or set train.plm=MODEL to compute the teacher online in "
                    "every step (slow; it should be the teacher the cache was built with)"
                )
            elif self.cfg.gmot.teacher != "real":
                raise TrainingSetupError(
                    f"gmot.teacher={self.cfg.gmot.teacher} needs the PLM feature cache of `gmot prepare`; "
                    f"{self.data_dir} has none"
                )
            else:
                from models.nn.plm import PLMError, load_teacher

                if self.dd.main:
                    warnings.warn(
                        f"{self.data_dir} has no PLM feature cache: computing PLM features online in every "
                        "step (slow); run `gmot prepare` with a PLM to cache them",
                        stacklevel=2,
                    )
                try:
                    self.teacher = load_teacher(t.plm, layer=t.plm_layer, device=str(self.device))
                except PLMError as err:
                    raise TrainingSetupError(
                        f"no PLM cache in {self.data_dir} and no online PLM: {err}"
                    ) from None
                self.plm_width = int(self.teacher.width)
        if self.cfg.model.ctc_from == "adapter" and self.plm_width is None:
            if self.plm_info is None:
                raise TrainingSetupError(
                    f"model.ctc_from=adapter needs the PLM width: {lang} has no plm.json (prepare with a PLM)"
                )
            self.plm_width = self.plm_info.width
        lengths = self.train_set.lengths()
        unalignable = ctc_infeasible(self.train_set.records, self.cfg.model.subsampling)
        self._warn_left_out(
            unalignable,
            f"have more characters (plus repeats) than encoder frames after x{self.cfg.model.subsampling} "
            "subsampling",
        )
        left_out = set(unalignable)
        if self.use_kt:  # nothing to transfer; named here once, where the loss would weigh them 0 unseen
            no_tokens = [
                i
                for i, r in enumerate(self.train_set.records)
                if i not in left_out and r.plm is not None and r.plm.num_tokens < 1
            ]
            self._warn_left_out(no_tokens, "have no PLM teacher tokens")
            left_out.update(no_tokens)
        lengths = [0 if i in left_out else n for i, n in enumerate(lengths)]
        batches, dropped = bucket_batches(lengths, t.max_frames, t.max_utts, self.cfg.model.min_input_frames)
        self._warn_left_out(
            [i for i in dropped if i not in left_out],
            f"are shorter than {self.cfg.model.min_input_frames} frames",
        )
        if not batches:
            raise TrainingSetupError(f"no usable train utterances in {train_dir}")
        self.sampler = BucketBatchSampler(
            batches, shuffle=t.shuffle, seed=t.seed, rank=self.dd.rank, world_size=self.dd.world
        )
        self.steps_per_epoch = math.ceil(len(self.sampler) / max(t.accum_grad, 1))

    def _apply_teacher_control(self) -> None:
        """Give the training utterances the features of the gmot.teacher control (data.teacher_controls);
        "real" leaves them alone."""
        control, seed = self.cfg.gmot.teacher, self.cfg.train.seed
        records = self.train_set.records
        if control == "shuffle":
            try:
                counts = [r.plm.num_tokens for r in records]  # has_plm: every train entry has one
                plan = shuffle_sources([r.text for r in records], counts, seed)
            except ValueError as err:
                raise TrainingSetupError(f"gmot.teacher=shuffle on {self.data_dir}: {err}") from None
            self.train_set.teacher_source = plan.source
            off = f", {plan.off_count} from the nearest other token count" if plan.off_count else ""
            self._say(
                f"teacher control: shuffle (each train utterance reads another sentence's features{off})"
            )
        elif control == "random_units":  # dev has no teacher, so no plans to score
            self.train_set.teacher_units = (seed, int(self.cfg.gmot.random_width))
            if self.dev_set is not None:
                self.dev_set.use_plm = False
            self._say(
                f"teacher control: random_units (one fixed N(0, 1) vector of width "
                f"{self.cfg.gmot.random_width} per transcript unit; no PLM)"
            )
        elif control == "random":
            info = self.plm_info
            mean = None if info is None else np.asarray(info.mean, np.float32)
            std = None if info is None else np.asarray(info.std, np.float32)
            self.train_set.teacher_random = (seed, mean, std)
            self._say("teacher control: random (fixed Gaussian vectors with the teacher's mean and std)")

    def _warn_left_out(self, indices: list[int], why: str) -> None:
        """Warn that the train utterances at `indices` are left out, naming the first five."""
        if indices:
            ids = ", ".join(self.train_set.records[i].id for i in indices[:5])
            more = " ..." if len(indices) > 5 else ""
            self._say(
                f"[yellow]warning:[/] {len(indices)} train utterances {why} and are left out ({ids}{more})"
            )
