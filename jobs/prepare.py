"""``python -m jobs.prepare {sg2im,vg,coco,shapes} …`` — scene graphs in, contract Parquet out.

Every subcommand streams its input through an importer (``sgmodel.data``) into
:class:`sgmodel.data.writer.GraphShardWriter`, which writes ``{output}/part-00000.parquet …`` (GRAPH_SCHEMA plus any
extra columns the importer supplies), ``{output}/_errors.parquet`` (id, reason, code) and, last,
``{output}/_summary.json``. Nothing is lost: every input row is either written or in the error
table, and the summary counts both (rows_read == rows_written + rows_rejected). Output goes to a
local folder or ``s3://`` through :class:`workers.storage.Storage`.

Exit status: 0 when the input was read to the end (rejected rows are normal), 1 when a file
stopped being valid JSON part-way (what came before it is still written), 2 for bad arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa

from jobs.common import program, storage_for
from jobs.config import ConfigError, parse_config, require, to_dict
from jobs.preflight import check_before_start
from sgmodel.data.writer import ERRORS_FILE, GraphShardWriter, Item
from sgmodel.graph import (
    SceneGraph,
    SceneGraphError,
    ValidationLimits,
    validate_graph,
)
from workers.storage import Storage, is_s3, join

SUMMARY_FILE = "_summary.json"



# ----------------------------------------------------------------------------- configs


@dataclass(kw_only=True)
class PrepareConfig:
    """Options every prepare subcommand shares."""

    output: str = ""
    """Output folder, a local path or s3://bucket/prefix (part-*.parquet, _errors.parquet, _summary.json)."""
    rows_per_shard: int = 1000
    """Scene graphs per Parquet file."""
    max_text_chars: int = 128
    """Reject graphs with a longer label, attribute or predicate."""
    max_objects: int = 64
    """Reject graphs with more objects than this."""
    max_relations: int = 256
    """Reject graphs with more relations than this."""
    s3_endpoint_url: str | None = None
    """S3 endpoint override (MinIO, moto); default AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
    s3_region: str | None = None
    """S3 region; default AWS_REGION / AWS_DEFAULT_REGION, else us-east-1."""

    def __post_init__(self) -> None:
        require(bool(self.output), "output", self.output, "required: a local folder or s3://bucket/prefix")
        require(self.rows_per_shard >= 1, "rows_per_shard", self.rows_per_shard, "must be >= 1")
        for name in ("max_text_chars", "max_objects", "max_relations"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        if self.s3_endpoint_url is not None:
            require(
                self.s3_endpoint_url.startswith(("http://", "https://")),
                "s3_endpoint_url", self.s3_endpoint_url, "must start with http:// or https://",
            )

    @property
    def limits(self) -> ValidationLimits:
        return ValidationLimits(
            max_text_chars=self.max_text_chars, max_objects=self.max_objects, max_relations=self.max_relations
        )


@dataclass(kw_only=True)
class Sg2imConfig(PrepareConfig):
    """Import sg2im scene-graph JSON (one graph object or a list of them)."""

    input: str = ""
    """sg2im JSON file (local or s3://): {"objects": [...], "relationships": [[s, "pred", o], ...]} or a list."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.input), "input", self.input, "required: an sg2im JSON file")


@dataclass(kw_only=True)
class VGConfig(PrepareConfig):
    """Import Visual Genome v1.4 scene graphs with sg2im's filters (streamed: constant memory)."""

    scene_graphs: str = ""
    """Visual Genome scene_graphs.json (local or s3://)."""
    image_data: str | None = None
    """image_data.json: image sizes to normalise boxes (without it objects have no boxes)."""
    attributes: str | None = None
    """attributes.json: object attributes, joined by image and object id."""
    min_object_size: int = 32
    """Drop objects whose width or height is under this many pixels (sg2im: 32)."""
    min_objects_per_image: int = 3
    """Reject images with fewer objects left after filtering."""
    max_objects_per_image: int = 30
    """Reject images with more objects left after filtering (0: no limit)."""
    min_relations_per_image: int = 1
    """Reject images with fewer relationships left."""
    max_relations_per_image: int = 30
    """Reject images with more relationships left (0: no limit)."""
    min_image_size: int = 200
    """Reject images whose shorter side is under this many pixels (needs image sizes; sg2im: 200)."""
    max_attributes_per_object: int = 30
    """Keep at most this many attributes per object (0: no limit)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.scene_graphs), "scene_graphs", self.scene_graphs, "required: Visual Genome scene_graphs.json")
        for name in (
            "min_object_size", "min_objects_per_image", "max_objects_per_image", "min_relations_per_image",
            "max_relations_per_image", "min_image_size", "max_attributes_per_object",
        ):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")


@dataclass(kw_only=True)
class COCOConfig(PrepareConfig):
    """Build synthetic scene graphs from COCO(-Stuff) annotations by sg2im's rules."""

    instances: str = ""
    """COCO instances_*.json (local or s3://)."""
    stuff: str | None = None
    """COCO-Stuff stuff_*.json; its annotations join the instances of the same image."""
    min_object_size: float = 0.02
    """Drop objects whose box covers this fraction of the image or less (sg2im: 0.02)."""
    min_objects_per_image: int = 3
    """Reject images with fewer objects left (sg2im: 3)."""
    max_objects_per_image: int = 8
    """Reject images with more objects left (sg2im: 8)."""
    include_other: bool = False
    """Keep COCO-Stuff's 'other' class."""
    stuff_only: bool = True
    """With --stuff, keep only images that have stuff annotations."""
    instance_whitelist: list[str] | None = None
    """Comma-separated instance category names to keep (default: all)."""
    stuff_whitelist: list[str] | None = None
    """Comma-separated stuff category names to keep (default: all)."""
    seed: int = 0
    """Seed of the random relation choice; the same seed gives the same graphs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.instances), "instances", self.instances, "required: a COCO instances json")
        require(0.0 <= self.min_object_size < 1.0, "min_object_size", self.min_object_size, "must be in [0, 1)")
        require(self.min_objects_per_image >= 0, "min_objects_per_image", self.min_objects_per_image, "must be >= 0")
        require(
            self.max_objects_per_image >= self.min_objects_per_image,
            "max_objects_per_image", self.max_objects_per_image, "must be >= --min-objects-per-image",
        )


@dataclass(kw_only=True)
class ShapesConfig(PrepareConfig):
    """Generate the shapes world: random graphs of coloured shapes with images and class maps."""

    count: int = 0
    """Number of scene graphs to generate."""
    seed: int = 0
    """Seed; the same seed gives the same graphs and pictures."""
    size: int = 32
    """Image side in pixels."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.count >= 1, "count", self.count, "must be >= 1")
        require(self.size >= 8, "size", self.size, "must be >= 8 pixels")


# ----------------------------------------------------------------------------- the job


@dataclass
class OpenInput:
    """One input of a run: its flag, URI, and the open binary stream."""

    flag: str
    uri: str
    handle: IO[bytes]


def _open_inputs(
    stack: contextlib.ExitStack, storage: Storage, inputs: Mapping[str, str | None]
) -> dict[str, OpenInput]:
    """Open every given input (local or s3://), failing up front with the flag when one is missing."""
    opened: dict[str, OpenInput] = {}
    for flag, uri in inputs.items():
        if uri is None:
            continue
        if not storage.exists(uri) or (not is_s3(uri) and os.path.isdir(uri)):
            raise ConfigError(f"--{flag.replace('_', '-')} = {uri!r}: no such file")
        if is_s3(uri):
            fs, path = storage.filesystem(uri)
            handle = stack.enter_context(fs.open_input_stream(path))
        else:
            handle = stack.enter_context(open(uri, "rb"))
        opened[flag] = OpenInput(flag, uri, handle)
    return opened


def _validated(records: Iterable[tuple[SceneGraph, dict]], limits: ValidationLimits) -> Iterator[Item]:
    """Graphs built in code (the shapes world) go through the same validation as imported ones."""
    for graph, extras in records:
        try:
            yield validate_graph(graph, limits), extras
        except SceneGraphError as err:
            yield err


def _items(config: PrepareConfig, sources: Mapping[str, OpenInput], stats: Counter) -> tuple[Iterator[Item], dict]:
    """The importer's item stream and the extra columns it supplies."""
    names = {flag: source.uri for flag, source in sources.items()}
    handles = {flag: source.handle for flag, source in sources.items()}
    if isinstance(config, Sg2imConfig):
        from sgmodel.data.sg2im import iter_sg2im

        return iter_sg2im(handles["input"], name=names["input"], limits=config.limits), {}
    if isinstance(config, VGConfig):
        from sgmodel.data.visual_genome import VGOptions, iter_visual_genome

        options = VGOptions(
            min_object_size=config.min_object_size,
            min_objects_per_image=config.min_objects_per_image,
            max_objects_per_image=config.max_objects_per_image,
            min_relations_per_image=config.min_relations_per_image,
            max_relations_per_image=config.max_relations_per_image,
            min_image_size=config.min_image_size,
            max_attributes_per_object=config.max_attributes_per_object,
        )
        items = iter_visual_genome(
            handles["scene_graphs"], image_data=handles.get("image_data"), attributes=handles.get("attributes"),
            options=options, limits=config.limits, stats=stats, names=names,
        )
        return items, {}
    if isinstance(config, COCOConfig):
        from sgmodel.data.coco import COCOOptions, iter_coco

        options = COCOOptions(
            min_object_size=config.min_object_size,
            min_objects_per_image=config.min_objects_per_image,
            max_objects_per_image=config.max_objects_per_image,
            include_other=config.include_other,
            stuff_only=config.stuff_only,
            seed=config.seed,
            instance_whitelist=tuple(config.instance_whitelist) if config.instance_whitelist else None,
            stuff_whitelist=tuple(config.stuff_whitelist) if config.stuff_whitelist else None,
        )
        items = iter_coco(
            handles["instances"], stuff=handles.get("stuff"), options=options, limits=config.limits,
            stats=stats, names=names,
        )
        return items, {"file_name": pa.string()}
    if isinstance(config, ShapesConfig):
        try:
            from sgmodel.shapes.world import iter_shapes_records
        except ImportError as err:
            raise ConfigError(f"the shapes world is not available in this checkout ({err})") from err
        records = iter_shapes_records(config.count, config.seed, config.size)
        return _validated(records, config.limits), {"class_map": pa.binary()}
    raise TypeError(f"unknown prepare config {type(config).__name__}")


def _inputs(config: PrepareConfig) -> dict[str, str | None]:
    if isinstance(config, Sg2imConfig):
        return {"input": config.input}
    if isinstance(config, VGConfig):
        return {"scene_graphs": config.scene_graphs, "image_data": config.image_data, "attributes": config.attributes}
    if isinstance(config, COCOConfig):
        return {"instances": config.instances, "stuff": config.stuff}
    return {}


def prepare(config: PrepareConfig, storage: Storage | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run one prepare job end to end and return its summary (also written to _summary.json)."""
    storage = storage or storage_for(config)
    check_before_start(config, storage)
    fmt = SUBCOMMAND_OF[type(config)]
    started = time.perf_counter()
    stats: Counter[str] = Counter()
    with contextlib.ExitStack() as stack:
        sources = _open_inputs(stack, storage, _inputs(config))
        items, extra_schema = _items(config, sources, stats)
        writer = GraphShardWriter(storage, config.output, config.rows_per_shard, extra_schema, log=log)
        stack.callback(writer.discard)
        for item in items:
            writer.add(item)
        writer.close()
    summary = {
        "job": "prepare",
        "format": fmt,
        "inputs": {flag: uri for flag, uri in _inputs(config).items() if uri is not None},
        "output": config.output,
        "rows_read": writer.rows_read,
        "rows_written": writer.rows_written,
        "rows_rejected": writer.rows_rejected,
        "rejected_by_reason": dict(sorted(writer.rejected.items())),
        "dropped": dict(sorted(stats.items())),
        "complete": writer.rejected.get("invalid_json", 0) == 0,
        "shards": writer.shards,
        "errors": ERRORS_FILE,
        "seconds": round(time.perf_counter() - started, 3),
        "config": to_dict(config),
    }
    storage.write_text(join(config.output, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as the few lines a person reads after a run."""
    lines = [
        f"prepare {summary['format']}: {', '.join(summary['inputs'].values()) or '(generated)'} -> {summary['output']}",
        f"  rows read      {summary['rows_read']}",
        f"  rows written   {summary['rows_written']}  ({len(summary['shards'])} shard(s))",
        f"  rows rejected  {summary['rows_rejected']}" + (f"  (see {ERRORS_FILE})" if summary["rows_rejected"] else ""),
    ]
    width = max((len(code) for code in summary["rejected_by_reason"]), default=0)
    lines += [f"    {code.ljust(width)}  {n}" for code, n in summary["rejected_by_reason"].items()]
    if summary["dropped"]:
        lines.append("  dropped inside kept graphs (not errors):")
        width = max(len(k) for k in summary["dropped"])
        lines += [f"    {k.ljust(width)}  {n}" for k, n in summary["dropped"].items()]
    if not summary["complete"]:
        lines.append("  INCOMPLETE: an input stopped being valid JSON; see the invalid_json row in the error table")
    return "\n".join(lines)


SUBCOMMANDS: dict[str, type[PrepareConfig]] = {
    "sg2im": Sg2imConfig,
    "vg": VGConfig,
    "coco": COCOConfig,
    "shapes": ShapesConfig,
}
SUBCOMMAND_OF = {cls: name for name, cls in SUBCOMMANDS.items()}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(
        f"  {name.ljust(width)}  {(cls.__doc__ or '').strip().splitlines()[0]}" for name, cls in SUBCOMMANDS.items()
    )
    prog = program("python -m jobs.prepare")
    return (
        f"usage: {prog} {{sg2im,vg,coco,shapes}} [options]\n\n"
        f"formats:\n{rows}\n\n'{prog} <format> --help' lists its options."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        print(f"error: unknown format {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        config = parse_config(SUBCOMMANDS[argv[0]], argv[1:], prog=f"{program('python -m jobs.prepare')} {argv[0]}")
        summary = prepare(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
