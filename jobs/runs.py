"""A run's folder: its id, its layout, and the per-shard stats files that commit finished input shards."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
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
LEASE_FILE = "_lease.json"
STATS_FOLDER = "stats"
STATS_SUFFIX = "_stats.json"


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


def files_but_lease(storage: Storage, folder: str) -> list[str]:
    """Every file under a run folder but its lease (which the run holds while it deletes the rest)."""
    lease = join(folder, LEASE_FILE)
    return [u for u in storage.list(folder) if u != lease]


class RunLayout:
    """``{output}/{run_id}/``: images/, metadata/, errors/, stats/, run.json, summary.json, report.html.

    ``stats/{shard}_stats.json`` is written last for each input shard, once all its rows are in
    metadata/ or errors/: it is the shard's commit marker (as img2dataset's stats files are).
    ``_lease.json`` is held while a run works in the folder.
    """

    def __init__(self, storage: Storage, output: str, run_id: str) -> None:
        check_run_id(run_id)
        self.storage = storage
        self.uri = join(output, run_id)
        self.run_id = run_id

    def path(self, *parts: str) -> str:
        return join(self.uri, *parts)

    @property
    def lease_uri(self) -> str:
        return self.path(LEASE_FILE)

    def files(self) -> list[str]:
        """Every file of the run but its lease."""
        return files_but_lease(self.storage, self.uri)

    def exists(self) -> bool:
        return bool(self.files())

    def prepare(self, resume: bool, overwrite: bool) -> None:
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if not self.exists():
            return
        if overwrite:
            files = self.files()
            for uri in files:
                self.storage.delete(uri)
            logger.info("--overwrite: removed %d files under %s", len(files), self.uri)
        elif not resume:
            raise RunExistsError(
                f"run {self.uri!r} already exists: pass --resume to finish it or --overwrite to start it again"
            )

    def stats_file(self, shard: str) -> str:
        return self.path(STATS_FOLDER, f"{shard}{STATS_SUFFIX}")

    def committed(self) -> set[str]:
        return {PurePosixPath(u).name[: -len(STATS_SUFFIX)] for u in self.storage.list(self.path(STATS_FOLDER))
                if u.endswith(STATS_SUFFIX)}

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

    def write_stats(self, shard: str, stats: dict) -> None:
        self.storage.write_text(self.stats_file(shard), json.dumps(stats, indent=2) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        self.storage.write_text(self.path(name), json.dumps(data, indent=2, default=str) + "\n")

    def read_json(self, name: str) -> dict:
        return json.loads(self.storage.read_text(self.path(name)))
