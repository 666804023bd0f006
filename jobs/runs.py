"""What every batch job shares: the run folder, its inputs as shards, commit markers, progress, Ray start-up."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePosixPath

from jobs.common import RunExistsError
from jobs.config import ConfigError
from jobs.inputs import (  # noqa: F401 - the input helpers other jobs import from here
    InputShard,
    discover_inputs,
    duplicate_ids,
    input_columns,
    parquet_paths,
    shard_name,
)
from workers.storage import Storage, join

logger = logging.getLogger("sgbatch")

RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S")


def run_id_problem(run_id: str) -> str | None:
    """Why ``run_id`` cannot name a run folder, or None. It must be one path segment that stays inside --output."""
    if not RUN_ID.fullmatch(run_id):
        return "must be 1-128 characters from A-Z a-z 0-9 . _ - (one folder name)"
    if run_id in (".", ".."):
        return "must not be '.' or '..'"
    return None


def check_run_id(run_id: str) -> None:
    problem = run_id_problem(run_id)
    if problem:
        raise ConfigError(f"--run-id = {run_id[:160]!r}: {problem}")


class RunLayout:
    """``{output}/{run_id}/``: images/, metadata/, errors/, _markers/, run.json, summary.json, report.html."""

    def __init__(self, storage: Storage, output: str, run_id: str) -> None:
        check_run_id(run_id)
        self.storage = storage
        self.uri = join(output, run_id)
        self.run_id = run_id

    def path(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def exists(self) -> bool:
        return bool(self.storage.list(self.uri))

    def prepare(self, resume: bool, overwrite: bool) -> None:
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if not self.exists():
            return
        if overwrite:
            removed = self.storage.delete_prefix(self.uri)
            logger.info("--overwrite: removed %d files under %s", removed, self.uri)
        elif not resume:
            raise RunExistsError(
                f"run {self.uri!r} already exists: pass --resume to finish it or --overwrite to start it again"
            )

    def marker(self, shard: str) -> str:
        return self.path("_markers", f"{shard}.json")

    def committed(self) -> set[str]:
        return {PurePosixPath(u).name[: -len(".json")] for u in self.storage.list(self.path("_markers"))
                if u.endswith(".json")}

    def clean_partial(self, shards: Iterable[str]) -> int:
        """Delete what an interrupted attempt left for uncommitted shards (its batches may differ now)."""
        names = set(shards)
        if not names:
            return 0
        removed = 0
        for folder in ("metadata", "errors", "candidates", "images"):
            for uri in self.storage.list(self.path(folder)):
                parts = uri[len(self.path(folder)) + 1 :].split("/")
                nested = folder == "candidates" and parts[0] == "images" and len(parts) > 2  # candidates/images/{shard}/
                head = parts[1] if nested else parts[0]
                if head in names or any(head.startswith(f"{n}-") and head.endswith((".parquet", ".tar")) for n in names):
                    self.storage.delete(uri)
                    removed += 1
        return removed

    def write_marker(self, shard: str, stats: dict) -> None:
        self.storage.write_text(self.marker(shard), json.dumps(stats, indent=2) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        self.storage.write_text(self.path(name), json.dumps(data, indent=2, default=str) + "\n")

    def read_json(self, name: str) -> dict:
        return json.loads(self.storage.read_text(self.path(name)))


@dataclass
class Progress:
    """Tracks rows per shard (to commit shards) and prints periodic progress lines."""

    shards: dict[str, InputShard]
    layout: RunLayout
    log_every: float = 10.0
    done_rows: dict[str, int] = field(default_factory=dict)
    images: int = 0
    errors: int = 0
    recall_sum: float = 0.0
    recall_count: int = 0
    started: float = field(default_factory=time.perf_counter)
    _last: float = field(default_factory=time.perf_counter)
    committed_now: list[str] = field(default_factory=list)

    def update(self, stats: list[dict]) -> None:
        for s in stats:
            shard = s["shard"]
            self.done_rows[shard] = self.done_rows.get(shard, 0) + int(s["rows"])
            self.images += int(s["images"])
            self.errors += int(s["errors"])
            self.recall_sum += float(s["recall_sum"])
            self.recall_count += int(s["recall_count"])
            expected = self.shards[shard].rows
            if self.done_rows[shard] == expected:
                self.layout.write_marker(shard, {"shard": shard, "input": self.shards[shard].uri, "rows": expected,
                                                  "finished": datetime.now(timezone.utc).isoformat()})
                self.committed_now.append(shard)
            elif self.done_rows[shard] > expected:
                logger.warning("shard %s: %d rows seen for %d in the input", shard, self.done_rows[shard], expected)
        now = time.perf_counter()
        if now - self._last >= self.log_every:
            self._last = now
            self.log()

    def log(self) -> None:
        elapsed = time.perf_counter() - self.started
        rows = sum(self.done_rows.values())
        total = sum(s.rows for s in self.shards.values())
        recall = self.recall_sum / self.recall_count if self.recall_count else float("nan")
        logger.info("%d/%d rows, %d images (%.2f images/s), %d errors, mean recall %.3f, %d shards committed",
                    rows, total, self.images, self.images / max(elapsed, 1e-9), self.errors, recall,
                    len(self.committed_now))

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started
