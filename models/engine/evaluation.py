"""The dev pass and the checkpoint average: greedy CER and CTC loss on the dev split (`_dev_cer`, ranks score
disjoint shares and sum the counts; with a transfer loss rank 0 also scores the dev plans against the CTC
forced alignment, models.engine.diagnostics), the best epoch checkpoints by dev CER (`_best`), and avg.pt,
their mean, written at the end of a run (`_average`) unless the one there is current.

`EvaluationMixin` is part of `models.engine.training.Trainer`: it reads the model, the dev set and the
experiment folder, and writes the outcome's average and dev_alignment (models.engine.trainer_base declares
them).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from data.loader import bucket_batches, collate
from data.scoring import score_pairs
from models.engine.checkpoint import AVERAGE_NAME, average_checkpoints, load_checkpoint, save_checkpoint
from models.engine.diagnostics import AlignmentMeter, score_batch_plans
from models.engine.distributed import all_reduce, unwrap
from models.engine.precision import autocast_for
from models.engine.run_log import METRICS, read_index
from models.engine.trainer_base import TrainerBase
from models.nn.ctc import ctc_losses, greedy_ctc


class EvaluationMixin(TrainerBase):
    """Scores the Trainer's model on dev and averages its best checkpoints."""

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
        model = unwrap(self.model)
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
                    [r.token_ids for r in records], [r.text for r in records],
                    [list(r.plm.tokens) if r.plm is not None else [] for r in records], meter,
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
        unwrap(self.model).load_state_dict(saved["model"])
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
            model = unwrap(self.model)
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
