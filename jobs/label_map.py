"""``--label-map``: which segmenter class stands for which graph label, read once by the driver.

The file is YAML or JSON, graph label (or a phrase such as "red car") -> the segmenter's class
name or id; it becomes :attr:`sgmodel.scoring.RecallConfig.mapping`, which beats name matching.
An ADE20K example: ``jobs/samples/ade20k_label_map.yaml``.
"""

from __future__ import annotations

from typing import Any

from jobs.config import ConfigError
from workers.storage import Storage


def read_label_map_file(storage: Storage, uri: str) -> dict[str, str | int]:
    """The mapping in a ``--label-map`` file (local or s3://); a ConfigError names the file and the problem."""
    from sgmodel.scoring.config import read_label_map

    try:
        text = storage.read_text(uri)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"--label-map {uri!r}: no such file") from None
    try:
        return read_label_map(text)
    except ValueError as err:
        raise ConfigError(f"--label-map {uri!r}: {err}") from None


def recall_options(cfg: Any, storage: Storage) -> dict[str, Any]:
    """RecallConfig options for the scorer actors: the label map's mapping, when the job has one."""
    uri = getattr(cfg, "label_map", None)
    return {"mapping": read_label_map_file(storage, uri)} if uri else {}
