"""DeepSpeed around the training module: wrapping it, the collectives the loop needs, the full weights.

Frozen parts of the model live outside the engine (moved and cast here), so ZeRO-3 never
partitions them; the trained weights come back as full fp32 tensors on rank 0 for the export.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sgmodel.graph import SceneGraph

LOSS_KEYS = ("total", "recon", "clip", "mmd", "adversarial", "layout")


def place_frozen(module, device: torch.device, dtype: torch.dtype) -> None:
    """Frozen parts live outside the DeepSpeed engine: move and cast them ourselves (like diffusers' scripts)."""
    for part in vars(module.frozen).values():
        if isinstance(part, torch.nn.Module):
            part.to(device=device, dtype=dtype)


class LossOutputs(torch.nn.Module):
    """What DeepSpeed wraps: the training module, with its loss terms returned as a dict of tensors.

    ZeRO-3 re-gathers a module's parameters for the backward pass through hooks on the module's
    tensor outputs; it cannot see into the dataclasses (LossTerms, Condition) the model returns.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, graphs: Sequence[SceneGraph], images: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """graphs (B), images [B, 3, H, W] in [-1, 1] -> {"total": scalar, "recon": scalar, …}."""
        terms = self.inner(graphs, images, generator=generator)
        return {key: value for key in LOSS_KEYS if (value := getattr(terms, key)) is not None}


def prepare_for_deepspeed(module: torch.nn.Module, zero_stage: int) -> LossOutputs:
    """Adapt the training module to DeepSpeed's expectations (returns the module to pass to initialize).

    - 0-dim parameters (GLIGEN's gates ``alpha_attn``/``alpha_dense``) become shape [1]: DeepSpeed
      broadcasts parameters as byte views, which a 0-dim tensor cannot give. They broadcast the same
      in the forward; the export reshapes them back.
    - At ZeRO-3, parameters that modules own directly next to child modules (the conditioner's
      token-type and null tokens, used in ``drop()`` outside its forward and behind a dataclass
      output) are registered with the wrapper, so they stay gathered from its forward to its backward.
      Such parameters are small; the big weights sit in leaf layers (Linear, Conv, Embedding, norms).
    """
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(owner, name, torch.nn.Parameter(param.data.reshape(1), requires_grad=param.requires_grad))
    wrapper = LossOutputs(module)
    if zero_stage == 3:
        import deepspeed

        for owner in module.modules():
            if next(owner.children(), None) is not None:
                for param in owner.parameters(recurse=False):
                    deepspeed.zero.register_external_parameter(wrapper, param)
    return wrapper


def trained_state(engine, rank: int) -> dict[str, torch.Tensor]:
    """Full fp32 master weights of every trainable parameter, on rank 0 (empty elsewhere).

    ``safe_get_full_fp32_param`` reads the optimizer's fp32 copy (exact under bf16) and, at
    ZeRO-3, gathers the partitions: a collective, so every rank walks the parameters in the same order.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        if full is None:  # no optimizer mapping (e.g. ZeRO disabled by an override): the weight itself
            full = param.detach()
        if rank == 0:
            out[name.removeprefix("inner.")] = full.detach().to("cpu", torch.float32).clone()
    return out


def comm_device() -> torch.device:
    """Where small collective tensors must live: the GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or ``op``) a small tensor over all ranks; returns it on the CPU."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return tensor
    on_device = tensor.to(comm_device())
    dist.all_reduce(on_device, op=op or dist.ReduceOp.SUM)
    return on_device.cpu()


def all_ranks_have(flag: bool) -> bool:
    """True when every rank's ``flag`` is True (a one-element MIN all-reduce)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    return bool(all_reduce(torch.tensor([1 if flag else 0], dtype=torch.int32), op=dist.ReduceOp.MIN).item())
