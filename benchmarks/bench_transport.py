"""Benchmark: batched entropic FGW (models.ot.transport) against POT 0.9.7, forward + backward of the value.

Usage: python benchmarks/bench_transport.py [--quick] [--device cpu|cuda] [--repeats R] [--threads T]
       [--epsilon E] [--no-ott] [--interleaved]

For each (B, N, M) the same problems go to every solver: node features (B, N, 384) and (B, M, 384) drawn at
random; cost = graphs.cosine_cost, structures = graphs.structure_matrix(kind="cosine") (built once, outside
the timed region, as leaves that require grad); float32; alpha 0.5, epsilon 0.1 (--epsilon); 10 outer x 20
inner iterations for every solver, no tolerance. Timed: the solve plus ``value.sum().backward()`` into the
cost and both structures. Reported: median wall time over the repeats, and peak memory allocated during one
run (CPU: torch profiler memory events, i.e. tensors allocated by torch; CUDA: max_memory_allocated). The
solvers run in rounds, one run each, ours pgd next to OTT-JAX and ours ppa next to POT's batch solver; the
speed-up columns are medians over rounds of the ratio of those adjacent runs (the 2-core development VM's
speed drifts by a third over seconds, which a ratio of medians taken minutes apart does not cancel).

- equal lengths: ours (solver="ppa", the algorithm of POT's batch solver; and "pgd") vs
  ``ot.batch.solve_gromov_batch(..., max_iter=10, max_iter_inner=20, tol=0, tol_inner=0, grad="envelope")``;
- ragged (lengths uniform in [N/2, N] x [M/2, M]): ours on the padded batch vs a loop over pairs of
  ``ot.gromov.entropic_fused_gromov_wasserstein2(..., solver="PPA", max_iter=10, numItermax=20)`` (POT
  differentiates it by autograd through its iterations);
- OTT-JAX (optional column, when jax and ott-jax are importable; ``pip install ott-jax``, benchmark only):
  ``ott.solvers.quadratic.gromov_wasserstein.GromovWasserstein`` on the equal-length batch under
  ``jax.jit(jax.vmap(...))``, 10 outer x 20 inner (min = max iterations), objective scaled to ours
  (fused_penalty = (1 - alpha) / alpha, epsilon / alpha), the solve on stopped gradients and the value
  ``(1 - alpha) <C, T> + alpha GW(T)`` differentiated at the plan (the envelope gradient, as ours and POT's
  batch solver). With --threads 1 XLA is restricted to one thread (XLA_FLAGS, set before jax is imported);
  otherwise XLA uses its default (all cores).

`--interleaved` times each solver run the way training meets it: before every timed run (untimed) one
forward + backward of the demo preset's encoder on a batch of about 2,500 frames, so that each solve starts
from what a training step leaves behind (caches holding the encoder's activations, the allocator's free
lists, the thread pool asleep or busy) instead of from the previous solve's warm state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "5")
import ot
from rich.console import Console
from rich.table import Table

from models.ot.graphs import cosine_cost, structure_matrix, uniform_marginal
from models.ot.transport import fused_gromov_wasserstein

WIDTH, ALPHA, EPSILON, OUTER, INNER = 384, 0.5, 0.1, 10, 20
FULL = [(b, n, m) for b in (8, 32) for n in (64, 128, 256) for m in (16, 32)] + [(32, 128, 24)]
QUICK = [(8, 64, 16), (32, 128, 24), (32, 256, 32)]


def make_problem(batch: int, n: int, m: int, device: str, ragged: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if ragged:
        n_lens = torch.randint(n // 2, n + 1, (batch,), generator=g)
        m_lens = torch.randint(max(1, m // 2), m + 1, (batch,), generator=g)
        n_lens[0], m_lens[0] = n, m
    else:
        n_lens, m_lens = torch.full((batch,), n), torch.full((batch,), m)
    x = torch.randn(batch, n, WIDTH, generator=g).to(device)
    y = torch.randn(batch, m, WIDTH, generator=g).to(device)
    xm = (torch.arange(n)[None, :] < n_lens[:, None]).to(device)
    ym = (torch.arange(m)[None, :] < m_lens[:, None]).to(device)
    cost = cosine_cost(x, y, xm, ym)
    sa, sb = structure_matrix(x, xm, "cosine"), structure_matrix(y, ym, "cosine")
    return cost, sa, sb, uniform_marginal(xm).to(device), uniform_marginal(ym).to(device), n_lens, m_lens


def leaves(*tensors: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """Leaf copies of ``tensors`` that require grad, made once (outside the timed region); the function
    returned gives them back with their gradients cleared, for one run."""
    made = [t.detach().clone().requires_grad_() for t in tensors]

    def fresh() -> list[torch.Tensor]:
        for t in made:
            t.grad = None
        return made

    return fresh


def ours(problem, solver: str, solve: Callable = fused_gromov_wasserstein) -> Callable[[], None]:
    """One timed run of our solver (``solve``: models.ot.transport's, or another version's; see
    bench_transport_ab.py) at the module's alpha, epsilon and iteration counts."""
    cost, sa, sb, a, b, _, _ = problem
    inputs = leaves(cost, sa, sb)

    def run() -> None:
        c, da, dl = inputs()
        res = solve(
            c,
            da,
            dl,
            a,
            b,
            alpha=ALPHA,
            epsilon=EPSILON,
            outer_iter=OUTER,
            inner_iter=INNER,
            solver=solver,
            symmetric=True,
            check_convergence=False,  # epsilon 0.05 at 20 inner iterations: a few items above 1e-3
        )
        res.value.sum().backward()

    return run


def pot_batch(problem) -> Callable[[], None]:
    cost, sa, sb, a, b, _, _ = problem
    inputs = leaves(cost, sa, sb)

    def run() -> None:
        c, da, dl = inputs()
        res = ot.batch.solve_gromov_batch(
            da,
            dl,
            reg=EPSILON,
            a=a,
            b=b,
            M=c,
            alpha=ALPHA,
            max_iter=OUTER,
            tol=0.0,
            max_iter_inner=INNER,
            tol_inner=0.0,
            grad="envelope",
            symmetric=True,
        )
        res.value.sum().backward()

    return run


def pot_loop(problem) -> Callable[[], None]:
    cost, sa, sb, a, b, n_lens, m_lens = problem
    inputs = leaves(cost, sa, sb)

    def run() -> None:
        c, da, dl = inputs()
        total = c.new_zeros(())
        for i, (ni, mi) in enumerate(zip(n_lens.tolist(), m_lens.tolist(), strict=True)):
            total = total + ot.gromov.entropic_fused_gromov_wasserstein2(
                c[i, :ni, :mi],
                da[i, :ni, :ni],
                dl[i, :mi, :mi],
                a[i, :ni],
                b[i, :mi],
                alpha=ALPHA,
                epsilon=EPSILON,
                solver="PPA",
                max_iter=OUTER,
                tol=0.0,
                numItermax=INNER,
                stopThr=0.0,
                symmetric=True,
            )
        total.backward()

    return run


def ott_fgw(problem) -> Callable[[], None] | None:
    """OTT-JAX's GromovWasserstein, forward + backward of the FGW value; None when jax is not importable."""
    try:
        import jax
        import jax.numpy as jnp
        from ott.geometry import geometry
        from ott.problems.quadratic import quadratic_problem
        from ott.solvers.linear import sinkhorn as ott_sinkhorn
        from ott.solvers.quadratic import gromov_wasserstein
    except ImportError:
        return None
    cost, sa, sb, a, b, _, _ = (t.detach().cpu().numpy() if torch.is_tensor(t) else t for t in problem)
    linear = ott_sinkhorn.Sinkhorn(min_iterations=INNER, max_iterations=INNER, inner_iterations=INNER)
    solver = gromov_wasserstein.GromovWasserstein(
        linear, epsilon=EPSILON / ALPHA, min_iterations=OUTER, max_iterations=OUTER
    )

    def value(c, da, dl, wa, wb):
        prob = quadratic_problem.QuadraticProblem(
            geometry.Geometry(cost_matrix=jax.lax.stop_gradient(da)),
            geometry.Geometry(cost_matrix=jax.lax.stop_gradient(dl)),
            geometry.Geometry(cost_matrix=jax.lax.stop_gradient(c)),
            fused_penalty=(1 - ALPHA) / ALPHA,
            a=wa,
            b=wb,
        )
        plan = jax.lax.stop_gradient(solver(prob).matrix)
        r, k = plan.sum(1), plan.sum(0)
        gw = r @ (da * da) @ r + k @ (dl * dl) @ k - 2 * jnp.sum((da @ plan @ dl.T) * plan)
        return (1 - ALPHA) * jnp.sum(c * plan) + ALPHA * gw

    grad = jax.jit(jax.vmap(jax.value_and_grad(value, argnums=(0, 1, 2))))
    args = tuple(jnp.asarray(x) for x in (cost, sa, sb, a, b))

    def run() -> None:
        out = grad(*args)
        jax.block_until_ready(out)

    return run


def encoder_step(device: str, frames: int = 2500, seed: int = 0) -> Callable[[], None]:
    """One forward + backward of the demo preset's conformer-CTC (CTC loss, no optimiser step) on a fixed
    random batch of about ``frames`` padded 10 ms frames, as the function to run between timed solves."""
    from models.nn.ctc import ctc_losses
    from models.nn.encoder import PRESETS, ConformerCTC

    g = torch.Generator().manual_seed(seed)
    batch, length = max(1, frames // 300), 300
    model = ConformerCTC(PRESETS["demo"], 1800, WIDTH).to(device).train()
    feats = torch.randn(batch, length, 80, generator=g).to(device)
    lens = torch.full((batch,), length, device=device)
    tokens = torch.randint(2, 1800, (batch, 9), generator=g).to(device)
    token_lens = torch.full((batch,), 9, device=device)

    def run() -> None:
        out = model(feats, lens)
        ctc_losses(out, tokens, token_lens).mean().backward()
        model.zero_grad(set_to_none=True)

    return run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_runs(
    fns: dict[str, Callable[[], None]], device: str, repeats: int, between: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Wall times in ms per function over ``repeats`` rounds of one run each. The order is reversed every
    other round, so that functions listed next to each other always run next to each other in time (their
    per-round ratios compare like with like on a machine whose speed drifts) and none always follows the
    same one. ``between`` (untimed) runs before every timed run (--interleaved: an encoder step)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for k in range(repeats):
        for name in names if k % 2 == 0 else names[::-1]:
            if between is not None:
                between()
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of slow / fast, each round's two runs adjacent in time."""
    return statistics.median(s / f for s, f in zip(slow, fast, strict=True))


def peak_mib(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def main() -> None:
    global EPSILON
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three shapes instead of the full grid")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds per cell (default 9, quick 7)")
    parser.add_argument("--loop-repeats", type=int, default=3, help="timed runs of the slow per-pair loop")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--epsilon", type=float, default=0.1, help="entropic regularisation")
    parser.add_argument("--no-ott", action="store_true", help="leave the OTT-JAX column out")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("B", "N", "M"), help="one shape only")
    parser.add_argument(
        "--interleaved", action="store_true", help="an encoder forward + backward before every timed solve"
    )
    args = parser.parse_args()
    EPSILON = args.epsilon
    if args.threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    warnings.filterwarnings(
        "ignore", category=UserWarning
    )  # POT: "Sinkhorn did not converge" at 20 iterations
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (7 if args.quick else 9)
    shapes = [tuple(args.shape)] if args.shape else QUICK if args.quick else FULL
    have_ott = (
        not args.no_ott and args.device == "cpu" and ott_fgw(make_problem(1, 4, 2, "cpu", False)) is not None
    )
    if not have_ott:
        console_note = "OTT-JAX column left out: " + (
            "--no-ott"
            if args.no_ott
            else "CPU only"
            if args.device != "cpu"
            else "jax / ott-jax not importable"
        )
        print(console_note)
    console = Console(width=150)
    between = encoder_step(args.device) if args.interleaved else None
    mem = "CUDA max_memory_allocated" if args.device == "cuda" else "torch CPU allocations (profiler)"
    table = Table(
        title=f"FGW forward+backward, float32, {args.device}, {torch.get_num_threads()} threads, "
        f"{OUTER}x{INNER} iterations, epsilon {EPSILON:g}"
        + (", each solve after an encoder step (--interleaved)" if args.interleaved else "")
        + f"; median ms, peak MiB ({mem})"
    )
    for col in (
        "B",
        "N",
        "M",
        "ours pgd",
        "ours ppa",
        "POT batch",
        "speed-up",
        "OTT-JAX",
        "vs OTT",
        "MiB ours/POT",
        "ours ragged",
        "POT loop (ragged)",
        "speed-up",
    ):
        table.add_column(col, justify="right")
    for batch, n, m in shapes:
        equal = make_problem(batch, n, m, args.device, ragged=False)
        ragged = make_problem(batch, n, m, args.device, ragged=True)
        # listed in pairs whose ratio is reported: pgd next to OTT-JAX, ppa next to POT's batch solver
        fns = {"pgd": ours(equal, "pgd")}
        if have_ott:
            fns["ott"] = ott_fgw(equal)
        fns |= {"ppa": ours(equal, "ppa"), "pot": pot_batch(equal), "ragged": ours(ragged, "ppa")}
        runs = timed_runs(fns, args.device, repeats, between)
        t = {name: statistics.median(r) for name, r in runs.items()}
        t_ott = t.get("ott")
        t_pgd, t_ppa, t_pot, t_rag = t["pgd"], t["ppa"], t["pot"], t["ragged"]
        pot_speedup = paired_ratio(runs["pot"], runs["ppa"])
        ott_speedup = paired_ratio(runs["ott"], runs["pgd"]) if have_ott else None
        loop = {"loop": pot_loop(ragged)}
        t_loop = statistics.median(timed_runs(loop, args.device, args.loop_repeats, between)["loop"])
        mem_ours, mem_pot = peak_mib(ours(equal, "ppa"), args.device), peak_mib(pot_batch(equal), args.device)
        table.add_row(
            str(batch),
            str(n),
            str(m),
            f"{t_pgd:.1f}",
            f"{t_ppa:.1f}",
            f"{t_pot:.1f}",
            f"{pot_speedup:.1f}x",
            "-" if t_ott is None else f"{t_ott:.1f}",
            "-" if ott_speedup is None else f"{ott_speedup:.1f}x",
            f"{mem_ours:.0f}/{mem_pot:.0f}",
            f"{t_rag:.1f}",
            f"{t_loop:.0f}",
            f"{t_loop / t_rag:.0f}x",
        )
        console.print(f"done B={batch} N={n} M={m}", style="dim")
    console.print(table)


if __name__ == "__main__":
    main()
