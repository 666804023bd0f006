"""The run report: ``{run}/report.html`` with its plots and thumbnails in ``{run}/report/``.

    python -m jobs.report --run out/generate/run-20261101-120000
    sgbatch report --run s3://bucket/runs/run-20261101-120000

Works for generate, SBPC and fine-tune runs, local or on S3 (read from the run, written back to
it). The page is static and offline: no scripts, no CDN, relative links only, so it can be opened
from disk or from a synced copy of the run. The jobs call :func:`build_report` at the end of a
run; rebuilding it later (e.g. with another ``--max-images``) is cheap.

Parts: ``data`` (what is read from the run), ``graph`` (scene graphs as SVG), ``images``
(thumbnails), ``plots`` (matplotlib figures), ``html`` (markup), ``build`` (the page).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jobs.common import job_main, storage_for
from jobs.config import require
from jobs.preflight import check_before_start
from jobs.report.build import build_report


@dataclass(kw_only=True)
class ReportConfig:
    """Build the offline HTML report of a generate, SBPC or fine-tune run."""

    run: str = ""
    """The run folder, local or s3:// (the one holding run.json and summary.json)."""
    max_images: int = 120
    """Gallery images at most (a deterministic sample plus the lowest-recall ones)."""
    max_errors: int = 200
    """Error rows listed at most (the counts by reason always cover all of them)."""
    s3_endpoint_url: str | None = None
    """S3 endpoint override (default: AWS_ENDPOINT_URL); credentials come from the AWS chain."""
    s3_region: str | None = None
    """S3 region (default: AWS_REGION)."""

    def __post_init__(self) -> None:
        require(bool(self.run), "run", self.run, "required: a run folder or s3:// prefix")
        require(self.max_images >= 0, "max_images", self.max_images, "must be >= 0")
        require(self.max_errors >= 0, "max_errors", self.max_errors, "must be >= 0")


def run(cfg: ReportConfig) -> tuple[dict, int]:
    check_before_start(cfg)
    uri = build_report(storage_for(cfg), cfg.run, max_images=cfg.max_images, max_errors=cfg.max_errors)
    print(f"report: {uri}")
    return {"report": uri}, 0


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(ReportConfig, run, argv, "python -m jobs.report")


__all__ = ["ReportConfig", "build_report", "main"]
