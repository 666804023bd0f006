"""Gallery thumbnails: read each shown image from the run (PNG file or WebDataset tar member), write a small PNG.

Generated images can be 16-32 px; a browser shrinking or blurring them hides what the model drew,
so small images are upscaled by an integer factor with nearest-neighbour (every pixel stays a sharp
square) and large ones are downscaled. Thumbnails are written next to the report, so the page
needs nothing outside the run folder and never has to read into a tar.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

from workers.storage import Storage, join

logger = logging.getLogger("sgbatch")

THUMB = 160
"""Target thumbnail size (pixels, longer side)."""
MAX_THUMB = 256
TAR_MARK = ".tar/"


def thumbnail(data: bytes, target: int = THUMB) -> tuple[bytes, int, int]:
    """PNG bytes of the thumbnail and its size: integer nearest-neighbour upscale, or a Lanczos downscale."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode not in ("RGB", "RGBA", "L"):
            im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
        side = max(im.size)
        if side < target:
            factor = max(1, target // side)
            im = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
        elif side > MAX_THUMB:
            im.thumbnail((MAX_THUMB, MAX_THUMB), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        return buf.getvalue(), im.width, im.height


def split_tar_key(key: str) -> tuple[str, str] | None:
    """``images/s-abc.tar/name.png`` -> (``images/s-abc.tar``, ``name.png``); None for a plain file key."""
    at = key.find(TAR_MARK)
    if at < 0:
        return None
    return key[: at + len(TAR_MARK) - 1], key[at + len(TAR_MARK):]


class ThumbnailWriter:
    """Writes ``{run}/{folder}/NNNNN.png`` for image keys relative to the run; one thumbnail per distinct key."""

    def __init__(self, storage: Storage, run_uri: str, folder: str = "report/img", threads: int = 8) -> None:
        self.storage = storage
        self.run_uri = run_uri
        self.folder = folder
        self.threads = threads
        self.written: dict[str, tuple[str, int, int] | None] = {}
        """image key -> (path relative to the run, width, height), or None when the image could not be read."""
        self.failures: dict[str, str] = {}

    def write(self, keys: Iterable[str | None]) -> None:
        """Make thumbnails for the keys not done yet; unreadable ones are recorded, never raised."""
        todo = sorted({k for k in keys if k and k not in self.written})
        if not todo:
            return
        sources = self._read_sources(todo)
        start = len(self.written)
        jobs = [(k, f"{self.folder}/{start + n:05d}.png") for n, k in enumerate(todo)]
        _ = self.storage.s3 if self.run_uri.startswith("s3://") else None  # one client, made before the threads

        def make(job: tuple[str, str]) -> tuple[str, tuple[str, int, int] | None]:
            key, rel = job
            data = sources.get(key)
            if data is None:
                return key, None
            try:
                png, w, h = thumbnail(data)
            except (UnidentifiedImageError, OSError, ValueError) as err:
                self.failures[key] = f"not a readable image: {err}"
                return key, None
            self.storage.write_bytes(join(self.run_uri, rel), png, content_type="image/png")
            return key, (rel, w, h)

        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            for key, result in pool.map(make, jobs):
                self.written[key] = result

    def _read_sources(self, keys: list[str]) -> dict[str, bytes]:
        """Bytes of each key: plain files one by one, tar members by reading each tar once."""
        out: dict[str, bytes] = {}
        tars: dict[str, dict[str, str]] = defaultdict(dict)
        plain = []
        for key in keys:
            parts = split_tar_key(key)
            if parts:
                tars[parts[0]][parts[1]] = key
            else:
                plain.append(key)

        def read_plain(key: str) -> tuple[str, bytes | None]:
            try:
                return key, self.storage.read_bytes(join(self.run_uri, key))
            except (FileNotFoundError, IsADirectoryError) as err:
                self.failures[key] = f"missing: {err}"
                return key, None

        def read_tar(tar_key: str) -> dict[str, bytes]:
            members = tars[tar_key]
            try:
                blob = self.storage.read_bytes(join(self.run_uri, tar_key))
            except FileNotFoundError as err:
                for key in members.values():
                    self.failures[key] = f"missing: {err}"
                return {}
            found = {}
            try:
                with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
                    for info in tar:
                        if info.isfile() and info.name in members:
                            handle = tar.extractfile(info)
                            if handle is not None:
                                found[members[info.name]] = handle.read()
            except tarfile.TarError as err:
                logger.warning("report: cannot read %s: %s", tar_key, err)
            for name, key in members.items():
                if key not in found:
                    self.failures[key] = f"no member {name!r} in {tar_key}"
            return found

        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            for key, data in pool.map(read_plain, plain):
                if data is not None:
                    out[key] = data
            for found in pool.map(read_tar, list(tars)):
                out.update(found)
        return out

    def get(self, key: str | None) -> tuple[str, int, int] | None:
        return self.written.get(key) if key else None
