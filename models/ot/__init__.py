"""Optimal transport, independent of speech. The solvers: the batched (fused) Gromov-Wasserstein and
Wasserstein solvers (`transport`) and the unbalanced one (`unbalanced`); the graph structures a transport
compares (`graphs`). Their parts: the problem set-up, input checks and cost scaling (`problem`), one Sinkhorn
projection (`projection`), the objective and its gradients (`objective`), the choice of CPU loop (`backend`)
and the compiled CPU kernels behind the projection (`_sinkhorn_cpu`, private).

The modules import each other relatively (``from .problem import ...``), so that a revision's folder can be
loaded as a package of its own (benchmarks/bench_transport_ab.py).

May import: torch, numpy, numba. Nothing else of gmot (not `models.nn`, `models.engine`, `models.tasks`,
`data`).
"""
