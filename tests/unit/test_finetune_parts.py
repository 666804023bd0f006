"""The fine-tuning job's parts that need no cluster: row decoding, bad-row accounting, the DeepSpeed
adaptation of the model, the export, the base-model inspection and the config's validation."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from diffusers.models.attention_processor import Attention
from PIL import Image

from jobs.config import ConfigError
from jobs.finetune import FinetuneConfig, inspect_base, run
from sgmodel.graph import GRAPH_SCHEMA, graph_to_row
from sgmodel.optim import EMA
from sgmodel.pipeline import SceneGraphDiffusionPipeline
from sgmodel.shapes.flavours import build_pipeline
from sgmodel.shapes.world import iter_shapes_records
from sgmodel.train import DiffusionTrainingModule, TrainConfig, configure_trainable
from workers.storage import Storage
from workers.train_data import BadRows, decode_batch, rows_to_batch
from workers.train_engine import prepare_for_deepspeed
from workers.train_export import export_pipeline
from workers.train_loop import WorkerSettings, steps_for_epochs

from .conftest import VOCAB


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def shapes_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=GRAPH_SCHEMA)


# ----------------------------------------------------------------------------- decoding


def test_decode_batch_resizes_good_rows_and_marks_bad_ones_without_raising():
    good = [graph_to_row(g) for g, _ in iter_shapes_records(2, seed=5, size=24)]
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (10, 0, 30, 20))  # the centre square is blue: a centre crop keeps only blue
    rows = [
        good[0],
        {**good[1], "id": "wide", "image": png(wide)},
        {**good[0], "id": "garbage", "image": b"\x89PNG but not really"},
        {**good[0], "id": "missing", "image": None},
        {**good[0], "id": "bad-graph", "relations": [{"subject": 0, "predicate": "above", "object": 7}]},
        {**good[0], "id": "grey", "image": png(Image.new("L", (16, 16), 128))},
    ]
    out = decode_batch(shapes_table(rows), size=16)
    assert out.num_rows == len(rows) and out.column("id").to_pylist() == [r["id"] for r in rows]
    assert "image" not in out.column_names  # encoded bytes stay in the data pipeline
    assert out.column("error_code").to_pylist() == [None, None, "image_undecodable", "image_missing",
                                                     "relation_index_out_of_range", None]
    errors = out.column("error").to_pylist()
    assert "cannot be decoded" in errors[2] and "index out of range" in errors[4]
    pixels = out.column("pixels").to_pylist()
    assert [len(p) for p in pixels] == [16 * 16 * 3, 16 * 16 * 3, 0, 0, 0, 16 * 16 * 3]
    wide_px = np.frombuffer(pixels[1], dtype=np.uint8).reshape(16, 16, 3)
    assert (wide_px[:, :, 2] > 200).all() and (wide_px[:, :, 0] < 50).all()
    assert (np.frombuffer(pixels[5], dtype=np.uint8) == 128).all()  # greyscale -> RGB


def test_rows_to_batch_gives_graphs_and_images_in_minus_one_one():
    rows = [graph_to_row(g) for g, _ in iter_shapes_records(3, seed=5, size=16)]
    decoded = decode_batch(shapes_table(rows), size=16).to_pylist()
    graphs, images = rows_to_batch(decoded, 16)
    assert [g.id for g in graphs] == [r["id"] for r in rows]
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    original = np.asarray(Image.open(io.BytesIO(rows[0]["image"])).convert("RGB"), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(images[0].permute(1, 2, 0), torch.from_numpy(original))


def test_bad_rows_are_counted_once_per_id_across_epochs_and_ranks():
    bad = BadRows()
    for _ in range(3):  # three epochs over the same bad rows
        bad.add({"id": "a", "error_code": "image_missing", "error": "image is null"}, rank=0)
        bad.add({"id": "b", "error_code": "image_undecodable", "error": "…"}, rank=0)
    assert bad.counts() == {"image_missing": 1, "image_undecodable": 1}
    bad.merge({"image_missing": ["a", "c"]})  # another rank's ids
    assert bad.counts() == {"image_missing": 2, "image_undecodable": 1}
    assert bad.as_json() == {"image_missing": ["a", "c"], "image_undecodable": ["b"]}


def test_steps_for_epochs():
    assert steps_for_epochs(1, rows=100, global_batch=8) == 12
    assert steps_for_epochs(2.5, rows=100, global_batch=8) == 31
    assert steps_for_epochs(1, rows=3, global_batch=8) == 1


# ----------------------------------------------------------------------------- model


def test_prepare_for_deepspeed_keeps_the_forward_and_returns_loss_tensors():
    pipe = build_pipeline("debug", VOCAB, conditioning="gated", seed=0)
    module = DiffusionTrainingModule(pipe, TrainConfig(trainable="conditioning", cond_dropout=0.5))
    graphs = [g for g, _ in iter_shapes_records(2, seed=1, size=16)]
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    before = module(graphs, images, generator=torch.Generator().manual_seed(3))
    assert any(p.dim() == 0 for p in module.parameters())  # GLIGEN's gates
    wrapped = prepare_for_deepspeed(module, zero_stage=2)
    assert all(p.dim() >= 1 for p in wrapped.parameters())
    after = wrapped(graphs, images, generator=torch.Generator().manual_seed(3))
    assert set(after) == {"total", "recon", "layout"}
    assert torch.equal(after["total"], before.total) and torch.equal(after["layout"], before.layout)


def settings_for(base: str, output: str, trainable: str = "conditioning") -> WorkerSettings:
    return WorkerSettings(
        base=base, base_kind="scene_graph", conditioning=None, layout_channels=0, image_encoder=None,
        train=TrainConfig(trainable=trainable), deepspeed={}, steps=1, lr=1e-4, weight_decay=0.0, warmup_steps=0,
        image_size=16, use_gpu=False, threads=None, seed=0, log_every=1, checkpoint_every=1, val_every=None,
        val_batches=None, shuffle_buffer=1, output=output, storage=Storage().settings, has_val=False,
    )


def test_export_puts_trained_weights_into_the_base_and_saves_gates_as_scalars(tmp_path):
    base = tmp_path / "base"
    build_pipeline("debug", VOCAB, conditioning="gated", seed=0).save_pretrained(base)
    pipe = SceneGraphDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    gate = next(n for n, p in pipe.unet.named_parameters() if n.endswith("alpha_attn"))
    state = {
        "conditioner.null_tokens": pipe.conditioner.null_tokens.detach() + 1.0,
        f"unet.{gate}": torch.tensor([0.25]),  # shape [1], as trained through DeepSpeed
        "discriminator.net.0.weight": torch.zeros(3),  # a training-only helper: not exported
    }
    written = export_pipeline(settings_for(str(base), str(tmp_path / "out")), state, Storage())
    assert any(w.endswith("model_index.json") for w in written) and not any(w.endswith(".bin") for w in written)
    out = SceneGraphDiffusionPipeline.from_pretrained(tmp_path / "out", use_safetensors=True)
    assert torch.equal(out.conditioner.null_tokens, pipe.conditioner.null_tokens + 1.0)
    exported_gate = dict(out.unet.named_parameters())[gate]
    assert exported_gate.dim() == 0 and float(exported_gate.detach()) == 0.25
    assert torch.equal(out.graph_encoder.global_out[0].weight, pipe.graph_encoder.global_out[0].weight)


def test_export_splits_the_attention_into_the_heads_asked_for_and_keeps_every_weight(tmp_path):
    base = tmp_path / "base"
    build_pipeline("debug", VOCAB, conditioning="gated", seed=0).save_pretrained(base)
    pipe = SceneGraphDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    assert pipe.unet.config.attention_head_dim == 4
    settings = dataclasses.replace(settings_for(str(base), str(tmp_path / "out")), attention_heads=1)
    export_pipeline(settings, {}, Storage())
    out = SceneGraphDiffusionPipeline.from_pretrained(tmp_path / "out", use_safetensors=True)
    assert out.unet.config.attention_head_dim == 1
    assert {m.heads for m in out.unet.modules() if isinstance(m, Attention)} == {1}
    base_weights = pipe.unet.state_dict()
    assert all(torch.equal(w, base_weights[n]) for n, w in out.unet.state_dict().items())
    graphs = [g for g, _ in iter_shapes_records(2, seed=1, size=16)]
    kwargs = dict(num_inference_steps=2, seeds=[0, 1], output_type="np")
    assert not np.array_equal(out(graphs, **kwargs).images, pipe(graphs, **kwargs).images)  # same weights, other split


def test_attention_heads_must_divide_the_base_unets_widths(tmp_path):
    base = tmp_path / "base"
    build_pipeline("debug", VOCAB, seed=0).save_pretrained(base)
    with pytest.raises(ConfigError, match=r"--attention-heads = 3: must divide each of the base UNet's block widths \[8, 16\]"):
        run(FinetuneConfig(train="t.parquet", base=str(base), output=str(tmp_path / "out"), steps=1, attention_heads=3))


def test_export_refuses_weights_the_base_does_not_have(tmp_path):
    base = tmp_path / "base"
    build_pipeline("debug", VOCAB, seed=0).save_pretrained(base)
    with pytest.raises(RuntimeError, match="not found in the base's conditioner"):
        export_pipeline(settings_for(str(base), str(tmp_path / "out")), {"conditioner.nope": torch.zeros(1)}, Storage())


def test_lora_export_writes_diffusers_lora_weights_beside_the_merged_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    base = tmp_path / "base"
    build_pipeline("debug", VOCAB, seed=0).save_pretrained(base)
    pipe = SceneGraphDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    configure_trainable(pipe, TrainConfig(trainable="lora"))  # the adapters the export adds: same names and rank
    torch.manual_seed(1)
    state = {f"unet.{n}": torch.randn_like(p) * 0.1 for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert state
    export_pipeline(settings_for(str(base), str(tmp_path / "out"), trainable="lora"), state, Storage())
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()

    merged = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    onto_base = SceneGraphDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    onto_base.load_lora_weights(tmp_path / "out")  # the LoRA file on the base gives the merged UNet
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 5, merged.config.cross_attention_dim)
    with torch.no_grad():
        expected = merged(x, 10, encoder_hidden_states=ctx).sample
        got = onto_base.unet(x, 10, encoder_hidden_states=ctx).sample
        plain = UNet2DConditionModel.from_pretrained(base / "unet")(x, 10, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the adapters change the UNet


def test_inspect_base_tells_scene_graph_from_stable_diffusion_folders(tmp_path):
    sg = tmp_path / "sg"
    build_pipeline("debug", VOCAB, seed=0).save_pretrained(sg)
    assert inspect_base(Storage(), str(sg)) == ("scene_graph", 16)
    sd = tmp_path / "sd"
    for name, data in {
        "model_index.json": {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                             "tokenizer": ["transformers", "CLIPTokenizer"]},
        "unet/config.json": {"sample_size": 64},
        "vae/config.json": {"block_out_channels": [128, 256, 512, 512]},
    }.items():
        (sd / name).parent.mkdir(parents=True, exist_ok=True)
        (sd / name).write_text(json.dumps(data))
    assert inspect_base(Storage(), str(sd)) == ("stable_diffusion", 512)
    with pytest.raises(ConfigError, match="no model_index.json"):
        inspect_base(Storage(), str(tmp_path))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "--steps = None: give exactly one of --steps and --epochs"),
        ({"steps": 10, "epochs": 1.0}, "give exactly one of"),
        ({"train": ""}, "--train = '': required"),
        ({"steps": 0}, "--steps = 0: must be >= 1"),
        ({"steps": 5, "precision": "fp16"}, "--precision = 'fp16': fp16 needs --use-gpu"),
        ({"steps": 5, "lambda_recon": 0.5}, "--image-encoder = None: required when --lambda-recon < 1"),
        ({"steps": 5, "lambda_recon": 1.5}, "--lambda-recon = 1.5: must lie in"),
        ({"steps": 5, "workers": 0}, "--workers = 0"),
        ({"steps": 5, "resume": True, "overwrite": True}, "exclude each other"),
        ({"steps": 5, "deepspeed_overrides": "{not json"}, "--deepspeed-overrides = '{not json': not valid JSON"),
        ({"steps": 5, "deepspeed_overrides": "/no/such/file.yaml"}, "no such file"),
        ({"steps": 5, "cpus_per_worker": 0.0}, "--cpus-per-worker = 0.0: must be > 0"),
        ({"steps": 5, "ema_decay": 0.999, "zero_stage": 3}, "--ema-decay = 0.999: needs --zero-stage 1 or 2"),
        ({"steps": 5, "ema_decay": 1.0}, "--ema-decay = 1.0: must lie in"),
        ({"steps": 5, "output": "s3://bucket"}, "--output = 's3://bucket': is a bucket or filesystem root"),
        ({"steps": 5, "graph_dim": 0}, "--graph-dim = 0: must be >= 1"),
        ({"steps": 5, "graph_layers": 0}, "--graph-layers = 0: must be >= 1"),
        ({"steps": 5, "new_layers_lr": 0.0}, "--new-layers-lr = 0.0: must be > 0"),
        ({"steps": 5, "attention_heads": 0}, "--attention-heads = 0: must be >= 1"),
    ],
)
def test_config_rejects_bad_flags_naming_flag_and_value(kwargs, message):
    values = {"train": "t.parquet", **kwargs}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        FinetuneConfig(**values)


def test_config_reads_overrides_inline_or_from_yaml(tmp_path):
    inline = FinetuneConfig(train="t", steps=1, deepspeed_overrides='{"zero_optimization": {"reduce_bucket_size": 5}}')
    assert inline.overrides() == {"zero_optimization": {"reduce_bucket_size": 5}}
    path = tmp_path / "ds.yaml"
    path.write_text("zero_optimization:\n  reduce_bucket_size: 7\n")
    assert FinetuneConfig(train="t", steps=1, deepspeed_overrides=str(path)).overrides() == {
        "zero_optimization": {"reduce_bucket_size": 7}}
    # checkpoints go beside the output, so the output folder holds just what is shared
    assert FinetuneConfig(train="t", steps=1).checkpoint_uri == "out/finetune-checkpoints"
    assert FinetuneConfig(train="t", steps=1, output="s3://b/x/").checkpoint_uri == "s3://b/x-checkpoints"
    assert FinetuneConfig(train="t", steps=1, output="s3://b", checkpoint_dir="s3://c/k").checkpoint_uri == "s3://c/k"


def test_resolved_makes_local_paths_absolute_and_leaves_s3_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    cfg = FinetuneConfig(train="tables/train", base="base", output="out/ft", steps=1).resolved()
    assert (cfg.train, cfg.base, cfg.output) == (str(tmp_path / "tables/train"), str(tmp_path / "base"),
                                                 str(tmp_path / "out/ft"))
    assert cfg.checkpoint_uri == str(tmp_path / "out/ft-checkpoints")
    given = FinetuneConfig(train="t", output="o", checkpoint_dir="ck", steps=1).resolved()
    assert given.checkpoint_uri == str(tmp_path / "ck")
    remote = FinetuneConfig(train="s3://b/t", base="someone/stable-diffusion", output="s3://b/o", steps=1).resolved()
    assert (remote.train, remote.base, remote.output) == ("s3://b/t", "someone/stable-diffusion", "s3://b/o")


def test_the_command_line_parses_into_the_config_and_help_renders():
    from jobs.config import build_parser, parse_config

    assert "--zero-stage {0,1,2,3}" in build_parser(FinetuneConfig, "finetune").format_help()
    cfg = parse_config(FinetuneConfig, ["--train", "t", "--epochs", "1.5", "--zero-stage", "3", "--offload", "cpu",
                                        "--no-report", "--precision", "bf16"], "finetune")
    assert (cfg.epochs, cfg.zero_stage, cfg.offload, cfg.report, cfg.precision, cfg.steps) == (1.5, 3, "cpu", False,
                                                                                               "bf16", None)


def test_ema_warms_up_averages_in_fp32_and_round_trips_through_safetensors(tmp_path):
    weight = torch.zeros(3, dtype=torch.bfloat16)
    ema = EMA({"w": weight}, decay=0.9)
    ema.update({"w": torch.ones(3, dtype=torch.bfloat16)})  # warmup: decay min(0.9, 2/11)
    assert ema.shadow["w"].dtype == torch.float32
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 1 - 2 / 11))
    for _ in range(200):
        ema.update({"w": torch.ones(3)})
    assert torch.allclose(ema.shadow["w"], torch.ones(3), atol=1e-6)
    ema.save(tmp_path / "ema.safetensors")
    again = EMA({"w": torch.zeros(3)}, decay=0.9)
    again.load(tmp_path / "ema.safetensors")
    assert again.updates == 201 and torch.equal(again.shadow["w"], ema.shadow["w"])
