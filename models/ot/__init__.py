"""Optimal transport, independent of speech: the batched (fused) Gromov-Wasserstein and Wasserstein solvers
(`transport`), the unbalanced solver (`unbalanced`), the graph structures a transport compares (`graphs`) and
the compiled CPU kernels behind the solvers' projection (`_sinkhorn_cpu`, private).

May import: torch, numpy, numba. Nothing else of gmot (not `models.nn`, `models.engine`, `models.tasks`,
`data`).
"""
