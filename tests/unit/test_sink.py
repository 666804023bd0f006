"""The sink's files as a data set user reads them: keys, captions, WebDataset samples."""

import io
import json
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sgmodel.caption import graph_caption
from sgmodel.graph import SceneGraph, SGObject, SGRelation
from workers.schema import METADATA_SCHEMA, SCORED_SCHEMA
from workers.sink import Sink, SinkSettings
from workers.storage import Storage
from workers.validate import graph_to_json

GRAPHS = [
    SceneGraph(id="two", objects=(SGObject("circle", ("red",)), SGObject("square", ("blue",))),
               relations=(SGRelation(0, "left of", 1),)),
    SceneGraph(id="odd id/with.dots", objects=(SGObject("triangle"),)),
]


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def scored_rows(samples: int = 2) -> pa.Table:
    rows = []
    for g, graph in enumerate(GRAPHS):
        for k in range(samples):
            rows.append({
                "id": graph.id, "shard": "part-0", "graph": graph_to_json(graph), "error": None, "error_code": None,
                "sample_index": k, "seed": 100 * g + k, "image": png(10 * g + k), "height": 8, "width": 8,
                "steps": 2, "guidance": 3.0, "gen_seconds": 0.5, "generated_at": datetime.now(timezone.utc),
                "recall": 0.5, "found": ["red circle"], "missing": ["blue square"], "unscorable": [],
                "relation_score": None, "relations_checked": 0, "relations_satisfied": 0, "score_seconds": 0.1,
            })
    rows.append({"id": "bad", "shard": "part-0", "graph": None, "error": "no objects", "error_code": "no_objects"})
    return pa.Table.from_pylist(rows, schema=SCORED_SCHEMA)


def write(tmp_path: Path, output_format: str) -> tuple[Path, pa.Table]:
    run = tmp_path / output_format
    stats = Sink(SinkSettings(run_uri=str(run), output_format=output_format, model_fingerprint="fp"))(scored_rows())
    row = stats.to_pylist()[0]
    assert {k: row[k] for k in ("shard", "rows", "images", "errors", "recall_count", "errors_by_reason")} == {
        "shard": "part-0", "rows": 3, "images": 4, "errors": 1, "recall_count": 4,
        "errors_by_reason": '{"no_objects": 1}'}
    return run, pq.read_table(next((run / "metadata").glob("*.parquet")))


def test_metadata_keeps_every_column_and_adds_key_and_caption(tmp_path):
    _, meta = write(tmp_path, "png")
    assert meta.schema.names == METADATA_SCHEMA.names
    assert meta.schema.names[-2:] == ["key", "caption"]
    by_id = {}
    for row in meta.to_pylist():
        by_id.setdefault(row["id"], []).append(row)
    assert {r["caption"] for r in by_id["two"]} == {"a red circle left of a blue square"}
    assert {r["caption"] for r in by_id["odd id/with.dots"]} == {"a triangle"}
    keys = meta["key"].to_pylist()
    assert len(set(keys)) == 4 and not any("." in k or "/" in k for k in keys)


def test_png_keys_are_the_image_files_stems(tmp_path):
    run, meta = write(tmp_path, "png")
    files = {p.stem: p for p in (run / "images").rglob("*.png")}
    assert set(files) == set(meta["key"].to_pylist())
    for row in meta.to_pylist():
        assert files[row["key"]] == run / row["image_key"]
        value = 10 * [g.id for g in GRAPHS].index(row["id"]) + row["sample_index"]
        assert np.asarray(Image.open(files[row["key"]]))[0, 0, 0] == value


def test_tar_samples_hold_image_caption_and_metadata_under_the_key(tmp_path):
    run, meta = write(tmp_path, "webdataset")
    (tar_path,) = (run / "images").glob("*.tar")
    with tarfile.open(tar_path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    rows = {r["key"]: r for r in meta.to_pylist()}
    assert set(members) == {f"{k}.{ext}" for k in rows for ext in ("png", "txt", "json")}
    for key, row in rows.items():
        assert members[f"{key}.txt"].decode() == row["caption"]
        sample = json.loads(members[f"{key}.json"])
        assert sample["graph"] == json.loads(row["graph"])
        assert (sample["id"], sample["seed"], sample["recall"], sample["key"]) == (row["id"], row["seed"], 0.5, key)
        assert "gen_seconds" not in sample and "generated_at" not in sample  # reruns write the same bytes


def test_identical_batches_write_identical_tars(tmp_path):
    a, _ = write(tmp_path / "a", "webdataset")
    b, _ = write(tmp_path / "b", "webdataset")
    (ta,), (tb,) = (a / "images").glob("*.tar"), (b / "images").glob("*.tar")
    assert ta.name == tb.name and ta.read_bytes() == tb.read_bytes()


@pytest.mark.parametrize(
    ("graph", "text"),
    [
        (SceneGraph(id="a", objects=(SGObject("apple", ("green",)),)), "a green apple"),
        (SceneGraph(id="b", objects=(SGObject("apple"), SGObject("owl"))), "an apple and an owl"),
        (SceneGraph(id="c", objects=(SGObject("circle"), SGObject("circle"), SGObject("sky")),
                    relations=(SGRelation(0, "below", 2), SGRelation(1, "below", 2))),
         "a circle below a sky and another circle below the sky"),
    ],
)
def test_graph_caption(graph, text):
    assert graph_caption(graph) == text


def test_summary_reports_recall_over_scorable_images_and_warns_when_many_objects_are_unscorable(tmp_path, caplog):
    import logging

    from jobs.summary import summarize

    table = scored_rows(samples=1).to_pylist()
    # "two": 1 of 2 objects found; "odd id": its only object matches no class (recall 1.0 by definition)
    table[0].update(recall=0.5, found=["red circle"], missing=["blue square"], unscorable=[])
    table[1].update(recall=1.0, found=[], missing=[], unscorable=["triangle"])
    Sink(SinkSettings(run_uri=str(tmp_path / "run")))(pa.Table.from_pylist(table, schema=SCORED_SCHEMA))
    with caplog.at_level(logging.WARNING, logger="sgbatch"):
        summary = summarize(Storage(), str(tmp_path / "run"), rows_in=3)
    recall = summary["recall"]
    assert recall["mean"] == pytest.approx(0.75) and recall["mean_scorable"] == pytest.approx(0.5)
    assert (recall["images_scorable"], recall["objects"], recall["objects_unscorable"]) == (1, 3, 1)
    assert recall["unscorable_fraction"] == pytest.approx(1 / 3)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "1 of 3 objects (33%)" in warning and "0.750" in warning and "0.500" in warning and "--label-map" in warning

    caplog.clear()
    table[1].update(recall=1.0, found=["triangle"], unscorable=[])
    Sink(SinkSettings(run_uri=str(tmp_path / "run")))(pa.Table.from_pylist(table, schema=SCORED_SCHEMA))
    with caplog.at_level(logging.WARNING, logger="sgbatch"):
        again = summarize(Storage(), str(tmp_path / "run"), rows_in=3)
    assert again["recall"]["unscorable_fraction"] == 0 and again["recall"]["mean_scorable"] == pytest.approx(0.75)
    assert not caplog.records
