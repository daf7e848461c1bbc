"""What a run carries from checkpoint to checkpoint: the model, optimiser, scaler and augmentations built at
the start (`_build`), the state resumed from the newest checkpoint in EXP_DIR or the encoder initialised from
`--init-from` (`_resume_or_init`), and the checkpoints written with their full state (`_state`, `_save`:
rank 0 writes ckpt-<step>.pt and checkpoints.json and prunes to keep_last + the best by dev CER).

Under DDP the ranks resume from the checkpoint rank 0 chooses, agree on whether rank 0's writes failed
(`_agree_on_writes`, a TrainingError on every rank when one did) and sum the epoch's sums (`_global_sums`).

`RunStateMixin` is part of `models.engine.training.Trainer`: it reads the data the Trainer loaded
(models.engine.train_data) and sets the attributes the loop and the step use (model, optimizer, scaler,
kt_loss, step, epoch, the counters); `_save` keeps the best checkpoints by `_best`
(models.engine.evaluation). models.engine.trainer_base declares the attributes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from data.loader import FrequencyWarp, SpecAugment
from models.engine.checkpoint import (
    CheckpointError,
    check_state_dict_compatible,
    checkpoint_path,
    init_from_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from models.engine.config import config_to_dict
from models.engine.distributed import all_reduce, unwrap
from models.engine.outcome import TrainingError
from models.engine.precision import choose_precision, grad_scaler
from models.engine.run_log import INDEX, read_index, write_failure, write_index
from models.engine.schedule import lr_at
from models.engine.trainer_base import TrainerBase
from models.nn.encoder import KERNEL_OPTIONS, ConformerCTC
from models.nn.transfer_loss import GMOTLoss


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's RNG state (and the CUDA generator's of `device`) for a checkpoint."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


class RunStateMixin(TrainerBase):
    """Builds, resumes and saves the Trainer's state."""

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
        unwrap(self.model).check_lengths = False
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
            # how attention is computed is not the model: a checkpoint from before the option resumes
            diff = sorted(
                k for k in new_model if old_model.get(k) != new_model[k] and k not in KERNEL_OPTIONS
            )
            if diff:
                raise CheckpointError(
                    f"{self.exp_dir} holds checkpoints ({path.name}) of a different model "
                    f"(model.{', model.'.join(diff)}); use a new EXP_DIR or the same model options"
                )
            old_cfg, new_cfg = state["config"], config_to_dict(self.cfg)
            changed = [
                f"{sec}.{k}"
                for sec in ("model", "gmot", "train")
                for k, v in new_cfg[sec].items()
                if old_cfg.get(sec, {}).get(k) != v
                and f"{sec}.{k}" != "train.epochs"
                and (sec != "model" or k in KERNEL_OPTIONS)
            ]
            if changed:
                self._say(f"[yellow]note:[/] resuming with changed options: {', '.join(changed)}")
            if self.init_from is not None:
                self._say(
                    f"[yellow]note:[/] {self.exp_dir} holds checkpoints already: --init-from is ignored"
                )
            model = unwrap(self.model)
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
            init_from_checkpoint(unwrap(self.model), self.init_from, self.vocab, self.frontend)
            self._say(f"initialised the encoder from {self.init_from}")

    def _state(self, epoch_complete: bool, consumed: int, epoch_sums: dict[str, float]) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "config": config_to_dict(self.cfg),
            "vocab": list(self.vocab),
            "cmvn": {
                "mean": torch.from_numpy(self.cmvn[0].copy()),
                "std": torch.from_numpy(self.cmvn[1].copy()),
                "frontend": self.frontend,
            },
            "plm": None if self.plm_info is None else self.plm_info.to_json(),
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
            "rng": rng_state(self.device),
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
