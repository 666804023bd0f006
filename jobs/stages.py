"""The Ray Data stages the batch jobs share: read + validate, the generator actor pool, the sink.

Light stages reserve little CPU so that, even on a 2-CPU machine, the generator actor and the
reads can be scheduled side by side.

Results stream: after the generator, each stage takes the blocks as they come (one generator call
each) instead of gathering a fixed number of rows, so a batch is written, counted and its shard
committed seconds after the generator finishes it. ``--sink-rows`` trades that for fewer files.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

from jobs.common import cluster_has_gpus
from jobs.config import ConfigError
from jobs.inputs import InputShard
from sgmodel.graph import ValidationLimits
from workers.storage import Storage

READ_CPUS, SINK_CPUS, SCORER_CPUS = 0.1, 0.1, 0.25
SINK_MEMORY = 384 * 2**20
"""Memory the sink actor declares: its process (pyarrow, PIL, boto3) holds about 250 MiB, and Ray Data
warns every 30 s about an actor that uses memory it never asked for."""


@dataclass(frozen=True)
class Placement:
    generator_gpus: float
    scorer_gpus: float


def placement(cfg) -> Placement:
    """GPUs per actor: as configured, else a whole GPU per generator and a quarter per scorer when the cluster has GPUs."""
    has = cluster_has_gpus() if cfg.gpus_per_worker is None or cfg.scorer_gpus is None else False
    gen = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1.0 if has else 0.0)
    score = cfg.scorer_gpus if cfg.scorer_gpus is not None else (0.25 if has else 0.0)
    return Placement(gen, score)


def check_cpu_budget(cfg) -> None:
    """On a fixed local instance, the actors must leave one CPU for Ray Data's file listing.

    An autoscaling cluster (RAY_ADDRESS) adds nodes instead, so nothing is checked there.
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return
    total = ray.cluster_resources().get("CPU", 0)
    scorers = cfg.scorer_workers * SCORER_CPUS if cfg.scoring else 0.0
    reserved = cfg.worker_range[0] * cfg.cpus_per_worker + SINK_CPUS + scorers
    if reserved > total - 1:
        raise ConfigError(
            f"--workers {cfg.workers} x --cpus-per-worker {cfg.cpus_per_worker} (+ scorer and sink) reserve "
            f"{reserved:.2f} of this machine's {total:.0f} CPUs; leave at least one free for reading the input"
        )


def read_validated(cfg, pending: list[InputShard], storage: Storage, dupes: frozenset[str]):
    """One read task per input file, each with the file's own columns -> validated rows (VALIDATED_SCHEMA)."""
    import ray

    from workers.reader import ReadSettings, read_units

    settings = ReadSettings(limits=ValidationLimits(max_text_chars=cfg.max_text_chars, max_objects=cfg.max_objects,
                                                    max_relations=cfg.max_relations),
                            duplicate_ids=dupes, storage=storage.settings)
    units = [{"uri": s.uri, "shard": s.name, "rows": s.rows} for s in pending if s.rows]
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    return ds.map_batches(read_units, fn_args=(settings,), batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS)


def generation_settings(cfg, gpus: float, steps: int | None = None):
    from workers.generator import GenerationSettings

    return GenerationSettings(
        model=cfg.model, steps=steps or cfg.steps, guidance=cfg.guidance, height=cfg.height, width=cfg.width,
        samples_per_graph=cfg.samples_per_graph, base_seed=cfg.seed, precision=cfg.precision,
        scheduler=cfg.scheduler, use_gpu=gpus > 0, threads=cfg.threads_per_worker, compile=cfg.compile,
        channels_last=cfg.memory_format == "channels_last", layout=cfg.layout,
        separate_guidance=cfg.guidance_passes == "separate",
    )


def actor_pool(**sizes):
    """An ActorPoolStrategy whose actors run the model on their main thread.

    By default Ray Data calls an actor's ``__call__`` on a helper thread (to overlap batching,
    which only helps with ``max_concurrency`` > 1, not used here). Torch's OpenMP kernels run
    slower from that second thread (they no longer keep every core busy). With max_concurrency 1 (the default) "true
    multi-threading" just means the call runs on the actor's own thread, one at a time. Ray
    versions without the option keep their default.
    """
    from ray.data import ActorPoolStrategy

    if "enable_true_multi_threading" in inspect.signature(ActorPoolStrategy.__init__).parameters:
        sizes["enable_true_multi_threading"] = True
    return ActorPoolStrategy(**sizes)


def generator_stage(ds, cfg, actor_cls, constructor_args: tuple, gpus: float):
    """The pool of GPU-resident model actors (autoscaling between --workers MIN,MAX)."""
    low, high = cfg.worker_range
    # Ray Data hands an actor whole blocks, and small input files are read as one block: without
    # this split one actor of the pool would get every row while the others idle.
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    return ds.map_batches(actor_cls, fn_constructor_args=constructor_args, batch_format="pyarrow",
                          batch_size=cfg.batch_size, compute=actor_pool(min_size=low, max_size=high),
                          num_gpus=gpus, num_cpus=cfg.cpus_per_worker)


def sink_stage(ds, cfg, run_uri: str, model_fp: str, storage: Storage):
    """One writer actor; each call writes one metadata file (and one tar in WebDataset output) per input shard.

    By default it writes every block as it arrives (``batch_size=None``); ``--sink-rows N`` gathers N
    rows per call instead.
    """
    from workers.sink import Sink, SinkSettings

    sink = SinkSettings(run_uri=run_uri, output_format=cfg.output_format, model_fingerprint=model_fp)
    return ds.map_batches(Sink, fn_constructor_args=(sink, storage.settings), batch_format="pyarrow",
                          batch_size=cfg.sink_rows, compute=actor_pool(size=1), num_cpus=SINK_CPUS,
                          memory=SINK_MEMORY)
