"""HTML of the run report: one self-contained page, no scripts, no external resources.

Every string that comes from the run (ids, labels, predicates, error reasons, config values) goes
through :func:`e`; links and image sources are relative paths the report itself wrote (or the
run's own image keys, URL-quoted), so the page opens offline from a local folder or a synced
S3 prefix alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from jobs.report.data import Image, SbpcStats
from sgmodel.sbpc import TABLE3_THRESHOLDS


def e(value: Any) -> str:
    """Escape text for HTML content and quoted attributes."""
    return escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:,.{digits}f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as (dotted key, leaf) pairs, in their own order."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.extend(flatten(value, f"{name}."))
        else:
            out.append((name, value))
    return out


def kv_table(data: Mapping[str, Any], css_class: str = "kv") -> str:
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(fmt(v))}</td></tr>" for k, v in flatten(data))
    return f'<table class="{css_class}">{rows}</table>'


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], css_class: str = "data") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{e(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def stat(key: str, label: str, value: Any, digits: int = 3) -> str:
    """A headline number; ``data-key`` names the summary.json field it shows."""
    return (f'<div class="stat" data-key="{e(key)}"><div class="v">{e(fmt(value, digits))}</div>'
            f'<div class="l">{e(label)}</div></div>')


def recall_class(recall: float | None) -> str:
    if recall is None or (isinstance(recall, float) and math.isnan(recall)):
        return "r-none"
    return "r-low" if recall < 0.5 else "r-mid" if recall < 0.9 else "r-high"


def thumb_html(thumb: tuple[str, int, int] | None, key: str | None, alt: str, link: bool = True) -> str:
    if thumb is None:
        return f'<div class="thumb noimg" title="{e(key)}">image unavailable</div>'
    rel, w, h = thumb
    img = f'<img class="thumb" src="{e(quote(rel))}" width="{w}" height="{h}" alt="{e(alt)}">'
    # Plain image files are linked at full size; tar members cannot be linked into.
    if link and key and ".tar/" not in key:
        return f'<a href="{e(quote(key))}">{img}</a>'
    return img


def image_card(image: Image, thumb: tuple[str, int, int] | None, graph_svg: str) -> str:
    d = image.details
    lines = [f'<div class="cid">{e(image.id)} <span class="muted">#{image.sample_index}</span></div>']
    score = (f'<span class="badge {recall_class(image.recall)}">recall {e(fmt(image.recall, 2))}</span>'
             if image.recall is not None else '<span class="badge r-none">not scored</span>')
    checked = d.get("relations_checked")
    if checked:
        score += f' <span class="muted">relations {e(d.get("relations_satisfied"))}/{e(checked)}</span>'
    if d.get("precision") is not None:
        score += f' <span class="muted">precision {e(fmt(d["precision"], 2))}</span>'
    lines.append(f"<div>{score}</div>")
    if d.get("missing"):
        lines.append(f'<div class="missing">missing: {e(", ".join(map(str, d["missing"])))}</div>')
    if d.get("extra_objects"):
        lines.append(f'<div class="missing">extra: {e(", ".join(map(str, d["extra_objects"])))}</div>')
    if d.get("unscorable"):
        lines.append(f'<div class="muted">not scorable: {e(", ".join(map(str, d["unscorable"])))}</div>')
    if d.get("winner_candidate") is not None:
        lines.append(f'<div class="muted">SBPC: candidate {e(d["winner_candidate"])} of '
                     f'{e(d.get("candidates_drawn"))} won</div>')
    lines.append(f'<div class="muted">seed {e(d.get("seed"))}</div>')
    alt = f"generated image for {image.id} #{image.sample_index}"
    return (f'<figure class="card" data-id="{e(image.id)}" data-sample="{image.sample_index}" '
            f'data-recall="{e(image.recall)}"><div class="pair">{thumb_html(thumb, image.image_key, alt)}'
            f"{graph_svg}</div><figcaption>{''.join(lines)}</figcaption></figure>")


def sbpc_table(stats: SbpcStats, summary_sbpc: Mapping[str, Any] | None) -> str:
    headers = ["graphs", "candidates (N)", "avg min recall", "avg median recall", "avg max recall",
               *[f"avg # with recall ≥ {t}" for t in TABLE3_THRESHOLDS], "avg candidates drawn"]
    t3 = stats.table3
    row = [t3["graphs"], stats.max_candidates, t3["avg_min_recall"], t3["avg_median_recall"], t3["avg_max_recall"],
           *[t3["avg_count_at_least"][t] for t in TABLE3_THRESHOLDS], t3["avg_candidates_drawn"]]
    out = [table(headers, [row], css_class="data sbpc-table")]
    if summary_sbpc:
        out.append("<details><summary>summary.json: sbpc</summary>" + kv_table(summary_sbpc) + "</details>")
    return "".join(out)


CSS = """
:root { --fg:#1f2328; --muted:#57606a; --line:#d0d7de; --bg2:#f6f8fa; --blue:#0969da; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); margin: 0; background: #fff; }
header { padding: 18px 28px 10px; border-bottom: 1px solid var(--line); background: var(--bg2); }
header h1 { margin: 0 0 4px; font-size: 22px; }
nav { padding: 8px 28px; border-bottom: 1px solid var(--line); position: sticky; top: 0; background: #fff; z-index: 1; }
nav a { margin-right: 16px; color: var(--blue); text-decoration: none; }
main { padding: 0 28px 40px; max-width: 1500px; }
section { margin-top: 26px; }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 14px; margin: 14px 0 6px; }
.muted, .note { color: var(--muted); }
.note { margin: 4px 0 12px; }
.stats { display: flex; flex-wrap: wrap; gap: 10px; }
.stat { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.stat .v { font-size: 20px; font-weight: 600; }
.stat .l { color: var(--muted); font-size: 12px; }
.status-succeeded { color: #1a7f37; } .status-failed { color: #cf222e; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { background: var(--bg2); }
table.kv th { font-weight: 500; color: var(--muted); background: var(--bg2); }
td { max-width: 60em; overflow-wrap: anywhere; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plots figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
.plots figcaption { color: var(--muted); font-size: 12px; max-width: 520px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(390px, 1fr)); gap: 12px; }
.card { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
.pair { display: flex; gap: 8px; }
img.thumb, .thumb { width: 160px; height: 160px; object-fit: contain; image-rendering: pixelated;
                    background: var(--bg2); border: 1px solid var(--line); }
.noimg { display: flex; align-items: center; justify-content: center; color: var(--muted); font-size: 12px; }
svg.graph { width: 200px; height: 200px; flex: none; }
.card figcaption { margin-top: 6px; font-size: 13px; }
.cid { font-weight: 600; overflow-wrap: anywhere; }
.missing { color: #cf222e; }
.badge { display: inline-block; border-radius: 10px; padding: 0 8px; font-size: 12px; font-weight: 600; }
.r-high { background: #dafbe1; color: #1a7f37; } .r-mid { background: #fff8c5; color: #9a6700; }
.r-low { background: #ffebe9; color: #cf222e; } .r-none { background: var(--bg2); color: var(--muted); }
.legend span { margin-right: 14px; } .legend i { display: inline-block; width: 12px; height: 10px;
  border: 1px solid; border-radius: 2px; margin-right: 4px; vertical-align: -1px; }
.strip { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
.cand { margin: 0; padding: 4px; width: 112px; border: 2px solid transparent; border-radius: 6px; text-align: center; font-size: 12px; }
.cand img.thumb, .cand .thumb { width: 96px; height: 96px; }
.cand.winner { border-color: #1a7f37; background: #dafbe1; }
.chip { display: inline-block; border: 1px solid var(--line); border-radius: 4px; padding: 0 5px; margin: 1px; }
.chip.winner { border: 2px solid #1a7f37; font-weight: 600; }
footer { color: var(--muted); font-size: 12px; padding: 12px 28px; border-top: 1px solid var(--line); }
"""

LEGEND = ('<p class="legend note"><span><i style="background:#dafbe1;border-color:#1a7f37"></i>found</span>'
          '<span><i style="background:#ffebe9;border-color:#cf222e"></i>missing</span>'
          '<span><i style="background:#eaeef2;border-color:#6e7781"></i>not scorable</span>'
          '<span style="color:#0969da">→ relation (subject → object)</span></p>')


def page(title: str, header: str, nav: Sequence[tuple[str, str]], sections: Sequence[str], footer: str) -> str:
    links = "".join(f'<a href="#{e(anchor)}">{e(text)}</a>' for anchor, text in nav)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
            f"<header>{header}</header><nav>{links}</nav><main>{''.join(sections)}</main>"
            f"<footer>{footer}</footer></body></html>\n")
