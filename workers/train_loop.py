"""The per-worker fine-tuning loop under Ray Train and DeepSpeed ZeRO.

``train_loop_per_worker`` runs on every Ray Train worker: it builds the model, wraps the trainable
part with ``deepspeed.initialize``, streams its dataset shard, and reports metrics and checkpoints
through ``ray.train.report``; rank 0 writes ``metrics.jsonl`` and exports the final pipeline.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sgmodel.optim import EMA, lr_factor, trainable_named
from workers.storage import Storage, StorageSettings, join
from workers.train_checkpoint import (
    check_own_checkpoint,
    staged_for_deepspeed,
    tidy_saved,
    use_safetensors_checkpoints,
)
from workers.train_data import BadRows, SyncedBatches, gather_bad_rows
from workers.train_engine import LOSS_KEYS, all_reduce, place_frozen, prepare_for_deepspeed, trained_state
from workers.train_export import export_pipeline, load_base, load_image_encoder
from workers.train_memory import ModelStateProbe

logger = logging.getLogger("sgbatch")

CHECKPOINT_TAG = "deepspeed"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
BaseKind = Literal["scene_graph", "stable_diffusion"]


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """Everything a Ray Train worker needs (resolved by the job's driver; picklable)."""

    base: str
    base_kind: BaseKind
    conditioning: str | None
    layout_channels: int
    """For Stable Diffusion bases: tokens | gated."""
    attention_heads: int | None = None
    image_encoder: str | None
    train: Any
    """sgmodel.train.TrainConfig."""
    deepspeed: dict
    steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    image_size: int
    use_gpu: bool
    threads: int | None
    seed: int
    log_every: int
    checkpoint_every: int
    val_every: int | None
    val_batches: int | None
    shuffle_buffer: int
    output: str
    storage: StorageSettings
    has_val: bool
    ema_decay: float | None = None
    new_layers_lr: float | None = None
    checkpoint_root: str = ""
    """Where this run's checkpoints live, as Ray Train names them (resume reads nothing from elsewhere)."""
    graph_sizes: dict = field(default_factory=dict)
    """For Stable Diffusion bases: sizes of the new graph encoder and conditioner (from_stable_diffusion's arguments)."""

    @property
    def micro_batch(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def accumulation(self) -> int:
        return int(self.deepspeed["gradient_accumulation_steps"])

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed["zero_optimization"]["stage"])


@dataclass
class TrainerState:
    """What a checkpoint carries besides DeepSpeed's own files (trainer_state.json, written by rank 0)."""

    step: int = 0
    world_size: int = 1
    zero_stage: int = 2
    samples: int = 0
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    steady_samples: int = 0
    steady_seconds: float = 0.0
    """Samples and time of every logging window but the first after a (re)start (start-up excluded)."""
    bad_rows: dict[str, list[str]] = field(default_factory=dict)
    resumed_from_step: int | None = None
    initial_val_loss: float | None = None
    """Validation loss of the base model, before the first step."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainerState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class LossMeter:
    """Sums of loss terms over a logging window, averaged across ranks when read."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
        self.counts = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)

    def add(self, losses: Mapping[str, torch.Tensor]) -> None:
        for i, key in enumerate(LOSS_KEYS):
            value = losses.get(key)
            if value is not None:
                self.sums[i] += float(value.detach().float())
                self.counts[i] += 1

    def reduce(self) -> dict[str, float]:
        both = all_reduce(torch.stack([self.sums, self.counts]))
        self.sums.zero_()
        self.counts.zero_()
        return {f"loss_{key}": float(both[0, i] / both[1, i]) for i, key in enumerate(LOSS_KEYS) if both[1, i] > 0}


def step_seed(seed: int, *parts: int) -> int:
    """A noise seed per (run seed, rank, step…): reproducible and distinct on every rank."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def write_metrics(storage: Storage, output: str, history: Sequence[Mapping[str, Any]]) -> None:
    storage.write_text(join(output, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: build, wrap with DeepSpeed, (resume,) train, checkpoint, export."""
    settings: WorkerSettings = config["settings"]
    if not settings.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported in this process
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from sgmodel.deepspeed_config import compute_dtype
    from sgmodel.train import DiffusionTrainingModule, parameter_groups

    logging.basicConfig(level=logging.INFO, format="%(asctime)s sgbatch %(levelname)s %(message)s")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = settings.threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size()))
    torch.set_num_threads(threads)
    if settings.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    storage = Storage(settings.storage)
    dtype = compute_dtype(settings.deepspeed)

    # 1. Model: identical on every rank (same seed for any new module), frozen parts outside DeepSpeed.
    torch.manual_seed(settings.seed)
    pipe = load_base(settings, storage)
    module = DiffusionTrainingModule(pipe, settings.train, image_encoder=load_image_encoder(settings, storage))
    place_frozen(module, device, dtype)
    model = prepare_for_deepspeed(module, settings.zero_stage).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.lr, settings.new_layers_lr),
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=settings.warmup_steps, total_steps=settings.steps)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=settings.deepspeed, dist_init_required=False
    )
    use_safetensors_checkpoints(engine)  # weights and optimizer state as safetensors; nothing is unpickled

    # 2. Resume (only from this run's own checkpoint storage): DeepSpeed restores weights, optimizer and LR
    #    schedule; our state file the rest.
    state = TrainerState(world_size=world, zero_stage=settings.zero_stage)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        check_own_checkpoint(checkpoint.path, settings.checkpoint_root)
        with checkpoint.as_directory() as folder:
            saved = TrainerState.from_json(json.loads((Path(folder) / STATE_FILE).read_text()))
            if saved.world_size != world or saved.zero_stage != settings.zero_stage:
                raise RuntimeError(
                    f"checkpoint at step {saved.step} was written by {saved.world_size} workers at ZeRO-{saved.zero_stage}; "
                    f"resume with --workers {saved.world_size} --zero-stage {saved.zero_stage}"
                )
            with staged_for_deepspeed(folder, CHECKPOINT_TAG) as staged:
                load_path, _ = engine.load_checkpoint(staged, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint under {checkpoint.path}")
        state = saved
        state.resumed_from_step = saved.step
        if rank == 0:
            logger.info("resumed from step %d (%s)", saved.step, checkpoint.path)
    ema = None
    if settings.ema_decay and rank == 0:
        ema = EMA(trainable_named(engine.module, prefix="inner."), settings.ema_decay)
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                if (Path(folder) / EMA_FILE).is_file():
                    ema.load(Path(folder) / EMA_FILE)
                else:
                    logger.warning("the checkpoint has no EMA weights: the average starts at step %d", state.step)
    bad = BadRows()
    bad.merge(state.bad_rows)
    if rank == 0 and state.history:
        write_metrics(storage, settings.output, state.history)

    train = SyncedBatches(ray.train.get_dataset_shard("train"), settings.micro_batch, settings.image_size, bad,
                          rank, settings.seed + 1000 * state.step, settings.shuffle_buffer)
    val = None
    if settings.has_val:
        val = SyncedBatches(ray.train.get_dataset_shard("val"), settings.micro_batch, settings.image_size,
                            BadRows(), rank, settings.seed, 0)  # bad validation rows are logged, not counted

    def validate() -> float:
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i, (graphs, images) in enumerate(val.one_pass(settings.val_batches)):
                gen = torch.Generator("cpu").manual_seed(step_seed(settings.seed, rank, i, 1))
                total[0] += float(engine(graphs, images.to(device), generator=gen)["total"].float()) * len(graphs)
                total[1] += len(graphs)
        total = all_reduce(total)
        engine.train()
        return float(total[0] / total[1]) if total[1] else float("nan")

    def save_and_report(metrics: dict) -> None:
        merged = gather_bad_rows(bad)
        state.bad_rows = merged.as_json()
        with tempfile.TemporaryDirectory() as folder:
            engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state={"step": state.step})
            tidy_saved(folder)
            if rank == 0:
                (Path(folder) / STATE_FILE).write_text(json.dumps(asdict(state)) + "\n")
                if ema is not None:
                    ema.save(Path(folder) / EMA_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step-{state.step:08d}")

    # 3. Train: one "step" is one optimizer step of gradient_accumulation micro-batches on every rank.
    if val is not None and checkpoint is None:
        state.initial_val_loss = validate()
        if rank == 0:
            logger.info("validation loss of the base model: %.4f", state.initial_val_loss)
    engine.train()
    meter = LossMeter()
    probe = ModelStateProbe(engine)  # per-rank model-state bytes at the first step, in the first metrics record
    window_start, window_samples, first_window = time.perf_counter(), 0, True
    global_batch = settings.micro_batch * settings.accumulation * world
    started_at = state.step
    while state.step < settings.steps:
        lr = scheduler.get_last_lr()[0]
        for micro in range(settings.accumulation):
            graphs, images = train.next()
            gen = torch.Generator("cpu").manual_seed(step_seed(settings.seed, rank, state.step, micro))
            losses = engine(graphs, images.to(device), generator=gen)
            engine.backward(losses["total"])
            probe.after_backward()
            engine.step()
            probe.after_step()
            meter.add(losses)
        if ema is not None:
            ema.update(trainable_named(engine.module, prefix="inner."))
        state.step += 1
        state.samples += global_batch
        window_samples += global_batch
        last = state.step == settings.steps
        checkpoint_now = state.step % settings.checkpoint_every == 0 and not last  # the last one follows the export
        if state.step % settings.log_every == 0 or last or checkpoint_now:
            elapsed = time.perf_counter() - window_start
            state.train_seconds += elapsed
            if not first_window:
                state.steady_samples += window_samples
                state.steady_seconds += elapsed
            first_window = False
            record = {"step": state.step, **meter.reduce(), "lr": lr,
                      "samples_per_s": round(window_samples / max(elapsed, 1e-9), 3)}
            record.update(probe.report())
            if val is not None and (last or (settings.val_every and state.step % settings.val_every == 0)):
                record["val_loss"] = validate()
            state.history.append(record)
            if rank == 0:
                write_metrics(storage, settings.output, state.history)
                logger.info("step %d/%d loss %.4f (recon %.4f)%s lr %.2e %.1f samples/s", state.step, settings.steps,
                            record["loss_total"], record["loss_recon"],
                            f" val {record['val_loss']:.4f}" if "val_loss" in record else "", lr, record["samples_per_s"])
            if checkpoint_now:
                save_and_report(record)
            elif not last:
                ray.train.report(record)
            window_start, window_samples = time.perf_counter(), 0

    # 4. Export (rank 0) from the full fp32 weights (or their EMA), then the final checkpoint, whose metrics carry the
    #    run's totals to the driver (Ray Train's Result.metrics are those of the latest checkpoint).
    weights = trained_state(engine, rank)
    state.bad_rows = gather_bad_rows(bad).as_json()
    if rank == 0:
        if ema is not None:
            weights = dict(ema.shadow)
        written = export_pipeline(settings, weights, storage)
        logger.info("exported the fine-tuned pipeline to %s (%d files)", settings.output, len(written))
    dist.barrier()
    final = dict(state.history[-1]) if state.history else {"step": state.step}
    steady = state.steady_seconds > 0
    final.update({
        "final": True, "steps": state.step, "samples": state.samples, "train_seconds": round(state.train_seconds, 3),
        "samples_per_s_mean": round((state.steady_samples / state.steady_seconds) if steady
                                    else state.samples / max(state.train_seconds, 1e-9), 3),
        "resumed_from_step": state.resumed_from_step, "initial_val_loss": state.initial_val_loss,
        "bad_rows": {code: len(ids) for code, ids in state.bad_rows.items()}, "world_size": world,
    })
    if state.step > started_at:
        save_and_report(final)
    else:  # resumed a finished run: nothing trained, the latest checkpoint already holds these totals
        ray.train.report(final)


def steps_for_epochs(epochs: float, rows: int, global_batch: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``rows`` rows (at least one)."""
    return max(1, math.floor(epochs * rows / global_batch))
