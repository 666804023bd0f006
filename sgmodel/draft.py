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


def check_draft_teacher(draft: dict, draft_path: str, teacher_fingerprint: str) -> None:
    """Refuse a draft model that learnt another model's renders (its ``teacher_fingerprint`` must match)."""
    learnt = draft.get("teacher_fingerprint")
    if learnt != teacher_fingerprint:
        raise ValueError(
            f"draft model {draft_path!r} learnt the renders of {draft.get('teacher')!r} (fingerprint {learnt}), "
            f"not of this model (fingerprint {teacher_fingerprint}): distil one from it with python -m jobs.distill_draft"
        )


def load_draft_model(path: str | Path) -> tuple[SceneGraphDiffusionPipeline, dict]:
    """A distilled draft model and its ``draft.json``; a folder without one is a clear error."""
    draft = read_draft_config(path)
    if draft is None:
        raise ValueError(f"{path}: no {DRAFT_FILE}, not a distilled draft model (python -m jobs.distill_draft)")
    pipe = SceneGraphDiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe, draft


FAST_FILE = "sbpc_fast.json"
"""Written into a model's folder: the fastest SBPC settings measured for it (steps, stopping, draft model, finals)."""

FAST_KEYS = ("draft_model", "candidates", "final_candidates", "target_recall", "target_precision", "final_strength",
             "final_steps")
"""Every key is required; ``draft_model`` (relative to the model's folder), ``target_recall``,
``target_precision``, ``final_strength`` and ``final_steps`` may be null (no draft model, no adaptive
stop, no precision in it, finals from noise, the job's --steps)."""


def read_fast_settings(model_dir: str | Path) -> dict | None:
    """The model's ``sbpc_fast.json`` with ``draft_model`` (if any) made a path relative to the model's
    folder, or None when the model has none. Unknown or missing keys are an error naming the file."""
    path = Path(model_dir) / FAST_FILE
    if not path.exists():
        return None
    settings = json.loads(path.read_text())
    unknown = sorted(set(settings) - set(FAST_KEYS) - {"measured_by"})
    missing = [k for k in FAST_KEYS if k not in settings]
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {unknown} / missing keys {missing} (expected {list(FAST_KEYS)})")
    if settings["draft_model"] is not None:
        draft = Path(settings["draft_model"])
        settings["draft_model"] = str(draft if draft.is_absolute() else (Path(model_dir) / draft).resolve())
    return {k: settings[k] for k in FAST_KEYS}
