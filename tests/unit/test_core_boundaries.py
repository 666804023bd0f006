"""The core library stands alone: no Ray anywhere in sgmodel, and nothing from the shapes world outside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SGMODEL = Path(__file__).resolve().parents[2] / "sgmodel"
CORE = sorted(p for p in SGMODEL.rglob("*.py") if "shapes" not in p.relative_to(SGMODEL).parts)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SGMODEL.parent).with_suffix("").parts).removesuffix(".__init__")


def test_importing_every_core_module_loads_neither_ray_nor_the_shapes_world():
    names = [module_name(p) for p in CORE]
    assert "sgmodel.pipeline" in names and "sgmodel.scoring.recall" in names and len(names) > 20
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'sgmodel.shapes')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=SGMODEL.parent).stdout.strip().splitlines()[-1]
    assert out == "[]"


def test_no_core_source_names_ray_or_the_shapes_package():
    offenders = []
    for path in CORE:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "import ray" in code or "from ray" in code or "sgmodel.shapes" in code:
                offenders.append(f"{path.relative_to(SGMODEL.parent)}:{number}: {line.strip()}")
    assert offenders == []
