"""What one rank's DeepSpeed engine holds in memory: parameter, gradient and optimizer-state bytes.

Counted from the engine's own objects, each tensor storage once (flat buffers and the views into
them share a storage; a storage is counted whole, padding and all, as that is what is allocated):

- parameters: the storages behind the module's parameters (``param.data``; at ZeRO-1/2 the flat
  buffer they are views of) and, at ZeRO-3, each parameter's partition ``ds_tensor`` plus any full
  copy still gathered (persistent small parameters stay gathered on every rank);
- gradients: ``param.grad`` of the module's parameters and every tensor the optimizer wrapper keeps
  under a gradient attribute (ZeRO-1/2 ``averaged_gradients``/``grads_in_partition``, ZeRO-3
  ``grad_partitions_flat_buffer``, the ``.grad`` of the fp32 master partitions, ...);
- optimizer state: the torch optimizer's ``state`` (Adam moments, step) and its parameters where
  they are not the module's own (the fp32 master partitions of ZeRO-1/2/3 and of the bf16/fp16
  wrappers), plus other fp32/master buffers of the wrapper;
- other: what remains reachable from the wrapper (communication buckets, overflow trackers).
  Bucket buffers are allocated at DeepSpeed's ``reduce_bucket_size`` and mostly never written, so
  they are reported apart and not part of the model state.

:class:`ModelStateProbe` takes these counts in the training loop at the first optimizer step:
gradients after that step's last backward (the optimizer step frees or reuses them), parameters,
optimizer state and other buffers after the step (torch optimizers create their state lazily in it).
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from typing import Any

import torch

PARAMS, GRADS, OPTIMIZER, OTHER = "param_bytes", "grad_bytes", "optimizer_bytes", "other_bytes"
CATEGORIES = (PARAMS, GRADS, OPTIMIZER, OTHER)
"""In order of precedence: a storage reached as a parameter and as optimizer state counts as a parameter."""
MODEL_STATE = (PARAMS, GRADS, OPTIMIZER)
MAX_DEPTH = 8


class StorageLedger:
    """Tensor storages by category, each storage counted once (in the first category of :data:`CATEGORIES`)."""

    def __init__(self) -> None:
        self.owner: dict[tuple, tuple[str, int]] = {}

    def add(self, tensor: Any, category: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        key = (tensor.device.type, tensor.device.index, storage.data_ptr())
        held = self.owner.get(key)
        if held is None or CATEGORIES.index(category) < CATEGORIES.index(held[0]):
            self.owner[key] = (category, nbytes)

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for category, nbytes in self.owner.values():
            out[category] += nbytes
        return out


def _descend(obj: Any) -> bool:
    """Objects whose attributes may hold optimizer tensors: DeepSpeed's and torch.optim's own classes."""
    if isinstance(obj, torch.nn.Module) or not hasattr(obj, "__dict__"):
        return False
    module = type(obj).__module__
    return module.startswith("deepspeed.") or module.startswith("torch.optim")


def _category(names: tuple[str, ...], forced: str | None) -> str:
    lowered = [n.lower() for n in names]
    if any("grad" in n and "norm" not in n for n in lowered):  # not the scalar _global_grad_norm
        return GRADS
    if forced is not None or any("fp32" in n or "master" in n for n in lowered):
        return OPTIMIZER
    return OTHER


def _walk(obj: Any, names: tuple[str, ...], forced: str | None, seen: set[int],
          depth: int = 0) -> Iterator[tuple[torch.Tensor, str]]:
    """(tensor, category) for every tensor reachable from ``obj`` through containers and DeepSpeed objects."""
    if depth > MAX_DEPTH or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj, _category(names, forced)
        if obj.is_leaf and obj.grad is not None:
            yield obj.grad, GRADS
        partition = getattr(obj, "ds_tensor", None)
        if isinstance(partition, torch.Tensor):
            yield partition, PARAMS
        return
    if isinstance(obj, dict):
        for key, value in obj.items():  # optimizer state is keyed by parameters: only values are walked
            yield from _walk(value, (*names, key if isinstance(key, str) else ""), forced, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk(value, names, forced, seen, depth + 1)
    elif isinstance(obj, torch.optim.Optimizer):
        yield from _walk(obj.state, (*names, "state"), OPTIMIZER, seen, depth + 1)
        for group in obj.param_groups:
            yield from _walk(group.get("params", []), (*names, "params"), OPTIMIZER, seen, depth + 1)
        for key, value in vars(obj).items():
            if key not in ("state", "param_groups"):
                yield from _walk(value, (*names, key), forced, seen, depth + 1)
    elif _descend(obj):
        for key, value in vars(obj).items():
            yield from _walk(value, (*names, key), forced, seen, depth + 1)


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state and other optimizer buffers this rank's engine holds now.

    ``engine`` is what ``deepspeed.initialize`` returned (its ``module`` and ``optimizer`` are read);
    a plain torch module and optimizer work too, as ``engine.module``/``engine.optimizer`` attributes.
    """
    ledger = StorageLedger()
    for param in engine.module.parameters():
        ledger.add(param.data, PARAMS)
        ledger.add(getattr(param, "ds_tensor", None), PARAMS)
        ledger.add(param.grad, GRADS)
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None:
        for tensor, category in _walk(optimizer, (), None, set()):
            ledger.add(tensor, category)
    return ledger.totals()


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ModelStateProbe:
    """The model-state bytes of every rank at the first optimizer step, gathered for rank 0's metrics.

    Call :meth:`after_backward` after each ``engine.backward`` and :meth:`after_step` after each
    ``engine.step``; :meth:`report` (on every rank at the same point: it is a collective the first
    time it has something) returns ``{"model_state": [per-rank dicts]}`` once, then ``{}``.
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self.grads: int | None = None
        self.counts: dict[str, int] | None = None
        self.reported = False

    def after_backward(self) -> None:
        if self.grads is None and self.engine.is_gradient_accumulation_boundary():
            self.grads = model_state_bytes(self.engine)[GRADS]

    def after_step(self) -> None:
        if self.counts is None and self.grads is not None:
            counts = model_state_bytes(self.engine)
            counts[GRADS] = self.grads
            counts["model_state_bytes"] = sum(counts[c] for c in MODEL_STATE)
            self.counts = counts

    def report(self) -> dict[str, Any]:
        if self.reported or self.counts is None:
            return {}
        self.reported = True
        import torch.distributed as dist

        mine = {**self.counts, "peak_rss_bytes": peak_rss_bytes(),
                "rank": dist.get_rank() if dist.is_initialized() else 0}
        if not dist.is_initialized():
            return {"model_state": [mine]}
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return {"model_state": everyone}
