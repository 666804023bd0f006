"""The run report built from real runs: a generate run on local Ray (PNG, local), one on moto S3
(WebDataset), and SBPC- and fine-tune-shaped folders written to the contract.

Checks what a reader relies on: the counts are summary.json's, every image the page shows exists
next to it, errors are listed with their reasons, data text is escaped, the gallery is bounded
and deterministic.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.generate import GenerateConfig, run
from jobs.report import build_report, main
from sgmodel.graph import GRAPH_SCHEMA, graphs_to_table
from sgmodel.shapes.world import iter_shapes_records
from tests.report_runs import HOSTILE_ID, ReportPage, write_finetune_run, write_sbpc_run
from workers.storage import Storage, join


def real_run(fn):
    """Tests on a real generate run (local Ray, tiny model): marked ray and slow."""
    return pytest.mark.ray(pytest.mark.slow(fn))


GOOD_ROWS = 10
BAD_ROWS = [
    {"id": HOSTILE_ID, "objects": [], "relations": []},  # no objects; the id must come out escaped
    {"id": "bad-relation", "objects": [{"label": "circle", "attributes": ["red"], "box": None}],
     "relations": [{"subject": 0, "predicate": "left of", "object": 3}]},
]


def write_input(path: Path) -> Path:
    graphs = [g for g, _ in iter_shapes_records(GOOD_ROWS, seed=21, size=16)]
    table = graphs_to_table(graphs)
    bad = pa.Table.from_pylist([{**row, "caption": None, "image": None, "seed": None} for row in BAD_ROWS],
                               schema=GRAPH_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables([table, bad]), path)
    return path


def generate(tmp: Path, output: str, **overrides) -> tuple[dict, int]:
    return run(GenerateConfig(**{
        "input": str(write_input(tmp / "in" / "graphs.parquet")), "output": output, "steps": 2, "batch_size": 4,
        "max_error_fraction": 0.5, "log_every": 1000.0, **overrides}))


@pytest.fixture(scope="module")
def png_run(tmp_path_factory, local_ray, tiny_model_dir, segmenter_dir) -> tuple[Path, dict]:
    """A real generate run (tiny untrained model, trained segmenter): 10 images, 2 rejected rows."""
    tmp = tmp_path_factory.mktemp("report-run")
    summary, code = generate(tmp, str(tmp / "runs"), run_id="r1", model=tiny_model_dir, segmenter=segmenter_dir,
                             report_max_images=6)
    assert code == 0, summary
    return tmp / "runs" / "r1", summary


def metadata(run_dir: Path) -> list[dict]:
    return pa.concat_tables([pq.read_table(p) for p in sorted((run_dir / "metadata").glob("*.parquet"))]).to_pylist()


def local_src(run_dir: Path, src: str) -> Path:
    assert not urlparse(src).scheme and not src.startswith("/"), f"not a relative link: {src!r}"
    return run_dir / unquote(src)


# ----------------------------------------------------------------------------- generate, local


@real_run
def test_job_writes_the_report_and_its_counts_are_the_summary(png_run):
    run_dir, summary = png_run
    page = ReportPage((run_dir / "report.html").read_text())
    assert summary["images"] == GOOD_ROWS and summary["errors"] == len(BAD_ROWS)
    for key in ("rows_in", "images", "errors", "rows_lost"):
        assert int(page.stat(key)) == summary[key], key
    assert float(page.stat("recall.mean")) == pytest.approx(summary["recall"]["mean"], abs=5e-4)
    assert page.tables["reasons"][1:] == [[code, str(n)] for code, n in summary["errors_by_reason"].items()]
    # the histogram caption lists the same counts as summary.json
    counts = [int(part.rsplit(":", 1)[1]) for part in page.texts["hist-counts"][0].split(":", 1)[1].split(",")]
    assert counts == summary["recall"]["histogram"]["counts"]
    assert {"summary", "plots", "gallery", "worst", "errors", "config"} <= set(page.sections)


@real_run
def test_gallery_is_bounded_and_every_image_it_shows_exists(png_run):
    run_dir, summary = png_run
    page = ReportPage((run_dir / "report.html").read_text())
    # the job's report_max_images=6: 6 distinct images of 10, and the page says so
    note = page.attrs_of["gallery-note"]
    assert (int(note["data-shown"]), int(note["data-total"])) == (6, summary["images"])
    assert "Showing 6 of 10 images" in page.texts["gallery-note"][0]
    shown = {(c["id"], c["sample"]) for c in page.cards}
    assert len(shown) == 6
    thumbs = [src for _, src in page.images if src.startswith("report/img/")]
    assert len(set(thumbs)) == 6 == len(list((run_dir / "report" / "img").iterdir()))
    for _, src in page.images:
        assert local_src(run_dir, src).is_file(), src
    for href in page.links:
        if not href.startswith("#"):
            assert local_src(run_dir, href).is_file(), href  # full-size links to the run's PNGs
    assert page.scripts == 0


@real_run
def test_worst_section_lists_the_lowest_recall_first(png_run):
    run_dir, _ = png_run
    page = ReportPage((run_dir / "report.html").read_text())
    rows = sorted(metadata(run_dir), key=lambda r: r["recall"])
    worst = [c for c in page.cards if c["section"] == "worst"]
    assert len(worst) == 6 // 4
    recalls = [float(c["recall"]) for c in worst]
    assert recalls == sorted(recalls) and recalls[0] == pytest.approx(rows[0]["recall"])


@real_run
def test_cards_show_recall_missing_objects_and_the_graph(png_run):
    run_dir, _ = png_run
    html = (run_dir / "report.html").read_text()
    page = ReportPage(html)
    by_id = {r["id"]: r for r in metadata(run_dir)}
    for card in page.cards:
        row = by_id[card["id"]]
        assert float(card["recall"]) == pytest.approx(row["recall"])
    missing = [", ".join(r["missing"]) for r in by_id.values() if r["missing"] and r["id"] in {c["id"] for c in page.cards}]
    for text in missing:
        assert f"missing: {text}" in page.texts["missing"]
    assert html.count('<svg class="graph"') == len(page.cards)
    # a graph's objects and relation predicates are drawn in its SVG
    graph = json.loads(next(iter(by_id.values()))["graph"])
    if graph["relations"]:
        assert graph["relations"][0]["predicate"] in html


@real_run
def test_errors_are_listed_with_reasons_and_escaped(png_run):
    run_dir, _ = png_run
    html = (run_dir / "report.html").read_text()
    page = ReportPage(html)
    errors = pa.concat_tables([pq.read_table(p) for p in (run_dir / "errors").glob("*.parquet")]).to_pylist()
    listed = {row[0]: row for row in page.tables["errors"][1:]}
    assert set(listed) == {e["id"] for e in errors} == {r["id"] for r in BAD_ROWS}
    for e in errors:
        assert listed[e["id"]][1:3] == [e["code"], e["reason"]]
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@real_run
def test_thumbnails_are_nearest_neighbour_upscales(png_run):
    run_dir, _ = png_run
    page = ReportPage((run_dir / "report.html").read_text())
    card = page.cards[0]
    row = next(r for r in metadata(run_dir) if r["id"] == card["id"])
    original = Image.open(run_dir / row["image_key"]).convert("RGB")
    src = page.section_images("gallery")[0]
    thumb = Image.open(local_src(run_dir, src)).convert("RGB")
    assert original.size == (16, 16) and thumb.size == (160, 160)
    assert list(thumb.getdata()) == list(original.resize((160, 160), Image.Resampling.NEAREST).getdata())


@real_run
def test_rebuild_is_deterministic_shows_everything_when_it_fits_and_drops_stale_assets(png_run):
    run_dir, summary = png_run
    storage = Storage()
    build_report(storage, str(run_dir), max_images=6)
    first = [(c["section"], c["id"]) for c in ReportPage((run_dir / "report.html").read_text()).cards]
    build_report(storage, str(run_dir), max_images=6)
    assert [(c["section"], c["id"]) for c in ReportPage((run_dir / "report.html").read_text()).cards] == first

    assert main(["--run", str(run_dir), "--max-images", "100", "--max-errors", "1"]) == 0
    page = ReportPage((run_dir / "report.html").read_text())
    gallery = [c for c in page.cards if c["section"] == "gallery"]
    assert len(gallery) == summary["images"] and [c["id"] for c in gallery] == sorted(c["id"] for c in gallery)
    assert "All 10 images" in page.texts["gallery-note"][0]
    assert len(page.tables["errors"]) == 1 + 1 and "first 1" in (run_dir / "report.html").read_text()

    build_report(storage, str(run_dir), max_images=2)
    assert len(list((run_dir / "report" / "img").iterdir())) == 2


def test_report_of_a_missing_run_is_an_argument_error(tmp_path, capsys):
    assert main(["--run", str(tmp_path / "nope")]) == 2
    assert "no run at" in capsys.readouterr().err
    assert main(["--run", str(tmp_path), "--max-images", "-1"]) == 2


# ----------------------------------------------------------------------------- SBPC and fine-tune shapes


def test_sbpc_report_has_the_best_of_n_curve_table3_and_candidates(tmp_path):
    storage = Storage()
    run_dir = tmp_path / "sbpc-1"
    write_sbpc_run(storage, str(run_dir))
    build_report(storage, str(run_dir))
    html = (run_dir / "report.html").read_text()
    page = ReportPage(html)
    assert page.texts["sbpc-curve"][0].endswith("n=1: 0.417, n=2: 0.500, n=3: 0.750, n=4: 0.833")
    header, row = page.tables["sbpc-table"]
    assert row == ["3", "4", "0.083", "0.417", "0.833", "2.333", "1.000", "0.667", "4.000"]
    assert (run_dir / "report" / "sbpc_curve.png").is_file()
    # candidates side by side, the winner marked: each graph's strip has 4 images, one winner
    blocks = html.split('<div class="cand-graph"')[1:]
    assert len(blocks) == 3
    for block in blocks:
        assert block.count('<figure class="cand') == 4 and block.count('data-won="true"') == 1
    assert len(page.texts["cand winner"]) == 3 and all("recall" in t for t in page.texts["cand winner"])
    for _, src in page.images:
        assert local_src(run_dir, src).is_file(), src
    assert "candidate 2 of 4 won" in html  # metadata's winner_candidate / candidates_drawn
    assert "&lt;script&gt;" in html and "<script>" not in html


def test_sbpc_report_without_kept_candidates_lists_their_recalls(tmp_path):
    storage = Storage()
    run_dir = tmp_path / "sbpc-2"
    write_sbpc_run(storage, str(run_dir), keep_candidates=False)
    build_report(storage, str(run_dir))
    page = ReportPage((run_dir / "report.html").read_text())
    assert not page.section_images("candidates")
    assert sorted(page.texts["chip winner"]) == ["#0 1.00", "#2 1.00", "#3 0.50"]
    assert "--keep-candidates" in page.html


def test_finetune_report_shows_config_summary_and_loss_curves(tmp_path):
    storage = Storage()
    run_dir = tmp_path / "ft"
    summary = write_finetune_run(storage, str(run_dir), steps=30)
    build_report(storage, str(run_dir))
    page = ReportPage((run_dir / "report.html").read_text())
    assert page.sections == ["summary", "training", "config"]
    assert page.section_images("training") == ["report/losses.png"]
    with Image.open(run_dir / "report" / "losses.png") as im:
        assert im.size[0] >= 400
    last = dict(zip(*page.tables["last-step"]))
    assert last["step"] == "30" and float(last["val_loss"]) == pytest.approx(1.1 / 30 + 0.06, abs=5e-4)
    kv = {row[0]: row[1] for row in page.tables["kv"]}
    assert kv["final_loss_total"] == f"{summary['final_loss_total']:.3f}" and kv["zero_stage"] == "2"


# ----------------------------------------------------------------------------- S3 and WebDataset


@real_run
def test_s3_webdataset_run_gets_its_report_written_back(s3_bucket, tmp_path, tiny_model_dir, segmenter_dir, local_ray):
    storage = s3_bucket.storage()
    summary, code = generate(tmp_path, s3_bucket.uri("runs"), run_id="s3run", model=tiny_model_dir,
                             segmenter=segmenter_dir, output_format="webdataset",
                             s3_endpoint_url=s3_bucket.endpoint_url)
    assert code == 0, summary
    run_uri = s3_bucket.uri("runs", "s3run")
    assert any(".tar/" in key for key in _image_keys(storage, run_uri))
    # the job wrote it; rebuild it through the CLI too, as a user would
    assert main(["--run", run_uri, "--s3-endpoint-url", s3_bucket.endpoint_url]) == 0
    page = ReportPage(storage.read_text(join(run_uri, "report.html")))
    assert int(page.stat("images")) == summary["images"] == GOOD_ROWS
    thumbs = page.section_images("gallery")
    assert len(thumbs) == GOOD_ROWS
    for _, src in page.images:
        data = storage.read_bytes(posixpath.join(run_uri, unquote(src)))
        with Image.open(io.BytesIO(data)) as im:
            assert min(im.size) > 0
    with Image.open(io.BytesIO(storage.read_bytes(join(run_uri, thumbs[0])))) as im:
        assert im.size == (160, 160)  # extracted from the tar member and upscaled
    # tar members are shown but not linked (a browser cannot open into a tar)
    assert not [h for h in page.links if ".tar" in h]
    assert math.isclose(float(page.stat("recall.mean")), summary["recall"]["mean"], abs_tol=5e-4)


def _image_keys(storage: Storage, run_uri: str) -> list[str]:
    keys = []
    for uri in storage.list(join(run_uri, "metadata")):
        keys.extend(storage.read_parquet(uri, columns=["image_key"]).column(0).to_pylist())
    return keys
