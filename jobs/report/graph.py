"""A scene graph drawn as inline SVG for the run report: objects as labelled nodes, relations as arrows.

Inline SVG rather than one matplotlib figure per image: a gallery of a hundred graphs renders in
milliseconds, the text stays selectable and searchable in the page, and no graphviz binary is
needed. Nodes sit at their box centres when the graph has a layout (so "left of" reads left to
right), else on a circle. Every string from the data is XML-escaped.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

SIZE = 200
"""Width and height of the drawing (SVG user units; the page scales it)."""
FONT = 9.0
CHAR_W = 5.1
"""Approximate advance of one character at ``FONT`` (for sizing label boxes without a font engine)."""
MAX_LABEL = 22
"""Characters of an object label shown in its node (the full text is in the node's tooltip)."""
PAD = 3.0
GAP = 16.0
"""Space kept between node boxes, so an arrow between neighbours stays visible."""

STATUS_STYLE = {
    "found": ("#dafbe1", "#1a7f37"),
    "missing": ("#ffebe9", "#cf222e"),
    "unscorable": ("#eaeef2", "#6e7781"),
    None: ("#f6f8fa", "#57606a"),
}
"""(fill, stroke) of a node by its recall status; None = not scored."""


def object_text(obj: dict[str, Any]) -> str:
    """Attributes then label, as recall reports objects ("large red circle")."""
    attrs = [str(a) for a in (obj.get("attributes") or [])]
    return " ".join([*attrs, str(obj.get("label", "?"))])


def object_statuses(objects: Sequence[dict[str, Any]], found: Sequence[str] | None, missing: Sequence[str] | None,
                    unscorable: Sequence[str] | None) -> list[str | None]:
    """Each object's recall status, matching recall's description lists as multisets in object order.

    Recall lists objects by description (not index), in object order; two identical "red square"s
    are told apart by counting.
    """
    if found is None and missing is None and unscorable is None:
        return [None] * len(objects)
    pools = {name: Counter(values or ()) for name, values in
             (("found", found), ("missing", missing), ("unscorable", unscorable))}
    out: list[str | None] = []
    for obj in objects:
        text = object_text(obj)
        status = None
        for name in ("found", "missing", "unscorable"):
            if pools[name][text] > 0:
                pools[name][text] -= 1
                status = name
                break
        out.append(status)
    return out


@dataclass
class _Node:
    x: float
    y: float
    w: float
    h: float
    text: str
    full: str
    status: str | None

    def edge_point(self, tx: float, ty: float, margin: float = 1.5) -> tuple[float, float]:
        """Where the segment from this node's centre towards (tx, ty) leaves its label box."""
        dx, dy = tx - self.x, ty - self.y
        if dx == 0 and dy == 0:
            return self.x, self.y
        scale = min((self.w / 2 + margin) / abs(dx) if dx else math.inf,
                    (self.h / 2 + margin) / abs(dy) if dy else math.inf)
        return self.x + dx * min(scale, 1.0), self.y + dy * min(scale, 1.0)


def _short(text: str, limit: int = MAX_LABEL) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _valid_box(box: Any) -> bool:
    return (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box))


def _layout(objects: Sequence[dict[str, Any]], statuses: Sequence[str | None]) -> list[_Node]:
    n = len(objects)
    use_boxes = n > 0 and all(_valid_box(o.get("box")) for o in objects)
    nodes = []
    for i, (obj, status) in enumerate(zip(objects, statuses)):
        full = object_text(obj)
        text = _short(full)
        w, h = len(text) * CHAR_W + 2 * PAD, FONT + 2 * PAD
        if use_boxes:
            x0, y0, x1, y1 = (float(v) for v in obj["box"])
            x, y = (x0 + x1) / 2 * SIZE, (y0 + y1) / 2 * SIZE
        else:
            angle = -math.pi / 2 + 2 * math.pi * i / max(n, 1)
            radius = 0 if n == 1 else SIZE * 0.36
            x, y = SIZE / 2 + radius * math.cos(angle), SIZE / 2 + radius * math.sin(angle)
        nodes.append(_Node(x, y, w, h, text, full, status))
    _separate(nodes)
    return nodes


def _separate(nodes: list[_Node], rounds: int = 40) -> None:
    """Push overlapping label boxes apart (along the axis of least overlap) and keep them in view."""
    for _ in range(rounds):
        moved = False
        for i, a in enumerate(nodes):
            for b in nodes[i + 1:]:
                ox = (a.w + b.w) / 2 + GAP - abs(a.x - b.x)
                oy = (a.h + b.h) / 2 + GAP - abs(a.y - b.y)
                if ox <= 0 or oy <= 0:
                    continue
                moved = True
                if oy <= ox:
                    sign = 1.0 if a.y > b.y or (a.y == b.y and id(a) < id(b)) else -1.0
                    a.y += sign * oy / 2
                    b.y -= sign * oy / 2
                else:
                    sign = 1.0 if a.x > b.x else -1.0
                    a.x += sign * ox / 2
                    b.x -= sign * ox / 2
        for node in nodes:
            node.x = min(max(node.x, node.w / 2 + 1), SIZE - node.w / 2 - 1) if node.w < SIZE else SIZE / 2
            node.y = min(max(node.y, node.h / 2 + 1), SIZE - node.h / 2 - 1)
        if not moved:
            break


def _arrow_head(x: float, y: float, fx: float, fy: float, colour: str) -> str:
    """A filled triangle at (x, y) pointing away from (fx, fy) (the curve's last control point)."""
    dx, dy = x - fx, y - fy
    length = math.hypot(dx, dy) or 1.0
    ux, uy = dx / length, dy / length
    size, half = 6.0, 2.8
    bx, by = x - ux * size, y - uy * size
    points = [(x, y), (bx - uy * half, by + ux * half), (bx + uy * half, by - ux * half)]
    return f'<polygon points="{" ".join(f"{px:.1f},{py:.1f}" for px, py in points)}" fill="{colour}"/>'


def _label_box(x: float, y: float, text: str) -> tuple[float, float, float, float]:
    half = len(text) * CHAR_W * 0.9 / 2
    return x - half, y - 4.5, x + half, y + 4.5


def _label_spot(p0: tuple[float, float], c: tuple[float, float], p1: tuple[float, float], text: str,
                nodes: Sequence[_Node], placed: Sequence[tuple[float, float, float, float]]) -> tuple[float, float]:
    """A point on the relation's curve where its label covers no node and no other label (else the middle)."""
    def at(t: float) -> tuple[float, float]:
        return ((1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * c[0] + t * t * p1[0],
                (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * c[1] + t * t * p1[1])

    boxes = [*((n.x - n.w / 2, n.y - n.h / 2, n.x + n.w / 2, n.y + n.h / 2) for n in nodes), *placed]
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    length = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / length, dx / length
    # On the curve first, beside it (off a short arrow between close nodes) when that is covered;
    # where every spot is covered, the one that hides the least.
    best, best_cover = at(0.5), math.inf
    for shift in (0.0, -9.0, 9.0, -16.0, 16.0):
        for t in (0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8):
            x, y = at(t)
            x, y = x + nx * shift, y + ny * shift
            a = _label_box(x, y, text)
            if a[0] < 0 or a[2] > SIZE or a[1] < 0 or a[3] > SIZE:
                continue
            cover = sum(max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
                        for b in boxes)
            if cover == 0:
                return x, y
            if cover < best_cover:
                best, best_cover = (x, y), cover
    return best


def graph_svg(graph: dict[str, Any], found: Sequence[str] | None = None, missing: Sequence[str] | None = None,
              unscorable: Sequence[str] | None = None, css_class: str = "graph") -> str:
    """The scene graph as an ``<svg>`` element; objects coloured by recall status, relations as labelled arrows."""
    objects = [o for o in (graph.get("objects") or []) if isinstance(o, dict)]
    relations = [r for r in (graph.get("relations") or []) if isinstance(r, dict)]
    statuses = object_statuses(objects, found, missing, unscorable)
    nodes = _layout(objects, statuses)
    title = escape(f"scene graph of {graph.get('id', '')}: {len(objects)} objects, {len(relations)} relations")
    parts = [f'<svg class="{escape(css_class)}" viewBox="0 0 {SIZE} {SIZE}" role="img" '
             f'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="{FONT}">',
             f"<title>{title}</title>",
             f'<rect x="0.5" y="0.5" width="{SIZE - 1}" height="{SIZE - 1}" fill="#fff" stroke="#d0d7de"/>']

    pairs: dict[tuple[int, int], list[int]] = {}
    valid = []
    for k, rel in enumerate(relations):
        s, o = rel.get("subject"), rel.get("object")
        if isinstance(s, int) and isinstance(o, int) and 0 <= s < len(nodes) and 0 <= o < len(nodes):
            valid.append((k, s, o, str(rel.get("predicate", ""))))
            pairs.setdefault((min(s, o), max(s, o)), []).append(k)

    edges, labels = [], []
    placed: list[tuple[float, float, float, float]] = []
    for k, s, o, predicate in valid:
        a, b = nodes[s], nodes[o]
        colour = "#0969da"
        if s == o:  # a self-relation: a small loop above the node
            x, y = a.x, a.y - a.h / 2
            edges.append(f'<path d="M{x - 6:.1f},{y:.1f} C{x - 14:.1f},{y - 22:.1f} {x + 14:.1f},{y - 22:.1f} '
                         f'{x + 6:.1f},{y:.1f}" fill="none" stroke="{colour}" stroke-width="1"/>')
            edges.append(_arrow_head(x + 6, y, x + 14, y - 22, colour))
            mx, my = x, y - 18
        else:
            group = pairs[(min(s, o), max(s, o))]
            # Several relations between one pair bend apart, measured in the pair's fixed orientation.
            offset = (group.index(k) - (len(group) - 1) / 2) * 36.0
            lo, hi = (a, b) if s < o else (b, a)
            dx, dy = hi.x - lo.x, hi.y - lo.y
            dist = math.hypot(dx, dy) or 1.0
            cx, cy = (a.x + b.x) / 2 - dy / dist * offset, (a.y + b.y) / 2 + dx / dist * offset
            x0, y0 = a.edge_point(cx, cy)
            x1, y1 = b.edge_point(cx, cy)
            edges.append(f'<path d="M{x0:.1f},{y0:.1f} Q{cx:.1f},{cy:.1f} {x1:.1f},{y1:.1f}" fill="none" '
                         f'stroke="{colour}" stroke-width="1"/>')
            edges.append(_arrow_head(x1, y1, cx, cy, colour))
            mx, my = _label_spot((x0, y0), (cx, cy), (x1, y1), _short(predicate, 16), nodes, placed)
        text = escape(_short(predicate, 16))
        placed.append(_label_box(mx, my, _short(predicate, 16)))
        labels.append(f'<text x="{mx:.1f}" y="{my + 3:.1f}" text-anchor="middle" fill="#0550ae" font-size="8" '
                      f'stroke="#fff" stroke-width="2.5" paint-order="stroke">'
                      f"<title>{escape(predicate)}</title>{text}</text>")

    parts.extend(edges)
    for node in nodes:
        fill, stroke = STATUS_STYLE.get(node.status, STATUS_STYLE[None])
        tip = escape(node.full + (f" ({node.status})" if node.status else ""))
        parts.append(f'<g><title>{tip}</title><rect x="{node.x - node.w / 2:.1f}" y="{node.y - node.h / 2:.1f}" '
                     f'width="{node.w:.1f}" height="{node.h:.1f}" rx="3" fill="{fill}" stroke="{stroke}"/>'
                     f'<text x="{node.x:.1f}" y="{node.y + FONT / 2 - 1:.1f}" text-anchor="middle" '
                     f'fill="#1f2328">{escape(node.text)}</text></g>')
    parts.extend(labels)
    if not objects:
        parts.append(f'<text x="{SIZE / 2}" y="{SIZE / 2}" text-anchor="middle" fill="#57606a">no objects</text>')
    parts.append("</svg>")
    return "".join(parts)
