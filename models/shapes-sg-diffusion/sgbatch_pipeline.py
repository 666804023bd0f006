"""Loads this folder with sgbatch's SceneGraphDiffusionPipeline (needs the sgbatch package installed).

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
"""

from sgmodel.pipeline import SceneGraphDiffusionPipeline

__all__ = ["SceneGraphDiffusionPipeline"]
