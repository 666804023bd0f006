"""The run report in a real browser: headless Chromium opens report.html from disk (file://).

Checks what only a browser can: nothing the page asks for fails to load, it asks for nothing but
files beside it (works offline), every gallery and candidate image decodes (naturalWidth > 0)
and is painted in the screenshot, and data text stays text. A negative control deletes one
thumbnail and expects the same checks to catch it, so a silently broken harness cannot pass.

Chromium comes from Debian's ``chromium`` package (``scripts/ensure-chromium.sh``, run by
``make test``); the tests skip, saying so, only where it is not installed, and fail instead under CI=true.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from jobs.report import build_report
from tests.e2e.chromium_cdp import Chromium, find_chromium
from tests.report_runs import HOSTILE_ID, write_generate_run, write_sbpc_run
from workers.storage import Storage

pytestmark = pytest.mark.browser

IMAGES_JS = """
Array.from(document.images).map(img => ({
  src: img.getAttribute('src'), complete: img.complete, naturalWidth: img.naturalWidth,
  section: img.closest('section') ? img.closest('section').id : null,
  winner: !!img.closest('.cand.winner'),
  rect: (r => [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height])(img.getBoundingClientRect()),
}))
"""
PAGE_JS = """
({
  scripts: document.querySelectorAll('script, iframe, object, embed, link[rel=stylesheet]').length,
  svgs: Array.from(document.querySelectorAll('svg.graph')).filter(s => s.getBoundingClientRect().width > 0).length,
  cards: document.querySelectorAll('figure.card').length,
  errorIds: Array.from(document.querySelectorAll('table.errors tbody tr td:first-child')).map(td => td.textContent),
  title: document.title,
})
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = find_chromium()
    if exe is None:
        why = ("headless Chromium is not installed and could not be installed here: run "
               "scripts/ensure-chromium.sh as root (it installs Debian's 'chromium' package)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the browser tests: {why}")  # a CI run that skips them proves nothing
        pytest.skip(why)
    return exe


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """A generate run (WebDataset, written by the job's Sink) and an SBPC run with kept candidates, reported."""
    root = tmp_path_factory.mktemp("browser-runs")
    storage = Storage()
    write_generate_run(storage, str(root / "gen"), count=12, output_format="webdataset")
    build_report(storage, str(root / "gen"), max_images=10)
    write_sbpc_run(storage, str(root / "sbpc"))
    build_report(storage, str(root / "sbpc"))
    return {"gen": root / "gen", "sbpc": root / "sbpc"}


def painted(screenshot: Image.Image, rect: list[float]) -> float:
    """Standard deviation of the screenshot's pixels inside an element (0 for a blank box)."""
    x, y, w, h = (int(round(v)) for v in rect)
    crop = screenshot.crop((x + 2, y + 2, x + w - 2, y + h - 2)).convert("L")
    return ImageStat.Stat(crop).stddev[0]


def open_report(chromium: str, page: Path, shot: Path) -> tuple:
    with Chromium(chromium) as browser:
        load = browser.load(page.as_uri(), width=1280, height=900)
        images = browser.evaluate(IMAGES_JS)
        info = browser.evaluate(PAGE_JS)
        browser.screenshot(shot, max_height=6000)
    return load, images, info


def test_generate_report_loads_offline_and_every_image_renders(chromium, reports, tmp_path):
    run = reports["gen"]
    shot = tmp_path / "generate-report.png"
    load, images, info = open_report(chromium, run / "report.html", shot)

    assert load.failed == [], f"resources that failed to load: {load.failed}"
    assert load.console_errors == []
    schemes = {url.split(":", 1)[0] for url in load.requests.values()}
    assert schemes <= {"file", "data"}, f"the page asked for more than local files: {sorted(load.requests.values())}"
    root = run.resolve().as_uri()
    assert all(url.startswith(root) for url in load.requests.values() if url.startswith("file:"))

    gallery = [i for i in images if i["section"] in ("gallery", "worst")]
    assert len({i["src"] for i in gallery}) == 10  # max_images=10 of 12
    broken = [i["src"] for i in images if not (i["complete"] and i["naturalWidth"] > 0)]
    assert broken == [], f"images that did not decode: {broken}"
    assert all(i["naturalWidth"] == 160 for i in gallery)  # 32 px tar members, upscaled 5x
    assert info["scripts"] == 0 and info["svgs"] == info["cards"] == len(gallery)
    assert info["errorIds"] == [HOSTILE_ID]  # shown as text, not run as markup

    with Image.open(shot) as im:
        screenshot = im.convert("RGB")
    assert screenshot.width == 1280 and screenshot.height > 1500
    for image in gallery + [i for i in images if i["section"] == "plots"]:
        if image["rect"][1] + image["rect"][3] <= screenshot.height:
            assert painted(screenshot, image["rect"]) > 8, f"{image['src']} looks blank in the screenshot"


def test_sbpc_report_shows_candidates_with_one_winner_each(chromium, reports, tmp_path):
    load, images, info = open_report(chromium, reports["sbpc"] / "report.html", tmp_path / "sbpc-report.png")
    assert load.failed == [] and load.console_errors == []
    candidates = [i for i in images if i["section"] == "candidates"]
    assert len(candidates) == 12 and all(i["naturalWidth"] > 0 for i in candidates)
    assert sum(i["winner"] for i in candidates) == 3
    plots = {i["src"] for i in images if i["section"] == "plots"}
    assert plots == {"report/recall_hist.png", "report/sbpc_curve.png"}
    assert all(i["naturalWidth"] > 0 for i in images if i["section"] == "plots")


def test_a_missing_thumbnail_is_caught(chromium, reports, tmp_path):
    """Negative control: the checks above must fail on a page with a broken image."""
    run = tmp_path / "broken"
    shutil.copytree(reports["gen"], run)
    victim = sorted((run / "report" / "img").iterdir())[0]
    victim.unlink()
    load, images, _ = open_report(chromium, run / "report.html", tmp_path / "broken.png")
    assert [(url.rsplit("/", 1)[-1], "FILE_NOT_FOUND" in err) for url, err in load.failed] == [(victim.name, True)]
    broken = [i for i in images if i["naturalWidth"] == 0]
    assert [Path(i["src"]).name for i in broken] == [victim.name] * len(broken) and broken


def test_screenshot_is_a_readable_png(chromium, reports, tmp_path):
    shot = tmp_path / "top.png"
    with Chromium(chromium) as browser:
        browser.load((reports["gen"] / "report.html").as_uri(), width=1280, height=900)
        size = browser.screenshot(shot, max_height=900)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == size == (1280, 900)
        assert ImageStat.Stat(im.convert("L")).stddev[0] > 10  # text, plots and pictures, not a blank page
