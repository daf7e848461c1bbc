"""Training on a shared machine: the demo distill step time with the cores to itself and with a competing
process busy on one core, for 2 threads, 1 thread and gmot's automatic choice (train.threads=0), and with
OpenMP's active or passive wait policy.

    python benchmarks/bench_shared.py [--quick] [--steps N]

Each cell runs in a fresh child process (the wait policy is read when OpenMP starts): build the demo model
and synthetic batches (benchmarks/bench_train.py's), take 2 warm-up steps, then time N steps and print the
median. Steps run in the precision training picks on this CPU (bf16 where it has native bf16). The
competitor is a Python busy loop started before the child and stopped after it. Run it on an
otherwise idle machine: the point is the difference between the rows, and other load changes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(threads: int, steps: int) -> dict[str, float]:
    """In the child: time `steps` demo distill steps with `threads` torch threads (0: gmot's choice)."""
    import torch
    from bench_train import SHAPES, make_batches, train_step  # this script's folder: sys.path[0]

    from models.engine.distributed import cpu_threads
    from models.nn.encoder import PRESETS, ConformerCTC
    from models.nn.transfer_loss import GMOTConfig, GMOTLoss

    chosen = cpu_threads(threads) or torch.get_num_threads()
    torch.set_num_threads(chosen)
    shape = SHAPES["demo"]
    batches = make_batches(shape, 12000, steps + 2, seed=0)
    torch.manual_seed(0)
    model = ConformerCTC(PRESETS["demo"], shape.vocab, shape.plm_width).train()
    kt = GMOTLoss(GMOTConfig(centre=True, tot_weight=0.5), torch.zeros(384), torch.ones(384))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = torch.device("cpu")
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        train_step(model, opt, batch, kt, device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"threads": chosen, "median_s": statistics.median(times), "max_s": max(times)}


def run_cell(threads: int, steps: int, policy: str, competitor: bool) -> dict[str, float]:
    """One cell in a child process, with or without a busy competitor."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    env.pop("OMP_NUM_THREADS", None)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if competitor else None
    try:
        if busy is not None:
            time.sleep(2.0)  # let the load average see it (gmot's automatic choice reads it)
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(threads), "--steps", str(steps)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Print the table of median step times; 0 on success."""
    p = argparse.ArgumentParser(prog="benchmarks/bench_shared.py", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per cell (default 6)")
    p.add_argument("--quick", action="store_true", help="3 steps per cell, active policy only")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(a.child, a.steps)))
        return 0
    steps = 3 if a.quick else a.steps
    policies = ["active"] if a.quick else ["active", "passive"]
    import torch

    from models.engine.precision import choose_precision

    precision = choose_precision(torch.device("cpu"), True)
    print(
        f"demo distill step, {os.cpu_count()} cores, {precision} (as training picks it), {steps} timed steps "
        "per cell (median s / worst s)"
    )
    print("| competitor | wait policy | threads asked | threads used | median s | worst s |")
    print("|---|---|---|---|---|---|")
    for competitor in (False, True):
        for policy in policies:
            for threads in (2, 1, 0):
                r = run_cell(threads, steps, policy, competitor)
                asked = "auto" if threads == 0 else str(threads)
                print(
                    f"| {'1 busy core' if competitor else 'none'} | {policy} | {asked} | {r['threads']} | "
                    f"{r['median_s']:.2f} | {r['max_s']:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
