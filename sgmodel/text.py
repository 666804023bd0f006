"""Text embeddings for labels, attributes, predicates and captions, over any Hugging Face text model.

Scene graphs repeat a small vocabulary ("person", "left of", …) many times, so the embedder
encodes each *distinct* string once, on its own, and keeps it in a bounded LRU cache: encoder
calls grow with the number of distinct strings, not with the number of objects, and a string's
vector does not depend on what else was in the batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

Pooling = Literal["eos", "mean"]


class TextEmbedder:
    """Phrase embeddings [E] (pooled) and caption token embeddings [L, E] from a tokenizer + text model.

    ``pooling="eos"`` uses the model's ``pooler_output`` (CLIP's end-of-text state, what Stable
    Diffusion-era work uses for label embeddings); ``"mean"`` averages the unpadded token states,
    which suits small text encoders trained from scratch.
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        tokenizer,
        pooling: Pooling = "eos",
        cache_size: int = 8192,
        max_length: int | None = None,
    ) -> None:
        if pooling not in ("eos", "mean"):
            raise ValueError(f"pooling must be 'eos' or 'mean', got {pooling!r}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size!r}")
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.cache_size = cache_size
        self.max_length = max_length or min(int(getattr(tokenizer, "model_max_length", 77) or 77), 77)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoder_calls = 0
        """Forward passes through the text model (for benchmarks and tests)."""
        self.strings_encoded = 0
        """Strings sent through the text model."""

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

    def _encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the text model once. Returns pooled [B, E], token states [B, L, E], mask [B, L]."""
        tokens = self._tokenize(texts)
        self.encoder_calls += 1
        self.strings_encoded += len(texts)
        out = self.text_encoder(**tokens)
        hidden = out.last_hidden_state
        mask = tokens["attention_mask"].bool()
        if self.pooling == "eos":
            pooled = out.pooler_output
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return pooled, hidden, mask

    def embed(self, texts: Sequence[str], use_cache: bool = True) -> torch.Tensor:
        """Pooled embeddings [len(texts), E]: one encoder call per uncached distinct string.

        With ``use_cache=False`` (training the text encoder) the call keeps its autograd graph.
        """
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        unique = list(dict.fromkeys(texts))
        if not use_cache:
            pooled, _, _ = self._encode(unique)
            index = {t: i for i, t in enumerate(unique)}
            return pooled[torch.tensor([index[t] for t in texts], device=pooled.device)]
        # Each new string is encoded on its own: batched, its vector would depend (in the last bits) on
        # which strings happened to share the call, and a job's images on the order batches arrived.
        for text in (t for t in unique if t not in self._cache):
            with torch.no_grad():
                self._cache[text] = self._encode([text])[0][0].detach()
        rows = []
        for text in texts:
            vec = self._cache.get(text)
            if vec is None:  # evicted by this very batch (batch larger than the cache)
                with torch.no_grad():
                    vec = self._encode([text])[0][0].detach()
            else:
                self._cache.move_to_end(text)
            rows.append(vec)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack(rows)

    def embed_tokens(self, texts: Sequence[str], grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, L, E] and mask [B, L] for captions (not cached: captions rarely repeat)."""
        with torch.set_grad_enabled(grad):
            _, hidden, mask = self._encode(texts)
        return hidden, mask
