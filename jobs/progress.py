"""The driver's view of a running job: per-shard tallies, shard commits (stats files) and progress lines.

The driver receives one small stats row per (sink call, input shard). When a shard's rows are all
in, its ``stats/{shard}_stats.json`` is written at once: the shard is committed and a resumed run
skips it. Progress lines come from a clock thread, so they keep coming while no result arrives
(model loading, a slow batch).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from jobs.inputs import InputShard
from jobs.runs import RunLayout
from workers.storage import redact

logger = logging.getLogger("sgbatch")


@dataclass
class ShardTally:
    rows: int = 0
    images: int = 0
    errors: int = 0
    by_reason: Counter = field(default_factory=Counter)
    recall_sum: float = 0.0
    recall_count: int = 0
    started: float | None = None

    def add(self, s: dict) -> None:
        self.rows += int(s["rows"])
        self.images += int(s["images"])
        self.errors += int(s["errors"])
        self.by_reason.update(json.loads(s.get("errors_by_reason") or "{}"))
        self.recall_sum += float(s["recall_sum"])
        self.recall_count += int(s["recall_count"])
        if s.get("started") is not None:
            self.started = s["started"] if self.started is None else min(self.started, s["started"])

    def stats(self, shard: InputShard, finished: float) -> dict:
        """The shard's stats file, with img2dataset's field names where they apply."""
        started = self.started if self.started is not None else finished
        seconds = max(0.0, finished - started)
        return {
            "shard": shard.name,
            "input": redact(shard.uri),
            "count": shard.rows,
            "successes": self.rows - self.errors,
            "failed": self.errors,
            "images": self.images,
            "status_dict": dict(sorted({"success": self.rows - self.errors, **self.by_reason}.items())),
            "mean_recall": self.recall_sum / self.recall_count if self.recall_count else None,
            "start_time": round(started, 3),
            "end_time": round(finished, 3),
            "duration": round(seconds, 3),
            "images_per_second": round(self.images / seconds, 3) if seconds > 0 else None,
        }


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Tallies per shard, commits finished shards, and logs a progress line every ``log_every`` seconds."""

    def __init__(self, shards: Iterable[InputShard], layout: RunLayout, committed: Iterable[str] = (),
                 log_every: float = 10.0) -> None:
        self.shards = {s.name: s for s in shards}
        self.layout = layout
        self.log_every = log_every
        self.committed_before = set(committed)
        self.rows_before = sum(self.shards[n].rows for n in self.committed_before)
        self.tallies: dict[str, ShardTally] = {}
        self.committed_now: list[str] = []
        self.started = time.perf_counter()
        self._first_result: float | None = None
        self._lock = threading.Lock()

    # -- results
    def update(self, stats: Iterable[dict]) -> None:
        with self._lock:
            for s in stats:
                tally = self.tallies.setdefault(s["shard"], ShardTally())
                tally.add(s)
                if self._first_result is None:
                    self._first_result = time.perf_counter()
                self._maybe_commit(s["shard"])

    def commit_empty(self) -> None:
        """Shards with no rows have nothing to wait for: commit them now."""
        with self._lock:
            for name, shard in self.shards.items():
                if shard.rows == 0 and name not in self.committed_before:
                    self._maybe_commit(name)

    def _maybe_commit(self, name: str) -> None:
        shard, tally = self.shards[name], self.tallies.setdefault(name, ShardTally())
        if tally.rows == shard.rows and name not in self.committed_now:
            self.layout.write_stats(name, tally.stats(shard, time.time()))
            self.committed_now.append(name)
        elif tally.rows > shard.rows:
            logger.warning("shard %s: %d rows seen for %d in the input", name, tally.rows, shard.rows)

    # -- figures
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def images(self) -> int:
        return sum(t.images for t in self.tallies.values())

    def line(self) -> str:
        with self._lock:
            now = time.perf_counter()
            rows_now = sum(t.rows for t in self.tallies.values())
            images = sum(t.images for t in self.tallies.values())
            errors = sum(t.errors for t in self.tallies.values())
            recall_n = sum(t.recall_count for t in self.tallies.values())
            recall = sum(t.recall_sum for t in self.tallies.values()) / recall_n if recall_n else None
            committed = len(self.committed_before) + len(self.committed_now)
        total = sum(s.rows for s in self.shards.values())
        done = self.rows_before + rows_now
        elapsed = now - self.started
        eta = "0s" if done >= total else "-"
        if done < total and self._first_result is not None and now > self._first_result:
            # the rate since the first result came in: model loading is not part of what is left
            eta = duration((total - done) * (now - self._first_result) / rows_now)
        return (f"progress: {done}/{total} rows ({100 * done / total if total else 100:.0f}%), {images} images, "
                f"{images / max(elapsed, 1e-9):.2f} images/s, {errors} errors, "
                f"mean recall {'-' if recall is None else f'{recall:.3f}'}, "
                f"{committed}/{len(self.shards)} shards committed, elapsed {duration(elapsed)}, ETA {eta}")

    def log(self) -> None:
        logger.info("%s", self.line())

    @contextmanager
    def ticking(self) -> Iterator[None]:
        """Log a progress line every ``log_every`` seconds while the block runs, and once at its end."""
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.log_every):
                self.log()

        thread = threading.Thread(target=tick, name="sgbatch-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            self.log()
