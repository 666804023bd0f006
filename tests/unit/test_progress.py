"""Shard commits and progress lines of the driver (no Ray: the sink's stats rows are given directly)."""

from __future__ import annotations

import json
import logging
import time

import pytest

from jobs.inputs import InputShard
from jobs.progress import Progress
from jobs.runs import RunLayout
from workers.storage import Storage


def stat(shard: str, rows: int, images: int, errors: int = 0, recall: float = 0.0, reasons=None, started=None) -> dict:
    return {"shard": shard, "rows": rows, "images": images, "errors": errors, "recall_sum": recall * (rows - errors),
            "recall_count": rows - errors, "errors_by_reason": json.dumps(reasons or {}), "started": started}


def layout(tmp_path) -> RunLayout:
    return RunLayout(Storage(), str(tmp_path), "r")


SHARDS = [InputShard("in/a.parquet", "a-1", 4), InputShard("in/b.parquet", "b-2", 3), InputShard("in/c.parquet", "c-3", 0)]


def test_a_shard_is_committed_with_its_stats_when_its_last_row_arrives(tmp_path):
    run = layout(tmp_path)
    progress = Progress(SHARDS, run)
    progress.commit_empty()
    assert run.committed() == {"c-3"}
    assert json.loads((tmp_path / "r" / "stats" / "c-3_stats.json").read_text())["count"] == 0

    progress.update([stat("a-1", 2, 4, started=time.time() - 3)])
    assert run.committed() == {"c-3"}
    progress.update([stat("a-1", 2, 2, errors=1, reasons={"duplicate_id": 1}, recall=0.5), stat("b-2", 1, 2)])
    assert run.committed() == {"a-1", "c-3"}

    stats = json.loads((tmp_path / "r" / "stats" / "a-1_stats.json").read_text())
    assert stats["shard"] == "a-1" and stats["input"] == "in/a.parquet"
    assert (stats["count"], stats["successes"], stats["failed"], stats["images"]) == (4, 3, 1, 6)
    assert stats["status_dict"] == {"duplicate_id": 1, "success": 3}
    assert stats["duration"] >= 3
    assert stats["end_time"] - stats["start_time"] == pytest.approx(stats["duration"], abs=0.002)
    assert stats["images_per_second"] == round(6 / stats["duration"], 3)
    assert stats["mean_recall"] is not None


def test_progress_line_counts_rows_recall_shards_and_eta(tmp_path):
    progress = Progress(SHARDS, layout(tmp_path), committed=["c-3"])
    line = progress.line()
    assert line.startswith("progress: 0/7 rows (0%), 0 images, 0.00 images/s, 0 errors, mean recall -, "
                           "1/3 shards committed, elapsed ")
    assert line.endswith("ETA -")
    progress.update([stat("a-1", 4, 4, recall=0.75)])
    time.sleep(0.05)
    line = progress.line()
    assert "4/7 rows (57%), 4 images" in line and "mean recall 0.750" in line and "2/3 shards committed" in line
    assert "ETA -" not in line
    progress.update([stat("b-2", 3, 3, recall=0.75)])
    assert progress.line().endswith("ETA 0s") and "7/7 rows (100%)" in progress.line()


def test_progress_lines_keep_coming_while_no_result_arrives(tmp_path):
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("sgbatch")
    logger.addHandler(handler)
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        progress = Progress(SHARDS, layout(tmp_path), log_every=0.05)
        with progress.ticking():  # no update at all: every line comes from the clock
            deadline = time.monotonic() + 30
            while len([m for m in lines if m.startswith("progress:")]) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
    assert len([m for m in lines if m.startswith("progress: 0/7 rows")]) >= 3
