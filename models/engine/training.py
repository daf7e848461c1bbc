"""The training engine shared by `gmot pretrain` (gmot.mode = none) and `gmot distill` (wd / fgw ...).

loss = ctc + lambda * kt, where kt is `models.nn.transfer_loss.GMOTLoss` between the adapter output and the
PLM token features of the transcript, read from the prepare cache (computed online only when train.plm names a
teacher).

What a run does, in order: build the model (or resume from the newest checkpoint in EXP_DIR, or initialise
from `--init-from`), write config.yaml and command.txt, then per epoch: train over duration-bucketed batches
(AdamW, warm-up + decay, gradient clipping and accumulation, mixed precision), a dev pass with greedy CER and
the plan diagnostics, a checkpoint with full state; at the end, avg.pt = the mean of the best n epoch
checkpoints by dev CER. This module is the loop (`Trainer.run`, `_train_epoch`); the Trainer is made of the
parts beside it, one mixin each: models.engine.train_data (the data, what is left out, the teacher controls),
models.engine.run_state (the model built, resumed and saved), models.engine.step (the loss step, its NaN /
infinite-CTC / out-of-memory handling), models.engine.evaluation (the dev pass, avg.pt); the attributes
they share are declared in models.engine.trainer_base. Its other pieces:
models.engine.distributed (ranks, devices), models.engine.precision (autocast and the fp16 scaler),
models.engine.schedule (learning rate, kt ramp), models.nn.ctc (CTC and which transcripts it can align),
models.engine.run_log (metrics.jsonl, the checkpoint index, command lines, progress), models.engine.outcome
(TrainOutcome, TrainingError; TrainingSetupError when the run cannot start).

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

import gc
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader

from data.loader import collate
from models.engine.allocator import keep_freed_memory
from models.engine.checkpoint import checkpoint_path, remove_temporaries
from models.engine.config import ExperimentConfig, dump_config
from models.engine.diagnostics import alignment_warning
from models.engine.distributed import (
    DeviceError,
    all_reduce,
    cpu_threads,
    init_distributed,
    launch_info,
    pick_device,
)
from models.engine.evaluation import EvaluationMixin
from models.engine.outcome import TrainingError, TrainingSetupError, TrainOutcome
from models.engine.preemption import Preempted, StopSignals, ignore_stop_signals
from models.engine.run_log import INDEX, MetricsLogger, read_index, record_command, training_progress
from models.engine.run_state import RunStateMixin
from models.engine.step import MicroBatch, StepMixin
from models.engine.train_data import TrainDataMixin
from models.engine.trainer_base import TrainerBase

__all__ = ["CONFIG", "TrainOutcome", "Trainer", "TrainingError", "TrainingSetupError", "train"]

CONFIG = "config.yaml"


# ----------------------------------------------------------------------------------------------------------
# pieces


def _batch_seed(seed: int, epoch: int, position: int) -> int:
    """A reproducible seed for the batch at `position` of `epoch`'s global order."""
    return (seed * 1_000_003 + epoch * 100_003 + position * 7919) % (2**63 - 1)


def _batches(loader: DataLoader, trainer: TrainerBase) -> Iterator[dict[str, Any]]:
    """The batches of `loader`, adding the seconds spent waiting for each (reading, SpecAugment and collating
    in this process, or waiting for the loader's workers) to trainer.window_wait and trainer.epoch_wait.

    The loader's worker processes are shut down however the iteration ends. An error raised in a worker (a
    damaged shard) keeps the loader's iterator alive through its traceback, and a worker left running would
    make the interpreter wait for it forever at exit."""
    batches = iter(loader)
    try:
        while True:
            asked = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            waited = time.perf_counter() - asked
            trainer.window_wait += waited
            trainer.epoch_wait += waited
            yield batch
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator only
        if shutdown is not None:
            shutdown()


def _flushes_subnormals() -> bool:
    """Whether the CPU currently flushes subnormal float32 results to zero (torch.set_flush_denormal)."""
    tiny = torch.tensor([1e-38], dtype=torch.float32)
    return bool((tiny * 1e-3).item() == 0.0)


class Trainer(TrainDataMixin, RunStateMixin, StepMixin, EvaluationMixin):
    """One training run from a prepared folder into an experiment folder; `run()` trains, returns the outcome.

    `init_from`: a checkpoint whose encoder weights initialise the model (vocabulary and widths must match;
    the adapter may be new) unless EXP_DIR already holds checkpoints: then the run resumes from the newest.
    `command`: the command line to record (default sys.argv). `progress`: show a rich progress bar (rank 0).

    The loop is here; the methods it calls come from the mixins (models.engine.train_data, run_state, step,
    evaluation), which share the Trainer's attributes.
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
            raise TrainingSetupError(str(err)) from None
        self.dd = init_distributed(self.dd, self.device)
        self.mode = str(cfg.gmot.mode)
        self.use_kt = self.mode != "none"
        self.outcome = TrainOutcome(self.exp_dir, 0, 0, None)

    def _say(self, text: str) -> None:
        if self.dd.main:
            self.console.print(text)

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

    def load(self) -> None:
        """Read the prepared folder (manifests, vocabulary, teacher features, the knowledge control) and build
        the model, optimiser and loss; writes nothing. What `train()` does first; diagnostics that need the
        trainer's batches and model without training call it alone."""
        self._load_data()
        self._build()

    def _run(self) -> TrainOutcome:
        t = self.cfg.train
        self.load()
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
                    self.epoch_wait = 0.0
                    self._train_epoch(progress)
                    train_seconds = time.time() - started
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
                        train_seconds=round(train_seconds, 2),
                        data_seconds=round(self.epoch_wait, 2),
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

    # --- an epoch -----------------------------------------------------------------------------------------

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
        pending: list[MicroBatch] = []
        self.window, self.window_n, self.window_ratio = {}, 0, None
        self.window_wait, self.window_started = 0.0, time.perf_counter()
        for batch in _batches(loader, self):
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
