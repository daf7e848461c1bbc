"""The networks and losses: the conformer-CTC encoder with its transfer adapter (`encoder`), the CTC loss,
greedy CTC and the blank id (`ctc`), the PLM teacher (`plm`, and `plm_image` that rebuilds the offline
e5-small image) and the GM-OT transfer loss (`transfer_loss`).

May import: `models.ot`, `data` (records and features), torch, transformers. Not `models.engine` or
`models.tasks`.
"""
