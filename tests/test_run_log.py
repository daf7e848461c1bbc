"""models/engine/run_log.read_metrics: the one reader of a run's metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from models.engine.run_log import read_metrics


def test_read_metrics_filters_by_event_and_skips_a_cut_line(tmp_path: Path) -> None:
    assert read_metrics(tmp_path) == []  # no metrics.jsonl yet
    (tmp_path / "metrics.jsonl").write_text(
        '{"event": "train", "step": 10, "loss": 2.0}\n'
        '{"event": "epoch", "step": 20, "dev_cer": 0.5}\n'
        "[1, 2]\n"  # JSON, but not a record
        '{"event": "train", "step": 30, "loss": 1.0}\n'
        '{"event": "train", "step": 4',  # a run killed while writing
        encoding="utf-8",
    )
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30]
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [10, 30]
    assert read_metrics(tmp_path, "epoch") == [{"event": "epoch", "step": 20, "dev_cer": 0.5}]
