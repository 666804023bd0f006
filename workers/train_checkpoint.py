"""DeepSpeed checkpoints written as safetensors, and read back without unpickling anything.

DeepSpeed saves each state dict (module weights, ZeRO optimizer partitions, LR schedule) with
``torch.save`` and loads it with ``torch.load(weights_only=False)``, which runs whatever code a
checkpoint file names. Here its checkpoint engine is replaced: every state dict becomes one
safetensors file, its tensors as tensors and everything else as a JSON tree in the file's
metadata. Loading rebuilds only plain data, tensors and a fixed list of DeepSpeed's own small
classes (loss scaler, ZeRO stage, fragment address); a file naming anything else is refused.

DeepSpeed finds its files by their ``.pt`` names, so :func:`staged_for_deepspeed` gives it a
folder of empty ``.pt`` placeholders next to links to the safetensors files; only the engine
here opens them, and only as safetensors.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TREE_KEY = "sgbatch_tree"
SUFFIX = ".safetensors"
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
"""Scripts DeepSpeed copies into a checkpoint; they read its pickle format, not these files."""

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                      torch.int64, torch.int32, torch.uint8, torch.bool)}


class CheckpointFormatError(RuntimeError):
    """A checkpoint file this loader does not read (another format, or a type outside the allowed list)."""


def _allowed_classes() -> dict[str, type]:
    """DeepSpeed's own small classes that its state dicts hold, by qualified name (the only ones rebuilt)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {f"{c.__module__}.{c.__qualname__}": c for c in (LossScaler, DynamicLossScaler, ZeroStageEnum,
                                                             fragment_address)}


# ----------------------------------------------------------------------------- tree <-> (JSON, tensors)


def encode_tree(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-able form of a state dict; tensors move into ``tensors`` under names ``t0``, ``t1``, …"""
    if value is None or isinstance(value, (bool, int, float, str)) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").contiguous()
        return {"tensor": name}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, list):
        return [encode_tree(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple) and type(value) is tuple:
        return {"tuple": [encode_tree(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict) and type(value) in (dict, OrderedDict):
        pairs = [[encode_tree(k, tensors, path), encode_tree(v, tensors, f"{path}/{k}")] for k, v in value.items()]
        return {"odict" if isinstance(value, OrderedDict) else "dict": pairs}
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if name in _allowed_classes():
        if isinstance(value, enum.Enum):
            return {"enum": name, "value": encode_tree(value.value, tensors, path)}
        return {"object": name, "state": encode_tree(dict(vars(value)), tensors, path)}
    raise TypeError(f"checkpoint value at {path or '/'} has a type this format does not store: {name}")


def decode_tree(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_tree`; classes are rebuilt only from the allowed list."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode_tree(v, tensors) for v in value]
    if not isinstance(value, dict) or len(value) not in (1, 2):
        raise CheckpointFormatError(f"unexpected node in a checkpoint tree: {str(value)[:80]!r}")
    if "tensor" in value:
        return tensors[value["tensor"]]
    if "size" in value:
        return torch.Size(value["size"])
    if "dtype" in value:
        if value["dtype"] not in _DTYPES:
            raise CheckpointFormatError(f"unexpected dtype in a checkpoint: {value['dtype']!r}")
        return _DTYPES[value["dtype"]]
    if "tuple" in value:
        return tuple(decode_tree(v, tensors) for v in value["tuple"])
    if "dict" in value or "odict" in value:
        pairs = [(decode_tree(k, tensors), decode_tree(v, tensors)) for k, v in value.get("dict", value.get("odict"))]
        return OrderedDict(pairs) if "odict" in value else dict(pairs)
    kind = "enum" if "enum" in value else "object" if "object" in value else None
    cls = _allowed_classes().get(value.get(kind)) if kind else None
    if cls is None:
        raise CheckpointFormatError(f"a checkpoint names a class this loader does not rebuild: {str(value)[:120]!r}")
    if kind == "enum":
        return cls(decode_tree(value["value"], tensors))
    obj = cls.__new__(cls)
    obj.__dict__.update(decode_tree(value["state"], tensors))
    return obj


def save_tree(state: Any, path: str | os.PathLike) -> None:
    """One state dict as one safetensors file (tensors) with its structure as JSON in the metadata."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = encode_tree(state, tensors)
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():  # safetensors refuses tensors that share memory: copy those
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            tensors[name] = t.clone()
        seen.add(key)
    save_file(tensors, str(path), metadata={TREE_KEY: json.dumps(tree)})


def load_tree(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        tree = (f.metadata() or {}).get(TREE_KEY)
        if tree is None:
            raise CheckpointFormatError(f"{path} is not a checkpoint file of this format (no {TREE_KEY!r} metadata)")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return decode_tree(json.loads(tree), tensors)


# ----------------------------------------------------------------------------- DeepSpeed


def safetensors_name(deepspeed_path: str | os.PathLike) -> Path:
    """``…/mp_rank_00_model_states.pt`` -> ``…/mp_rank_00_model_states.safetensors``."""
    return Path(deepspeed_path).with_suffix(SUFFIX)


def use_safetensors_checkpoints(engine) -> None:
    """Make a DeepSpeed engine save and load its checkpoints with this module's format."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafetensorsCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            save_tree(state_dict, safetensors_name(path))

        def load(self, path: str, map_location=None):
            device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
            return load_tree(safetensors_name(path), device)

    engine.checkpoint_engine = SafetensorsCheckpointEngine(None)


def tidy_saved(folder: str | os.PathLike) -> None:
    """Remove what DeepSpeed adds to a checkpoint besides its state (recovery scripts for its pickle format)."""
    for name in RECOVERY_SCRIPTS:
        with contextlib.suppress(FileNotFoundError):
            (Path(folder) / name).unlink()


@contextlib.contextmanager
def staged_for_deepspeed(folder: str | os.PathLike, tag: str) -> Iterator[str]:
    """A folder for ``engine.load_checkpoint(…, tag=tag)``: links to ``{folder}/{tag}/*.safetensors`` plus the
    empty ``.pt`` names DeepSpeed looks for. Raises CheckpointFormatError when the checkpoint has none of
    these files (e.g. DeepSpeed's own pickle format, which is never read)."""
    source = Path(folder) / tag
    files = sorted(source.glob(f"*{SUFFIX}")) if source.is_dir() else []
    if not files:
        found = sorted(p.name for p in source.iterdir()) if source.is_dir() else []
        raise CheckpointFormatError(
            f"{source} holds no safetensors checkpoint files (found {found[:5]}); checkpoints in DeepSpeed's pickle "
            "format are not loaded: start the run again with --overwrite"
        )
    with tempfile.TemporaryDirectory(prefix="sgbatch-ckpt-") as tmp:
        staged = Path(tmp) / tag
        staged.mkdir()
        for file in files:
            (staged / file.name).symlink_to(file.resolve())
            (staged / file.with_suffix(".pt").name).touch()
        yield tmp


def check_own_checkpoint(checkpoint_path: str, run_root: str) -> None:
    """Refuse a checkpoint outside this run's checkpoint storage (Ray Train's snapshot names where to resume
    from; whoever can edit it could otherwise point a resume anywhere)."""
    def bare(path: str) -> str:  # Ray may name S3 paths with or without their scheme
        return os.path.normpath(re.sub(r"^[a-z0-9+.-]+://", "", path))

    resolved, root = bare(checkpoint_path), bare(run_root)
    try:
        inside = os.path.commonpath([resolved, root]) == root and resolved != root
    except ValueError:  # one absolute, one relative: not the same storage
        inside = False
    if not inside:
        raise CheckpointFormatError(f"checkpoint {checkpoint_path!r} is not in this run's checkpoint storage {run_root!r}")
