"""The Ray Train side of fine-tuning: decoding training rows (Ray Data) and the per-worker loop.

``decode_batch`` runs inside the Ray Data pipeline: it validates each row's scene graph, decodes
and resizes its image, and marks bad rows with a reason instead of raising. ``train_loop_per_worker``
runs on every Ray Train worker: it builds the model, wraps the trainable part with
``deepspeed.initialize``, streams its dataset shard, and reports metrics and checkpoints through
``ray.train.report``; rank 0 writes ``metrics.jsonl`` and exports the final pipeline.

Every rank must run the same number of forward/backward passes (ZeRO gathers parameters and
reduces gradients collectively), but bad rows are skipped per rank, so shards yield different
numbers of batches. ``SyncedBatches`` therefore asks all ranks at each micro-step whether they
still have a batch and starts a new epoch on all of them together when one runs dry.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from sgmodel.graph import SceneGraph, SceneGraphError, parse_graph
from workers.storage import Storage, StorageSettings, join

logger = logging.getLogger("sgbatch")

GRAPH_COLUMNS = ("id", "objects", "relations", "caption")
LOSS_KEYS = ("total", "recon", "clip", "mmd", "adversarial", "layout")
CHECKPOINT_TAG = "deepspeed"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
CRASH_ENV = "SGBATCH_FINETUNE_CRASH_AFTER_STEP"
"""Fault injection for tests and drills: every worker exits hard right after the checkpoint of this step."""
BaseKind = Literal["scene_graph", "stable_diffusion"]


# ----------------------------------------------------------------------------- data decoding


def decode_image(data: bytes | None, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 [size, size, 3] (RGB, centre crop to square, bicubic resize)."""
    from PIL import Image, ImageOps

    if data is None:
        raise ValueError("image_missing")
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def decode_batch(table: pa.Table, size: int) -> pa.Table:
    """Ray Data stage: graph columns + ``pixels`` (raw uint8 HxWx3 bytes) + ``error``/``error_code``.

    Never raises on a bad row: a graph that breaks the contract or an image that is missing or
    cannot be decoded gives a row with ``error`` set (and empty pixels), which the worker counts
    and skips. Dropping the encoded ``image`` here keeps the bytes moved to the workers small.
    """
    from PIL import Image

    pixels: list[bytes] = []
    errors: list[str | None] = []
    codes: list[str | None] = []
    for row in table.to_pylist():
        graph_row = {k: row.get(k) for k in GRAPH_COLUMNS}
        try:
            parse_graph(graph_row)
            pixels.append(decode_image(row.get("image"), size).tobytes())
            errors.append(None)
            codes.append(None)
        except SceneGraphError as err:
            pixels.append(b"")
            errors.append(err.reason)
            codes.append(err.code)
        except (ValueError, OSError, Image.DecompressionBombError, SyntaxError) as err:
            # PIL raises OSError/UnidentifiedImageError for garbage, SyntaxError for some broken PNGs.
            missing = str(err) == "image_missing"
            pixels.append(b"")
            errors.append("image is null" if missing else f"image cannot be decoded: {type(err).__name__}: {err}"[:300])
            codes.append("image_missing" if missing else "image_undecodable")
    columns = {name: table.column(name) for name in GRAPH_COLUMNS if name in table.column_names}
    if "caption" not in columns:
        columns["caption"] = pa.nulls(table.num_rows, pa.string())
    columns["pixels"] = pa.array(pixels, pa.binary())
    columns["error"] = pa.array(errors, pa.string())
    columns["error_code"] = pa.array(codes, pa.string())
    return pa.table(columns)


def rows_to_batch(rows: Sequence[Mapping[str, Any]], size: int) -> tuple[list[SceneGraph], torch.Tensor]:
    """Decoded rows -> (graphs, images [B, 3, size, size] float32 in [-1, 1])."""
    graphs = [parse_graph({k: r.get(k) for k in GRAPH_COLUMNS}) for r in rows]
    arrays = np.stack([np.frombuffer(r["pixels"], dtype=np.uint8).reshape(size, size, 3) for r in rows])
    images = torch.from_numpy(arrays.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return graphs, images


@dataclass
class BadRows:
    """Bad rows seen by one worker, as distinct ids per reason code (a row is counted once across epochs)."""

    ids: dict[str, set[str]] = field(default_factory=dict)
    logged: int = 0
    log_limit: int = 20

    def add(self, row: Mapping[str, Any], rank: int) -> None:
        code = row.get("error_code") or "unknown"
        row_id = str(row.get("id"))
        seen = self.ids.setdefault(code, set())
        if row_id in seen:
            return
        seen.add(row_id)
        if self.logged < self.log_limit:
            logger.warning("rank %d: skipping row %r (%s): %s", rank, row_id, code, row.get("error"))
            self.logged += 1
            if self.logged == self.log_limit:
                logger.warning("rank %d: further bad rows are counted but not logged", rank)

    def merge(self, other: Mapping[str, Sequence[str]]) -> None:
        for code, ids in other.items():
            self.ids.setdefault(code, set()).update(ids)

    def counts(self) -> dict[str, int]:
        return {code: len(ids) for code, ids in sorted(self.ids.items())}

    def as_json(self) -> dict[str, list[str]]:
        return {code: sorted(ids) for code, ids in sorted(self.ids.items())}


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """Everything a Ray Train worker needs (resolved by the job's driver; picklable)."""

    base: str
    base_kind: BaseKind
    conditioning: str | None
    """For Stable Diffusion bases: tokens | gated."""
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

    @property
    def micro_batch(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def accumulation(self) -> int:
        return int(self.deepspeed["gradient_accumulation_steps"])

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed["zero_optimization"]["stage"])


# ----------------------------------------------------------------------------- model


def load_base(settings: WorkerSettings, storage: Storage):
    """The pipeline to fine-tune: a scene-graph pipeline as saved, or SD + a fresh graph encoder/conditioner.

    Seeded by the caller, so every rank builds identical new modules.
    """
    from sgmodel.pipeline import SceneGraphDiffusionPipeline
    from workers.runtime import localize_model

    path = localize_model(settings.base, storage)
    if settings.base_kind == "scene_graph":
        pipe = SceneGraphDiffusionPipeline.from_pretrained(path, use_safetensors=True)
        mode = pipe.conditioner.config.mode
        if settings.conditioning not in (None, mode):
            raise ValueError(f"--conditioning {settings.conditioning!r} does not match the base model's {mode!r}")
        return pipe
    projection_dim = None
    if settings.image_encoder:
        projection_dim = int(load_image_encoder_config(settings, storage).projection_dim)
    return SceneGraphDiffusionPipeline.from_stable_diffusion(
        path, conditioning=settings.conditioning or "tokens", projection_dim=projection_dim
    )


def load_image_encoder_config(settings: WorkerSettings, storage: Storage):
    from transformers import CLIPVisionConfig

    from workers.runtime import localize_model

    return CLIPVisionConfig.from_pretrained(localize_model(settings.image_encoder, storage))


def load_image_encoder(settings: WorkerSettings, storage: Storage):
    """The frozen CLIP vision model of the alignment losses (None when λ = 1)."""
    if not settings.image_encoder:
        return None
    from transformers import CLIPVisionModelWithProjection

    from workers.runtime import localize_model

    return CLIPVisionModelWithProjection.from_pretrained(
        localize_model(settings.image_encoder, storage), use_safetensors=True
    )


def place_frozen(module, device: torch.device, dtype: torch.dtype) -> None:
    """Frozen parts live outside the DeepSpeed engine: move and cast them ourselves (like diffusers' scripts)."""
    for part in vars(module.frozen).values():
        if isinstance(part, torch.nn.Module):
            part.to(device=device, dtype=dtype)


class LossOutputs(torch.nn.Module):
    """What DeepSpeed wraps: the training module, with its loss terms returned as a dict of tensors.

    ZeRO-3 re-gathers a module's parameters for the backward pass through hooks on the module's
    tensor outputs; it cannot see into the dataclasses (LossTerms, Condition) the model returns.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, graphs: Sequence[SceneGraph], images: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """graphs (B), images [B, 3, H, W] in [-1, 1] -> {"total": scalar, "recon": scalar, …}."""
        terms = self.inner(graphs, images, generator=generator)
        return {key: value for key in LOSS_KEYS if (value := getattr(terms, key)) is not None}


def prepare_for_deepspeed(module: torch.nn.Module, zero_stage: int) -> LossOutputs:
    """Adapt the training module to DeepSpeed's expectations (returns the module to pass to initialize).

    - 0-dim parameters (GLIGEN's gates ``alpha_attn``/``alpha_dense``) become shape [1]: DeepSpeed
      broadcasts parameters as byte views, which a 0-dim tensor cannot give. They broadcast the same
      in the forward; the export reshapes them back.
    - At ZeRO-3, parameters that modules own directly next to child modules (the conditioner's
      token-type and null tokens, used in ``drop()`` outside its forward and behind a dataclass
      output) are registered with the wrapper, so they stay gathered from its forward to its backward.
      Such parameters are small; the big weights sit in leaf layers (Linear, Conv, Embedding, norms).
    """
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(owner, name, torch.nn.Parameter(param.data.reshape(1), requires_grad=param.requires_grad))
    wrapper = LossOutputs(module)
    if zero_stage == 3:
        import deepspeed

        for owner in module.modules():
            if next(owner.children(), None) is not None:
                for param in owner.parameters(recurse=False):
                    deepspeed.zero.register_external_parameter(wrapper, param)
    return wrapper


def trained_state(engine, rank: int) -> dict[str, torch.Tensor]:
    """Full fp32 master weights of every trainable parameter, on rank 0 (empty elsewhere).

    ``safe_get_full_fp32_param`` reads the optimizer's fp32 copy (exact under bf16) and, at
    ZeRO-3, gathers the partitions: a collective, so every rank walks the parameters in the same order.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        if full is None:  # no optimizer mapping (e.g. ZeRO disabled by an override): the weight itself
            full = param.detach()
        if rank == 0:
            out[name.removeprefix("inner.")] = full.detach().to("cpu", torch.float32).clone()
    return out


def export_pipeline(settings: WorkerSettings, state: Mapping[str, torch.Tensor], storage: Storage) -> list[str]:
    """Load the base again, put the trained weights in, merge LoRA, save safetensors to ``settings.output``.

    Rebuilding from the base (instead of saving the training copy) gives full frozen weights even
    when ZeRO-3 partitioned them, and a plain fp32 pipeline whatever the training precision.
    """
    from sgmodel.train import configure_trainable, merge_lora

    torch.manual_seed(settings.seed)
    pipe = load_base(settings, storage)
    configure_trainable(pipe, settings.train)  # adds LoRA adapters under the names training used
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        part, _, rest = name.partition(".")
        if part == "discriminator":  # a training-only helper, not part of the generator
            continue
        by_part.setdefault(part, {})[rest] = tensor
    for part, tensors in by_part.items():
        target = getattr(pipe, part)
        missing_from_model = set(tensors) - set(dict(target.named_parameters()))
        if missing_from_model:
            raise RuntimeError(f"trained weights not found in the base's {part}: {sorted(missing_from_model)[:5]}")
        with torch.no_grad():
            params = dict(target.named_parameters())
            for key, tensor in tensors.items():
                params[key].copy_(tensor.reshape(params[key].shape).to(params[key].dtype))  # [1] -> 0-dim gates
    if settings.train.trainable == "lora":
        merge_lora(pipe.unet)
    pipe.to(torch.float32)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                uri = join(settings.output, str(path.relative_to(tmp)))
                storage.write_bytes(uri, path.read_bytes())
                written.append(uri)
    return written


# ----------------------------------------------------------------------------- batches across ranks


def comm_device() -> torch.device:
    """Where small collective tensors must live: the GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or ``op``) a small tensor over all ranks; returns it on the CPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return tensor
    on_device = tensor.to(comm_device())
    dist.all_reduce(on_device, op=op or dist.ReduceOp.SUM)
    return on_device.cpu()


def all_ranks_have(flag: bool) -> bool:
    """True when every rank's ``flag`` is True (a one-element MIN all-reduce)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    return bool(all_reduce(torch.tensor([1 if flag else 0], dtype=torch.int32), op=dist.ReduceOp.MIN).item())


class SyncedBatches:
    """Micro-batches of valid rows from a Ray Data shard, in lock-step across ranks (see module docstring)."""

    def __init__(self, shard, batch_size: int, size: int, bad: BadRows, rank: int, seed: int,
                 shuffle_buffer: int) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.size = size
        self.bad = bad
        self.rank = rank
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = -1
        self._rows: Iterator[list[dict]] | None = None

    def _epoch_rows(self, epoch: int) -> Iterator[list[dict]]:
        buffer: list[dict] = []
        shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer, "local_shuffle_seed": self.seed + 7919 * epoch + self.rank} \
            if self.shuffle_buffer > 1 else {}
        for table in self.shard.iter_batches(batch_size=self.batch_size, batch_format="pyarrow", **shuffle):
            for row in table.to_pylist():
                if row.get("error"):
                    self.bad.add(row, self.rank)
                    continue
                buffer.append(row)
                if len(buffer) == self.batch_size:
                    yield buffer
                    buffer = []

    def next(self) -> tuple[list[SceneGraph], torch.Tensor]:
        """The next micro-batch; when any rank's epoch ends, all ranks start the next epoch together."""
        fresh_epochs = 0
        while True:
            rows = next(self._rows, None) if self._rows is not None else None
            if all_ranks_have(rows is not None):
                return rows_to_batch(rows, self.size)
            if fresh_epochs >= 1:  # a whole new epoch gave no batch on some rank
                raise RuntimeError(
                    f"a worker's shard has fewer than --batch-size {self.batch_size} valid rows; "
                    "use a bigger training table, a smaller --batch-size or fewer --workers"
                )
            self._close()
            self.epoch += 1
            fresh_epochs += 1
            self._rows = self._epoch_rows(self.epoch)

    def one_pass(self, limit: int | None) -> Iterator[tuple[list[SceneGraph], torch.Tensor]]:
        """One synchronised pass (validation): stops when any rank runs out, or after ``limit`` batches."""
        self.epoch += 1
        rows_iter = self._epoch_rows(self.epoch)
        count = 0
        try:
            while limit is None or count < limit:
                rows = next(rows_iter, None)
                if not all_ranks_have(rows is not None):
                    return
                count += 1
                yield rows_to_batch(rows, self.size)
        finally:
            rows_iter.close()

    def _close(self) -> None:
        if self._rows is not None:
            self._rows.close()  # let go of the old epoch's stream before the next one starts


# ----------------------------------------------------------------------------- state and metrics


class EMA:
    """Exponential moving average of the trained weights, in fp32, kept by rank 0 (ZeRO stages 1-2).

    At stages 1-2 every rank holds the full, identical weights after each step, so rank 0 alone can
    average them. Warmup as in diffusers' EMAModel: decay = min(decay, (1 + n) / (10 + n)).
    """

    def __init__(self, named: Mapping[str, torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {name: t.detach().float().clone() for name, t in named.items()}

    @torch.no_grad()
    def update(self, named: Mapping[str, torch.Tensor]) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, tensor in named.items():
            self.shadow[name].mul_(decay).add_(tensor.detach().float(), alpha=1 - decay)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path), metadata={"updates": str(self.updates)})

    def load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            self.updates = int(f.metadata()["updates"])
            for name in f.keys():
                self.shadow[name].copy_(f.get_tensor(name))


def trainable_named(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by their export names (without the DeepSpeed wrapper's prefix)."""
    return {name.removeprefix("inner."): p for name, p in model.named_parameters() if p.requires_grad}


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


def gather_bad_rows(bad: BadRows) -> BadRows:
    """Every rank's bad-row ids merged (a collective: all ranks call it at the same points)."""
    import torch.distributed as dist

    merged = BadRows()
    merged.merge(bad.as_json())
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, bad.as_json())
        for part in parts:
            merged.merge(part)
    return merged


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
    from sgmodel.train import DiffusionTrainingModule, lr_factor, trainable_parameters

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
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=settings.warmup_steps, total_steps=settings.steps)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=settings.deepspeed, dist_init_required=False
    )

    # 2. Resume: DeepSpeed restores weights, optimizer and LR schedule; our state file the rest.
    state = TrainerState(world_size=world, zero_stage=settings.zero_stage)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = TrainerState.from_json(json.loads((Path(folder) / STATE_FILE).read_text()))
            if saved.world_size != world or saved.zero_stage != settings.zero_stage:
                raise RuntimeError(
                    f"checkpoint at step {saved.step} was written by {saved.world_size} workers at ZeRO-{saved.zero_stage}; "
                    f"resume with --workers {saved.world_size} --zero-stage {saved.zero_stage}"
                )
            load_path, _ = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint under {checkpoint.path}")
        state = saved
        state.resumed_from_step = saved.step
        if rank == 0:
            logger.info("resumed from step %d (%s)", saved.step, checkpoint.path)
    ema = None
    if settings.ema_decay and rank == 0:
        ema = EMA(trainable_named(engine.module), settings.ema_decay)
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
    window_start, window_samples, first_window = time.perf_counter(), 0, True
    global_batch = settings.micro_batch * settings.accumulation * world
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    started_at = state.step
    while state.step < settings.steps:
        lr = scheduler.get_last_lr()[0]
        for micro in range(settings.accumulation):
            graphs, images = train.next()
            gen = torch.Generator("cpu").manual_seed(step_seed(settings.seed, rank, state.step, micro))
            losses = engine(graphs, images.to(device), generator=gen)
            engine.backward(losses["total"])
            engine.step()
            meter.add(losses)
        if ema is not None:
            ema.update(trainable_named(engine.module))
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
                if crash_after and state.step >= crash_after > (state.resumed_from_step or 0):
                    ray.train.get_all_reported_checkpoints()  # wait until the checkpoint is registered
                    logger.warning("rank %d: %s=%d: exiting hard after step %d", rank, CRASH_ENV, crash_after, state.step)
                    os._exit(1)
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
