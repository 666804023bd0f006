"""A short, stable id of a model folder, to tell which model made an output (and which teacher a draft learnt)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def model_fingerprint(path_or_id: str) -> str:
    """A short, stable id of a model folder: file names, sizes and the head and tail bytes of each file.

    Cheap even for multi-GB checkpoints, and changes whenever weights or configs change. A hub id
    that is not a local folder is fingerprinted by its name.
    """
    root = Path(path_or_id)
    digest = hashlib.sha256()
    if not root.is_dir():
        digest.update(f"hub:{path_or_id}".encode())
        return digest.hexdigest()[:16]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    index = root / "model_index.json"
    if index.exists():  # a pipeline folder may also hold a run's checkpoints and logs: hash the model only
        parts = {k for k in json.loads(index.read_text()) if not k.startswith("_")}
        files = [f for f in files if f == index or f.relative_to(root).parts[0] in parts]
    for file in files:
        if file.name == "training_summary.json":
            continue
        size = file.stat().st_size
        digest.update(json.dumps([str(file.relative_to(root)), size]).encode())
        with file.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read())
    return digest.hexdigest()[:16]
