"""The documented training command runs end to end on tiny settings (the real run takes ~1 h 45 min)."""

import json
import subprocess
import sys

from sgmodel.pipeline import SceneGraphDiffusionPipeline
from sgmodel.scoring import SegmentationScorer


def test_train_demo_command_runs_and_checkpoints_load(tmp_path):
    out = tmp_path / "models"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train_demo", "--tiny", "--output", str(out), "--segmenter-steps", "3",
         "--diffusion-steps", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3/3" in proc.stdout and "== done" in proc.stdout
    pipe = SceneGraphDiffusionPipeline.from_pretrained(out / "shapes-sg-diffusion")
    assert json.loads((out / "shapes-sg-diffusion" / "training_summary.json").read_text())["steps"] == 3
    scorer = SegmentationScorer.from_pretrained(out / "shapes-segmenter")
    assert scorer.id2label[1] == "red circle"
    assert pipe.unet.config.sample_size == 16
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
