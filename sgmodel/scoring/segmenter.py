"""SegmentationScorer: any transformers semantic segmenter plus the recall arithmetic.

Images and graphs in, :class:`~sgmodel.scoring.recall.RecallResult` out. No Ray here: the Ray
scorer actor holds one of these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sgmodel.graph import SceneGraph
from sgmodel.scoring.config import RecallConfig, config_with
from sgmodel.scoring.labels import EmbedFn, LabelMatcher
from sgmodel.scoring.recall import RecallResult, expected_recall, score_class_maps

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be float32, float16 or bfloat16 (or None to keep the model's), got {dtype!r}")


def _resolve_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None


def _as_rgb(image: Any, index: int) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image (any mode) or a uint8 array [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"images[{index}] is empty: shape {image.shape}")
        return image
    desc = f"{image.dtype} array {image.shape}" if isinstance(image, np.ndarray) else repr(type(image).__name__)
    raise ValueError(f"images[{index}] must be a PIL image or a uint8 array [H, W, 3], got {desc}")


class SegmentationScorer:
    """A semantic segmenter plus the recall arithmetic: images + graphs in, :class:`RecallResult` out.

    Works with any transformers ``AutoModelForSemanticSegmentation`` whose output has ``logits``
    [B, C, h, w] (Segformer, UperNet, DPT, BEiT, MobileViT, ...) and its image processor. The
    model is put in eval mode on ``device`` / ``dtype`` (fp16/bf16 for GPUs); label matching
    uses ``model.config.id2label``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        config: RecallConfig | None = None,
        embed_fn: EmbedFn | None = None,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **options: Any,
    ) -> None:
        """``options`` are :class:`RecallConfig` fields overriding ``config`` (e.g. ``min_area_fraction=0.02``)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch module (a transformers segmentation model), got {model!r}")
        if not callable(processor):
            raise ValueError(f"processor must be a callable image processor, got {processor!r}")
        id2label = getattr(getattr(model, "config", None), "id2label", None)
        if not id2label:
            raise ValueError("model.config.id2label is missing: cannot name the segmentation classes")
        self.config = config_with(config, options)
        self.device = _resolve_device(device) or next(model.parameters()).device
        self.dtype = _resolve_dtype(dtype) or next(model.parameters()).dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.processor = processor
        self.batch_size = batch_size
        self.matcher = LabelMatcher(id2label, config=self.config, embed_fn=embed_fn)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        *,
        load_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> SegmentationScorer:
        """Load model + processor from a folder or hub id; ``options`` go to the constructor.

        ``load_kwargs`` go to both ``from_pretrained`` calls (e.g. ``local_files_only=True``,
        ``revision``). Weights load in their stored dtype and are then cast to ``dtype``.
        """
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        kwargs = dict(load_kwargs or {})
        model = AutoModelForSemanticSegmentation.from_pretrained(str(path_or_id), **kwargs)
        processor = AutoImageProcessor.from_pretrained(str(path_or_id), **kwargs)
        return cls(model, processor, device=device, dtype=dtype, **options)

    @property
    def id2label(self) -> dict[int, str]:
        return self.matcher.id2label

    def _batches(self, arrays: list[np.ndarray]) -> list[list[int]]:
        """Index batches; a processor that does not resize cannot stack different sizes, so group by size."""
        order = list(range(len(arrays)))
        if not getattr(self.processor, "do_resize", True):
            order.sort(key=lambda i: arrays[i].shape[:2])
        batches: list[list[int]] = []
        for i in order:
            if batches and len(batches[-1]) < self.batch_size and (
                getattr(self.processor, "do_resize", True) or arrays[batches[-1][0]].shape == arrays[i].shape
            ):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    @torch.inference_mode()
    def segment(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Class maps, one per image at that image's own resolution.

        images: PIL images or uint8 arrays [H, W, 3], sizes may differ. Returns integer arrays
        [H, W] (uint8 when the model has <= 256 classes, else int32): the argmax of the logits
        [C, h, w] after bilinear upsampling to [C, H, W] (in float32, one image at a time).
        """
        return self._segment(images)[0]

    @torch.inference_mode()
    def _segment(self, images: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Class maps, and per image each class's mean softmax probability [C] (for expected recall)."""
        arrays = [_as_rgb(im, i) for i, im in enumerate(images)]
        out: list[np.ndarray | None] = [None] * len(arrays)
        areas: list[np.ndarray | None] = [None] * len(arrays)
        num_classes = max(self.id2label) + 1
        map_dtype = np.uint8 if num_classes <= 256 else np.int32
        for batch in self._batches(arrays):
            inputs = self.processor(images=[arrays[i] for i in batch], return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.device, dtype=self.dtype)  # [b, 3, S, S']
            logits = self.model(pixel_values=pixel_values).logits  # [b, C, h, w]
            for j, i in enumerate(batch):
                height, width = arrays[i].shape[:2]
                up = F.interpolate(logits[j : j + 1].float(), size=(height, width), mode="bilinear", align_corners=False)
                out[i] = up[0].argmax(dim=0).to("cpu").numpy().astype(map_dtype)  # [H, W]
                areas[i] = up[0].softmax(dim=0).mean(dim=(1, 2)).to("cpu").numpy()  # [C]
        return [m for m in out if m is not None], [a for a in areas if a is not None]

    def score_class_maps(self, class_maps: Sequence[np.ndarray] | np.ndarray, graphs: Sequence[SceneGraph]) -> list[RecallResult]:
        """:func:`score_class_maps` with this scorer's classes, options and caches."""
        return score_class_maps(class_maps, graphs, self.matcher, config=self.config)

    def score(self, images: Sequence[Any], graphs: Sequence[SceneGraph]) -> list[RecallResult]:
        """Segment ``images`` and score each against the graph at the same position."""
        images, graphs = list(images), list(graphs)
        if len(images) != len(graphs):
            raise ValueError(f"got {len(images)} images for {len(graphs)} graphs; need one per graph")
        maps, areas = self._segment(images)
        results = self.score_class_maps(maps, graphs)
        for result, class_areas, graph in zip(results, areas, graphs):
            result.expected_recall = expected_recall(class_areas, graph, self.matcher.match_many(graph.objects),
                                                     self.config)
        return results
