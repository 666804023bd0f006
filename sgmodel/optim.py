"""The learning-rate schedule and the weight average every training loop uses (in-process and DeepSpeed)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier at optimizer step ``step``: linear warmup, then cosine decay to ``min_ratio``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of named weights, kept in fp32.

    Warmup as in diffusers' EMAModel: decay = min(decay, (1 + n) / (10 + n)) at update n, so the
    average follows the fast early changes instead of remembering the initial weights.
    Under DeepSpeed it is kept by rank 0 at ZeRO stages 1-2, where every rank holds the full weights.
    """

    def __init__(self, named: Mapping[str, torch.Tensor], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        self.decay = decay
        self.updates = 0
        self.shadow = {name: t.detach().float().clone() for name, t in named.items()}

    @torch.no_grad()
    def update(self, named: Mapping[str, torch.Tensor]) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, tensor in named.items():
            self.shadow[name].mul_(decay).add_(tensor.detach().float(), alpha=1 - decay)

    @contextmanager
    def applied(self, named: Mapping[str, torch.nn.Parameter]) -> Iterator[None]:
        """The averaged weights swapped into ``named`` (e.g. to save them), the trained ones restored after."""
        saved = {name: p.detach().clone() for name, p in named.items()}
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(saved[name])

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path), metadata={"updates": str(self.updates)})

    def load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            self.updates = int(f.metadata()["updates"])
            for name in f.keys():
                self.shadow[name].copy_(f.get_tensor(name))


def trainable_named(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name (``prefix`` removed, e.g. a wrapper's ``inner.``)."""
    return {name.removeprefix(prefix): p for name, p in model.named_parameters() if p.requires_grad}
