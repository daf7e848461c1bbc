"""The training engine: the trainer and its loop (`training`), with its parts (`train_data`, `run_state`,
`step`, `evaluation`, sharing the attributes declared in `trainer_base`) and what a run ends with (`outcome`);
configuration (`config`), learning-rate schedule, distributed set-up, precision, checkpoints, run log,
transfer diagnostics, preemption and the allocator set-up.

May import: `models.nn`, `models.ot`, `data`. Not `models.tasks` (what a trained model is used for) or
`gmot_cli`.
"""
