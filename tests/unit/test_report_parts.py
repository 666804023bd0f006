"""The report's pure parts: graph drawing, gallery choice, SBPC statistics, thumbnails, plots, escaping."""

from __future__ import annotations

import io
import random
import re
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from jobs.report.data import ImageIndex, sbpc_stats, select_images
from jobs.report.graph import graph_svg, object_statuses
from jobs.report.html import e, fmt
from jobs.report.images import split_tar_key, thumbnail
from jobs.report.plots import (
    histogram_counts,
    loss_curves,
    loss_curves_figure,
    max_recall_curve,
    max_recall_curve_figure,
    recall_histogram,
    recall_histogram_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG_NS = "{http://www.w3.org/2000/svg}"


def obj(label, *attributes, box=None):
    return {"label": label, "attributes": list(attributes), "box": box}


# ----------------------------------------------------------------------------- graph


def test_graph_svg_is_well_formed_and_escapes_labels_and_predicates():
    graph = {"id": "<x>", "objects": [obj("<script>alert(1)</script>"), obj("cat", "a&b")],
             "relations": [{"subject": 0, "predicate": 'on "top" <of>', "object": 1}]}
    svg = graph_svg(graph)
    root = ET.fromstring(svg)  # parses as XML: nothing from the data broke the markup
    assert "<script" not in svg and "&lt;script&gt;" in svg
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG_NS}text")]
    assert any("a&b cat" in t for t in texts) and any('on "top" <of>' in t for t in texts)


def test_nodes_sit_at_their_box_centres_and_relations_are_arrows():
    graph = {"id": "g", "objects": [obj("circle", box=[0.0, 0.4, 0.2, 0.6]), obj("square", box=[0.8, 0.4, 1.0, 0.6])],
             "relations": [{"subject": 0, "predicate": "left of", "object": 1}]}
    root = ET.fromstring(graph_svg(graph))
    rects = [r for r in root.iter(f"{SVG_NS}rect") if r.get("rx") == "3"]
    xs = [float(r.get("x")) + float(r.get("width")) / 2 for r in rects]
    assert xs[0] < 60 < 140 < xs[1]  # the layout reads left to right, as the boxes do
    assert len(list(root.iter(f"{SVG_NS}path"))) == 1 and len(list(root.iter(f"{SVG_NS}polygon"))) == 1
    head = next(root.iter(f"{SVG_NS}polygon")).get("points")
    tip_x = float(head.split()[0].split(",")[0])
    assert tip_x > 100  # the arrow points at the object (subject -> object)


def test_graph_without_boxes_bad_relations_and_no_objects_still_draw():
    graph = {"id": "g", "objects": [obj("a"), obj("b"), obj("c")],
             "relations": [{"subject": 0, "predicate": "near", "object": 9}, {"subject": 1, "predicate": "x", "object": 1},
                           {"subject": 0, "predicate": "p", "object": 2}, {"subject": 2, "predicate": "q", "object": 0}]}
    root = ET.fromstring(graph_svg(graph))
    assert len(list(root.iter(f"{SVG_NS}polygon"))) == 3  # the out-of-range relation is skipped
    assert "no objects" in graph_svg({"id": "empty", "objects": [], "relations": []})


def test_object_statuses_count_identical_descriptions():
    objects = [obj("square", "red"), obj("circle"), obj("square", "red")]
    assert object_statuses(objects, ["red square"], ["circle", "red square"], []) == ["found", "missing", "missing"]
    assert object_statuses(objects, None, None, None) == [None, None, None]


# ----------------------------------------------------------------------------- gallery choice


def index(n, scored=True, files=3, seed=None):
    """n images spread over ``files`` light tables (shuffled first when ``seed`` is given)."""
    import pyarrow as pa

    rows = [{"id": f"g{i:04d}", "sample_index": 0, "image_key": f"images/s/g{i}.png",
             "recall": (i * 37 % 101) / 100 if scored else None, "relation_score": None} for i in range(n)]
    if seed is not None:
        random.Random(seed).shuffle(rows)
    schema = pa.schema([("id", pa.string()), ("sample_index", pa.int32()), ("image_key", pa.string()),
                        ("recall", pa.float64()), ("relation_score", pa.float64())])
    return ImageIndex([pa.Table.from_pylist(rows[f::files], schema=schema) for f in range(files)])


def test_selection_is_bounded_deterministic_and_has_the_worst():
    idx = index(500)
    sel = select_images(idx, 40)
    assert sel.shown == 40 and len(sel.worst) == 10 and len(sel.gallery) == 30
    assert [i.recall for i in sel.worst] == sorted(idx.recall.tolist())[:10]
    again = select_images(index(500, files=7, seed=1), 40)
    assert [i.id for i in again.gallery] == [i.id for i in sel.gallery]  # independent of files and row order
    assert [i.id for i in again.worst] == [i.id for i in sel.worst]
    assert [i.id for i in sel.gallery] == sorted(i.id for i in sel.gallery)


def test_selection_shows_all_when_it_fits_and_nothing_worst_without_scores():
    sel = select_images(index(8), 120)
    assert len(sel.gallery) == 8 and sel.shown == 8 and len(sel.worst) == 8
    unscored = select_images(index(300, scored=False), 20)
    assert unscored.worst == [] and unscored.shown == 20
    assert select_images(index(5), 0).shown == 0
    assert select_images(index(0, files=1), 10).shown == 0


# ----------------------------------------------------------------------------- SBPC


def candidates(recalls):
    import pyarrow as pa

    out = []
    for g, values in enumerate(recalls):
        for c, r in enumerate(values):
            out.append({"id": f"g{g}", "candidate_index": c, "seed": c, "recall": r, "relation_score": None,
                        "won": False, "image_key": None})
    # draw order comes from candidate_index, not from row order
    return pa.Table.from_pylist(out[::-1])


def test_sbpc_statistics_by_hand():
    stats = sbpc_stats(candidates([(0.25, 0.5, 1.0, 0.75), (1.0, 0.0, 0.5, 0.5), (0.0, 0.0, 0.25, 0.5)]))
    assert [n for n, _ in stats.curve] == [1, 2, 3, 4]
    assert [m for _, m in stats.curve] == pytest.approx([1.25 / 3, 0.5, 0.75, 2.5 / 3])
    t3 = stats.table3
    assert (t3["avg_min_recall"], t3["avg_median_recall"], t3["avg_max_recall"]) == pytest.approx(
        (0.25 / 3, 1.25 / 3, 2.5 / 3))
    assert t3["avg_count_at_least"] == pytest.approx({"0.5": 7 / 3, "0.75": 1.0, "0.9": 2 / 3})


def test_sbpc_adaptive_graphs_keep_their_best_after_stopping_and_unscored_are_skipped():
    stats = sbpc_stats(candidates([(0.2, 0.9), (0.1, 0.3, 0.5), (None, None)]))
    assert stats.table3["graphs"] == 2 and stats.max_candidates == 3
    assert [m for _, m in stats.curve] == pytest.approx([0.15, 0.6, 0.7])
    assert stats.table3["avg_candidates_drawn"] == pytest.approx(7 / 3)  # drawn counts every graph, scored or not
    assert sbpc_stats(candidates([(None,)])) is None


# ----------------------------------------------------------------------------- thumbnails, plots, text


def png(size, colour=(10, 200, 30)):
    buf = io.BytesIO()
    im = Image.new("RGB", size, colour)
    im.putpixel((0, 0), (255, 0, 0))
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_small_images_are_upscaled_by_whole_pixels_and_large_ones_shrunk():
    data, w, h = thumbnail(png((16, 16)))
    with Image.open(io.BytesIO(data)) as im:
        assert (w, h) == im.size == (160, 160)
        assert im.getpixel((9, 9))[:3] == (255, 0, 0) and im.getpixel((10, 10))[:3] == (10, 200, 30)
    _, w, h = thumbnail(png((600, 300)))
    assert (w, h) == (256, 128)
    with pytest.raises(OSError):
        thumbnail(b"not an image")


def test_tar_keys():
    assert split_tar_key("images/s-abc.tar/x-000.png") == ("images/s-abc.tar", "x-000.png")
    assert split_tar_key("images/s/x-000.png") is None


def test_plots_draw_the_data():
    assert histogram_counts([0.0, 0.05, 1.0])[1] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    hist = recall_histogram_figure([0.0, 0.5, 1.0, 1.0]).axes[0]
    assert [round(p.get_height()) for p in hist.patches] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert hist.lines[0].get_xdata()[0] == pytest.approx(0.625)  # the mean's marker
    curve = max_recall_curve_figure([1, 2, 3], [0.3, 0.5, 0.6]).axes[0].lines[0]
    assert curve.get_xydata().tolist() == [[1, 0.3], [2, 0.5], [3, 0.6]]
    # losses that are missing, zero or negative in places still plot (linear scale then), per key
    metrics = [{"step": 1, "loss_total": 1.0, "lr": 1e-4}, {"step": 2, "loss_total": -0.1, "loss_layout": 0.5},
               {"step": 3, "loss_adversarial": 0.0, "val_loss": float("nan")}, {"loss_total": 3.0}]
    losses, lr = loss_curves_figure(metrics).axes
    drawn = {line.get_label(): line.get_xydata().tolist() for line in losses.lines}
    assert drawn == {"loss_total": [[1, 1.0], [2, -0.1]], "loss_adversarial": [[3, 0.0]], "loss_layout": [[2, 0.5]]}
    assert losses.get_yscale() == "linear" and lr.lines[0].get_xydata().tolist() == [[1, 1e-4]]
    assert loss_curves_figure([{"step": 1, "loss_total": 2.0}, {"step": 2, "loss_total": 1.0}]).axes[0].get_yscale() \
        == "log"
    for png in (recall_histogram([0.5]), max_recall_curve([1], [0.5]), loss_curves([])):
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_text_helpers():
    assert e('<a href="x">&') == "&lt;a href=&quot;x&quot;&gt;&amp;"
    assert e(None) == ""
    assert [fmt(v) for v in (None, True, 12345, 0.5, 1e-6, float("nan"), [1])] == \
        ["—", "yes", "12,345", "0.500", "1.00e-06", "—", "[1]"]
    assert re.fullmatch(r"\d+\.\d{3}", fmt(2 / 3))
