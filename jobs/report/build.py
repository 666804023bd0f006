"""Building the page: read the run, pick the images, draw plots and thumbnails, write ``report.html``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone

from jobs.report.data import (
    RunData,
    Selection,
    load_details,
    load_run,
    sample_rank,
    sbpc_stats,
    select_images,
)
from jobs.report.graph import graph_svg
from jobs.report.html import (
    LEGEND,
    e,
    fmt,
    image_card,
    kv_table,
    page,
    sbpc_table,
    stat,
    table,
    thumb_html,
)
from jobs.report.images import ThumbnailWriter
from workers.storage import Storage, join

logger = logging.getLogger("sgbatch")

ASSETS = "report"
"""Folder of the report's files inside the run (rewritten on every build)."""
MAX_CANDIDATE_GRAPHS = 12


def build_report(storage: Storage, run_uri: str, *, max_images: int = 120, max_errors: int = 200) -> str:
    """Write ``{run_uri}/report.html`` and its assets; returns the page's URI.

    Raises FileNotFoundError when ``run_uri`` holds no run (no run.json, summary.json, metadata
    or metrics).
    """
    started = time.perf_counter()
    run_uri = run_uri.rstrip("/")
    run = load_run(storage, run_uri, max_errors)
    if not (run.info or run.summary or run.metadata_files or run.metrics is not None):
        raise FileNotFoundError(f"no run at {run_uri!r}: expected run.json, summary.json or metadata/ there")
    storage.delete_prefix(join(run_uri, ASSETS))  # a smaller rebuild leaves no stale thumbnails behind
    builder = _Builder(storage, run, max_images)
    html = builder.render()
    uri = join(run_uri, "report.html")
    storage.write_bytes(uri, html.encode("utf-8"), content_type="text/html; charset=utf-8")
    logger.info("report: %s (%d images shown, %.1f s)", uri, builder.images_shown, time.perf_counter() - started)
    return uri


class _Builder:
    """Renders one run's page; writes plots and thumbnails as it goes."""

    def __init__(self, storage: Storage, run: RunData, max_images: int) -> None:
        self.storage = storage
        self.run = run
        self.max_images = max_images
        self.thumbs = ThumbnailWriter(storage, run.uri, folder=f"{ASSETS}/img")
        self.images_shown = 0
        self.nav: list[tuple[str, str]] = []
        self.sbpc = sbpc_stats(run.candidates) if run.candidates is not None else None

    def asset(self, name: str, data: bytes) -> str:
        self.storage.write_bytes(join(self.run.uri, ASSETS, name), data, content_type="image/png")
        return f"{ASSETS}/{name}"

    def section(self, anchor: str, title: str, body: str) -> str:
        self.nav.append((anchor, title))
        return f'<section id="{e(anchor)}"><h2>{e(title)}</h2>{body}</section>'

    # ------------------------------------------------------------------ page
    def render(self) -> str:
        run, info = self.run, self.run.info
        summary = run.summary or {}
        run_id = info.get("run_id") or summary.get("run_id") or run.uri.rsplit("/", 1)[-1]
        sections = [self.summary_section()]
        if run.job == "finetune" or run.metrics is not None:
            sections.append(self.training_section())
        if run.metadata_files or run.job in ("generate", "sbpc"):
            sections.append(self.plots_section())
            sections.extend(self.gallery_sections())
        if run.candidates is not None:
            sections.append(self.candidates_section())
        if run.errors_total or run.job in ("generate", "sbpc"):
            sections.append(self.errors_section())
        sections.append(self.config_section())
        status = summary.get("status")
        header = (f"<h1>{e(run.job)} run {e(run_id)}</h1><div class=\"muted\">"
                  + (f'<b class="status-{e(status)}">{e(status)}</b> · ' if status else "")
                  + f"{e(run.uri)}</div>")
        footer = (f"sgbatch report, built {e(datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))} "
                  f"from the run's tables; the page needs no network.")
        return page(f"sgbatch {run.job} report — {run_id}", header, self.nav, sections, footer)

    # ------------------------------------------------------------------ summary
    def summary_section(self) -> str:
        run, s = self.run, self.run.summary
        if run.job == "finetune" and s is not None:
            return self.section("summary", "Summary", kv_table(s))
        if s is None:
            body = ('<p class="note">summary.json is missing (the run is still going, or it failed before the '
                    'end); the numbers below are read from its tables.</p><div class="stats">'
                    + stat("images", "images", len(run.images)) + stat("errors", "errors", run.errors_total)
                    + stat("recall.mean", "mean recall", _mean(run.recalls)) + "</div>")
            return self.section("summary", "Summary", body)
        recall = s.get("recall") or {}
        per_image = s.get("seconds_per_image") or {}
        stats = [
            stat("rows_in", "input rows", s.get("rows_in")),
            stat("images", "images", s.get("images")),
            stat("errors", "errors", s.get("errors")),
            stat("rows_lost", "rows lost", s.get("rows_lost")),
            stat("recall.mean", "mean recall", recall.get("mean")),
            stat("recall.median", "median recall", recall.get("median")),
            stat("relation_accuracy.accuracy", "relation accuracy", (s.get("relation_accuracy") or {}).get("accuracy")),
            stat("precision.mean", "mean precision", (s.get("precision") or {}).get("mean")),
            stat("extra_objects.images_with_extras", "images with extra objects",
                 (s.get("extra_objects") or {}).get("images_with_extras")),
            stat("images_per_second", "images / s", s.get("images_per_second")),
            stat("elapsed_seconds", "elapsed s", s.get("elapsed_seconds"), 1),
            stat("seconds_per_image.generate", "s / image (generate)", per_image.get("generate")),
            stat("seconds_per_image.score", "s / image (score)", per_image.get("score")),
        ]
        sbpc = s.get("sbpc") or {}
        if sbpc:
            stats.append(stat("sbpc.seconds_per_graph", "s / graph (SBPC)", sbpc.get("seconds_per_graph")))
        body = f'<div class="stats">{"".join(stats)}</div>'
        reasons = s.get("errors_by_reason") or {}
        if reasons:
            body += "<h3>Errors by reason</h3>" + table(["reason", "rows"], reasons.items(), "data reasons")
        body += "<details><summary>summary.json</summary>" + kv_table(s) + "</details>"
        return self.section("summary", "Summary", body)

    # ------------------------------------------------------------------ plots
    def plots_section(self) -> str:
        figures = []
        recalls = self.run.recalls
        if recalls:
            from jobs.report.plots import histogram_counts, recall_histogram

            edges, counts = histogram_counts(recalls)
            src = self.asset("recall_hist.png", recall_histogram(recalls))
            text = ", ".join(f"{lo:g}–{hi:g}: {c}" for lo, hi, c in zip(edges, edges[1:], counts))
            figures.append(f'<figure><img src="{e(src)}" width="520" height="300" alt="recall histogram">'
                           f'<figcaption class="hist-counts">images per recall bin: {e(text)}</figcaption></figure>')
        stats = self.sbpc
        body = ""
        if stats is not None:
            from jobs.report.plots import max_recall_curve

            ns, means = zip(*stats.curve)
            src = self.asset("sbpc_curve.png", max_recall_curve(list(ns), list(means)))
            text = ", ".join(f"n={n}: {m:.3f}" for n, m in stats.curve)
            figures.append(f'<figure><img src="{e(src)}" width="520" height="300" alt="average max recall against '
                           f'the number of candidates"><figcaption class="sbpc-curve">average over {stats.table3["graphs"]} '
                           f"graphs of the best recall among the first n candidates: {e(text)}</figcaption></figure>")
            body += ("<h3>SBPC candidates (FG-DM Table 3 statistics)</h3>"
                     + sbpc_table(stats, (self.run.summary or {}).get("sbpc")))
        if not figures and not body:
            return self.section("plots", "Plots", '<p class="note">No recall scores in this run (scoring was off '
                                                  "or no image was written).</p>")
        return self.section("plots", "Plots", f'<div class="plots">{"".join(figures)}</div>{body}')

    def training_section(self) -> str:
        metrics = self.run.metrics or []
        if not metrics:
            return self.section("training", "Training", '<p class="note">metrics.jsonl is missing or empty.</p>')
        from jobs.report.plots import LOSS_KEYS, loss_curves

        src = self.asset("losses.png", loss_curves(metrics))
        last = metrics[-1]
        keys = [k for k in ("step", *LOSS_KEYS, "lr", "samples_per_s") if k in last]
        body = (f'<div class="plots"><figure><img src="{e(src)}" width="640" height="440" alt="loss curves">'
                f'<figcaption>{len(metrics)} logged steps</figcaption></figure></div>'
                "<h3>Last logged step</h3>" + table(keys, [[last.get(k) for k in keys]], "data last-step"))
        return self.section("training", "Training", body)

    # ------------------------------------------------------------------ gallery
    def gallery_sections(self) -> list[str]:
        run = self.run
        if not run.images:
            return [self.section("gallery", "Gallery", '<p class="note">No images in this run.</p>')]
        selection = select_images(run.images, self.max_images)
        shown = [*selection.gallery, *selection.worst]
        load_details(self.storage, run, shown)
        self.thumbs.write(i.image_key for i in shown)
        self.images_shown = selection.shown
        out = [self.section("gallery", "Gallery", self._gallery_note(selection) + LEGEND
                            + self._cards(selection.gallery))]
        if selection.worst:
            note = (f'<p class="note">The {len(selection.worst)} images with the lowest recall, worst first '
                    "(ties in a fixed order).</p>")
            out.append(self.section("worst", "Lowest recall", note + self._cards(selection.worst)))
        return out

    def _gallery_note(self, sel: Selection) -> str:
        if sel.total <= self.max_images:
            text = f"All {sel.total:,} images of the run, in id order."
        else:
            text = (f"Showing {sel.shown:,} of {sel.total:,} images (at most {self.max_images:,}; "
                    f"--max-images): {len(sel.gallery):,} sampled below in id order — a fixed sample, the same "
                    f"on every rebuild — plus the {len(sel.worst):,} with the lowest recall in the next section.")
        if self.thumbs.failures:
            text += f" {len(self.thumbs.failures)} image(s) could not be read."
        return f'<p class="note gallery-note" data-shown="{sel.shown}" data-total="{sel.total}">{e(text)}</p>'

    def _cards(self, images: Sequence) -> str:
        cards = []
        for image in images:
            d = image.details
            graph = d.get("graph")
            svg = (graph_svg(graph, d.get("found"), d.get("missing"), d.get("unscorable")) if isinstance(graph, dict)
                   else '<div class="thumb noimg">no graph</div>')
            cards.append(image_card(image, self.thumbs.get(image.image_key), svg))
        return f'<div class="grid">{"".join(cards)}</div>'

    # ------------------------------------------------------------------ SBPC candidates
    def candidates_section(self) -> str:
        stats = self.sbpc
        if stats is None:
            return self.section("candidates", "Candidates", '<p class="note">No scored candidates.</p>')
        kept = any(r.get("image_key") for rows in stats.by_graph.values() for r in rows)
        per_graph = max(stats.max_candidates, 1)
        limit = max(1, min(MAX_CANDIDATE_GRAPHS, self.max_images // per_graph if kept else MAX_CANDIDATE_GRAPHS))
        order = _candidate_graph_order(stats.by_graph)
        chosen = order[:limit]
        note = (f"{len(chosen)} of {len(stats.by_graph):,} graphs, each with its candidates in draw order; "
                "the winner is outlined in green.")
        if not kept:
            note += " Candidate images were not kept (run SBPC with --keep-candidates to see them): recall only."
            rows = []
            for gid in chosen:
                chips = "".join(f'<span class="chip{" winner" if r.get("won") else ""}" title="seed {e(r.get("seed"))}">'
                                f'#{e(r.get("candidate_index"))} {e(fmt(r.get("recall"), 2))}</span>'
                                for r in stats.by_graph[gid])
                rows.append(f"<tr><th>{e(gid)}</th><td>{chips}</td></tr>")
            body = f'<p class="note">{e(note)}</p><table class="data candidate-recalls">{"".join(rows)}</table>'
            return self.section("candidates", "SBPC candidates", body)
        self.thumbs.write(r.get("image_key") for gid in chosen for r in stats.by_graph[gid])
        blocks = []
        for gid in chosen:
            figs = []
            for r in stats.by_graph[gid]:
                won = bool(r.get("won"))
                alt = f"candidate {r.get('candidate_index')} of {gid}"
                figs.append(f'<figure class="cand{" winner" if won else ""}" data-won="{str(won).lower()}">'
                            f'{thumb_html(self.thumbs.get(r.get("image_key")), r.get("image_key"), alt)}'
                            f'<figcaption>#{e(r.get("candidate_index"))} · recall {e(fmt(r.get("recall"), 2))}'
                            f'{"<br><b>winner</b>" if won else ""}</figcaption></figure>')
            blocks.append(f'<div class="cand-graph" data-id="{e(gid)}"><h3>{e(gid)}</h3>'
                          f'<div class="strip">{"".join(figs)}</div></div>')
        return self.section("candidates", "SBPC candidates", f'<p class="note">{e(note)}</p>{"".join(blocks)}')

    # ------------------------------------------------------------------ errors and config
    def errors_section(self) -> str:
        run = self.run
        if not run.errors_total:
            return self.section("errors", "Errors", '<p class="note">No input row was rejected.</p>')
        rows = zip(*(run.errors.column(c).to_pylist() for c in ("id", "code", "reason", "shard")))
        note = f"{run.errors_total:,} rejected input rows"
        if run.errors.num_rows < run.errors_total:
            note += f"; the first {run.errors.num_rows:,} by reason and id are listed (--max-errors)"
        body = f'<p class="note">{e(note)}.</p>' + table(["id", "reason", "message", "input shard"], rows,
                                                           "data errors")
        return self.section("errors", "Errors", body)

    def config_section(self) -> str:
        info = self.run.info
        if not info:
            return self.section("config", "Configuration", '<p class="note">run.json is missing.</p>')
        config = info.get("config") if isinstance(info.get("config"), dict) else None
        rest = {k: v for k, v in info.items() if k not in ("config", "versions", "inputs")}
        body = kv_table(config) if config else ""
        body += "<h3>Run</h3>" + kv_table(rest)
        inputs = info.get("inputs")
        if isinstance(inputs, list) and inputs and all(isinstance(i, dict) for i in inputs):
            keys = list(inputs[0])
            body += "<h3>Inputs</h3>" + table(keys, [[i.get(k) for k in keys] for i in inputs])
        if isinstance(info.get("versions"), dict):
            body += "<h3>Versions</h3>" + kv_table(info["versions"])
        return self.section("config", "Configuration", body)


def _candidate_graph_order(by_graph: dict[str, list[dict]]) -> list[str]:
    """Graphs to show candidates for: a fixed sample (the gallery's ranking), so rebuilds agree."""
    return sorted(by_graph, key=lambda gid: sample_rank(gid, 0))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
