"""Checks a job makes before it starts Ray or writes anything: bad input is one line, exit 2, nothing left behind.

Each job's ``run()`` calls :func:`check_before_start` near its top. What is checked depends on the config's
fields, so one call fits every job:

- every ``s3://`` value: credentials exist and the bucket answers (one ``HeadBucket`` per bucket);
- ``--model`` / ``--draft-model`` / ``--teacher``: a scene-graph pipeline folder, not e.g. a plain
  Stable Diffusion folder (which ``jobs.finetune --base`` turns into one);
- ``--segmenter``: a transformers segmentation model folder (``config.json`` with ``id2label``);
- ``--label-map``: a readable mapping whose classes the segmenter has; and a warning when more
  than a fifth of the input's objects (in its first rows) match no segmenter class.

Hub ids are not checked here (no network is assumed); their loaders report problems themselves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any

from jobs.config import ConfigError
from jobs.label_map import read_label_map_file
from workers.storage import Storage, StorageSettings, is_s3, join, split_s3

logger = logging.getLogger("sgbatch")

PIPELINE_FLAGS = ("model", "draft_model", "teacher")
"""Fields naming a SceneGraphDiffusionPipeline the job samples from."""
UNSCORABLE_WARNING = 0.2
"""Warn when more than this fraction of objects match no segmenter class (they count as found)."""
SAMPLE_ROWS = 1000
"""Input rows read to estimate that fraction before the run."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PreflightError(ConfigError):
    """Input that cannot work, found before the job starts; the message names the flag and the value."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_before_start(cfg: Any, storage: Storage | None = None) -> None:
    """Every check that applies to ``cfg``'s fields; raises PreflightError (exit 2) at the first problem."""
    storage = storage or Storage(StorageSettings.from_env(endpoint_url=getattr(cfg, "s3_endpoint_url", None),
                                                          region=getattr(cfg, "s3_region", None)))
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    check_s3_access(storage, values)
    for name in PIPELINE_FLAGS:
        if isinstance(values.get(name), str) and values[name]:
            check_scene_graph_pipeline(storage, name, values[name])
    segmenter = values.get("segmenter")
    id2label = None
    if isinstance(segmenter, str) and segmenter.lower() != "none":
        id2label = check_segmenter(storage, "segmenter", segmenter)
    if values.get("label_map"):
        try:
            mapping = read_label_map_file(storage, values["label_map"])
        except ConfigError as err:
            raise PreflightError(str(err)) from None
        if id2label is not None:
            matcher = label_matcher(id2label, mapping, "label_map", values["label_map"])
            if isinstance(values.get("input"), str):
                warn_unscorable(storage, values["input"], matcher, segmenter)
    elif id2label is not None and isinstance(values.get("input"), str):
        warn_unscorable(storage, values["input"], label_matcher(id2label, {}, "segmenter", segmenter), segmenter)


# ----------------------------------------------------------------------------- S3


def check_s3_access(storage: Storage, values: dict[str, Any]) -> None:
    """One HeadBucket per bucket named by an s3:// value: credentials, access and the endpoint, in one line."""
    buckets: dict[str, tuple[str, str]] = {}
    for name, value in values.items():
        for uri in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(uri, str) and is_s3(uri):
                try:
                    bucket = split_s3(uri)[0]
                except ValueError as err:
                    raise PreflightError(f"{_flag(name)} {uri!r}: {err}") from None
                buckets.setdefault(bucket, (name, uri))
    for bucket, (name, uri) in buckets.items():
        problem = s3_problem(storage, bucket)
        if problem:
            raise PreflightError(f"{_flag(name)} {uri!r}: {problem}")


def s3_problem(storage: Storage, bucket: str) -> str | None:
    """Why ``bucket`` cannot be used with these settings and credentials, in a few words; None when it can."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    try:
        storage.s3.head_bucket(Bucket=bucket)
    except (NoCredentialsError, PartialCredentialsError):
        return ("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "or use an instance role)")
    except EndpointConnectionError:
        return f"cannot reach the S3 endpoint {storage.settings.endpoint_url or 'of AWS'} (--s3-endpoint-url)"
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            return f"access to bucket {bucket!r} denied with these credentials ({code})"
        if code in ("404", "NoSuchBucket", "NotFound"):
            return f"no such bucket {bucket!r}"
        return f"bucket {bucket!r}: S3 error {code}"
    except BotoCoreError as err:
        return " ".join(str(err).split())
    return None


# ----------------------------------------------------------------------------- models


def _local_or_s3(uri: str) -> bool:
    """A folder this job reads itself (hub ids are left to their loaders)."""
    return is_s3(uri) or os.path.exists(uri) or not _HUB_ID.match(uri)


def _read_json(storage: Storage, uri: str) -> dict | None:
    try:
        data = json.loads(storage.read_text(uri))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PreflightError(f"{uri!r} is not valid JSON: {err}") from None
    return data if isinstance(data, dict) else None


def check_scene_graph_pipeline(storage: Storage, name: str, uri: str) -> None:
    """``uri`` is a SceneGraphDiffusionPipeline folder; otherwise say what it is and how to make one."""
    from sgmodel.pipeline import pipeline_class_name

    if not _local_or_s3(uri):
        return
    if not is_s3(uri) and not os.path.isdir(uri):
        raise PreflightError(f"{_flag(name)} {uri!r}: no such folder (expected a scene-graph pipeline folder, "
                             "an s3:// prefix or a hub id)")
    index = _read_json(storage, join(uri, "model_index.json"))
    make_one = (f"make one from it with `sgbatch finetune --base {uri} --train <table>` (adds a graph encoder and "
                "conditioner and trains them)")
    if index is None:
        if _read_json(storage, join(uri, "unet", "config.json")) is not None:
            raise PreflightError(f"{_flag(name)} {uri!r} is a Stable Diffusion folder without model_index.json, "
                                 f"not a scene-graph pipeline; {make_one}")
        raise PreflightError(f"{_flag(name)} {uri!r}: no model_index.json, not a diffusers pipeline folder "
                             "(expected a scene-graph pipeline, as jobs.finetune writes)")
    cls = pipeline_class_name(index)
    if cls != "SceneGraphDiffusionPipeline":
        what = f"a {cls} folder" if cls else "a pipeline folder of no named class"
        raise PreflightError(f"{_flag(name)} {uri!r} is {what}, not a scene-graph pipeline; {make_one}")


def check_segmenter(storage: Storage, name: str, uri: str) -> dict[int, str] | None:
    """``uri`` is a segmentation model folder; returns its classes (None for a hub id)."""
    if not _local_or_s3(uri):
        return None
    config = _read_json(storage, join(uri, "config.json"))
    if config is None or not isinstance(config.get("id2label"), dict) or not config["id2label"]:
        raise PreflightError(f"{_flag(name)} {uri!r}: not a transformers segmentation model folder "
                             "(no config.json with id2label); pass a folder, s3:// prefix or hub id, or 'none'")
    try:
        return {int(k): str(v) for k, v in config["id2label"].items()}
    except ValueError:
        raise PreflightError(f"{_flag(name)} {uri!r}: config.json's id2label keys are not class ids") from None


# ----------------------------------------------------------------------------- label map


def label_matcher(id2label: dict[int, str], mapping: dict, name: str, uri: str):
    """The scorer's own label matching (explicit mapping, then class names), built as its actors will."""
    from sgmodel.scoring import LabelMatcher, RecallConfig

    try:
        return LabelMatcher(id2label, RecallConfig(mapping=mapping))
    except ValueError as err:
        raise PreflightError(f"{_flag(name)} {uri!r}: {err}") from None


def unscorable_fraction(storage: Storage, input_uri: str, matcher, max_rows: int = SAMPLE_ROWS) -> tuple[int, int]:
    """(objects matching no class, objects) over the input's first ``max_rows`` rows."""
    from sgmodel.graph import SGObject

    objects = []
    for uri in storage.expand_input(input_uri):
        for batch in storage.iter_parquet_batches(uri, batch_size=min(max_rows, 1024), columns=["objects"]):
            for row in batch.column(0).to_pylist():
                for obj in row or []:
                    if isinstance(obj, dict) and isinstance(obj.get("label"), str) and obj["label"].strip():
                        objects.append(SGObject(obj["label"], tuple(a for a in obj.get("attributes") or ()
                                                                    if isinstance(a, str))))
            max_rows -= batch.num_rows
            if max_rows <= 0:
                break
        if max_rows <= 0:
            break
    matches = matcher.match_many(objects) if objects else []
    return sum(1 for m in matches if not m.scorable), len(objects)


def warn_unscorable(storage: Storage, input_uri: str, matcher, segmenter: str) -> None:
    try:
        missing, total = unscorable_fraction(storage, input_uri, matcher)
    except (FileNotFoundError, OSError, KeyError, ValueError):  # the job reports unreadable input itself
        return
    if total and missing / total > UNSCORABLE_WARNING:
        logger.warning(
            "%d of %d objects in the input's first %d rows (%.0f%%) match no class of segmenter %s: they cannot be "
            "scored and count as found, so recall overstates. Map labels to its classes with --label-map.",
            missing, total, SAMPLE_ROWS, 100 * missing / total, segmenter)
