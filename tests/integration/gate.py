"""A test stage that holds back the last input shard's rows (light: Ray workers import only this module)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa


def hold_last_shard(batch: pa.Table, last_shard: str, stats_dir: str, log_path: str, flag: str) -> pa.Table:
    """Hold the last shard's rows until the earlier shards are committed and a progress line says so.

    Waits at most fifteen minutes (a loaded machine starts Ray workers slowly) and records what it saw,
    so the run always ends.
    """
    if last_shard in batch.column("shard").to_pylist():
        deadline = time.monotonic() + 900
        seen = {"stats_files": 0, "progress_line": False}
        while time.monotonic() < deadline:
            seen["stats_files"] = len(list(Path(stats_dir).glob("*_stats.json")))
            text = Path(log_path).read_text() if Path(log_path).exists() else ""
            seen["progress_line"] = "2/3 shards committed" in text
            if seen["stats_files"] == 2 and seen["progress_line"]:
                break
            time.sleep(0.2)
        Path(flag).write_text(json.dumps(seen))
    return batch
