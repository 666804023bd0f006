"""SBPC generator actor: draws candidates on its model, has them scored on the scorer actors, keeps the best.

The selection loop (draft -> score -> pick -> final render; adaptive rounds) needs scores between
generation calls, so this actor drives it and sends each round's images to the scorer actors (plain
Ray actors created by the job, each holding the segmenter on its own — possibly fractional — GPU).
"""

from __future__ import annotations

import itertools
import logging
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from sgmodel.draft import check_draft_teacher, read_draft_config
from sgmodel.fingerprint import model_fingerprint
from sgmodel.sbpc import SBPCConfig, pipeline_generate_fn, run_sbpc
from workers.generator import GenerationSettings, Generator, encode_png
from workers.runtime import load_pipeline, localize_model
from workers.schema import SBPC_SCHEMA
from workers.scorer import RECALL_COLUMNS
from workers.validate import graph_from_json, graph_to_json

logger = logging.getLogger(__name__)


class SBPCGenerator:
    def __init__(self, settings: GenerationSettings, sbpc: dict, scorers: list, keep_candidates: bool,
                 storage_settings=None, draft_model: str | None = None) -> None:
        import ray

        self._ray = ray
        self.base = Generator(settings, storage_settings)
        self.settings = settings
        self.sbpc_args = sbpc
        self.keep = keep_candidates
        if not scorers:
            raise ValueError("SBPC needs at least one scorer actor")
        self.scorers = scorers
        self._turn = itertools.cycle(range(len(scorers)))
        self.generate = pipeline_generate_fn(self.base.pipe, settings.guidance)
        self.generate_draft = self._load_draft_model(draft_model, storage_settings) if draft_model else None

    def _load_draft_model(self, model: str, storage_settings):
        """The distilled draft model on this actor's device; drafts run its own steps without guidance."""
        from workers.storage import Storage

        storage = Storage(storage_settings) if storage_settings else None
        path = localize_model(model, storage)
        draft = read_draft_config(path)
        if draft is None:
            raise ValueError(f"--draft-model {model!r} has no draft.json: not a distilled draft model "
                             "(make one with python -m jobs.distill_draft)")
        check_draft_teacher(draft, model, model_fingerprint(localize_model(self.settings.model, storage)))
        pipe = load_pipeline(path, self.base.device, self.base.dtype, "model", self.settings.compile,
                             self.settings.channels_last)
        if pipe.default_size != self.base.pipe.default_size:
            raise ValueError(f"--draft-model {model!r} renders {pipe.default_size} px, the model "
                             f"{self.base.pipe.default_size} px")
        final_steps = self.sbpc_args["final_steps"]
        if (draft["guidance"], draft["teacher_steps"]) != (self.settings.guidance, final_steps):
            logger.warning("draft model %s learnt renders at guidance %s, %s steps; this job: guidance %s, %s steps "
                           "(its drafts predict those less well)", model, draft["guidance"], draft["teacher_steps"],
                           self.settings.guidance, final_steps)
        if self.sbpc_args.get("draft_steps") is None:
            self.sbpc_args = {**self.sbpc_args, "draft_steps": int(draft["draft_steps"])}
        return pipeline_generate_fn(pipe, 1.0)

    def score(self, images: list[np.ndarray], graphs) -> list:
        """Split one round's images over the scorer actors and wait for all of them."""
        if not images:
            return []
        step = -(-len(images) // min(len(self.scorers), len(images)))
        refs = [
            self.scorers[next(self._turn)].score_images.remote(
                images[i : i + step], [graph_to_json(g) for g in graphs[i : i + step]])
            for i in range(0, len(images), step)
        ]
        return [r for chunk in self._ray.get(refs) for r in chunk]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = [self._passthrough(r) for r in rows if r["error"] is not None]
        good = [r for r in rows if r["error"] is None]
        if good:
            out.extend(self._select(good))
        return pa.Table.from_pylist(out, schema=SBPC_SCHEMA)

    def _select(self, rows: list[dict]) -> list[dict]:
        graphs = [graph_from_json(r["graph"]) for r in rows]
        cfg = SBPCConfig(height=self.base.height, width=self.base.width, base_seed=self.settings.base_seed,
                         **self.sbpc_args)
        try:
            results = run_sbpc(graphs, cfg, self.generate, self.score, keep_images=self.keep,
                               generate_draft=self.generate_draft)
        except Exception as err:  # noqa: BLE001 - never fail the batch: bisect to the culprit
            if len(rows) > 1:
                return [r for row in rows for r in self._select([row])]
            logger.exception("SBPC failed for %r", rows[0]["id"])
            return [self._passthrough(rows[0], f"graph {rows[0]['id']!r}: SBPC failed: {type(err).__name__}: {err}",
                                      "generation_failed")]
        done = datetime.now(timezone.utc)
        out = []
        for row, res in zip(rows, results):
            final = res.final
            rendered = {f.index: f.result.recall for f in res.finals}
            candidates = [
                {"candidate_index": c.index, "seed": c.seed, **{k: c.result.to_row()[k] for k in RECALL_COLUMNS},
                 "expected_recall": c.result.expected_recall,
                 "final_recall": rendered.get(c.index) if cfg.draft_steps is not None else c.result.recall,
                 "won": c.index == res.winner.index,
                 "image": encode_png(c.image) if self.keep and c.image is not None else None}
                for c in res.candidates
            ]
            out.append({
                "id": row["id"], "shard": row["shard"], "graph": row["graph"], "error": None, "error_code": None,
                "sample_index": 0, "seed": final.seed, "image": encode_png(final.image),
                "height": cfg.height, "width": cfg.width, "steps": cfg.final_steps, "guidance": self.settings.guidance,
                "gen_seconds": res.seconds, "generated_at": done, **final.result.to_row(), "score_seconds": None,
                "candidates_drawn": res.drawn, "winner_candidate": res.winner.index,
                "finals_rendered": len(res.finals) if cfg.draft_steps is not None else res.drawn,
                "candidate_steps": cfg.candidate_steps, "candidate_height": cfg.candidate_size[0],
                "candidates": candidates,
            })
        return out

    @staticmethod
    def _passthrough(row: dict, error: str | None = None, code: str | None = None) -> dict:
        out = {name: None for name in SBPC_SCHEMA.names}
        out.update(id=row["id"], shard=row["shard"], graph=row.get("graph"), error=error or row["error"],
                   error_code=code or row["error_code"])
        return out


def scorer_actor_class():
    """The Scorer as a plain Ray actor class (SBPC calls it directly instead of through Ray Data)."""
    import ray

    from workers.scorer import Scorer

    return ray.remote(Scorer)

