"""One optimiser step of the training loop: the forward pass and the loss of each micro-batch, its backward
pass, and the step after them, with its faults: an utterance whose CTC is infinite is left out of its batch's
CTC, a NaN loss or gradient (or an fp16 overflow the loss scale does not cure) skips the step and is counted,
`train.max_nan_steps` NaN steps in a row raise TrainingError, and a GPU out of memory gets a message saying
which option to lower (`_oom_message`).

The step reads its results on the host once (`_optimizer_step`): the micro-batches leave their flags and loss
terms on the device (`MicroBatch`) until then. The terms trained are summed into the log window (a "train"
record every log_interval steps, `_log_window`) and into the epoch's sums.

`StepMixin` is part of `models.engine.training.Trainer`, whose state it reads and updates (the model, the
optimiser and scaler built by models.engine.run_state, the step and epoch, the counters, the logger;
declared in models.engine.trainer_base).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import Progress
from torch import Tensor, nn

from models.engine.diagnostics import gradient_ratio_tensor
from models.engine.outcome import TrainingError
from models.engine.precision import autocast_for, overflow_is_nan
from models.engine.schedule import kt_weight_at, lr_at
from models.engine.trainer_base import TrainerBase
from models.nn.ctc import ctc_batch_loss


@dataclass
class MicroBatch:
    """What one micro-batch leaves on the device for its optimiser step to read with the step's results."""

    ids: list[str]
    flags: Tensor
    """(2,) float: [its loss is not finite (a NaN step), it trains (finite loss, some CTC alignable)]."""
    impossible: Tensor
    """(B,) float: 1 where the utterance's CTC is infinite (left out of the batch's CTC)."""
    names: list[str]
    values: Tensor
    """(len(names),) float: the loss terms, and "grad_ratio" when this batch measured it."""


class StepMixin(TrainerBase):
    """The loss step of the Trainer: `_forward`, `_backward` per micro-batch, `_optimizer_step` per step."""

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
        ctc, per_utt = ctc_batch_loss(out, tokens, token_lens)
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
            weight = kt_weight_at(self.step, self.cfg.train, self.total_steps)
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

    def _backward(self, ids: list[str], terms: dict[str, Tensor], per_utt: Tensor) -> MicroBatch:
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
        return MicroBatch(ids, flags, impossible.float(), names, torch.stack(values))

    def _optimizer_step(self, pending: list[MicroBatch]) -> bool:
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

    def _account(self, m: MicroBatch, values: list[float]) -> None:
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

    def _log_window(self, progress: Progress | None, task: Any) -> None:
        """Log the mean terms of the batches trained since the last record (a "train" record)."""
        means = {k: v / self.window_n for k, v in self.window.items()}
        if self.window_ratio is not None:
            means["grad_ratio"] = self.window_ratio
            self.epoch_sums["grad_ratio_sum"] = self.epoch_sums.get("grad_ratio_sum", 0.0) + self.window_ratio
            self.epoch_sums["grad_ratio_n"] = self.epoch_sums.get("grad_ratio_n", 0) + 1
        lr = self.optimizer.param_groups[0]["lr"]
        now = time.perf_counter()
        elapsed = max(now - self.window_started, 1e-9)
        timing = {"window_seconds": round(elapsed, 3), "data_share": round(self.window_wait / elapsed, 4)}
        self.logger.log("train", self.step, epoch=self.epoch, lr=lr, **means, **timing)
        self.window, self.window_n, self.window_ratio = {}, 0, None
        self.window_wait, self.window_started = 0.0, now
        if progress is not None and task is not None:
            shown = " ".join(
                f"{k} {v:.3f}" for k, v in means.items() if k in ("loss", "ctc", "kt", "grad_ratio")
            )
            progress.update(task, terms=f"{shown} lr {lr:.2e}")
