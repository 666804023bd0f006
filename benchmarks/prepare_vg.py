"""Does ``prepare vg`` stream? Import a ~20 MB and a ~200 MB synthetic Visual Genome file and compare.

Each import runs as its own process (``python -m jobs.prepare vg …``, the real job, Parquet
writing included), and its peak RSS is read from ``os.wait4`` for exactly that child. If the
importer held the file in memory, the large run would need ~10x the memory of the small one;
streaming keeps the ratio near 1 (target: <= 1.3).

    python benchmarks/prepare_vg.py                  # ~20 MB vs ~200 MB
    python benchmarks/prepare_vg.py --small-mb 2 --large-mb 20 --with-naive

``--with-naive`` adds the same large file read with ``json.load`` (what sg2im's preprocessing
does), to show what streaming avoids.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["man", "woman", "tree", "sky", "building", "window", "car", "shirt", "grass", "sign", "table", "head",
         "hand", "water", "cloud", "road", "wall", "person", "plate", "dog", "street", "pole", "leg", "chair"]
PREDICATES = ["on", "has", "wearing", "of", "in", "near", "behind", "with", "holding", "above", "sitting on",
              "standing on", "under", "in front of", "next to", "riding", "by", "beside"]
ATTRIBUTES = ["white", "black", "blue", "green", "red", "brown", "large", "small", "wooden", "tall", "metal"]


def synth_image(rng: random.Random, image_id: int, width: int, height: int) -> dict:
    """One image in Visual Genome v1.4's scene_graphs.json layout, about as dense as the real file."""
    objects = []
    for k in range(rng.randint(8, 40)):
        w = rng.randint(10, width // 2)
        h = rng.randint(10, height // 2)
        name = rng.choice(NAMES)
        objects.append({
            "object_id": image_id * 1000 + k,
            "x": rng.randint(0, width - w), "y": rng.randint(0, height - h), "w": w, "h": h,
            "names": [name], "synsets": [f"{name}.n.01"],
            "attributes": rng.sample(ATTRIBUTES, rng.randint(0, 2)),
        })
    relationships = []
    for r in range(rng.randint(2, 30)):
        s, o = rng.sample(objects, 2)
        pred = rng.choice(PREDICATES)
        relationships.append({
            "relationship_id": image_id * 1000 + r, "predicate": pred, "synsets": [f"{pred.split()[0]}.r.01"],
            "subject_id": s["object_id"], "object_id": o["object_id"],
        })
    return {"image_id": image_id, "objects": objects, "relationships": relationships}


def write_synthetic(folder: Path, target_mb: float, seed: int = 0) -> tuple[Path, Path, int]:
    """scene_graphs.json of about ``target_mb`` MB plus its image_data.json, written element by element."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sg_path, img_path = folder / "scene_graphs.json", folder / "image_data.json"
    target = int(target_mb * 1e6)
    n = 0
    with open(sg_path, "w") as sg, open(img_path, "w") as img:
        sg.write("[")
        img.write("[")
        written = 1
        while written < target:
            n += 1
            width, height = rng.choice([(800, 600), (500, 375), (1024, 768), (640, 480)])
            chunk = ("" if n == 1 else ", ") + json.dumps(synth_image(rng, n, width, height))
            sg.write(chunk)
            written += len(chunk)
            img.write(("" if n == 1 else ", ") + json.dumps(
                {"width": width, "height": height, "url": f"https://example.invalid/VG_100K/{n}.jpg",
                 "coco_id": None, "flickr_id": None, "image_id": n}))
        sg.write("]")
        img.write("]")
    return sg_path, img_path, n


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run one child process; return (wall seconds, its own peak RSS in MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def import_run(sg: Path, img: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "jobs.prepare", "vg", "--scene-graphs", str(sg), "--image-data", str(img),
           "--output", str(out)]
    seconds, rss = run_measured(cmd)
    summary = json.loads((out / "_summary.json").read_text())
    return {"seconds": seconds, "rss_mb": rss, "rows": summary["rows_read"], "written": summary["rows_written"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mb", type=float, default=20.0)
    parser.add_argument("--large-mb", type=float, default=200.0)
    parser.add_argument("--workdir", help="where to write the synthetic files (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files and outputs")
    parser.add_argument("--with-naive", action="store_true", help="also json.load the large file, for contrast")
    args = parser.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sgbatch-bench-vg-"))
    try:
        results = {}
        for label, mb in (("small", args.small_mb), ("large", args.large_mb)):
            t0 = time.perf_counter()
            sg, img, n = write_synthetic(work / label, mb, seed=1 if label == "small" else 2)
            size = sg.stat().st_size / 1e6
            print(f"{label}: wrote {size:.1f} MB, {n} images in {time.perf_counter() - t0:.1f} s", flush=True)
            results[label] = {**import_run(sg, img, work / f"{label}-out"), "mb": size, "images": n}

        print()
        print(f"{'run':6} {'file MB':>8} {'images':>8} {'written':>8} {'seconds':>8} {'graphs/s':>9} {'peak RSS MB':>12}")
        for label, r in results.items():
            print(f"{label:6} {r['mb']:8.1f} {r['images']:8d} {r['written']:8d} {r['seconds']:8.1f} "
                  f"{r['rows'] / r['seconds']:9.0f} {r['rss_mb']:12.1f}")
        size_ratio = results["large"]["mb"] / results["small"]["mb"]
        rss_ratio = results["large"]["rss_mb"] / results["small"]["rss_mb"]
        print(f"\nfile size ratio large/small: {size_ratio:.1f}x")
        print(f"peak RSS ratio large/small:  {rss_ratio:.2f}x  (target <= 1.3: {'PASS' if rss_ratio <= 1.3 else 'FAIL'})")

        if args.with_naive:
            code = "import json, sys; json.load(open(sys.argv[1]))"
            seconds, rss = run_measured([sys.executable, "-c", code, str(work / "large" / "scene_graphs.json")])
            print(f"\nfor contrast, json.load of the large file alone: {seconds:.1f} s, peak RSS {rss:.0f} MB")
        return 0 if rss_ratio <= 1.3 else 1
    finally:
        if args.keep:
            print(f"\nfiles kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
