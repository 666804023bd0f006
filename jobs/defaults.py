"""The embedded defaults: the project's own demo model, segmenter and bundled sample graphs.

Paths resolve against the current directory first (``ray job submit --working-dir .`` ships the
repository), then against the installed package's checkout.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def resolve(relative: str) -> str:
    here = Path(relative)
    if here.exists():
        return relative
    installed = PACKAGE_ROOT / relative
    return str(installed) if installed.exists() else relative


DEMO_MODEL = "models/shapes-sg-diffusion"
DEMO_SEGMENTER = "models/shapes-segmenter"
SAMPLE_SHAPES = "jobs/samples/shapes.parquet"
"""32 held-out shapes-world graphs (``prepare shapes --count 32 --seed 7``), the demo input."""
