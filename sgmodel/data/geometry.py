"""Spatial relations between boxes, by sg2im's rules (its COCO scene-graph builder).

Used to derive true relations for synthetic graphs (COCO-Stuff, the shapes world) and, with
the same definitions, to check relations on segmented images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SPATIAL_PREDICATES = ("left of", "right of", "above", "below", "inside", "surrounding")
"""Predicates whose truth can be read off geometry."""


def box_center(box: Sequence[float]) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0


def relation_from_boxes(subject: Sequence[float], obj: Sequence[float]) -> str:
    """sg2im's rule: containment first, else the sector of the angle between centroids (y grows downwards)."""
    sx0, sy0, sx1, sy1 = subject
    ox0, oy0, ox1, oy1 = obj
    if sx0 < ox0 and sx1 > ox1 and sy0 < oy0 and sy1 > oy1:
        return "surrounding"
    if sx0 > ox0 and sx1 < ox1 and sy0 > oy0 and sy1 < oy1:
        return "inside"
    (scx, scy), (ocx, ocy) = box_center(subject), box_center(obj)
    theta = math.atan2(scy - ocy, scx - ocx)
    if theta >= 3 * math.pi / 4 or theta <= -3 * math.pi / 4:
        return "left of"
    if -3 * math.pi / 4 <= theta < -math.pi / 4:
        return "above"
    if -math.pi / 4 <= theta < math.pi / 4:
        return "right of"
    return "below"


def contains(outer: Sequence[float], inner: Sequence[float], tolerance: float = 0.0) -> bool:
    """True when ``inner`` lies within ``outer`` (each edge may overshoot by ``tolerance``)."""
    return (
        inner[0] >= outer[0] - tolerance
        and inner[1] >= outer[1] - tolerance
        and inner[2] <= outer[2] + tolerance
        and inner[3] <= outer[3] + tolerance
    )


def relation_holds(
    predicate: str,
    subject_box: Sequence[float],
    obj_box: Sequence[float],
    subject_center: tuple[float, float] | None = None,
    obj_center: tuple[float, float] | None = None,
    tolerance: float = 0.0,
) -> bool | None:
    """Whether a spatial relation holds between two regions; None when the predicate is not spatial.

    Directional predicates compare centroids (a mask's centroid when given, else the box centre);
    they are implied by sg2im's sector rule, and lenient where the sector rule is strict.
    """
    sc = subject_center or box_center(subject_box)
    oc = obj_center or box_center(obj_box)
    if predicate == "left of":
        return sc[0] < oc[0]
    if predicate == "right of":
        return sc[0] > oc[0]
    if predicate == "above":
        return sc[1] < oc[1]
    if predicate == "below":
        return sc[1] > oc[1]
    if predicate == "inside":
        return contains(obj_box, subject_box, tolerance)
    if predicate == "surrounding":
        return contains(subject_box, obj_box, tolerance)
    return None
