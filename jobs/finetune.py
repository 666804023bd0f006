"""Fine-tune a scene-graph diffusion model on Parquet image/graph tables: Ray Train + DeepSpeed ZeRO.

    ray job submit --working-dir . -- python -m jobs.finetune --train s3://…/vg/ --base runwayml/stable-diffusion-v1-5 \\
        --output s3://…/sg-sd15 --workers 8 --use-gpu --precision bf16 --zero-stage 2 --steps 20000
    python -m jobs.finetune --train out/shapes-train --steps 200     # the shapes demo model, 2 local CPU workers

Ray Data reads the table and decodes/resizes images in its pipeline; each Ray Train worker wraps
the trainable part of the model with ``deepspeed.initialize``; checkpoints go beside the output to
``{output}-checkpoints/`` (or ``--checkpoint-dir``) through Ray Train's storage, so ``--resume`` picks
up the latest one, optimizer state included. At the end rank 0 exports a
``SceneGraphDiffusionPipeline`` to ``--output``, which ``jobs.generate --model`` loads, and
``diffusers.DiffusionPipeline.from_pretrained(output, trust_remote_code=True)`` too.

Output folder: the pipeline (model_index.json + component folders, safetensors), with
``--trainable lora`` also ``pytorch_lora_weights.safetensors`` (the UNet's LoRA in diffusers' format,
for ``load_lora_weights``), ``run.json`` (resolved config, DeepSpeed config, versions),
``metrics.jsonl``, ``summary.json`` and ``report.html``. Each ``metrics.jsonl`` line is one logging window: ``step`` (the window's last
step), ``loss_*`` (means over the window's micro-batches and all ranks), ``lr`` (of the window's last
step), ``samples_per_s`` (global) and, at validation steps, ``val_loss`` (fixed noise and timesteps,
so values are comparable across steps; ``summary.json`` has the base model's as ``val_loss_initial``).

Bad rows (undecodable or missing image, graph breaking the contract) are skipped and counted per
reason, never fatal. On a multi-node cluster ``--output`` and ``--checkpoint-dir`` must be shared
storage (s3://): rank 0 writes the export and every rank its checkpoint shards. Checkpoints hold
DeepSpeed's state (weights, optimizer partitions, LR schedule) as safetensors files
(:mod:`workers.train_checkpoint`), and ``--resume`` reads only the run's own checkpoint storage.
The run holds a lease on its output folder (``_lease.json``, :mod:`jobs.lease`) from before it deletes
or writes anything there until it ends, so a second run of the same output is refused, even with
``--overwrite``, while the first one lives.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from jobs.common import RunExistsError, fingerprint, init_ray, job_main, storage_for, versions, write_report
from jobs.config import ConfigError, require
from jobs.defaults import DEMO_MODEL, resolve
from jobs.lease import DEFAULT_TIMEOUT, RunLease
from jobs.preflight import check_before_start
from jobs.runs import LEASE_FILE, discover_inputs, files_but_lease, input_columns, parquet_paths
from sgmodel.pipeline import pipeline_class_name, widths_heads_do_not_divide
from sgmodel.train import TrainConfig
from workers.storage import Storage, is_s3, join, split_s3

logger = logging.getLogger("sgbatch")

RUN_NAME = "finetune"
"""Ray Train's run name under the checkpoint storage path (fixed, so a rerun finds the checkpoints)."""
TRAIN_COLUMNS = ("id", "objects", "relations", "caption", "image")


@dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """Fine-tune the scene-graph conditioning (optionally the UNet) with Ray Train + DeepSpeed ZeRO.

    The loss and what trains are :class:`sgmodel.train.TrainConfig`'s fields, passed down as they are."""

    train: str = ""
    """Training table: Parquet file, folder or glob, local or s3:// (rows with an encoded image and a graph)."""
    val: str | None = None
    """Validation table (same format); its mean loss is logged as val_loss."""
    base: str = DEMO_MODEL
    """Scene-graph pipeline folder to continue from, or a diffusers Stable Diffusion folder / hub id (a new
    graph encoder and conditioner are added). Local or s3://."""
    output: str = "out/finetune"
    """Folder or s3:// prefix for the exported pipeline, run.json, metrics.jsonl, summary.json."""
    checkpoint_dir: str | None = None
    """Where checkpoints go, local or s3:// (default: beside the output, {output}-checkpoints)."""
    conditioning: Literal["auto", "tokens", "gated", "caption"] = "auto"
    """Conditioning to train: auto keeps a scene-graph base's own (tokens for a Stable Diffusion base);
    another mode converts the base (gated adds GLIGEN layers with zero gates and a layout head;
    caption conditions on the caption alone, a text-prompt baseline)."""
    layout_channels: int = 8
    """Layout canvas channels the UNet takes when the base becomes gated (0: grounding tokens only)."""
    attention_heads: int | None = None
    """Split the UNet's attention into this many heads (default: the base's), keeping its weights: fewer,
    wider heads render faster on CPU. Changes the outputs until trained."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage (3 partitions parameters too, for models that do not fit one device)."""
    offload: Literal["none", "cpu"] = "none"
    """Offload optimizer state (and at stage 3 the parameters) to host memory."""
    deepspeed_overrides: str | None = None
    """Extra DeepSpeed config merged over the generated one: inline JSON or a JSON/YAML file."""
    workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); without it the workers run on CPU with gloo and DS_ACCELERATOR=cpu."""
    cpus_per_worker: float | None = None
    """CPUs reserved per worker (default: 1 on a cluster; on a local instance what leaves one CPU for reading data)."""
    threads_per_worker: int | None = None
    """Torch threads per worker (default: the machine's CPUs divided by the workers on it)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (fp16 needs --use-gpu); the export is fp32 either way."""
    batch_size: int = 8
    """Micro-batch per worker."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step (global batch = batch size x accumulation x workers)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    new_layers_lr: float | None = None
    """Peak learning rate of the layers a conversion adds (gated: GLIGEN fusers and box embedding, the
    input conv's canvas channels, grounding and layout-head MLPs; caption: the caption projection);
    default --lr. With it the input conv's latent channels stay fixed."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps, then cosine decay to a tenth of --lr."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 = off)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999) and export it
    (ZeRO stages 1-2, where every rank holds the full weights)."""
    steps: int | None = None
    """Optimizer steps (give this or --epochs)."""
    epochs: float | None = None
    """Passes over the training table, converted to steps from its row count (give this or --steps)."""
    image_size: int | None = None
    """Training resolution (default: the model's); images are centre-cropped and resized to it."""
    image_encoder: str | None = None
    """CLIP vision model (CLIPVisionModelWithProjection folder, s3:// or hub id) for the alignment losses."""
    checkpoint_every: int = 100
    """Save a checkpoint every K steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage (the oldest are deleted)."""
    graph_dim: int | None = None
    """Stable Diffusion base: width of the new graph encoder's node and triple features
    (default: the text encoder's width, at most 512)."""
    graph_hidden_dim: int | None = None
    """Stable Diffusion base: hidden width of the graph encoder's MLPs (default: --graph-dim)."""
    graph_layers: int | None = None
    """Stable Diffusion base: graph convolution layers of the new graph encoder (default: 5)."""
    conditioner_hidden_dim: int | None = None
    """Stable Diffusion base: hidden width of the new conditioner's MLPs (default: --graph-hidden-dim)."""
    log_every: int = 10
    """Log metrics every K steps."""
    val_every: int | None = None
    """Validate every K steps (default: at each checkpoint) and at the end."""
    val_batches: int | None = 16
    """Validation micro-batches per worker at most (none = the whole table)."""
    shuffle_buffer: int = 256
    """Rows in each worker's local shuffle buffer (1 = no shuffling)."""
    seed: int = 0
    """Seed of new weights, noise, timesteps and shuffling."""
    resume: bool = False
    """Continue from the latest checkpoint (same flags); starts fresh when there is none."""
    overwrite: bool = False
    """Delete an existing output (and checkpoints) first."""
    lease_timeout: float = DEFAULT_TIMEOUT
    """Seconds without a heartbeat after which the output's lease counts as abandoned (--resume or
    --overwrite may then take it over); the driver renews it every timeout/6 seconds."""
    max_failures: int = 0
    """Worker failures Ray Train recovers from within this run (restarting from the latest checkpoint)."""
    report: bool = True
    """Write report.html at the end (--no-report to skip)."""
    report_max_images: int = 120
    """Gallery images in the report at most."""
    s3_endpoint_url: str | None = None
    """S3 endpoint override (default: AWS_ENDPOINT_URL); credentials come from the AWS chain."""
    s3_region: str | None = None
    """S3 region (default: AWS_REGION)."""

    def __post_init__(self) -> None:
        require(bool(self.train), "train", self.train, "required: the training table (Parquet file, folder or glob)")
        require(bool(self.output), "output", self.output, "required")
        require(self.zero_stage in (0, 1, 2, 3) and (self.zero_stage > 0 or self.offload == "none"), "zero_stage",
                self.zero_stage, "must be 0, 1, 2 or 3 (--offload cpu needs 1, 2 or 3)")
        require(not (self.precision == "fp16" and not self.use_gpu), "precision", self.precision,
                "fp16 needs --use-gpu; use bf16 or fp32 on CPU workers")
        for name in ("workers", "batch_size", "gradient_accumulation", "checkpoint_every", "keep_checkpoints",
                     "log_every", "shuffle_buffer", "report_max_images"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.steps is None or self.steps >= 1, "steps", self.steps, "must be >= 1")
        require(self.layout_channels >= 0, "layout_channels", self.layout_channels, "must be >= 0")
        require(self.attention_heads is None or self.attention_heads >= 1, "attention_heads", self.attention_heads,
                "must be >= 1")
        require(self.epochs is None or self.epochs > 0, "epochs", self.epochs, "must be > 0")
        require((self.steps is None) != (self.epochs is None), "steps", self.steps,
                f"give exactly one of --steps and --epochs (got --epochs {self.epochs!r})")
        for name in ("val_every", "val_batches", "threads_per_worker", "graph_dim", "graph_hidden_dim", "graph_layers",
                     "conditioner_hidden_dim"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be >= 1")
        require(self.cpus_per_worker is None or self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker,
                "must be > 0")
        require(self.image_size is None or self.image_size >= 8, "image_size", self.image_size, "must be >= 8")
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.new_layers_lr is None or self.new_layers_lr > 0, "new_layers_lr", self.new_layers_lr, "must be > 0")
        for name in ("weight_decay", "grad_clip"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        if not self.checkpoint_dir:
            parent, name = os.path.split(self.output.rstrip("/"))
            require(bool(name) and not (is_s3(self.output) and parent == "s3:"), "output", self.output,
                    "is a bucket or filesystem root: give --checkpoint-dir (checkpoints go beside the output by default)")
        require(self.max_failures >= -1, "max_failures", self.max_failures, "must be >= 0 (or -1 for unlimited)")
        require(self.ema_decay is None or 0.0 < self.ema_decay < 1.0, "ema_decay", self.ema_decay, "must lie in (0, 1)")
        require(self.ema_decay is None or self.zero_stage < 3, "ema_decay", self.ema_decay,
                "needs --zero-stage 1 or 2 (at stage 3 no rank holds the full weights to average)")
        needs_encoder = self.lambda_recon < 1.0 or self.adversarial_weight > 0
        require(not needs_encoder or bool(self.image_encoder), "image_encoder", self.image_encoder,
                "required when --lambda-recon < 1 or --adversarial-weight > 0 (the alignment losses need image embeddings)")
        require(not (self.resume and self.overwrite), "resume", self.resume, "--resume and --overwrite exclude each other")
        require(self.lease_timeout >= 1, "lease_timeout", self.lease_timeout, "must be >= 1 second")
        self.overrides()  # validates --deepspeed-overrides early
        try:
            super().__post_init__()
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @property
    def checkpoint_uri(self) -> str:
        return self.checkpoint_dir or self.output.rstrip("/") + "-checkpoints"

    def graph_sizes(self) -> dict:
        """The size flags given, as ``SceneGraphDiffusionPipeline.from_stable_diffusion`` arguments."""
        sizes = {"graph_dim": self.graph_dim, "hidden_dim": self.graph_hidden_dim, "num_layers": self.graph_layers,
                 "conditioner_hidden_dim": self.conditioner_hidden_dim}
        return {k: v for k, v in sizes.items() if v is not None}

    def train_config(self) -> TrainConfig:
        """The training options alone (what the Ray Train workers get)."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    def overrides(self) -> dict | None:
        """--deepspeed-overrides as a dict: inline JSON (starts with '{') or a JSON/YAML file."""
        text = self.deepspeed_overrides
        if not text:
            return None
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"--deepspeed-overrides = {text!r}: not valid JSON ({err})") from None
        else:
            import yaml

            try:
                data = yaml.safe_load(Storage().read_text(text))
            except FileNotFoundError:
                raise ConfigError(f"--deepspeed-overrides = {text!r}: no such file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--deepspeed-overrides = {text!r}: expected a mapping, got {type(data).__name__}")
        return data

    def resolved(self) -> FinetuneConfig:
        """Repository defaults resolved, local paths made absolute (Ray workers do not share our cwd)."""

        def absolute(uri: str | None) -> str | None:
            return uri if uri is None or is_s3(uri) else os.path.abspath(uri)

        base = resolve(self.base)
        return dataclasses.replace(
            self, base=os.path.abspath(base) if os.path.exists(base) else base,  # else s3:// or a hub id
            train=absolute(self.train), val=absolute(self.val), output=absolute(self.output),
            checkpoint_dir=absolute(self.checkpoint_dir),
        )


# ----------------------------------------------------------------------------- the base model


def read_model_config(storage: Storage, base: str, name: str) -> dict | None:
    """A JSON config of a model folder (local, s3:// or hub id); None when it does not exist."""
    if is_s3(base) or os.path.isdir(base):
        uri = join(base, name)
        return json.loads(storage.read_text(uri)) if storage.exists(uri) else None
    from huggingface_hub import hf_hub_download  # a hub id: only the small config file is fetched here

    try:
        return json.loads(open(hf_hub_download(base, name)).read())
    except Exception:  # noqa: BLE001 - missing file or repository: the caller reports what it needed
        return None


def inspect_base(storage: Storage, base: str) -> tuple[str, int]:
    """(kind, training image size) of ``--base`` from its model_index.json and unet/vae configs."""
    index = read_model_config(storage, base, "model_index.json")
    if index is None:  # a folder assembled by hand: recognise Stable Diffusion by its component configs
        parts = ("unet/config.json", "vae/config.json", "text_encoder/config.json")
        if not all(read_model_config(storage, base, part) is not None for part in parts):
            raise ConfigError(f"--base = {base!r}: no model_index.json (expected a diffusers pipeline folder or hub id)")
        index = {"unet": [], "vae": [], "text_encoder": [], "tokenizer": []}
    cls = pipeline_class_name(index)
    if cls == "SceneGraphDiffusionPipeline":
        kind = "scene_graph"
    elif all(k in index for k in ("unet", "vae", "text_encoder", "tokenizer")):
        kind = "stable_diffusion"
    else:
        raise ConfigError(f"--base = {base!r}: a {cls or 'pipeline'} is neither a scene-graph nor a Stable Diffusion pipeline")
    unet = read_model_config(storage, base, "unet/config.json") or {}
    size = int(unet.get("sample_size") or 64)
    vae_declared = index.get("vae") not in (None, [None, None])
    vae = read_model_config(storage, base, "vae/config.json") if vae_declared else None
    if vae:
        size *= 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return kind, size


# ----------------------------------------------------------------------------- driver


def local_cpu_budget(cfg: FinetuneConfig) -> float:
    """CPUs per worker: explicit, 1 on a cluster, or on a fixed local instance what leaves one CPU for Ray Data."""
    import ray

    if cfg.cpus_per_worker is not None:
        per_worker = cfg.cpus_per_worker
    elif os.environ.get("RAY_ADDRESS") or cfg.use_gpu:
        return 1.0
    else:
        total = ray.cluster_resources().get("CPU", 0)
        per_worker = min(1.0, (total - 1) / cfg.workers)
        if per_worker <= 0:
            raise ConfigError(f"--workers {cfg.workers}: this machine's {total:.0f} CPUs leave none for reading the data")
        return per_worker
    if not os.environ.get("RAY_ADDRESS"):
        total = ray.cluster_resources().get("CPU", 0)
        if cfg.workers * per_worker > total - 1 + 1e-9:
            raise ConfigError(
                f"--workers {cfg.workers} x --cpus-per-worker {per_worker} reserve {cfg.workers * per_worker:.2f} of this "
                f"machine's {total:.0f} CPUs; leave at least one free for reading the data"
            )
    return per_worker


def build_datasets(cfg: FinetuneConfig, storage: Storage, image_size: int) -> tuple[dict, int]:
    """Ray Data pipelines (read -> decode/resize) per split, and the training rows (from Parquet footers)."""
    import ray

    from workers.train_data import decode_batch

    datasets = {}
    train_rows = 0
    for name, uri in (("train", cfg.train), ("val", cfg.val)):
        if not uri:
            continue
        shards = discover_inputs(storage, uri)
        if name == "train":
            train_rows = sum(s.rows for s in shards)
        paths, fs, _ = parquet_paths(storage, shards)
        columns = input_columns(storage, shards[0], TRAIN_COLUMNS)
        for needed in ("id", "objects", "image"):
            if needed not in columns:
                raise ConfigError(f"--{name} = {uri!r}: the table has no {needed!r} column")
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns, shuffle="files" if name == "train" else None,
                                   num_cpus=0.1)
        datasets[name] = ds.map_batches(decode_batch, fn_kwargs={"size": image_size}, batch_format="pyarrow",
                                        batch_size=64, num_cpus=0.1)
    return datasets, train_rows


def storage_path(storage: Storage, uri: str):
    """(path, pyarrow filesystem) for RunConfig: s3:// as bucket/key on our S3 filesystem, local as absolute."""
    if is_s3(uri):
        bucket, key = split_s3(uri.rstrip("/"))
        return f"{bucket}/{key}", storage.arrow_s3
    return os.path.abspath(uri), None


def prepare_output(cfg: FinetuneConfig, storage: Storage) -> bool:
    """Refuse to mix runs: an existing output needs --resume or --overwrite. Returns whether checkpoints exist."""
    snapshot = join(cfg.checkpoint_uri, RUN_NAME, "checkpoint_manager_snapshot.json")
    existing = storage.exists(join(cfg.output, "run.json")) or storage.exists(snapshot)
    if existing and cfg.overwrite:
        files = files_but_lease(storage, cfg.output)
        for uri in files:
            storage.delete(uri)
        removed = len(files)
        if not cfg.checkpoint_uri.startswith(cfg.output.rstrip("/") + "/"):
            removed += storage.delete_prefix(cfg.checkpoint_uri)
        logger.info("--overwrite: removed %d files under %s", removed, cfg.output)
        return False
    if existing and not cfg.resume:
        raise RunExistsError(
            f"{cfg.output!r} already holds a fine-tuning run: pass --resume to continue it or --overwrite to start again"
        )
    return storage.exists(snapshot)


def run(cfg: FinetuneConfig) -> tuple[dict, int]:
    """Run the job; returns (summary, exit code)."""
    cfg = cfg.resolved()
    check_before_start(cfg)
    started = time.perf_counter()
    storage = storage_for(cfg)
    base_kind, model_size = inspect_base(storage, cfg.base)
    require(not (base_kind == "stable_diffusion" and cfg.conditioning == "caption"), "conditioning", cfg.conditioning,
            "a Stable Diffusion base is text-conditioned already; caption mode converts scene-graph bases")
    unet = read_model_config(storage, cfg.base, "unet/config.json") or {}
    if cfg.new_layers_lr is not None and cfg.conditioning not in ("gated", "caption"):
        require(cfg.conditioning == "auto" and unet.get("attention_type") == "gated", "new_layers_lr",
                cfg.new_layers_lr, "trains the layers a conversion adds: give --conditioning gated or caption "
                "(or a gated --base)")
    if cfg.attention_heads is not None:
        widths = list(unet.get("block_out_channels", []))
        require(not widths_heads_do_not_divide(widths, cfg.attention_heads), "attention_heads", cfg.attention_heads,
                f"must divide each of the base UNet's block widths {widths}")
    if base_kind == "scene_graph" and cfg.image_encoder and cfg.lambda_recon < 1.0:
        logger.info("alignment losses on a scene-graph base need its graph encoder to have a projection")
    if base_kind == "scene_graph" and cfg.graph_sizes():
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in ("graph_dim", "graph_hidden_dim", "graph_layers",
                                                                     "conditioner_hidden_dim") if getattr(cfg, name))
        raise ConfigError(f"{flags}: size a new graph encoder for a Stable Diffusion base; --base {cfg.base!r} is a "
                          "scene-graph pipeline and keeps its own")
    image_size = cfg.image_size or model_size
    discover_inputs(storage, cfg.train)  # bad input fails fast, before touching the output
    if cfg.val:
        discover_inputs(storage, cfg.val)
    with RunLease(storage, join(cfg.output, LEASE_FILE), cfg.output, timeout=cfg.lease_timeout) as lease:
        lease.acquire(take_over=cfg.resume or cfg.overwrite)
        return _train(cfg, storage, base_kind, image_size, started, lease)


def _train(cfg: FinetuneConfig, storage: Storage, base_kind: str, image_size: int, started: float,
           lease: RunLease) -> tuple[dict, int]:
    """The run, once it holds its output's lease: output checks, Ray Train, summaries."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sgmodel.deepspeed_config import build_deepspeed_config
    from workers import train_loop

    has_checkpoints = prepare_output(cfg, storage)

    init_ray(dashboard=True)  # Ray Train's placement-group cleaner needs the State API
    cpus = local_cpu_budget(cfg)
    datasets, train_rows = build_datasets(cfg, storage, image_size)
    ds_config = build_deepspeed_config(
        zero_stage=cfg.zero_stage, offload=cfg.offload, precision=cfg.precision, micro_batch_size=cfg.batch_size,
        gradient_accumulation=cfg.gradient_accumulation, world_size=cfg.workers, gradient_clipping=cfg.grad_clip,
        use_gpu=cfg.use_gpu, overrides=cfg.overrides(),
    )
    global_batch = cfg.batch_size * cfg.gradient_accumulation * cfg.workers
    steps = cfg.steps or train_loop.steps_for_epochs(cfg.epochs, train_rows, global_batch)
    settings = train_loop.WorkerSettings(
        base=cfg.base, base_kind=base_kind, conditioning=None if cfg.conditioning == "auto" else cfg.conditioning,
        layout_channels=cfg.layout_channels, attention_heads=cfg.attention_heads,
        image_encoder=cfg.image_encoder, train=cfg.train_config(), deepspeed=ds_config, steps=steps, lr=cfg.lr,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, image_size=image_size, use_gpu=cfg.use_gpu,
        threads=cfg.threads_per_worker, seed=cfg.seed, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
        val_every=cfg.val_every or cfg.checkpoint_every, val_batches=cfg.val_batches, shuffle_buffer=cfg.shuffle_buffer,
        output=cfg.output, storage=storage.settings, has_val=bool(cfg.val), ema_decay=cfg.ema_decay,
        new_layers_lr=cfg.new_layers_lr,
        checkpoint_root=join(storage_path(storage, cfg.checkpoint_uri)[0], RUN_NAME), graph_sizes=cfg.graph_sizes(),
    )
    base_fp = fingerprint(storage, cfg.base) if (is_s3(cfg.base) or os.path.isdir(cfg.base)) else f"hub:{cfg.base}"
    run_info = {
        "job": "finetune", "config": dataclasses.asdict(cfg), "base_kind": base_kind, "base_fingerprint": base_fp,
        "image_size": image_size, "steps": steps, "global_batch": global_batch, "train_rows": train_rows,
        "checkpoints": join(cfg.checkpoint_uri, RUN_NAME), "deepspeed": ds_config, "versions": versions(),
        "resumed": has_checkpoints,
    }
    storage.write_text(join(cfg.output, "run.json"), json.dumps(run_info, indent=2, default=str) + "\n")
    logger.info("fine-tuning %s (%s, %dpx) on %d rows: %d steps x global batch %d, %d workers, ZeRO-%d, %s%s",
                cfg.base, base_kind, image_size, train_rows, steps, global_batch, cfg.workers, cfg.zero_stage,
                cfg.precision, " (resuming)" if has_checkpoints else "")

    env = {}
    if not cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    path, fs = storage_path(storage, cfg.checkpoint_uri)
    resources = {"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop.train_loop_per_worker,
        train_loop_config={"settings": settings},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": env},
        ),
        datasets=datasets,
    )
    error = None
    try:
        result = trainer.fit()
        error = result.error
        final = dict(result.metrics or {})
    except Exception as err:  # noqa: BLE001 - TrainingFailedError and friends: record the failure, keep checkpoints
        error, final = err, {}
    lease.check()  # another run took the output over: leave its files alone
    elapsed = time.perf_counter() - started
    summary = summarize(cfg, final, steps, elapsed, error)
    storage.write_text(join(cfg.output, "summary.json"), json.dumps(summary, indent=2, default=str) + "\n")
    if error is None:
        write_training_summary(storage, cfg, summary, run_info)
    if error is None and cfg.report:
        write_report(storage, cfg.output, cfg.report_max_images)
    print_result(cfg, summary)
    return summary, 0 if error is None else 1


def summarize(cfg: FinetuneConfig, final: dict, steps: int, elapsed: float, error) -> dict:
    losses = {k: v for k, v in final.items() if k.startswith("loss_") or k == "val_loss"}
    bad = final.get("bad_rows") or {}
    return {
        "job": "finetune", "status": "succeeded" if error is None else "failed",
        "error": None if error is None else f"{type(error).__name__}: {error}"[:2000],
        "output": cfg.output, "checkpoints": join(cfg.checkpoint_uri, RUN_NAME),
        "steps": final.get("steps"), "steps_planned": steps, "resumed_from_step": final.get("resumed_from_step"),
        "final_losses": losses, "val_loss_initial": final.get("initial_val_loss"), "lr": final.get("lr"),
        "samples": final.get("samples"),
        "samples_per_s": final.get("samples_per_s_mean"), "train_seconds": final.get("train_seconds"),
        "workers": final.get("world_size", cfg.workers), "bad_rows": sum(bad.values()), "bad_rows_by_reason": bad,
        "elapsed_seconds": round(elapsed, 2),
    }


def command_line() -> str:
    """How this process was started, as a shell line (``python -m jobs.finetune …`` for the module)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("jobs", "finetune.py")):
        argv = ["python", "-m", "jobs.finetune", *argv[1:]]
    return shlex.join(argv)


def write_training_summary(storage: Storage, cfg: FinetuneConfig, summary: dict, run_info: dict) -> None:
    """``training_summary.json`` beside the exported model: how to make it again (the command, seed,
    versions, the training data and how that was made) and how the run went (losses per window)."""
    data = {"train": cfg.train, "rows": run_info["train_rows"], "val": cfg.val}
    for name in ("train", "val"):
        uri = getattr(cfg, name)
        made_by = join(uri, "_summary.json") if uri else None  # what jobs.prepare wrote beside the table
        if made_by and storage.exists(made_by):
            data[f"{name}_prepared_by"] = json.loads(storage.read_text(made_by)).get("config")
    history_uri = join(cfg.output, "metrics.jsonl")
    history = ([json.loads(line) for line in storage.read_text(history_uri).splitlines() if line.strip()]
               if storage.exists(history_uri) else [])
    record = {
        "command": command_line(),
        "seed": cfg.seed, "steps": summary["steps"], "global_batch": run_info["global_batch"],
        "base": cfg.base, "base_fingerprint": run_info["base_fingerprint"], "config": dataclasses.asdict(cfg),
        "data": data, "versions": run_info["versions"], "final_losses": summary["final_losses"],
        "train_seconds": summary["train_seconds"], "history": history,
    }
    storage.write_text(join(cfg.output, "training_summary.json"), json.dumps(record, indent=2, default=str) + "\n")


def print_result(cfg: FinetuneConfig, summary: dict) -> None:
    losses = summary["final_losses"]
    loss = losses.get("loss_total")
    print(f"\nfine-tuning {summary['status']}: {summary['steps']} steps"
          + (f", loss {loss:.4f}" if loss is not None else "")
          + (f", val loss {losses['val_loss']:.4f}" if losses.get("val_loss") is not None else "")
          + (f", {summary['samples_per_s']:.1f} samples/s" if summary["samples_per_s"] else ""))
    if summary["error"]:
        print(f"error:       {summary['error']}")
        print(f"checkpoints: {summary['checkpoints']} (rerun with --resume to continue)")
    else:
        print(f"model:       {cfg.output}  (python -m jobs.generate --model {cfg.output})")
    if summary["bad_rows"]:
        print(f"bad rows:    {summary['bad_rows']} skipped {summary['bad_rows_by_reason']}")


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(FinetuneConfig, run, argv, "python -m jobs.finetune")


if __name__ == "__main__":
    sys.exit(main())
