"""Distilled draft models for draft SBPC: reading their ``draft.json`` and loading them.

A draft model is an ordinary pipeline folder plus ``draft.json``, which says how it was made
(teacher folder, teacher steps and guidance) and how to call it (its own few steps, no guidance).
Its drafts only predict the renders of the teacher it learnt from, so loading checks the teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

from sgmodel.pipeline import SceneGraphDiffusionPipeline

DRAFT_FILE = "draft.json"
"""Written into a distilled draft model's folder: teacher, teacher steps and guidance, draft steps."""


def read_draft_config(model_dir: str | Path) -> dict | None:
    """``draft.json`` of a distilled draft model, or None for an ordinary model folder."""
    path = Path(model_dir) / DRAFT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def load_draft_model(path: str | Path) -> tuple[SceneGraphDiffusionPipeline, dict]:
    """A distilled draft model and its ``draft.json``; a folder without one is a clear error."""
    draft = read_draft_config(path)
    if draft is None:
        raise ValueError(f"{path}: no {DRAFT_FILE}, not a distilled draft model (python -m jobs.distill_draft)")
    pipe = SceneGraphDiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe, draft
