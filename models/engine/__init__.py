"""The training engine: the trainer and its loop (`training`), configuration (`config`), learning-rate
schedule, distributed set-up, precision, checkpoints, run log, transfer diagnostics, preemption and the
allocator set-up.

May import: `models.nn`, `models.ot`, `data`. Not `models.tasks` (what a trained model is used for) or
`gmot_cli`.
"""
