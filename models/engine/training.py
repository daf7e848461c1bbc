"""The training engine shared by `gmot pretrain` (gmot.mode = none) and `gmot distill` (wd / fgw ...).

loss = ctc + lambda * kt, where kt is `models.nn.transfer_loss.GMOTLoss` between the adapter output and the
PLM token features of the transcript, read from the prepare cache (computed online only when train.plm names a
teacher).

What a run does, in order: build the model (or resume from the newest checkpoint in EXP_DIR, or initialise
from `--init-from`), write config.yaml and command.txt, then per epoch: train over duration-bucketed batches
(AdamW, warm-up + decay, gradient clipping and accumulation, mixed precision), a dev pass with greedy CER and
the plan diagnostics, a checkpoint with full state; at the end, avg.pt = the mean of the best n epoch
checkpoints by dev CER. The pieces live beside it: models.engine.distributed (ranks, devices),
models.engine.precision (autocast and the fp16 scaler), models.engine.schedule (learning rate, kt ramp),
models.nn.ctc (CTC and which transcripts it can align), models.engine.run_log (metrics.jsonl, the checkpoint
index, command lines, progress).

Determinism: every batch reseeds torch's RNG from (seed, epoch, the batch's position in the epoch's global
order), so dropout and SpecAugment draw the same numbers whether a run was interrupted and resumed, and
whether the batches ran on one process with W-fold accumulation or on W DDP ranks.

Faults: train utterances CTC cannot align after the model's subsampling are left out at load time; an
utterance whose CTC loss is still infinite is left out of its batch's CTC; a NaN loss or gradient skips the
step and is counted (under fp16, an overflow that the loss scale does not cure counts too,
models.engine.precision.overflow_is_nan); `train.max_nan_steps` NaN steps in a row stop the run with
TrainingError. SIGTERM / SIGINT stop the run after the current step with a mid-epoch checkpoint
(models.engine.preemption); a checkpoint or metrics.jsonl that cannot be written (a full disk) stops it with
TrainingError, the checkpoints already written untouched. Under DDP the ranks agree on every skip, on each
stop, and on the checkpoint a restart resumes from; the epoch's sums (losses, skipped utterances) are summed
over the ranks.

Host synchronisations (a GPU waits for the host to read a value): a step reads its results once, after the
backward passes and the gradient clipping (flags, loss terms, gradient norm, the ranks' agreement, all in
one tensor); with a transfer loss the solver adds one per micro-batch (its log-domain rerun check), so a
step of accum_grad=1 synchronises twice (tests/test_syncs.py counts them).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import (
    Progress,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader

from data.features import has_pitch
from data.loader import BucketBatchSampler, FrequencyWarp, SpecAugment, SpeechDataset, bucket_batches, collate
from data.scoring import score_pairs
from data.store import StoreError, read_cmvn, read_frontend, read_plm_info, read_vocab
from data.teacher_controls import shuffle_sources
from models.engine.allocator import keep_freed_memory
from models.engine.checkpoint import (
    AVERAGE_NAME,
    CheckpointError,
    average_checkpoints,
    check_state_dict_compatible,
    checkpoint_path,
    init_from_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_temporaries,
    save_checkpoint,
)
from models.engine.config import ExperimentConfig, config_to_dict, dump_config
from models.engine.diagnostics import (
    AlignmentMeter,
    alignment_warning,
    gradient_ratio_tensor,
    score_batch_plans,
)
from models.engine.distributed import (
    DeviceError,
    all_reduce,
    cpu_threads,
    init_distributed,
    launch_info,
    pick_device,
)
from models.engine.precision import autocast_for, choose_precision, grad_scaler, overflow_is_nan
from models.engine.preemption import Preempted, StopSignals, ignore_stop_signals
from models.engine.run_log import (
    INDEX,
    METRICS,
    MetricsLogger,
    read_index,
    record_command,
    training_progress,
    write_failure,
    write_index,
)
from models.engine.schedule import kt_weight_at, lr_at
from models.nn.ctc import ctc_impossible, ctc_infeasible, ctc_losses, greedy_ctc
from models.nn.encoder import ConformerCTC
from models.nn.transfer_loss import GMOTLoss

CONFIG = "config.yaml"


class TrainingError(RuntimeError):
    """A run that cannot start or go on (bad data folder, NaN storm, GPU out of memory); says what to do."""


@dataclass
class TrainOutcome:
    """What a finished `train` call did (rank 0's view)."""

    exp_dir: Path
    epochs_done: int
    step: int
    resumed_from: Path | None
    dev_cer: dict[int, float] = field(default_factory=dict)
    """Dev CER (fraction) per epoch trained or found in the experiment's index."""
    skipped_inf: int = 0
    """Batches skipped because their CTC loss was infinite (this call)."""
    skipped_nan: int = 0
    """Steps skipped because the loss or gradient was NaN (this call)."""
    average: Path | None = None
    """avg.pt when it was written."""
    average_cer: float | None = None


@dataclass
class _MicroBatch:
    """What one micro-batch leaves on the device for its optimiser step to read with the step's results."""

    ids: list[str]
    flags: Tensor
    """(2,) float: [its loss is not finite (a NaN step), it trains (finite loss, some CTC alignable)]."""
    impossible: Tensor
    """(B,) float: 1 where the utterance's CTC is infinite (left out of the batch's CTC)."""
    names: list[str]
    values: Tensor
    """(len(names),) float: the loss terms, and "grad_ratio" when this batch measured it."""


# ----------------------------------------------------------------------------------------------------------
# pieces


def _batch_seed(seed: int, epoch: int, position: int) -> int:
    """A reproducible seed for the batch at `position` of `epoch`'s global order."""
    return (seed * 1_000_003 + epoch * 100_003 + position * 7919) % (2**63 - 1)


def _batches(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """The batches of `loader`; its worker processes are shut down however the iteration ends. An error
    raised in a worker (a damaged shard) keeps the loader's iterator alive through its traceback, and a
    worker left running would make the interpreter wait for it forever at exit."""
    batches = iter(loader)
    try:
        yield from batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator only
        if shutdown is not None:
            shutdown()


def _unwrap(model: nn.Module) -> ConformerCTC:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # type: ignore[return-value]


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


# ----------------------------------------------------------------------------------------------------------
# the engine


def _flushes_subnormals() -> bool:
    """Whether the CPU currently flushes subnormal float32 results to zero (torch.set_flush_denormal)."""
    tiny = torch.tensor([1e-38], dtype=torch.float32)
    return bool((tiny * 1e-3).item() == 0.0)


class Trainer:
    """One training run from a prepared folder into an experiment folder; `run()` trains, returns the outcome.

    `init_from`: a checkpoint whose encoder weights initialise the model (vocabulary and widths must match;
    the adapter may be new) unless EXP_DIR already holds checkpoints: then the run resumes from the newest.
    `command`: the command line to record (default sys.argv). `progress`: show a rich progress bar (rank 0).
    """

    def __init__(
        self,
        data_dir: Path,
        exp_dir: Path,
        cfg: ExperimentConfig,
        *,
        init_from: Path | None = None,
        device: str | None = None,
        command: list[str] | None = None,
        console: Console | None = None,
        progress: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.exp_dir = Path(exp_dir)
        self.cfg = cfg
        self.init_from = Path(init_from) if init_from is not None else None
        self.command = command
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        self.dd = launch_info()
        try:
            self.device = pick_device(device, self.dd)  # first: the group is bound to this device
        except DeviceError as err:
            raise TrainingError(str(err)) from None
        self.dd = init_distributed(self.dd, self.device)
        self.mode = str(cfg.gmot.mode)
        self.use_kt = self.mode != "none"
        self.outcome = TrainOutcome(self.exp_dir, 0, 0, None)

    # --- set-up -------------------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.dd.main:
            self.console.print(text)

    def _load_data(self) -> None:
        lang = self.data_dir / "lang"
        train_dir = self.data_dir / "train"
        if not (train_dir / "manifest.jsonl").is_file():
            raise TrainingError(
                f"{train_dir / 'manifest.jsonl'} not found: is {self.data_dir} a folder written by "
                "`gmot prepare`?"
            )
        try:
            self.vocab = read_vocab(lang)
            mean, std = read_cmvn(lang)
            self.frontend = read_frontend(lang)
            self.plm_info = read_plm_info(lang)
        except StoreError as err:
            raise TrainingError(str(err)) from None
        self.cmvn = (mean, std)
        try:
            has_pitch(mean.shape[0])
        except ValueError as err:
            raise TrainingError(f"{lang / 'cmvn.json'}: {err}") from None
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
                self.plm_width = int(self.plm_info["width"])
                self._apply_teacher_control()
            elif t.plm is None:
                # an online teacher may not be the one the (partial) cache was built with: only on request
                missing = sum(1 for r in self.train_set.records if "plm" not in r)
                what = (
                    f"{missing} of {len(self.train_set.records)} train utterances have no cached PLM features"
                    if self.plm_info is not None
                    else f"{lang / 'plm.json'} is missing"
                )
                raise TrainingError(
                    f"{self.data_dir} has no complete PLM feature cache ({what}); re-run `gmot prepare` with "
                    "a PLM (the default e5-small), or set train.plm=MODEL to compute the teacher online in "
                    "every step (slow; it should be the teacher the cache was built with)"
                )
            elif self.cfg.gmot.teacher != "real":
                raise TrainingError(
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
                    raise TrainingError(f"no PLM cache in {self.data_dir} and no online PLM: {err}") from None
                self.plm_width = int(self.teacher.width)
        if self.cfg.model.ctc_from == "adapter" and self.plm_width is None:
            if self.plm_info is None:
                raise TrainingError(
                    f"model.ctc_from=adapter needs the PLM width: {lang} has no plm.json (prepare with a PLM)"
                )
            self.plm_width = int(self.plm_info["width"])
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
                if i not in left_out and "plm" in r and int(r["plm"]["num_tokens"]) < 1
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
            raise TrainingError(f"no usable train utterances in {train_dir}")
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
                plan = shuffle_sources(
                    [r["text"] for r in records], [int(r["plm"]["num_tokens"]) for r in records], seed
                )
            except ValueError as err:
                raise TrainingError(f"gmot.teacher=shuffle on {self.data_dir}: {err}") from None
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
            info = self.plm_info or {}
            mean = np.asarray(info["mean"], np.float32) if "mean" in info else None
            std = np.asarray(info["std"], np.float32) if "std" in info else None
            self.train_set.teacher_random = (seed, mean, std)
            self._say("teacher control: random (fixed Gaussian vectors with the teacher's mean and std)")

    def _warn_left_out(self, indices: list[int], why: str) -> None:
        """Warn that the train utterances at `indices` are left out, naming the first five."""
        if indices:
            ids = ", ".join(self.train_set.records[i]["id"] for i in indices[:5])
            more = " ..." if len(indices) > 5 else ""
            self._say(
                f"[yellow]warning:[/] {len(indices)} train utterances {why} and are left out ({ids}{more})"
            )

    def _build(self) -> None:
        t = self.cfg.train
        torch.manual_seed(t.seed)
        self.model: nn.Module = ConformerCTC(self.cfg.model, len(self.vocab), self.plm_width).to(self.device)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr,
            betas=tuple(t.betas),
            foreach=True,
        )
        self.kt_loss = None
        if self.use_kt:
            gcfg = self.cfg.gmot
            if gcfg.teacher == "random_units" and gcfg.standardise:  # N(0, 1) already, no statistics
                gcfg = dataclasses.replace(gcfg, standardise=False)
                self.cfg = dataclasses.replace(self.cfg, gmot=gcfg)
            if (
                self.teacher is not None and gcfg.standardise
            ):  # online PLM: no corpus statistics to standardise
                gcfg = dataclasses.replace(gcfg, standardise=False)
                # config.yaml and the checkpoints record the setting the run uses
                self.cfg = dataclasses.replace(self.cfg, gmot=gcfg)
                self._say(
                    "[yellow]note:[/] the online teacher has no corpus statistics: gmot.standardise is off "
                    "for this run"
                )
            self.kt_loss = GMOTLoss.from_plm_info(gcfg, self.plm_info if self.teacher is None else None)
            self.kt_loss.to(self.device)
        self.precision = choose_precision(self.device, t.bf16)
        self.scaler = grad_scaler(self.precision)
        self.freq_warp = FrequencyWarp(t.freq_warp)
        self.spec_augment = SpecAugment(
            t.freq_masks, t.freq_mask_width, t.time_masks, t.time_mask_width, t.time_mask_ratio
        )
        self.step = 0
        self.epoch = 1
        self.nan_streak = 0
        self.overflow_streak = 0
        self.micro = 0
        self.grad_ratio: Tensor | None = None
        self.halt: str | None = None
        self.dev_alignment = {}
        # batches hold no input too short for the model nor empty items (load time): no host reads of lengths
        _unwrap(self.model).check_lengths = False
        if self.kt_loss is not None:
            self.kt_loss.check_lengths = False

    def _resume_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from and its state, or None for a fresh start. Rank 0 decides from its
        view of EXP_DIR and broadcasts the checkpoint's name; every rank loads that file from its EXP_DIR,
        or all fail together (under torchrun on several nodes EXP_DIR must be on a filesystem all nodes
        see)."""
        if self.dd.main:
            ckpts = list_checkpoints(self.exp_dir) if self.exp_dir.is_dir() else []
            chosen = [ckpts[-1].name if ckpts else None]
        else:
            chosen = [None]
        if self.dd.distributed:
            dist.broadcast_object_list(chosen)
        if chosen[0] is None:
            return None
        path = self.exp_dir / chosen[0]  # each rank's own view of EXP_DIR
        state, problem = None, ""
        try:
            state = load_checkpoint(path, map_location="cpu")
        except (CheckpointError, OSError) as err:
            problem = str(err)
        if self.dd.distributed:
            failed = all_reduce([float(state is None)], self.dd, self.device, op="max")[0]
            if failed:
                raise TrainingError(
                    f"rank {self.dd.rank}: "
                    + (f"cannot read {path}, the checkpoint rank 0 resumes from ({problem})" if problem
                       else f"another rank cannot read {path}, the checkpoint rank 0 resumes from")
                    + "; under torchrun every node must see EXP_DIR (a shared filesystem)"
                )  # fmt: skip
        elif state is None:
            raise CheckpointError(problem)
        return path, state

    def _resume_or_init(self) -> None:
        found = self._resume_checkpoint()
        if found:
            path, state = found
            if list(state["vocab"]) != list(self.vocab):
                raise CheckpointError(
                    f"{self.exp_dir} holds checkpoints ({path.name}) trained on a different vocabulary "
                    f"({len(state['vocab'])} units, {self.data_dir} has {len(self.vocab)}); use a new EXP_DIR"
                )
            old_model = state["config"].get("model", {})
            new_model = config_to_dict(self.cfg.model)
            if old_model != new_model:
                diff = sorted(k for k in new_model if old_model.get(k) != new_model[k])
                raise CheckpointError(
                    f"{self.exp_dir} holds checkpoints ({path.name}) of a different model "
                    f"(model.{', model.'.join(diff)}); use a new EXP_DIR or the same model options"
                )
            old_cfg, new_cfg = state["config"], config_to_dict(self.cfg)
            changed = [
                f"{sec}.{k}"
                for sec in ("gmot", "train")
                for k, v in new_cfg[sec].items()
                if old_cfg.get(sec, {}).get(k) != v and f"{sec}.{k}" != "train.epochs"
            ]
            if changed:
                self._say(f"[yellow]note:[/] resuming with changed options: {', '.join(changed)}")
            if self.init_from is not None:
                self._say(
                    f"[yellow]note:[/] {self.exp_dir} holds checkpoints already: --init-from is ignored"
                )
            model = _unwrap(self.model)
            check_state_dict_compatible(path, state["model"], model)
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
            self.step = int(state["step"])
            self.epoch = int(state["epoch"]) + (1 if state.get("epoch_complete") else 0)
            self.sampler.load_state_dict(state["sampler"])
            if state.get("epoch_complete"):
                self.sampler.set_epoch(self.epoch)
            counters = state.get("counters", {})
            self.nan_streak = int(counters.get("nan_streak", 0))
            self.overflow_streak = int(counters.get("overflow_streak", 0))
            # the sums of every rank so far: rank 0 carries them on, the others add their own from here
            resumed_sums = self.dd.main and not state.get("epoch_complete")
            self.epoch_sums = dict(state.get("epoch_sums", {})) if resumed_sums else {}
            rng = state.get("rng", {})
            if "torch" in rng:
                torch.set_rng_state(rng["torch"])
            self.outcome.resumed_from = path
            self._say(f"resuming from {path} (epoch {state['epoch']}, step {self.step})")
            planned = int((state.get("scheduler") or {}).get("total_steps") or 0)
            if planned and planned != self.total_steps:
                # the schedule's length is fixed when a run starts: extending a run (more --epochs) goes on at
                # the schedule's final rate instead of re-heating a cosine that had annealed
                self._say(
                    f"[yellow]note:[/] the learning-rate schedule keeps the {planned} steps it was planned "
                    f"for (now {self.total_steps}); steps past them train at its final rate "
                    f"({lr_at(planned, self.cfg, planned):.2e}); for a new schedule start a new EXP_DIR "
                    "with --init-from"
                )
                self.total_steps = planned
            return
        self.epoch_sums = {}
        if self.init_from is not None:
            init_from_checkpoint(_unwrap(self.model), self.init_from, self.vocab, self.frontend)
            self._say(f"initialised the encoder from {self.init_from}")

    # --- one batch ----------------------------------------------------------------------------------------

    def _teacher_batch(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        assert self.teacher is not None
        encoded = self.teacher.encode(texts)
        feats = [torch.from_numpy(np.asarray(f, np.float32)) for _, f in encoded]
        lens = torch.tensor([len(f) for f in feats], dtype=torch.long)
        return nn.utils.rnn.pad_sequence(feats, batch_first=True), lens

    def _forward(self, batch: dict[str, Any], train: bool) -> tuple[dict[str, Tensor], Tensor]:
        """Loss dict {"loss", "ctc", "kt", kt parts...} (scalars) and per-utterance CTC losses (B,), inf
        where an utterance cannot be aligned. Such utterances are left out of "ctc" (their batch-mates
        still train); when all are, "ctc" is 0 and the batch does not train. Reads nothing on the host."""
        # the loader pins its batches on CUDA: these copies need not wait for the device
        feats = batch["feats"].to(self.device, non_blocking=True)
        lens = batch["feat_lens"].to(self.device, non_blocking=True)
        if train:
            feats = self.freq_warp(feats, lens)  # the identity when train.freq_warp is 0
        if train and self.cfg.train.spec_augment:
            feats = self.spec_augment(feats, lens)
        with autocast_for(self.device, self.precision):
            out = self.model(feats, lens)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        token_lens = batch["token_lens"].to(self.device, non_blocking=True)
        impossible = ctc_impossible(out["lengths"], tokens, token_lens)
        per_utt = ctc_losses(out, tokens, token_lens, zero_infinity=True)  # 0, no gradient where impossible
        ctc = per_utt.sum() / (~impossible).sum().clamp(min=1)
        per_utt = per_utt.masked_fill(impossible, math.inf)
        terms: dict[str, Tensor] = {"ctc": ctc}
        loss = ctc
        if self.use_kt and train:
            if batch["plm"] is not None:
                plm, plm_lens = batch["plm"], batch["plm_lens"]
            else:
                plm, plm_lens = self._teacher_batch(batch["texts"])
            assert self.kt_loss is not None
            kt = self.kt_loss(
                out["adapted"].float(), out["lengths"], plm.to(self.device, non_blocking=True),
                plm_lens.to(self.device, non_blocking=True), blank_prob=out["log_probs"][..., 0].exp(),
            )  # fmt: skip
            for k, v in kt.items():
                if k != "plan" and isinstance(v, Tensor) and v.dim() == 0:
                    terms[k] = v
            weight = kt_weight_at(self.step, self.cfg.train)
            loss = ctc + weight * kt["kt"]
            if self._measure_grad_ratio():
                self.grad_ratio = gradient_ratio_tensor(weight * kt["kt"], ctc, out["hidden"])
        terms["loss"] = loss
        return terms, per_utt

    def _measure_grad_ratio(self) -> bool:
        """Whether this batch measures the kt/ctc gradient ratio: the first batch of each logged step."""
        t = self.cfg.train
        return t.grad_ratio and (self.step + 1) % t.log_interval == 0 and self.micro == 0

    def _oom_message(self, batch: dict[str, Any]) -> str:
        t = self.cfg.train
        return (
            f"GPU out of memory on a batch of {len(batch['ids'])} utterances x {batch['feats'].shape[1]} "
            "frames; "
            f"lower the frames-per-batch budget, e.g. --set train.max_frames={t.max_frames // 2} "
            f"(now {t.max_frames}), or train.max_utts (now {t.max_utts})"
        )

    def _backward(self, ids: list[str], terms: dict[str, Tensor], per_utt: Tensor) -> _MicroBatch:
        """Backpropagate one micro-batch; a batch that does not train (every CTC infinite, or a non-finite
        loss) backpropagates 0 (NaN for a NaN loss: its step is skipped). Nothing is read on the host: the
        returned flags and terms wait on the device for the step's one read (`_optimizer_step`)."""
        impossible = torch.isinf(per_utt)
        loss = terms["loss"]
        finite = torch.isfinite(loss)
        some = ~impossible.all()
        trains = finite & some
        self.scaler.scale(loss * trains / self.cfg.train.accum_grad).backward()
        names = list(terms)
        values = [terms[k].detach().float() for k in names]
        if self.grad_ratio is not None:
            names.append("grad_ratio")
            values.append(self.grad_ratio.float())
            self.grad_ratio = None
        flags = torch.stack([~finite & some, trains]).float()
        return _MicroBatch(ids, flags, impossible.float(), names, torch.stack(values))

    def _optimizer_step(self, pending: list[_MicroBatch]) -> bool:
        """The optimiser step after the backward passes of `pending`, with the step's one host read.

        Gradients are averaged over the micro-batches that trained, on every rank, then unscaled (fp16)
        and clipped; one tensor holds the micro-batches' flags (summed over the ranks), the stop requests of
        every rank (a signal, a failed write), the gradient norm and this rank's loss terms, and is read
        once. Then the step is applied or skipped (a NaN loss or gradient, an fp16 overflow, nothing
        trained), and the terms, skipped utterances and NaN steps are counted and logged. Sets `self.halt`
        ("write" or "signal") when the ranks are to stop; returns whether the parameters were updated.

        For the fault tests, the environment variable GMOT_KILL_AFTER_STEP=N makes the process SIGKILL itself
        right after step N is applied, before it is saved: a crash at a known point.
        """
        t = self.cfg.train
        n = len(pending)
        device = pending[0].flags.device
        requests = [self.stop.signum == signal.SIGTERM, self.stop.signum == signal.SIGINT, self.logger.error]
        shared = torch.cat(
            [torch.stack([m.flags for m in pending]).flatten()]
            + [torch.full((1,), float(bool(r)), device=device) for r in requests]
        )
        if self.dd.distributed:
            dist.all_reduce(shared)  # how many ranks saw each flag
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.full((1,), math.nan, device=device)
        if params:
            # DDP averaged over the ranks and each backward divided by accum_grad: now the mean over the
            # micro-batches that trained (multiplying by 1 when all did)
            trained = shared[1 : 2 * n : 2].sum().clamp(min=1)
            torch._foreach_mul_([p.grad for p in params], (t.accum_grad * self.dd.world) / trained)
            self.scaler.unscale_(self.optimizer)  # a no-op unless fp16
            max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm).float().reshape(1)
        local = [torch.cat([m.flags, m.impossible, m.values]) for m in pending]
        host = torch.cat([shared, norm, *local]).tolist()  # the step's one host synchronisation
        agreed, (sigterm, sigint, failed), grad_norm = host[: 2 * n], host[2 * n : 2 * n + 3], host[2 * n + 3]
        self.halt = "write" if failed else "signal" if sigterm or sigint else None
        if sigterm or sigint:
            self.stop.signum = self.stop.signum or (signal.SIGTERM if sigterm else signal.SIGINT)
        at = 2 * n + 4
        for m in pending:
            size = 2 + len(m.ids) + len(m.names)
            self._account(m, host[at : at + size])
            at += size
        nan_batches = sum(1 for i in range(n) if agreed[2 * i] > 0)
        for _ in range(nan_batches):
            self._count_nan("loss")
        trained_anywhere = any(agreed[2 * i + 1] > 0 for i in range(n))
        if nan_batches or not trained_anywhere or not params:
            self.optimizer.zero_grad(set_to_none=True)
            if params and self.scaler.is_enabled():  # not an overflow: the scale stays
                self.scaler.update(self.scaler.get_scale())
            return False
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():  # an fp16 overflow: the scaler lowers its scale, unless it is a NaN
                self.scaler.update()
                self.overflow_streak += 1
                if not overflow_is_nan(self.overflow_streak, self.scaler.get_scale()):
                    return False
            self._count_nan("gradient")
            return False
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, self.cfg, self.total_steps)
        # the read above found the gradients finite: the step scaler.step() would take, without its own read
        self.optimizer.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.nan_streak = 0
        self.overflow_streak = 0
        if os.environ.get("GMOT_KILL_AFTER_STEP") == str(self.step):
            os.kill(os.getpid(), signal.SIGKILL)
        return True

    def _account(self, m: _MicroBatch, values: list[float]) -> None:
        """Count and log one micro-batch from its values as read: `values` = its flags, its utterances'
        infinite-CTC flags and its terms (the layout of `_optimizer_step`'s read)."""
        b = len(m.ids)
        impossible = [m.ids[i] for i in range(b) if values[2 + i]]
        if impossible:  # left out of this batch's CTC (all of them: the batch did not train)
            self.outcome.skipped_inf += len(impossible)
            self.epoch_sums["skipped_inf"] = self.epoch_sums.get("skipped_inf", 0) + len(impossible)
            self.logger.log("skip", self.step, epoch=self.epoch, reason="inf_ctc", utterances=impossible)
        if values[0]:
            self.logger.log("skip", self.step, epoch=self.epoch, reason="nan_loss", utterances=m.ids)
        if not values[1]:
            return
        terms = dict(zip(m.names, values[2 + b :], strict=True))
        ratio = terms.pop("grad_ratio", math.nan)
        if math.isfinite(ratio):
            self.window_ratio = ratio
        for k, v in terms.items():
            self.window[k] = self.window.get(k, 0.0) + v
            self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
        self.window_n += 1
        self.epoch_sums["batches"] = self.epoch_sums.get("batches", 0) + 1

    def _count_nan(self, what: str) -> None:
        self.outcome.skipped_nan += 1
        self.epoch_sums["skipped_nan"] = self.epoch_sums.get("skipped_nan", 0) + 1
        self.nan_streak += 1
        limit = self.cfg.train.max_nan_steps
        if self.nan_streak >= limit:
            raise TrainingError(
                f"the {what} was NaN in {self.nan_streak} consecutive steps (epoch {self.epoch}, "
                f"step {self.step}); "
                f"stopping (train.max_nan_steps={limit}). Lower the learning rate (--set train.lr=...), "
                "raise train.warmup_steps or check the data; the last good checkpoint is in "
                f"{self.exp_dir}"
            )

    # --- epochs -------------------------------------------------------------------------------------------

    def _train_epoch(self, progress: Progress | None) -> None:
        t = self.cfg.train
        self.sampler.set_epoch(self.epoch)
        self.model.train()
        done = self.sampler.consumed
        loader = DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=t.num_workers,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=ignore_stop_signals if t.num_workers > 0 else None,
        )
        task = None
        if progress is not None:
            task = progress.add_task(
                f"epoch {self.epoch}/{t.epochs}", total=len(self.sampler), completed=done, terms=""
            )
        pending: list[_MicroBatch] = []
        self.window, self.window_n, self.window_ratio = {}, 0, None
        for batch in _batches(loader):
            self.micro = done % max(t.accum_grad, 1)
            if self.dd.distributed:
                # DDP's no_sync(): all-reduce gradients only on the last micro-batch of an accumulation
                finishing = (done + 1) % t.accum_grad == 0 or done + 1 == len(self.sampler)
                self.model.require_backward_grad_sync = finishing
            position = done * self.dd.world + self.dd.rank
            torch.manual_seed(_batch_seed(t.seed, self.epoch, position))
            try:
                terms, per_utt = self._forward(batch, train=True)
                pending.append(self._backward(batch["ids"], terms, per_utt))
            except torch.cuda.OutOfMemoryError:
                raise TrainingError(self._oom_message(batch)) from None
            done += 1
            last = done == len(self.sampler)
            if done % t.accum_grad == 0 or last:
                stepped = self._optimizer_step(pending)
                pending = []
                if stepped and self.step % t.log_interval == 0 and self.window_n:
                    self._log_window(progress, task)
                if self.halt == "write":
                    raise TrainingError(self._write_failure_message(None))
                if self.halt == "signal":
                    self._save(epoch_complete=False, consumed=done)
                    raise self._preempted()
                if stepped and t.save_every_steps and self.step % t.save_every_steps == 0 and not last:
                    self._save(epoch_complete=False, consumed=done)
            if progress is not None and task is not None:
                progress.update(task, completed=done)
        if progress is not None and task is not None:
            progress.remove_task(task)

    def _log_window(self, progress: Progress | None, task: Any) -> None:
        """Log the mean terms of the batches trained since the last record (a "train" record)."""
        means = {k: v / self.window_n for k, v in self.window.items()}
        if self.window_ratio is not None:
            means["grad_ratio"] = self.window_ratio
            self.epoch_sums["grad_ratio_sum"] = self.epoch_sums.get("grad_ratio_sum", 0.0) + self.window_ratio
            self.epoch_sums["grad_ratio_n"] = self.epoch_sums.get("grad_ratio_n", 0) + 1
        lr = self.optimizer.param_groups[0]["lr"]
        self.logger.log("train", self.step, epoch=self.epoch, lr=lr, **means)
        self.window, self.window_n, self.window_ratio = {}, 0, None
        if progress is not None and task is not None:
            shown = " ".join(
                f"{k} {v:.3f}" for k, v in means.items() if k in ("loss", "ctc", "kt", "grad_ratio")
            )
            progress.update(task, terms=f"{shown} lr {lr:.2e}")

    def _stop_requested(self) -> bool:
        """Whether any rank caught a stop signal (all ranks call it together)."""
        requests = [float(self.stop.signum == signal.SIGTERM), float(self.stop.signum == signal.SIGINT)]
        if self.dd.distributed:
            requests = all_reduce(requests, self.dd, self.device)
        if requests[0] or requests[1]:
            self.stop.signum = self.stop.signum or (signal.SIGTERM if requests[0] else signal.SIGINT)
            return True
        return False

    def _preempted(self) -> Preempted:
        """The exception that ends a run stopped by a signal, after its checkpoint was saved."""
        signum = self.stop.signum or signal.SIGTERM
        return Preempted(
            signum,
            f"stopped by {signal.Signals(signum).name} at epoch {self.epoch}, step {self.step}: saved "
            f"{checkpoint_path(self.exp_dir, self.step)}; re-run the same command to resume from it",
        )

    @torch.no_grad()
    def _dev_cer(self) -> tuple[float, float] | None:
        """(dev CER as a fraction, mean dev CTC loss); ranks score disjoint shares and sum the counts.
        With a transfer loss and a dev PLM cache, rank 0 also scores the dev plans against the CTC forced
        alignment (models.engine.diagnostics) into self.dev_alignment."""
        self.dev_alignment: dict[str, float] = {}
        if self.dev_set is None:
            return None
        meter = AlignmentMeter()
        align_left = self.cfg.train.align_max_utts if self.kt_loss is not None and self.dd.main else 0
        model = _unwrap(self.model)
        model.eval()
        lengths = self.dev_set.lengths()
        keep = [i for i, n in enumerate(lengths) if n >= self.cfg.model.min_input_frames]
        if self.cfg.train.dev_max_utts:
            keep = keep[: self.cfg.train.dev_max_utts]
        mine = keep[self.dd.rank :: self.dd.world]
        sub_lengths = [lengths[i] for i in mine]
        batches, _ = (
            bucket_batches(sub_lengths, self.cfg.train.max_frames, self.cfg.train.max_utts)
            if mine
            else ([], [])
        )
        errors = ref_len = loss_sum = n_utts = 0.0
        for b in batches:
            batch = collate([self.dev_set[mine[i]] for i in b])
            feats, lens = batch["feats"].to(self.device), batch["feat_lens"].to(self.device)
            with autocast_for(self.device, self.precision):
                out = model(feats, lens)
            per_utt = ctc_losses(out, batch["tokens"].to(self.device), batch["token_lens"].to(self.device))
            finite = per_utt[torch.isfinite(per_utt)]
            loss_sum += float(finite.sum())
            n_utts += finite.numel()
            if align_left > 0 and batch["plm"] is not None and "adapted" in out:
                assert self.kt_loss is not None
                take = min(align_left, len(batch["ids"]))
                align_left -= take
                plm, plm_lens = batch["plm"][:take].to(self.device), batch["plm_lens"][:take].to(self.device)
                res = self.kt_loss(
                    out["adapted"][:take].float(), out["lengths"][:take], plm, plm_lens,
                    blank_prob=out["log_probs"][:take, :, 0].exp(),
                )  # fmt: skip
                records = [self.dev_set.records[mine[i]] for i in b[:take]]
                score_batch_plans(
                    res["plan"], out["log_probs"][:take], out["lengths"][:take], plm_lens,
                    [r["token_ids"] for r in records], [r["text"] for r in records],
                    [list(r["plm"].get("tokens") or []) for r in records], meter,
                )  # fmt: skip
            hyps = greedy_ctc(out["log_probs"], out["lengths"])
            pairs = [
                (uid, ref, "".join(self.vocab[i] if i > 1 else "\u2047" for i in h))
                for uid, ref, h in zip(batch["ids"], batch["texts"], hyps, strict=True)
            ]
            for s in score_pairs(pairs):
                errors += s.errors
                ref_len += s.ref_len
        errors, ref_len, loss_sum, n_utts = all_reduce(
            [errors, ref_len, loss_sum, n_utts], self.dd, self.device
        )
        self.model.train()
        if meter.utterances:
            self.dev_alignment = {k: round(v, 4) for k, v in meter.summary().items() if math.isfinite(v)}
        return errors / max(ref_len, 1.0), loss_sum / max(n_utts, 1.0)

    def _state(self, epoch_complete: bool, consumed: int, epoch_sums: dict[str, float]) -> dict[str, Any]:
        return {
            "model": _unwrap(self.model).state_dict(),
            "config": config_to_dict(self.cfg),
            "vocab": list(self.vocab),
            "cmvn": {
                "mean": torch.from_numpy(self.cmvn[0].copy()),
                "std": torch.from_numpy(self.cmvn[1].copy()),
                "frontend": self.frontend,
            },
            "plm": self.plm_info,
            "mode": self.mode,
            "epoch": self.epoch,
            "epoch_complete": epoch_complete,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "name": self.cfg.train.schedule,
                "step": self.step,
                "total_steps": self.total_steps,
            },
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "sampler": self.sampler.state_dict(consumed),
            "rng": _rng_state(self.device),
            "counters": {"nan_streak": self.nan_streak, "overflow_streak": self.overflow_streak},
            "epoch_sums": epoch_sums,
        }

    def _save(self, epoch_complete: bool, consumed: int, dev_cer: float | None = None) -> None:
        """Write ckpt-<step>.pt atomically (rank 0), update checkpoints.json, prune to keep_last + best n.
        A write that fails (a full disk) leaves the checkpoints written before as they were, and every rank
        stops with TrainingError (`_agree_on_writes`)."""
        epoch_sums = self._global_sums()
        failure = None
        if self.dd.main:
            path = checkpoint_path(self.exp_dir, self.step)
            try:
                state = self._state(epoch_complete, consumed, epoch_sums)
                state["dev_cer"] = dev_cer
                save_checkpoint(path, state)
                index = [e for e in read_index(self.exp_dir) if e["file"] != path.name]
                index.append(
                    {
                        "file": path.name,
                        "epoch": self.epoch,
                        "step": self.step,
                        "epoch_complete": epoch_complete,
                        "dev_cer": dev_cer,
                    }
                )
                keep = {e["file"] for e in index[-max(self.cfg.train.keep_last, 1) :]}
                keep |= {e["file"] for e in self._best(index)}
                path = self.exp_dir / INDEX
                write_index(self.exp_dir, [e for e in index if e["file"] in keep])
                for e in index:
                    if e["file"] not in keep:
                        (self.exp_dir / e["file"]).unlink(missing_ok=True)
            except OSError as err:
                failure = (err, path)
        self._agree_on_writes(failure)

    def _agree_on_writes(self, failure: tuple[OSError, Path] | None) -> None:
        """Every rank waits here for rank 0's writes (a barrier) and learns whether they failed: `failure`
        (the error and the file, rank 0) or an earlier failed metrics record. Raises TrainingError on every
        rank when one did, so that no rank is left waiting for another."""
        failed = failure is not None or self.logger.error is not None
        if self.dd.distributed:
            failed = bool(all_reduce([float(failed)], self.dd, self.device, op="max")[0])
        if failed:
            raise TrainingError(self._write_failure_message(failure))

    def _write_failure_message(self, failure: tuple[OSError, Path] | None) -> str:
        """What could not be written (rank 0) or that rank 0 could not write (other ranks), and the newest
        checkpoint a re-run resumes from."""
        if failure is None and self.logger.error is not None:
            failure = (self.logger.error, self.logger.path)
        if failure is None:
            return f"rank {self.dd.rank}: rank 0 could not write to {self.exp_dir} (its message says why)"
        ckpts = list_checkpoints(self.exp_dir)
        return write_failure(failure[0], failure[1], ckpts[-1] if ckpts else None)

    def _global_sums(self) -> dict[str, float]:
        """The epoch's sums over every rank: losses, batches and skipped utterances are each rank's own and
        are added up; skipped_nan is counted alike by every rank (they agree on each skip) and is not."""
        sums = dict(self.epoch_sums)
        if not self.dd.distributed:
            return sums
        every: list[list[str]] = [[] for _ in range(self.dd.world)]
        dist.all_gather_object(every, sorted(sums))  # a rank that trained no batch yet lacks the terms
        names = sorted({k for keys in every for k in keys} - {"skipped_nan"})
        values = all_reduce([float(sums.get(k, 0)) for k in names], self.dd, self.device)
        total = dict(zip(names, values, strict=True))
        nan = all_reduce([float(sums.get("skipped_nan", 0))], self.dd, self.device, op="max")[0]
        return {**total, "skipped_nan": nan} if nan else total

    def _best(self, index: list[dict[str, Any]]) -> list[dict[str, Any]]:
        n = self.cfg.train.average_best
        if n <= 0:
            return []
        done = [e for e in index if e.get("epoch_complete")]
        scored = [e for e in done if e.get("dev_cer") is not None]
        if scored:
            return sorted(scored, key=lambda e: (e["dev_cer"], -e["step"]))[:n]
        return done[-n:]

    def _average_is_current(self, index: list[dict[str, Any]]) -> bool:
        """True when avg.pt was written after every checkpoint and its dev CER is in the log (a re-run of a
        finished experiment): it is kept as it is, so re-running changes nothing downstream."""
        avg = self.exp_dir / AVERAGE_NAME
        metrics = self.exp_dir / METRICS
        if not avg.is_file() or not metrics.is_file():
            return False
        made = avg.stat().st_mtime_ns
        if any((self.exp_dir / e["file"]).stat().st_mtime_ns > made for e in index):
            return False
        saved = load_checkpoint(avg, map_location="cpu")
        sources = saved.get("averaged_from")
        records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line]
        logged = [r for r in records if r.get("event") == "average"]
        if not logged or logged[-1].get("files") != sources:
            return False
        _unwrap(self.model).load_state_dict(saved["model"])
        self.outcome.average = avg
        self.outcome.average_cer = logged[-1].get("dev_cer")
        self._say(f"avg.pt is up to date (mean of {', '.join(sources)}): kept")
        return True

    def _average(self) -> None:
        """Write avg.pt: the mean of the best `average_best` epochs by dev CER.

        An average of checkpoints far apart in training can be worse than its best member (early in a short
        run); then fewer of the best are averaged, down to the single best, and the first that is no worse on
        dev than the best single checkpoint is kept.
        """
        index = [e for e in read_index(self.exp_dir) if (self.exp_dir / e["file"]).is_file()]
        best = self._best(index)
        if not best:
            return
        if self._average_is_current(index):
            return
        single_best = best[0].get("dev_cer")
        for k in range(len(best), 0, -1):
            chosen = best[:k]
            paths = [self.exp_dir / e["file"] for e in chosen]
            failure = None
            if self.dd.main:
                state = load_checkpoint(max(paths), map_location="cpu")
                keep = {k: state[k] for k in ("config", "vocab", "cmvn", "plm", "mode", "epoch", "step")}
                try:
                    save_checkpoint(
                        self.exp_dir / AVERAGE_NAME,
                        {
                            **keep,
                            "model": average_checkpoints(paths),
                            "averaged_from": [p.name for p in paths],
                            "dev_cer_of_sources": [e.get("dev_cer") for e in chosen],
                        },
                    )
                except OSError as err:
                    failure = (err, self.exp_dir / AVERAGE_NAME)
            self._agree_on_writes(failure)
            model = _unwrap(self.model)
            model.load_state_dict(load_checkpoint(self.exp_dir / AVERAGE_NAME)["model"])
            result = self._dev_cer()
            self.outcome.average = self.exp_dir / AVERAGE_NAME
            if result is None:
                return
            self.outcome.average_cer = result[0]
            self.logger.log("average", self.step, files=[p.name for p in paths], dev_cer=result[0])
            self._say(f"avg.pt = mean of {', '.join(p.name for p in paths)}: dev CER {100 * result[0]:.2f} %")
            if k == 1 or single_best is None or result[0] <= single_best:
                return
            self._say(f"  worse than the best single checkpoint ({100 * single_best:.2f} %): averaging fewer")

    # --- the run ------------------------------------------------------------------------------------------

    def run(self) -> TrainOutcome:
        """Train up to cfg.train.epochs epochs (resuming if EXP_DIR has checkpoints); return the outcome."""
        flushing, threads_before = _flushes_subnormals(), torch.get_num_threads()
        keep_freed_memory()  # each step reuses the last step's memory instead of faulting in fresh pages
        if self.device.type == "cpu":
            # threads and the subnormal setting are process-wide: both are restored when training ends
            threads = cpu_threads(self.cfg.train.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            if threads is not None:
                torch.set_num_threads(threads)
            # Adam moments and late-training gradients reach subnormal floats, which x86 CPUs process many
            # times slower than normal ones. The setting is process-wide: restored when training ends.
            torch.set_flush_denormal(True)
        try:
            with StopSignals() as self.stop:
                return self._run()
        finally:
            torch.set_flush_denormal(flushing)
            torch.set_num_threads(threads_before)
            if self.dd.owns_group and dist.is_initialized():
                # free DDP's reducer while its process group exists: freed later (the Trainer kept alive),
                # gloo's destructor can wait forever for its threads (seen as a hung test worker)
                if isinstance(self.model, nn.parallel.DistributedDataParallel):
                    self.model.__dict__.pop("reducer", None)
                    gc.collect()
                dist.destroy_process_group()

    def _run(self) -> TrainOutcome:
        t = self.cfg.train
        self._load_data()
        self._build()
        self.total_steps = t.epochs * self.steps_per_epoch
        if self.dd.main:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
            stale = remove_temporaries(self.exp_dir, (INDEX, CONFIG))
            if stale:
                names = ", ".join(p.name for p in stale)
                self._say(f"removed what an interrupted write left in {self.exp_dir}: {names}")
        if self.dd.distributed:
            dist.barrier()
        self._resume_or_init()
        if self.dd.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.logger = MetricsLogger(self.exp_dir, self.dd.main)
        failure = None
        if self.dd.main:
            try:
                dump_config(self.cfg, self.exp_dir / CONFIG)
                record_command(self.exp_dir, self.command)
            except OSError as err:
                remove_temporaries(self.exp_dir, (CONFIG,))
                failure = (err, Path(err.filename) if err.filename else self.exp_dir / CONFIG)
        self._agree_on_writes(failure)
        n_params = sum(p.numel() for p in self.model.parameters())
        self._say(
            f"{self.mode if self.use_kt else 'pretrain'}: {n_params / 1e6:.2f} M parameters, "
            f"{len(self.train_set)} train utterances in {len(self.sampler.batches)} batches, "
            f"device {self.device} ({self.precision}"
            + (f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else "")
            + f"), {self.dd.world} process(es)"
            + (f" in a {dist.get_backend()} group" if self.dd.distributed else "")
        )
        for e in read_index(self.exp_dir) if self.dd.main else []:
            if e.get("dev_cer") is not None:
                self.outcome.dev_cer[int(e["epoch"])] = float(e["dev_cer"])
        try:
            with training_progress(self.show_progress and self.dd.main, self.console) as progress:
                while self.epoch <= t.epochs:
                    started = time.time()
                    self._train_epoch(progress)
                    dev = self._dev_cer()
                    dev_cer = None if dev is None else dev[0]
                    sums = self._global_sums()
                    n = max(sums.get("batches", 0), 1)
                    summary = {
                        k: v / n
                        for k, v in sums.items()
                        if k not in ("batches", "skipped_inf", "skipped_nan")
                        and not k.startswith("grad_ratio_")
                    }
                    if sums.get("grad_ratio_n"):
                        summary["grad_ratio"] = sums["grad_ratio_sum"] / sums["grad_ratio_n"]
                    summary.update(
                        skipped_inf=int(sums.get("skipped_inf", 0)),
                        skipped_nan=int(sums.get("skipped_nan", 0)),
                    )
                    if dev is not None:
                        summary.update(dev_cer=dev[0], dev_ctc=dev[1], **self.dev_alignment)
                        self.outcome.dev_cer[self.epoch] = dev[0]
                    self.logger.log(
                        "epoch",
                        self.step,
                        epoch=self.epoch,
                        seconds=round(time.time() - started, 2),
                        **summary,
                    )
                    self._say(
                        f"epoch {self.epoch}: loss {summary.get('loss', float('nan')):.4f}"
                        + (f", dev CER {100 * dev[0]:.2f} %" if dev is not None else "")
                        + (
                            f", dev plans: lift {self.dev_alignment['align_lift']:.2f} order "
                            f"{self.dev_alignment.get('align_order', float('nan')):+.2f} entropy "
                            f"{self.dev_alignment['align_entropy']:.2f}"
                            if "align_lift" in self.dev_alignment
                            else ""
                        )
                        + (f", kt/ctc grad {summary['grad_ratio']:.3f}" if "grad_ratio" in summary else "")
                        + (
                            f", {summary['skipped_inf']} utterances with infinite CTC left out, "
                            f"{summary['skipped_nan']} NaN batches skipped"
                            if summary["skipped_inf"] or summary["skipped_nan"]
                            else ""
                        )
                    )
                    warning = alignment_warning(self.dev_alignment, self.cfg.gmot.tot_weight)
                    if warning:
                        self._say(f"[yellow]warning:[/] {warning}")
                    self._save(epoch_complete=True, consumed=len(self.sampler), dev_cer=dev_cer)
                    if self._stop_requested():  # a signal during the dev pass or the save
                        raise self._preempted()
                    self.outcome.epochs_done = self.epoch
                    self.epoch += 1
                    self.epoch_sums = {}
            if t.average_best > 0:
                self._average()
            self._agree_on_writes(None)  # the last metrics records
            if self.dd.distributed:
                self.outcome.skipped_inf = int(
                    all_reduce([float(self.outcome.skipped_inf)], self.dd, self.device)[0]
                )
        finally:
            self.logger.close()
        self.outcome.step = self.step
        self.outcome.epochs_done = self.epoch - 1
        return self.outcome


def train(
    data_dir: Path,
    exp_dir: Path,
    cfg: ExperimentConfig,
    *,
    init_from: Path | None = None,
    device: str | None = None,
    command: list[str] | None = None,
    console: Console | None = None,
    progress: bool = True,
) -> TrainOutcome:
    """Train (or resume) an experiment; see `Trainer`. Raises TrainingError / CheckpointError with clear
    messages for the user."""
    return Trainer(
        data_dir,
        exp_dir,
        cfg,
        init_from=init_from,
        device=device,
        command=command,
        console=console,
        progress=progress,
    ).run()
