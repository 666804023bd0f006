"""Segmentation-based object recall (FG-DM) and spatial-relation compliance of generated images.

SBPC needs a cheap, automatic judge of whether a generated image holds what its scene graph asks
for. FG-DM segments the image with an off-the-shelf semantic segmenter and counts an object as
present when its class covers enough of the picture; recall = found / scorable objects. Relation
compliance is our addition, read off the same segmented regions.

Three layers, so each can be used and tested alone:

- :mod:`~sgmodel.scoring.labels`: which segmentation class stands for a graph object;
- :mod:`~sgmodel.scoring.recall`: recall and relation arithmetic on integer class maps;
- :mod:`~sgmodel.scoring.segmenter`: any transformers ``AutoModelForSemanticSegmentation`` turning
  images into class maps, scored by the layers above.
"""

from sgmodel.scoring.config import DEFAULT_IGNORE_CLASSES, RecallConfig, normalize_name
from sgmodel.scoring.labels import EmbedFn, LabelMatch, LabelMatcher, candidate_phrases, object_description
from sgmodel.scoring.recall import (
    RECALL_ROW_SCHEMA,
    RecallResult,
    Region,
    expected_recall,
    normalize_predicate,
    score_class_maps,
)
from sgmodel.scoring.segmenter import SegmentationScorer

__all__ = [
    "DEFAULT_IGNORE_CLASSES",
    "EmbedFn",
    "LabelMatch",
    "LabelMatcher",
    "RECALL_ROW_SCHEMA",
    "RecallConfig",
    "RecallResult",
    "Region",
    "SegmentationScorer",
    "candidate_phrases",
    "expected_recall",
    "normalize_name",
    "normalize_predicate",
    "object_description",
    "score_class_maps",
]
