"""Synthetic dataset generation: scene graphs (Parquet) in, images + recall out, on Ray.

    ray job submit --working-dir . -- python -m jobs.generate --input s3://…/graphs/ --output s3://…/runs
    python -m jobs.generate            # local Ray, demo model, bundled shapes graphs, ./out/generate

Ray Data streams read + validate (one task per input file) -> generator actors (model on GPU) ->
scorer actors (segmenter) -> sink; the driver only receives per-batch counts, commits each input
shard with its stats file as soon as all its rows are written, logs progress on a clock, and
writes summary.json at the end. The run holds a lease on its folder throughout (jobs.lease).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from jobs.common import fingerprint, init_ray, job_main, storage_for, versions, write_report
from jobs.config import ConfigError, require
from jobs.defaults import DEMO_MODEL, DEMO_SEGMENTER, SAMPLE_SHAPES, resolve
from jobs.inputs import InputShard, check_graph_schema, discover_inputs, duplicate_ids
from jobs.label_map import recall_options
from jobs.lease import DEFAULT_TIMEOUT, RunLease
from jobs.preflight import check_before_start
from jobs.progress import Progress
from jobs.runs import RunLayout, new_run_id, run_id_problem
from jobs.stages import (
    SCORER_CPUS,
    actor_pool,
    check_cpu_budget,
    generation_settings,
    generator_stage,
    placement,
    read_validated,
    sink_stage,
)
from jobs.summary import summarize
from workers.storage import Storage, redact_values

logger = logging.getLogger("sgbatch")


@dataclass(kw_only=True)
class GenerateConfig:
    """Generate images for every scene graph of a Parquet input, score them, stream them out."""

    input: str = SAMPLE_SHAPES
    """Parquet file, folder or glob, local or s3:// (default: the bundled shapes sample graphs)."""
    output: str = "out/generate"
    """Folder or s3:// prefix; the run goes to {output}/{run_id}/."""
    model: str = DEMO_MODEL
    """SceneGraphDiffusionPipeline folder (local or s3://) or hub id (default: the shapes demo model)."""
    segmenter: str = DEMO_SEGMENTER
    """Segmentation model folder or hub id for recall; 'none' turns scoring off."""
    label_map: str | None = None
    """YAML/JSON file (local or s3://): graph label -> segmenter class name or id, for labels the segmenter
    names otherwise (see jobs/samples/ade20k_label_map.yaml); unmapped labels match by name."""
    run_id: str | None = None
    """Name of the run folder (default: run-YYYYmmdd-HHMMSS): 1-128 of A-Z a-z 0-9 . _ -, not . or ..
    Give the same id with --resume."""
    samples_per_graph: int = 1
    """Images per scene graph."""
    steps: int = 25
    """Denoising steps."""
    guidance: float = 3.0
    """Classifier-free guidance scale (<= 1 disables the unconditional pass)."""
    height: int | None = None
    """Image height (default: the model's)."""
    width: int | None = None
    """Image width (default: the model's)."""
    batch_size: int = 8
    """Graphs per generator call."""
    workers: str = "1"
    """Generator actors: N, or MIN,MAX to autoscale."""
    gpus_per_worker: float | None = None
    """GPUs per generator actor (default: 1 when the cluster has GPUs, else 0)."""
    cpus_per_worker: float = 0.5
    """CPUs reserved per generator actor (a reservation for Ray's scheduler; torch threads are separate)."""
    threads_per_worker: int | None = None
    """Torch threads per generator actor (default: all CPUs of its machine)."""
    scorer_workers: int = 1
    """Scorer actors."""
    scorer_gpus: float | None = None
    """GPUs per scorer actor (default: 0.25 when the cluster has GPUs, else 0)."""
    output_format: Literal["png", "webdataset"] = "png"
    """PNG files, or WebDataset tar shards (one per batch and input shard)."""
    resume: bool = False
    """Finish an existing run: skip committed shards, redo the rest."""
    overwrite: bool = False
    """Delete an existing run of this id first."""
    max_error_fraction: float = 0.1
    """Fail the job (exit 1) when more than this fraction of input rows end in the error table."""
    seed: int = 0
    """Base seed; each image's seed derives from (seed, graph id, sample index) unless the row has one."""
    scheduler: Literal["model", "ddim", "dpm", "euler"] = "model"
    """Sampler: the model's own, DDIM, DPM-Solver++ or Euler."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Weights/activations dtype: auto = fp16 on GPU, fp32 on CPU."""
    compile: bool = False
    """torch.compile the UNet: frozen weights on CPU, CUDA graphs on GPU (the first batches pay the compile time)."""
    memory_format: Literal["channels_last", "contiguous"] = "contiguous"
    """The UNet's weight layout: channels_last runs convolutions faster (docs/benchmarks.md, render
    speed) with images a few levels off fp32 eager's; contiguous is PyTorch's default layout."""
    guidance_passes: Literal["batched", "separate"] = "batched"
    """Guided steps: conditional and unconditional halves in one batched UNet call or two calls (the
    same images; on CPU two calls measured 0.90-1.17x of one call at batch 16, docs/benchmarks.md)."""
    layout: Literal["sample", "mean"] = "sample"
    """Layout-grounded models, graphs without boxes: draw each image's layout from the layout distribution
    with the image's seed (sample), or start from the mean layout (mean). Boxes a row carries always win."""
    max_objects: int = 64
    """Reject graphs with more objects."""
    max_relations: int = 256
    """Reject graphs with more relations."""
    max_text_chars: int = 128
    """Reject labels/predicates longer than this."""
    report: bool = True
    """Write report.html at the end (--no-report to skip)."""
    report_max_images: int = 120
    """Gallery images in the report at most."""
    s3_endpoint_url: str | None = None
    """S3 endpoint override (default: AWS_ENDPOINT_URL); credentials come from the AWS chain."""
    s3_region: str | None = None
    """S3 region (default: AWS_REGION)."""
    log_every: float = 10.0
    """Seconds between progress lines (rows, images/s, mean recall, shards committed, ETA)."""
    sink_rows: int | None = None
    """Rows per write of the sink (default: every generator batch as soon as it is done). A larger N writes
    fewer, larger metadata files, and a shard is committed only once its last N rows are in."""
    lease_timeout: float = DEFAULT_TIMEOUT
    """Seconds without a heartbeat after which a run's lease counts as abandoned (--resume may then take it
    over); the holder renews it every timeout/6 seconds."""

    def __post_init__(self) -> None:
        for name in ("samples_per_graph", "steps", "batch_size", "scorer_workers", "max_objects", "max_relations",
                     "max_text_chars"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(0.0 <= self.max_error_fraction <= 1.0, "max_error_fraction", self.max_error_fraction, "must be in [0, 1]")
        require(self.guidance >= 0, "guidance", self.guidance, "must be >= 0")
        require(not (self.resume and self.overwrite), "resume", self.resume, "--resume and --overwrite exclude each other")
        for name in ("height", "width"):
            value = getattr(self, name)
            require(value is None or value >= 8, name, value, "must be >= 8")
        require(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "must be > 0")
        problem = run_id_problem(self.run_id) if self.run_id is not None else None
        require(problem is None, "run_id", (self.run_id or "")[:160], problem or "")
        require(self.sink_rows is None or self.sink_rows >= 1, "sink_rows", self.sink_rows, "must be >= 1")
        require(self.log_every > 0, "log_every", self.log_every, "must be > 0")
        require(self.lease_timeout >= 1, "lease_timeout", self.lease_timeout, "must be >= 1 second")
        for name in ("gpus_per_worker", "scorer_gpus"):
            value = getattr(self, name)
            require(value is None or value >= 0, name, value, "must be >= 0")
        _ = self.worker_range  # validates --workers

    @property
    def worker_range(self) -> tuple[int, int]:
        parts = [p.strip() for p in str(self.workers).split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--workers = {self.workers!r}: expected N or MIN,MAX") from None
        require(len(values) in (1, 2) and min(values) >= 1 and values[0] <= values[-1], "workers", self.workers,
                "expected N or MIN,MAX with 1 <= MIN <= MAX")
        return values[0], values[-1]

    @property
    def scoring(self) -> bool:
        return self.segmenter.lower() != "none"

    def resolved(self) -> GenerateConfig:
        """Defaults that point into the repository resolved to real paths."""
        return dataclasses.replace(self, input=resolve(self.input), model=resolve(self.model),
                                   segmenter=resolve(self.segmenter) if self.scoring else self.segmenter)


def build_dataset(cfg: GenerateConfig, pending: list[InputShard], storage: Storage, dupes: frozenset[str],
                  run_uri: str, model_fp: str):
    """read -> validate -> generator actors -> scorer actors -> sink; consuming it yields per-shard counts."""
    from workers.generator import Generator
    from workers.scorer import Scorer, ScoringSettings

    where = placement(cfg)
    ds = read_validated(cfg, pending, storage, dupes)
    ds = generator_stage(ds, cfg, Generator, (generation_settings(cfg, where.generator_gpus), storage.settings),
                         where.generator_gpus)
    if cfg.scoring:
        score = ScoringSettings(segmenter=cfg.segmenter, use_gpu=where.scorer_gpus > 0, precision=cfg.precision,
                                options=recall_options(cfg, storage))
        # batch_size=None: each generator call's images are scored as they come (streaming)
        ds = ds.map_batches(Scorer, fn_constructor_args=(score, storage.settings), batch_format="pyarrow",
                            batch_size=None, compute=actor_pool(size=cfg.scorer_workers), num_gpus=where.scorer_gpus,
                            num_cpus=SCORER_CPUS)
    return sink_stage(ds, cfg, run_uri, model_fp, storage)


def run(cfg: GenerateConfig, job: str = "generate", build=None, statistics=None) -> tuple[dict, int]:
    """Run the job; returns (summary, exit code). The SBPC job reuses this with its own stage and statistics.

    Nothing is written before the input is checked (every file's footer and schema), and nothing is
    written or deleted in the run folder before its lease is held.
    """
    cfg = cfg.resolved()
    check_before_start(cfg)
    storage = storage_for(cfg)
    layout = RunLayout(storage, cfg.output, cfg.run_id or new_run_id())
    shards = discover_inputs(storage, cfg.input, check=check_graph_schema)
    init_ray()
    check_cpu_budget(cfg)  # a layout that cannot run is refused before the run folder is touched
    with RunLease(storage, layout.lease_uri, layout.uri, timeout=cfg.lease_timeout) as lease:
        lease.acquire(take_over=cfg.resume or cfg.overwrite)
        return _run_leased(cfg, job, build, statistics, storage, layout, shards, lease)


def _run_leased(cfg: GenerateConfig, job: str, build, statistics, storage: Storage, layout: RunLayout,
                shards: list[InputShard], lease: RunLease) -> tuple[dict, int]:
    layout.prepare(cfg.resume, cfg.overwrite)
    committed = layout.committed() & {s.name for s in shards}
    pending = [s for s in shards if s.name not in committed]
    removed = layout.clean_partial(s.name for s in pending) if cfg.resume else 0
    dupes = duplicate_ids(storage, shards)
    model_fp = fingerprint(storage, cfg.model)
    layout.write_json("run.json", redact_values({
        "job": job, "run_id": layout.run_id, "config": dataclasses.asdict(cfg), "model_fingerprint": model_fp,
        "versions": versions(), "inputs": [dataclasses.asdict(s) for s in shards],
        "resumed": bool(cfg.resume and committed), "skipped_shards": sorted(committed),
    }))
    logger.info("%s run %s: %d input shards (%d rows), %d already committed, %d partial files removed",
                job, layout.uri, len(shards), sum(s.rows for s in shards), len(committed), removed)

    progress = Progress(shards, layout, committed, log_every=cfg.log_every)
    progress.commit_empty()
    if any(s.rows for s in pending):
        with progress.ticking():
            ds = (build or build_dataset)(cfg, pending, storage, dupes, layout.uri, model_fp)
            # prefetch_batches=0: hand each result over as soon as it exists, not when the next one does
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                lease.check()
                progress.update(batch.to_pylist())
    lease.check()
    summary = summarize(storage, layout.uri, rows_in=sum(s.rows for s in shards), extra={
        "run_id": layout.run_id, "run": layout.uri, "job": job, "model_fingerprint": model_fp,
        "shards": len(shards), "shards_skipped": len(committed), "shards_committed_now": len(progress.committed_now),
        "elapsed_seconds": round(progress.elapsed, 2),
        "images_per_second": round(progress.images / progress.elapsed, 3) if progress.elapsed else None,
    })
    if statistics is not None:
        summary[job] = statistics(storage, layout.uri, cfg)
    code = exit_code(summary, cfg.max_error_fraction)
    summary["status"] = "succeeded" if code == 0 else "failed"
    layout.write_json("summary.json", redact_values(summary))
    report = write_report(storage, layout.uri, cfg.report_max_images) if cfg.report else None
    print_result(layout, summary, report)
    return summary, code


def exit_code(summary: dict, max_error_fraction: float) -> int:
    if summary["rows_lost"]:
        logger.error("%d input rows are neither in metadata nor in errors", summary["rows_lost"])
        return 1
    if summary["error_fraction"] > max_error_fraction:
        logger.error("error fraction %.3f exceeds --max-error-fraction %.3f", summary["error_fraction"],
                     max_error_fraction)
        return 1
    return 0


def print_result(layout: RunLayout, summary: dict, report: str | None = None) -> None:
    recall = summary["recall"].get("mean")
    print(f"\nrun {summary['status']}: {summary['rows_in']} rows -> {summary['images']} images, "
          f"{summary['errors']} errors" + (f", mean recall {recall:.3f}" if recall is not None else ""))
    print(f"images:  {layout.path('images')}")
    print(f"summary: {layout.path('summary.json')}")
    if summary["errors"]:
        print(f"errors:  {layout.path('errors')}  {summary['errors_by_reason']}")
    if report:
        print(f"report:  {report}")


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(GenerateConfig, run, argv, "python -m jobs.generate")


if __name__ == "__main__":
    sys.exit(main())
