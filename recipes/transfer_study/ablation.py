"""The GM-OT ablation: every transfer variant from ONE pretrained start, at the same budget of updates.

    python recipes/transfer_study/ablation.py DATA_DIR OUT_DIR [--init-from CKPT | --pretrain-epochs N]
        [--epochs E] [--seeds 0,1,2] [--runs baseline,wd,fgw-cosine,fgw-temporal,fgw-hybrid,fgw-tot]
        [--preset demo] [--set key=value ...] [--variant NAME=BASE:key=value,... ...] [--tot-weight W]
        [--report FILE] [--device auto|cpu|cuda] [--threads N] [--quick] [--jobs N] [--untrained-data DIR]
        [--collect]

The start is a given checkpoint (`--init-from`) or one this script pretrains into OUT_DIR/pretrain (CTC only,
`--pretrain-epochs`, seed `--pretrain-seed`). From it each run trains `--epochs` epochs per seed with the same
preset, batching and schedule, so every run makes the same number of optimiser updates:

| run | what changes (config overrides) |
|---|---|
| baseline | gmot.mode=none: the pretrained model continued without transfer (the control) |
| wd | gmot.mode=wd: plain entropic Wasserstein OT to the PLM tokens (alpha = 0, the ASRU 2023 method) |
| fgw-cosine, fgw-temporal, fgw-hybrid | gmot.mode=fgw (GM-OT) with that graph structure |
| fgw-tot | GM-OT (cosine) plus the temporal-order prior gmot.tot_weight = `--tot-weight` |

`--variant` adds a sweep arm: NAME runs BASE's overrides plus its own (e.g.
`--variant fgw-w2=fgw-cosine:train.kt_weight=2`), reported in the same table.
`--set` options apply to every run (the pretraining included, except gmot keys there) before the run's own
overrides. Each run then greedy-decodes the test split (no PLM) and scores its CER (data.scoring); its dev CER
is the trainer's dev CER of the model decoded (avg.pt, else the last epoch). A run's wall time is that of the
invocation that finished it (training + decoding).

Runs are resumable: each lives in OUT_DIR/runs/<run>-seed<k> (an interrupted one resumes from its newest
checkpoint) and a finished one's result.json is reused when its start checkpoint, overrides and epochs match.
Writes OUT_DIR/ablation.json (every run and the summary) and a markdown report (`--report`, default
recipes/transfer_study/results/ablation.md) with the table, the exact command, the machine and the settings.
The knowledge controls (docs/transfer.md) are the arms `fgw-shuffle`, `fgw-random`, `fgw-random-units` and
`fgw-untrained` (the last trains on `--untrained-data DIR`, the corpus prepared with --plm untrained:...).
`--collect` trains nothing: it writes ablation.json and the report from the runs that have finished (a study
stopped part way). `--jobs N` trains N runs at once, each in a worker process of this script with one thread
(logs in OUT_DIR/logs), then collects them; on a 2-core CPU two 1-thread processes do about 1.3x the work
of one 2-thread process. `--quick` is a smoke run: 1 pretrain epoch, 1 epoch per run, the first seed only,
dev and test capped.

This script is longer than the project's 500 lines because it is one file on purpose: `--jobs` re-runs this
very file as its worker processes, and the tests load it by its path, where sibling modules of a recipe folder
(not a package) would not be importable without putting the folder on sys.path.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from data.scoring import ScoringError, score_transcripts
from data.store import StoreError, file_sha256, read_plm_info
from models.engine.checkpoint import CheckpointError, load_model, resolve_checkpoint
from models.engine.config import ConfigError, ExperimentConfig, config_to_dict, resolve_config
from models.engine.training import TrainingError, train
from models.nn.ctc import greedy_ctc
from models.tasks.decoding import split_utterances, transcribe, write_hypotheses
from models.tasks.search import DecodingError

DEFAULT_REPORT = Path(__file__).resolve().parent / "results" / "ablation.md"
SCRATCH = "scratch"  # the start "checkpoint hash" of runs trained from random weights (--from-scratch)
DIAGNOSTICS = ("align_lift", "align_order", "align_entropy", "grad_ratio")
RESULT = "result.json"
START_MARKER = "ablation_start.json"
QUICK_DEV_UTTS = 20
QUICK_TEST_UTTS = 50
UNTRAINED = "fgw-untrained"  # the arm that reads --untrained-data (prepared with --plm untrained:...)


@dataclass(frozen=True)
class RunSpec:
    """One arm of the ablation: a name, what it is, and its config overrides (dotted key -> value)."""

    name: str
    description: str
    overrides: dict[str, Any]


def run_specs(tot_weight: float) -> dict[str, RunSpec]:
    """The known runs by name; `tot_weight` is the temporal-order prior weight of `fgw-tot`."""
    # the arms before the transfer study: no centring and no order prior (no longer the defaults)
    fgw = {"gmot.mode": "fgw", "gmot.tot_weight": 0.0, "gmot.centre": False}
    specs = [
        RunSpec("baseline", "no transfer (CTC only)", {"gmot.mode": "none"}),
        RunSpec(
            "wd",
            "Wasserstein OT (alpha = 0)",
            {"gmot.mode": "wd", "gmot.tot_weight": 0.0, "gmot.centre": False},
        ),
        RunSpec("fgw-cosine", "GM-OT, cosine structure", {**fgw, "gmot.structure": "cosine"}),
        RunSpec("fgw-temporal", "GM-OT, temporal structure", {**fgw, "gmot.structure": "temporal"}),
        RunSpec("fgw-hybrid", "GM-OT, hybrid structure", {**fgw, "gmot.structure": "hybrid"}),
        RunSpec(
            "fgw-tot",
            f"GM-OT, cosine + temporal-order prior ({tot_weight:g})",
            {
                "gmot.mode": "fgw",
                "gmot.structure": "cosine",
                "gmot.tot_weight": tot_weight,
                "gmot.centre": False,
            },
        ),
        RunSpec(
            "fgw-centred",
            "GM-OT, cosine, teacher tokens centred per utterance",
            {**fgw, "gmot.structure": "cosine", "gmot.centre": True},
        ),
        RunSpec(
            "fgw-centred-tot",
            f"GM-OT, cosine, centred tokens + temporal-order prior ({tot_weight:g})",
            {
                "gmot.mode": "fgw",
                "gmot.structure": "cosine",
                "gmot.centre": True,
                "gmot.tot_weight": tot_weight,
            },
        ),
        RunSpec(
            "wd-centred-tot",
            f"Wasserstein OT, centred tokens + temporal-order prior ({tot_weight:g})",
            {"gmot.mode": "wd", "gmot.centre": True, "gmot.tot_weight": tot_weight},
        ),
    ]
    # the knowledge controls (issue "is it the language model?"): fgw-centred-tot with the teacher's
    # knowledge removed and everything else kept (data.teacher_controls)
    gmot = next(s for s in specs if s.name == "fgw-centred-tot").overrides
    specs += [
        RunSpec(
            "fgw-shuffle",
            "control: GM-OT (centred + prior) given another sentence's teacher features, same token count",
            {**gmot, "gmot.teacher": "shuffle"},
        ),
        RunSpec(
            "fgw-random",
            "control: GM-OT (centred + prior) given fixed Gaussian vectors of the teacher's shape",
            {**gmot, "gmot.teacher": "random"},
        ),
        RunSpec(
            "fgw-random-units",
            "GM-OT (centred + prior) to one fixed Gaussian vector per character: no PLM at all",
            {**gmot, "gmot.teacher": "random_units"},
        ),
        RunSpec(
            UNTRAINED,
            "control: GM-OT (centred + prior) from an untrained teacher (same architecture and tokenizer)",
            dict(gmot),
        ),
    ]
    return {s.name: s for s in specs}


def parse_variant(text: str, known: dict[str, RunSpec]) -> RunSpec:
    """A sweep arm from `NAME=BASE:key=value,key=value`: run BASE's overrides plus these, under NAME.

    E.g. `fgw-w2=fgw-cosine:train.kt_weight=2,gmot.alpha=0.3`. Raises ValueError naming what is wrong.
    """
    name, sep, rest = text.partition("=")
    base, sep2, pairs = rest.partition(":")
    name, base = name.strip(), base.strip()
    if not sep or not sep2 or not name or not pairs.strip():
        raise ValueError(f"--variant {text!r}: expected NAME=BASE:key=value[,key=value...]")
    if name in known:
        raise ValueError(f"--variant {text!r}: the name {name!r} is already a run")
    if base not in known:
        raise ValueError(f"--variant {text!r}: unknown base run {base!r}; choose from {', '.join(known)}")
    extra: dict[str, Any] = {}
    for pair in pairs.split(","):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"--variant {text!r}: {pair!r} is not key=value")
        extra[key.strip()] = value.strip()
    spec = known[base]
    desc = f"{spec.description}; {', '.join(f'{k}={v}' for k, v in extra.items())}"
    return RunSpec(name, desc, {**spec.overrides, **extra})


class AblationError(RuntimeError):
    """A problem the user must fix (bad option, an OUT_DIR run from other settings); exit code 2."""


class WorkerError(RuntimeError):
    """A run trained in a worker process (`--jobs`) failed; its log names the cause; exit code 1."""


# ----------------------------------------------------------------------------------------------------------
# small helpers


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented UTF-8 JSON to `path` atomically (temp file + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def machine_info() -> dict[str, Any]:
    """CPU model (from /proc/cpuinfo), logical cores, torch version and threads, Python, platform, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value) of `values`."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def overrides_list(overrides: dict[str, Any]) -> list[str]:
    """{"gmot.mode": "wd"} -> ["gmot.mode=wd"] (the --set form)."""
    return [f"{k}={v}" for k, v in overrides.items()]


# ----------------------------------------------------------------------------------------------------------
# the ablation


@dataclass
class Options:
    """Parsed command line (see `parse_args`)."""

    data_dir: Path
    out_dir: Path
    init_from: Path | None
    from_scratch: bool
    pretrain_epochs: int
    pretrain_seed: int
    epochs: int
    seeds: list[int]
    runs: list[str]
    variants: dict[str, RunSpec]
    preset: str
    sets: list[str]
    tot_weight: float
    report: Path
    device: str
    threads: int
    dev_max_utts: int
    test_max_utts: int
    progress: bool
    quick: bool
    command: str
    argv: list[str]
    jobs: int = 1
    only: tuple[str, int] | None = None
    untrained_data: Path | None = None
    collect: bool = False

    def data_for(self, run: str) -> Path:
        """The prepared folder run `run` trains on: --untrained-data for the untrained-teacher arm."""
        if run == UNTRAINED:
            if self.untrained_data is None:
                raise AblationError(
                    f"the {UNTRAINED} arm needs --untrained-data: a folder prepared like DATA_DIR with "
                    "--plm untrained:<teacher>"
                )
            return self.untrained_data
        return self.data_dir


def parse_args(argv: list[str]) -> Options:
    """Parse the command line (argparse exits 2 on a bad option); `--quick` shrinks sizes."""
    p = argparse.ArgumentParser(
        prog="recipes/transfer_study/ablation.py",
        description="GM-OT ablation: baseline, WD and FGW variants from one pretrained start, several seeds.",
    )
    p.add_argument("data_dir", type=Path, help="prepared data folder (gmot prepare)")
    p.add_argument("out_dir", type=Path, help="output folder (pretrain/, runs/, ablation.json); resumable")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init-from", type=Path, help="start checkpoint (.pt or an experiment folder)")
    start.add_argument("--pretrain-epochs", type=int, help="pretrain the start for N epochs (default 3)")
    start.add_argument(
        "--from-scratch",
        action="store_true",
        help="no common start: each run trains --epochs epochs from random weights (transfer throughout)",
    )
    p.add_argument("--pretrain-seed", type=int, default=0, help="seed of the pretraining (default 0)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of every run from the start (default 1)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--runs", default=",".join(run_specs(0.5)), help="comma-separated runs (default all)")
    p.add_argument("--preset", default="demo", help="model/training preset: tiny | demo | aishell1")
    p.add_argument("--set", dest="sets", action="append", default=[], help="key=value for every run")
    p.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        help="an extra run NAME=BASE:key=value,... (BASE's overrides plus these); added to --runs",
    )
    p.add_argument("--tot-weight", type=float, default=0.5, help="gmot.tot_weight of fgw-tot (default 0.5)")
    p.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="markdown report file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dev-max-utts", type=int, default=0, help="dev utterances scored per epoch (0: all)")
    p.add_argument("--test-max-utts", type=int, default=0, help="test utterances decoded (0: all)")
    p.add_argument("--no-progress", action="store_true", help="no training progress bars")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each a process with 1 thread (2 on 2 cores: about 1.3x the throughput)",
    )
    p.add_argument(
        "--untrained-data",
        type=Path,
        help=f"the {UNTRAINED} arm's data: DATA_DIR's corpus prepared with --plm untrained:<teacher>",
    )
    p.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: write ablation.json and the report from the runs that have finished",
    )
    p.add_argument("--only", help=argparse.SUPPRESS)  # RUN@SEED: one worker of --jobs
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 1 seed, dev/test capped")
    a = p.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds expects comma-separated integers, got {a.seeds!r}")
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    known = run_specs(a.tot_weight)
    variants: dict[str, RunSpec] = {}
    for text in a.variants:
        try:
            spec = parse_variant(text, {**known, **variants})
        except ValueError as err:
            p.error(str(err))
        variants[spec.name] = spec
    known = {**known, **variants}
    runs += [name for name in variants if name not in runs]
    unknown = [r for r in runs if r not in known]
    if unknown:
        p.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if not seeds or not runs:
        p.error("give at least one seed and one run")
    pretrain_epochs = 3 if a.pretrain_epochs is None else a.pretrain_epochs
    epochs, dev_cap, test_cap = a.epochs, a.dev_max_utts, a.test_max_utts
    if a.quick:
        pretrain_epochs, epochs, seeds = 1, 1, seeds[:1]
        dev_cap = dev_cap or QUICK_DEV_UTTS
        test_cap = test_cap or QUICK_TEST_UTTS
    if min(pretrain_epochs, epochs) < 1:
        p.error("--epochs and --pretrain-epochs must be at least 1")
    if a.jobs < 1:
        p.error("--jobs must be at least 1")
    only = None
    if a.only is not None:
        name, _, seed_text = a.only.partition("@")
        if name not in known or not seed_text.lstrip("-").isdigit():
            p.error(f"--only expects RUN@SEED, got {a.only!r}")
        only = (name, int(seed_text))
    return Options(
        data_dir=a.data_dir,
        out_dir=a.out_dir,
        init_from=a.init_from,
        from_scratch=a.from_scratch,
        pretrain_epochs=pretrain_epochs,
        pretrain_seed=a.pretrain_seed,
        epochs=epochs,
        seeds=seeds,
        runs=list(dict.fromkeys(runs)),
        variants=variants,
        preset=a.preset,
        sets=list(a.sets),
        tot_weight=a.tot_weight,
        report=a.report,
        device=a.device,
        threads=a.threads,
        dev_max_utts=dev_cap,
        test_max_utts=test_cap,
        progress=not a.no_progress,
        quick=a.quick,
        command=shlex.join(["python", "recipes/transfer_study/ablation.py", *argv]),
        argv=list(argv),
        jobs=a.jobs,
        only=only,
        untrained_data=a.untrained_data,
        collect=a.collect,
    )


def run_config(opt: Options, spec: RunSpec, seed: int) -> ExperimentConfig:
    """The resolved config of one run: preset, every --set, the run's overrides, epochs, seed, dev cap."""
    extra = {**spec.overrides, "train.epochs": opt.epochs, "train.seed": seed}
    if opt.threads > 0:  # the trainer's own choice of threads (train.threads 0) must not override --threads
        extra["train.threads"] = opt.threads
    if opt.dev_max_utts:
        extra["train.dev_max_utts"] = opt.dev_max_utts
    return resolve_config(opt.preset, None, opt.sets, extra)


def pretrained_start(opt: Options, console: Console) -> tuple[Path | None, str]:
    """The start checkpoint and its SHA-256: `--init-from`, or OUT_DIR/pretrain trained (or reused) here;
    (None, "scratch") with --from-scratch."""
    if opt.from_scratch:
        return None, SCRATCH
    if opt.init_from is not None:
        path = resolve_checkpoint(opt.init_from)
        if not path.is_file():
            raise AblationError(f"--init-from {opt.init_from}: no such checkpoint")
        return path, file_sha256(path)
    exp = opt.out_dir / "pretrain"
    marker = exp / START_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        path = Path(done["checkpoint"])
        same = done.get("epochs") == opt.pretrain_epochs and path.is_file()
        if same and file_sha256(path) == done["sha256"]:
            console.print(f"pretrained start: reusing {path} ({done['epochs']} epochs)", highlight=False)
            return path, done["sha256"]
    sets = [s for s in opt.sets if not s.strip().startswith("gmot.")]
    extra: dict[str, Any] = {
        "gmot.mode": "none",
        "train.epochs": opt.pretrain_epochs,
        "train.seed": opt.pretrain_seed,
    }
    if opt.dev_max_utts:
        extra["train.dev_max_utts"] = opt.dev_max_utts
    cfg = resolve_config(opt.preset, None, sets, extra)
    console.print(f"pretraining the start: {opt.pretrain_epochs} epoch(s) into {exp}", highlight=False)
    train(
        opt.data_dir,
        exp,
        cfg,
        device=opt.device,
        command=shlex.split(opt.command),
        console=Console(stderr=True),
        progress=opt.progress,
    )
    path = resolve_checkpoint(exp)
    sha = file_sha256(path)
    write_json(marker, {"checkpoint": str(path), "sha256": sha, "epochs": opt.pretrain_epochs})
    return path, sha


def decode_test(run_dir: Path, opt: Options, device: str, data_dir: Path) -> dict[str, Any]:
    """Greedy-decode the test split with the run's model (avg.pt, else the newest checkpoint); score CER.

    Writes run_dir/decode_test (text, details.jsonl, rtf.json). Returns cer, errors, ref_chars, utterances,
    rtf, checkpoint.
    """
    loaded = load_model(run_dir, device=device)
    utts, refs = split_utterances(data_dir / "test")
    if opt.test_max_utts:
        utts = utts[: opt.test_max_utts]
    if not utts:
        raise AblationError(f"the test split of {data_dir} is empty")
    hyps = transcribe(
        loaded.model, loaded.vocab, loaded.cmvn_mean, loaded.cmvn_std, utts, greedy_ctc, device=device
    )
    kept = {h.id: refs.get(h.id, "") for h in hyps}
    result = score_transcripts(kept, {h.id: h.text for h in hyps}, "char")
    audio = sum(h.duration for h in hyps)
    rtf = sum(h.decode_time for h in hyps) / audio if audio > 0 else math.nan
    summary = {
        "checkpoint": str(loaded.path),
        "method": "greedy",
        "utterances": len(hyps),
        "cer": result.rate,
        "errors": result.errors,
        "ref_chars": result.ref_len,
        "rtf": rtf,
    }
    write_hypotheses(run_dir / "decode_test", hyps, summary)
    return summary


def run_diagnostics(run_dir: Path) -> dict[str, float]:
    """The transfer diagnostics of a run's last epoch record in metrics.jsonl (models.engine.diagnostics):
    align_lift, align_order, align_entropy (dev plans vs. the CTC forced alignment) and grad_ratio (kt/ctc
    gradient norms at the adapter's block); the keys the run did not log are left out."""
    path = run_dir / "metrics.jsonl"
    last: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if row.get("event") == "epoch":
                last = row
    return {k: float(last[k]) for k in DIAGNOSTICS if isinstance(last.get(k), (int, float))}


def run_settings(opt: Options, spec: RunSpec, start: tuple[Path | None, str]) -> dict[str, Any]:
    """What a finished run must have been run with to be reused: overrides, preset, --set options, epochs,
    start checkpoint, dev/test caps, and its data folder where it is not DATA_DIR."""
    wanted: dict[str, Any] = {
        "overrides": overrides_list(spec.overrides),
        "preset": opt.preset,
        "sets": list(opt.sets),
        "epochs": opt.epochs,
        "init_sha256": start[1],
        "dev_max_utts": opt.dev_max_utts,
        "test_max_utts": opt.test_max_utts,
    }
    data_dir = opt.data_for(spec.name)
    if data_dir != opt.data_dir:
        wanted["data_dir"] = str(data_dir)
    return wanted


def finished_result(run_dir: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The result of the finished run in `run_dir` (its result.json), None when it has not finished;
    AblationError when it finished with settings other than `wanted`."""
    result_file = run_dir / RESULT
    if not result_file.is_file():
        return None
    old = json.loads(result_file.read_text(encoding="utf-8"))
    differs = [k for k, v in wanted.items() if old.get(k) != v]
    if differs:
        raise AblationError(
            f"{run_dir} holds a finished run with other settings ({', '.join(differs)} differ); "
            "use another OUT_DIR or delete that folder"
        )
    return old


def one_run(
    opt: Options, spec: RunSpec, seed: int, start: tuple[Path | None, str], device: str, console: Console
) -> tuple[dict[str, Any], bool]:
    """Train (or resume) and score one run x seed; returns (its result dict, whether it was reused)."""
    run_dir = opt.out_dir / "runs" / f"{spec.name}-seed{seed}"
    cfg = run_config(opt, spec, seed)
    data_dir = opt.data_for(spec.name)
    wanted = run_settings(opt, spec, start)
    finished = finished_result(run_dir, wanted)
    if finished is not None:
        return finished, True
    started = time.perf_counter()
    outcome = train(
        data_dir,
        run_dir,
        cfg,
        init_from=start[0],
        device=opt.device,
        command=shlex.split(opt.command),
        console=Console(stderr=True),
        progress=opt.progress,
    )
    trained = time.perf_counter()
    decoded = decode_test(run_dir, opt, device, data_dir)
    wall = time.perf_counter() - started
    if outcome.average_cer is not None:
        dev_cer = outcome.average_cer
    elif outcome.dev_cer:
        dev_cer = outcome.dev_cer[max(outcome.dev_cer)]
    else:
        dev_cer = None
    result = {
        "run": spec.name,
        "description": spec.description,
        "seed": seed,
        **wanted,
        "init_checkpoint": None if start[0] is None else str(start[0]),
        "config": config_to_dict(cfg),
        "steps": outcome.step,
        "test_cer": decoded["cer"],
        "test_errors": decoded["errors"],
        "test_chars": decoded["ref_chars"],
        "test_utterances": decoded["utterances"],
        "dev_cer": dev_cer,
        "model": decoded["checkpoint"],
        "train_seconds": round(trained - started, 2),
        "wall_seconds": round(wall, 2),
        "rtf": decoded["rtf"],
        **run_diagnostics(run_dir),
    }
    write_json(run_dir / RESULT, result)
    return result, False


def collected(opt: Options, spec: RunSpec, seed: int, start: tuple[Path | None, str]) -> dict | None:
    """The finished result of run x seed (as `one_run` would reuse it), None when it has not finished."""
    run_dir = opt.out_dir / "runs" / f"{spec.name}-seed{seed}"
    return finished_result(run_dir, run_settings(opt, spec, start))


def summarise(results: list[dict[str, Any]], runs: list[str], specs: dict[str, RunSpec]) -> list[dict]:
    """Per run: seeds, test CER mean / sample std, dev CER mean, mean wall seconds, updates per run."""
    rows = []
    for name in runs:
        mine = [r for r in results if r["run"] == name]
        if not mine:
            continue
        test_mean, test_std = mean_std([r["test_cer"] for r in mine])
        devs = [r["dev_cer"] for r in mine if r["dev_cer"] is not None]
        dev_mean, dev_std = mean_std(devs) if devs else (None, None)
        diag = {}
        for key in DIAGNOSTICS:
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
            diag[key] = statistics.fmean(values) if values else None
        rows.append(
            {
                "run": name,
                "description": specs[name].description,
                "overrides": overrides_list(specs[name].overrides),
                "seeds": [r["seed"] for r in mine],
                "test_cer_mean": test_mean,
                "test_cer_std": test_std,
                "test_cer_per_seed": [r["test_cer"] for r in mine],
                "dev_cer_mean": dev_mean,
                "dev_cer_std": dev_std,
                "dev_cer_per_seed": devs,
                **diag,
                "wall_seconds_mean": statistics.fmean(r["wall_seconds"] for r in mine),
                "steps": sorted({r["steps"] for r in mine}),
            }
        )
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def settings_of(opt: Options, start: tuple[Path, str]) -> dict[str, Any]:
    """The settings the report lists: the GM-OT options, adapter / PLM layer, kt weight, epochs, start."""
    probe = run_config(opt, run_specs(opt.tot_weight)["fgw-cosine"], opt.seeds[0])
    try:
        plm = read_plm_info(opt.data_dir / "lang")
    except (StoreError, OSError):
        plm = None
    return {
        "preset": opt.preset,
        "alpha": probe.gmot.alpha,
        "epsilon": probe.gmot.epsilon,
        "solver": probe.gmot.solver,
        "outer_iter": probe.gmot.outer_iter,
        "inner_iter": probe.gmot.inner_iter,
        "terms": probe.gmot.terms,
        "adapter_layer": probe.model.adapter_layer,
        "plm": None if plm is None else plm.name,
        "plm_layer": None if plm is None else plm.layer,
        "kt_weight": probe.train.kt_weight,
        "tot_weight": opt.tot_weight,
        "epochs": opt.epochs,
        "pretrain_epochs": None if opt.init_from is not None or opt.from_scratch else opt.pretrain_epochs,
        "lr": probe.train.lr,
        "schedule": probe.train.schedule,
        "seeds": opt.seeds,
        "sets": opt.sets,
        "dev_max_utts": opt.dev_max_utts,
        "test_max_utts": opt.test_max_utts,
        "start_checkpoint": "none (every run from random weights)" if start[0] is None else str(start[0]),
        "start_sha256": start[1],
    }


def markdown_report(
    summary: list[dict], settings: dict, machine: dict, command: str, date: str, timing: str = ""
) -> str:
    """The report: table (mean / std of test CER per run over seeds), command, machine, date, settings;
    `timing` (a sentence on the wall time) goes under the command."""
    lines = [
        "# GM-OT ablation",
        "",
        f"Date: {date}",
        "",
        (
            "Every run trains from random weights for the same number of updates (the transfer throughout);"
            if str(settings.get("start_checkpoint", "")).startswith("none")
            else "Every run starts from the same pretrained checkpoint and trains the same number of updates;"
        ),
        "the test split is decoded greedily (no PLM). CER in %; std is the sample standard deviation over",
        "seeds. Diagnostics (last epoch, mean over seeds): lift = dev plan mass inside each token's CTC",
        "forced-alignment span over a uniform plan's (1 = aligns nothing), order = Spearman of token index",
        "against its plan-weighted mean frame (+1 forward, -1 backwards), H = plan entropy over uniform,",
        "grad = ||d(lambda kt)/dh|| / ||d ctc/dh|| at the adapter's block.",
        "",
        "| run | what | seeds | test CER mean | test CER std | per seed | dev CER mean | dev CER std | lift |"
        " order | H | grad | updates | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        per_seed = ", ".join(_pct(c) for c in row["test_cer_per_seed"])
        lines.append(
            f"| {row['run']} | {row['description']} | {len(row['seeds'])} | {_pct(row['test_cer_mean'])} | "
            f"{_pct(row['test_cer_std'])} | {per_seed} | {_pct(row['dev_cer_mean'])} | "
            f"{_pct(row.get('dev_cer_std'))} | {_num(row.get('align_lift'), '.2f')} | "
            f"{_num(row.get('align_order'), '+.2f')} | {_num(row.get('align_entropy'), '.2f')} | "
            f"{_num(row.get('grad_ratio'), '.3f')} | "
            f"{'/'.join(str(s) for s in row['steps'])} | {row['wall_seconds_mean']:.1f} |"
        )
    if summary:
        low = min(r["test_cer_mean"] for r in summary)
        best = ", ".join(f"**{r['run']}**" for r in summary if r["test_cer_mean"] == low)
        lines += ["", f"Lowest mean test CER: {best} ({_pct(low)} %)."]
    lines += ["", "## Command", "", "```", command, "```", ""]
    lines += [timing, ""] if timing else []
    lines += ["## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", "## Settings", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def print_table(summary: list[dict], console: Console) -> None:
    """The summary table with rich."""
    table = Table(title="GM-OT ablation: test CER % over seeds")
    for col in ("run", "what", "seeds", "mean", "std", "per seed", "dev mean", "updates", "wall s"):
        table.add_column(col, justify="left" if col in ("run", "what") else "right")
    for row in summary:
        table.add_row(
            row["run"],
            row["description"],
            str(len(row["seeds"])),
            _pct(row["test_cer_mean"]),
            _pct(row["test_cer_std"]),
            ", ".join(_pct(c) for c in row["test_cer_per_seed"]),
            _pct(row["dev_cer_mean"]),
            "/".join(str(s) for s in row["steps"]),
            f"{row['wall_seconds_mean']:.1f}",
        )
    console.print(table)


def run_in_workers(opt: Options, start: tuple[Path, str], console: Console) -> None:
    """Train the unfinished run x seed pairs in `opt.jobs` worker processes of this script (1 thread each,
    output in OUT_DIR/logs/RUN-seedS.log); the caller then collects every result as reused."""
    todo = [
        (name, seed)
        for seed in opt.seeds
        for name in opt.runs
        if not (opt.out_dir / "runs" / f"{name}-seed{seed}" / RESULT).is_file()
    ]
    if not todo:
        return
    logs = opt.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, str(Path(__file__).resolve()), *opt.argv, "--threads", "1", "--no-progress"]
    running: list[tuple[str, int, Path, subprocess.Popen]] = []
    failed: list[str] = []
    console.print(f"{len(todo)} run(s) to train, {opt.jobs} at a time (logs in {logs})", highlight=False)
    while todo or running:
        while todo and len(running) < opt.jobs:
            name, seed = todo.pop(0)
            log = logs / f"{name}-seed{seed}.log"
            with log.open("w", encoding="utf-8") as fh:
                cmd = [*base, "--jobs", "1", "--only", f"{name}@{seed}"]
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
            running.append((name, seed, log, proc))
        time.sleep(1.0)
        for item in list(running):
            name, seed, log, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode == 0:
                console.print(f"{name} seed {seed}: finished (log {log})", highlight=False)
            else:
                failed.append(f"{name} seed {seed} (exit code {proc.returncode}, see {log})")
    if failed:
        raise WorkerError("worker run(s) failed: " + "; ".join(failed))


def run_ablation(opt: Options, console: Console) -> dict[str, Any]:
    """Run every run x seed (reusing finished ones), write ablation.json and the report; return the json."""
    began = time.perf_counter()
    if opt.threads > 0:
        torch.set_num_threads(opt.threads)
    device = opt.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = {**run_specs(opt.tot_weight), **opt.variants}
    for name in opt.runs:  # config errors show before any training
        run_config(opt, specs[name], opt.seeds[0])
        opt.data_for(name)
    scratch_or_given = opt.from_scratch or opt.init_from is not None
    if opt.collect and not scratch_or_given and not (opt.out_dir / "pretrain" / START_MARKER).is_file():
        raise AblationError(f"--collect: {opt.out_dir} has no pretrained start yet")
    start = pretrained_start(opt, console)
    if opt.only is not None:  # a worker of --jobs: one run, no report
        name, seed = opt.only
        result, _ = one_run(opt, specs[name], seed, start, device, console)
        return result
    if opt.jobs > 1 and not opt.collect:
        run_in_workers(opt, start, console)
    results = []
    total = len(opt.runs) * len(opt.seeds)
    k = 0
    for seed in opt.seeds:
        for name in opt.runs:
            k += 1
            tag = f"[{k}/{total}] {name} seed {seed}"
            if opt.collect:
                found = collected(opt, specs[name], seed, start)
                if found is None:
                    console.print(f"{tag}: not finished, left out", highlight=False)
                else:
                    results.append(found)
                continue
            console.print(
                Text(f"{tag}: training {opt.epochs} epoch(s) from {start[0] or 'scratch'}", style="bold"),
                soft_wrap=True,
            )
            result, reused = one_run(opt, specs[name], seed, start, device, console)
            results.append(result)
            console.print(
                f"{tag}: test CER {_pct(result['test_cer'])} %, dev CER {_pct(result['dev_cer'])} %, "
                f"{result['steps']} updates, {result['wall_seconds']:.1f} s"
                + (" (reused)" if reused else ""),
                highlight=False,
            )
    summary = summarise(results, opt.runs, specs)
    machine = {
        **machine_info(),
        "jobs": f"{opt.jobs} (worker processes of 1 thread each)" if opt.jobs > 1 else 1,
    }
    settings = settings_of(opt, start)
    elapsed = time.perf_counter() - began
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = {
        "command": opt.command,
        "date": date,
        "data_dir": str(opt.data_dir),
        "machine": machine,
        "settings": settings,
        "runs": results,
        "summary": summary,
        "elapsed_seconds": round(elapsed, 1),
    }
    write_json(opt.out_dir / "ablation.json", out)
    timing = (
        f"This invocation took {elapsed / 60:.1f} min of wall time (runs finished by an earlier invocation "
        "are reused, not timed again)."
    )
    write_text(opt.report, markdown_report(summary, settings, machine, opt.command, date, timing))
    print_table(summary, console)
    console.print(f"wrote {opt.out_dir / 'ablation.json'} and {opt.report}", highlight=False)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 a training/data error, 2 a usage/config error)."""
    opt = parse_args(sys.argv[1:] if argv is None else list(argv))
    console = Console()
    err = Console(stderr=True)
    try:
        run_ablation(opt, console)
    except (ConfigError, AblationError) as e:
        err.print(Text(f"error: {e}", style="red"))
        return 2
    except (TrainingError, CheckpointError, StoreError, DecodingError, ScoringError, WorkerError) as e:
        err.print(Text(f"error: {e}", style="red"))
        return 1
    except KeyboardInterrupt:
        err.print(Text("interrupted; re-run the same command to resume", style="yellow"))
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
