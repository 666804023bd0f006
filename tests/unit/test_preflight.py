"""Checks before a job starts: S3 access, what a model folder is, label maps, unscorable labels."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.generate import GenerateConfig
from jobs.label_map import read_label_map_file, recall_options
from jobs.preflight import PreflightError, check_before_start
from sgmodel.graph import GRAPH_SCHEMA
from sgmodel.shapes.diffusion import VOCABULARY
from sgmodel.shapes.flavours import build_pipeline
from workers.storage import Storage, StorageSettings

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
SAMPLE_LABEL_MAP = Path(__file__).resolve().parents[2] / "jobs" / "samples" / "ade20k_label_map.yaml"


@pytest.fixture(scope="module")
def sg_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "sg"
    build_pipeline("debug", VOCABULARY, seed=0, use_caption=False).save_pretrained(path)
    return str(path)


@pytest.fixture
def ade_segmenter(tmp_path) -> str:
    """An ADE20K segmenter's config.json (all that the checks read)."""
    folder = tmp_path / "ade-segmenter"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"id2label": dict(enumerate(ADE20K_CLASSES))}))
    return str(folder)


def graphs_table(path: Path, labels: list[list[str]]) -> str:
    rows = [{"id": f"g{i}", "objects": [{"label": lab, "attributes": [], "box": None} for lab in objs], "relations": []}
            for i, objs in enumerate(labels)]
    pq.write_table(pa.Table.from_pylist(rows, schema=GRAPH_SCHEMA), path)
    return str(path)


def config(tmp_path, **kw) -> GenerateConfig:
    values = {"input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"), "segmenter": "none"} | kw
    return GenerateConfig(**values)


# ----------------------------------------------------------------------------- models


def test_a_scene_graph_pipeline_passes(tmp_path, sg_model):
    check_before_start(config(tmp_path, model=sg_model))


def test_a_stable_diffusion_folder_is_named_and_the_way_to_convert_it_given(tmp_path):
    sd = tmp_path / "sd"
    (sd / "unet").mkdir(parents=True)
    (sd / "unet" / "config.json").write_text("{}")
    with pytest.raises(PreflightError) as err:
        check_before_start(config(tmp_path, model=str(sd)))
    assert "Stable Diffusion folder without model_index.json" in str(err.value)
    assert f"sgbatch finetune --base {sd} --train" in str(err.value)
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(PreflightError, match=r"--model '.*sd' is a StableDiffusionPipeline folder, not a scene-graph"):
        check_before_start(config(tmp_path, model=str(sd)))


@pytest.mark.parametrize(("name", "message"), [("nowhere", "no such folder"), ("empty", "no model_index.json")])
def test_missing_or_empty_model_folders(tmp_path, name, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match=message):
        check_before_start(config(tmp_path, model=str(tmp_path / name)))


def test_a_segmenter_without_classes_is_refused(tmp_path, sg_model):
    with pytest.raises(PreflightError, match="--segmenter .*: not a transformers segmentation model folder"):
        check_before_start(config(tmp_path, model=sg_model, segmenter=sg_model))


# ----------------------------------------------------------------------------- S3


def test_s3_without_credentials_is_one_line(tmp_path, monkeypatch, sg_model):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    cfg = config(tmp_path, model=sg_model, input="s3://sgb-data/graphs/", s3_endpoint_url="http://127.0.0.1:9")
    with pytest.raises(PreflightError) as err:
        check_before_start(cfg)
    assert str(err.value).startswith("--input 's3://sgb-data/graphs/': no AWS credentials found")
    assert "\n" not in str(err.value)


def test_s3_bucket_that_does_not_exist(s3_bucket, tmp_path, sg_model):
    cfg = config(tmp_path, model=sg_model, input=s3_bucket.uri("graphs/"), output="s3://sgb-nobody-here/runs",
                 s3_endpoint_url=s3_bucket.endpoint_url)
    with pytest.raises(PreflightError, match="--output 's3://sgb-nobody-here/runs': no such bucket 'sgb-nobody-here'"):
        check_before_start(cfg)
    check_before_start(config(tmp_path, model=sg_model, input=s3_bucket.uri("graphs/"), output=s3_bucket.uri("runs"),
                              s3_endpoint_url=s3_bucket.endpoint_url))


def test_an_unreachable_endpoint(tmp_path, sg_model):
    storage = Storage(StorageSettings(endpoint_url="http://127.0.0.1:9", region="us-east-1", retries=0))
    with pytest.raises(PreflightError, match=r"cannot reach the S3 endpoint http://127.0.0.1:9"):
        check_before_start(config(tmp_path, model=sg_model, output="s3://sgb-x/runs"), storage)


# ----------------------------------------------------------------------------- label maps


def test_the_ade20k_example_maps_onto_ade20k_classes(tmp_path, sg_model, ade_segmenter):
    check_before_start(config(tmp_path, model=sg_model, segmenter=ade_segmenter, label_map=str(SAMPLE_LABEL_MAP),
                              input=graphs_table(tmp_path / "in.parquet", [["man", "tv"], ["window"]])))
    mapping = read_label_map_file(Storage(), str(SAMPLE_LABEL_MAP))
    assert mapping["man"] == "person" and mapping["tv"] == "television receiver"
    from sgmodel.graph import SGObject
    from sgmodel.scoring import LabelMatcher, RecallConfig

    matcher = LabelMatcher(dict(enumerate(ADE20K_CLASSES)), RecallConfig(mapping=mapping))
    assert matcher.match(SGObject("woman", ("young",))).class_name == "person"
    assert matcher.match(SGObject("couch")).class_name == "sofa"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("man: person\nwoman: [person\n", r"--label-map '.*map.yaml': line 3, column 1: "),
        ("man: persn\n", r"mapping\['man'\] = 'persn' names no class of this segmenter"),
        ("- man\n- person\n", "expected a mapping of graph label: segmenter class, got list"),
        ("man: 999\n", "999 is not a class id of this segmenter"),
    ],
)
def test_bad_label_maps_are_one_line_naming_the_file(tmp_path, sg_model, ade_segmenter, text, message):
    (tmp_path / "map.yaml").write_text(text)
    cfg = config(tmp_path, model=sg_model, segmenter=ade_segmenter, label_map=str(tmp_path / "map.yaml"),
                 input=graphs_table(tmp_path / "in.parquet", [["man"]]))
    with pytest.raises(PreflightError, match=message) as err:
        check_before_start(cfg)
    assert "\n" not in str(err.value)


def test_recall_options_carry_the_mapping_to_the_scorers(tmp_path):
    (tmp_path / "map.yaml").write_text("man: person\n7: car\n")
    cfg = config(tmp_path, label_map=str(tmp_path / "map.yaml"))
    assert recall_options(cfg, Storage()) == {"mapping": {"man": "person", "7": "car"}}
    assert recall_options(config(tmp_path), Storage()) == {}


def test_a_warning_when_over_a_fifth_of_the_objects_are_unscorable(tmp_path, sg_model, ade_segmenter, caplog):
    seen = graphs_table(tmp_path / "seen.parquet", [["person", "tree"], ["car", "sky", "unicorn"]])  # 1 of 5
    unseen = graphs_table(tmp_path / "unseen.parquet", [["man", "tv"], ["window", "car"]])  # 3 of 4 without a map
    with caplog.at_level(logging.WARNING, logger="sgbatch"):
        check_before_start(config(tmp_path, model=sg_model, segmenter=ade_segmenter, input=seen))
        assert not caplog.records
        check_before_start(config(tmp_path, model=sg_model, segmenter=ade_segmenter, input=unseen))
        assert len(caplog.records) == 1 and "3 of 4 objects" in caplog.records[0].getMessage()
        assert "--label-map" in caplog.records[0].getMessage()
        caplog.clear()
        check_before_start(config(tmp_path, model=sg_model, segmenter=ade_segmenter, input=unseen,
                                  label_map=str(SAMPLE_LABEL_MAP)))
        assert not caplog.records
