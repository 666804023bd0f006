"""Bulk SBPC (sampling-based prompt compliance): best of N candidates per scene graph, on Ray.

    python -m jobs.sbpc --candidates 8 --draft-steps 4 --final-steps 50      # draft mode, demo defaults
    python -m jobs.sbpc --candidates 8 --draft-model models/shapes-sg-diffusion-draft   # distilled drafts
    python -m jobs.sbpc --candidates 8 --draft-model models/shapes-sg-diffusion-draft \
        --final-candidates 4 --target-recall 1.0       # full renders of the best drafts until one is complete
    python -m jobs.sbpc --candidates 8 --draft-model models/shapes-sg-diffusion-draft \
        --final-candidates 8 --target-recall 1.0 --final-strength 0.52  # finals finished from their drafts
    ray job submit --working-dir . -- python -m jobs.sbpc --input s3://… --output s3://… --candidates 10

Every flag of the generate job applies. Ray Data streams read -> validate -> SBPC generator actors
(draw candidates, keep the best, re-render it in draft mode) -> sink; the candidates are scored
on separate scorer actors. Output as the generate job's, plus candidates/*.parquet.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jobs import generate
from jobs.common import job_main
from jobs.config import ConfigError, require
from jobs.defaults import resolve
from jobs.generate import GenerateConfig
from jobs.label_map import recall_options
from jobs.stages import (
    SCORER_CPUS,
    generation_settings,
    generator_stage,
    placement,
    read_validated,
    sink_stage,
)
from jobs.summary import read_table
from sgmodel.draft import FAST_FILE, check_draft_teacher, read_draft_config, read_fast_settings
from sgmodel.fingerprint import model_fingerprint
from sgmodel.sbpc import table3_statistics
from workers.schema import CANDIDATES_SCHEMA, SBPC_METADATA_SCHEMA

logger = logging.getLogger("sgbatch")


def _same(key: str, value, fast_value) -> bool:
    """Whether a flag's value is the one sbpc_fast.json gives (paths compared resolved)."""
    if key == "draft_model" and value is not None and fast_value is not None:
        return Path(resolve(value)).resolve() == Path(fast_value).resolve()
    return value == fast_value


@dataclass(kw_only=True)
class SBPCJobConfig(GenerateConfig):
    """Best-of-N sampling: N candidates per graph scored by segmentation recall, the best kept."""

    output: str = "out/sbpc"
    """Folder or s3:// prefix; the run goes to {output}/{run_id}/."""
    candidates: int = 8
    """N: the most candidates per graph."""
    final_steps: int | None = None
    """Steps of the kept image (default: --steps)."""
    draft_steps: int | None = None
    """Draft mode: candidates use this many steps, and only the winning seed is rendered at --final-steps."""
    draft_size: int | None = None
    """Draft side length in pixels (draft mode; must divide the image size)."""
    draft_model: str | None = None
    """Draft mode on a distilled draft model (python -m jobs.distill_draft): drafts use its own steps
    (or --draft-steps), without guidance."""
    target_recall: float | None = None
    """Adaptive mode: stop drawing candidates for a graph once one reaches this recall."""
    target_precision: float | None = None
    """Adaptive mode: the stopping candidate must also reach this precision (1.0: nothing the graph
    does not name)."""
    round_size: int = 1
    """Adaptive mode: candidates per graph per round."""
    final_candidates: int = 1
    """Draft mode: render up to this many of the best drafts' seeds in full, best first, and keep the best
    final image; with --target-recall, a graph stops at the first final image that reaches it (and
    draws all its drafts)."""
    final_strength: float | None = None
    """Draft mode: finish each final image from its draft instead of rendering it from noise
    (image-to-image: the draft noised with the seed's own noise, then the last S x --final-steps
    steps); a final then costs S of a full render."""
    keep_candidates: bool = False
    """Also write every candidate's image (candidates/images/)."""
    fast: bool = False
    """The fastest settings measured for this model to keep recall within 0.01 of naive best-of-N: the
    steps, stopping rule, draft model and finals named in the model folder's sbpc_fast.json (a local
    model folder; refused without one)."""

    def __post_init__(self) -> None:
        if self.fast:
            self._apply_fast_settings()
        super().__post_init__()
        require(self.candidates >= 1, "candidates", self.candidates, "must be >= 1")
        require(self.scoring, "segmenter", self.segmenter, "SBPC needs a segmenter to score candidates")
        require(self.samples_per_graph == 1, "samples_per_graph", self.samples_per_graph,
                "SBPC keeps one image per graph; use --candidates")
        for name in ("final_steps", "draft_steps", "draft_size"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be >= 1")
        require(self.draft_size is None or self.draft_steps is not None, "draft_size", self.draft_size,
                "needs --draft-steps")
        require(self.draft_model is None or self.draft_size is None, "draft_size", self.draft_size,
                "cannot be combined with --draft-model (it drafts at the size it learnt)")
        if self.draft_model and Path(resolve(self.draft_model)).is_dir():  # s3:// models are checked on the actors
            draft = read_draft_config(resolve(self.draft_model))
            require(draft is not None, "draft_model", self.draft_model,
                    "has no draft.json: not a distilled draft model (make one with python -m jobs.distill_draft)")
            if Path(resolve(self.model)).is_dir():
                try:
                    check_draft_teacher(draft, self.draft_model, model_fingerprint(resolve(self.model)))
                except ValueError as err:
                    raise ConfigError(f"--draft-model = {self.draft_model!r}: {err}") from None
        require(self.target_recall is None or 0 <= self.target_recall <= 1, "target_recall", self.target_recall,
                "must be in [0, 1]")
        require(self.target_precision is None or (self.target_recall is not None and 0 <= self.target_precision <= 1),
                "target_precision", self.target_precision, "must be in [0, 1] and needs --target-recall")
        require(self.round_size >= 1, "round_size", self.round_size, "must be >= 1")
        require(1 <= self.final_candidates <= self.candidates, "final_candidates", self.final_candidates,
                f"must be in 1 … --candidates ({self.candidates})")
        require(self.final_candidates == 1 or self.draft_steps is not None or self.draft_model is not None,
                "final_candidates", self.final_candidates, "needs draft mode (--draft-model or --draft-steps)")
        require(self.final_strength is None or self.draft_steps is not None or self.draft_model is not None,
                "final_strength", self.final_strength, "needs draft mode (--draft-model or --draft-steps)")
        require(self.final_strength is None
                or (0 < self.final_strength <= 1 and int((self.final_steps or self.steps) * self.final_strength) >= 1),
                "final_strength", self.final_strength, "must be in (0, 1] and run at least one final step")

    def _apply_fast_settings(self) -> None:
        """--fast: take the SBPC settings from the model's sbpc_fast.json; no flag may contradict them."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        model = resolve(self.model)
        require(Path(model).is_dir(), "fast", True, f"needs a local model folder; --model = {self.model!r} is not one")
        try:
            settings = read_fast_settings(model)
        except (ValueError, OSError) as err:
            raise ConfigError(f"--fast: {err}") from None
        # A value equal to the file's is not a contradiction: a config copied with dataclasses.replace
        # (resolved paths) validates again with the settings already taken.
        chosen = [f"--{k.replace('_', '-')}" for k in ("steps", "final_steps", "draft_model", "draft_steps", "draft_size",
                                                        "final_candidates", "final_strength", "target_recall",
                                                        "target_precision", "round_size")
                  if getattr(self, k) != defaults[k] and (settings is None or not _same(k, getattr(self, k),
                                                                                        settings.get(k)))]
        require(not chosen, "fast", True, f"chooses these settings itself; drop {', '.join(chosen)}")
        require(settings is not None, "fast", True,
                f"model {self.model!r} has no {FAST_FILE} (no fast settings measured for it): "
                "measure them with benchmarks/sbpc.py, or use --candidates alone")
        require(self.candidates == defaults["candidates"] or self.candidates == settings["candidates"], "candidates",
                self.candidates, f"differs from the {settings['candidates']} that {FAST_FILE} was measured with")
        for key, value in settings.items():
            setattr(self, key, value)

    def resolved(self) -> SBPCJobConfig:
        out = super().resolved()
        if self.draft_model:
            out = dataclasses.replace(out, draft_model=resolve(self.draft_model))
        return out

    def sbpc_args(self) -> dict:
        return {
            "candidates": self.candidates, "final_steps": self.final_steps or self.steps,
            "draft_steps": self.draft_steps, "draft_size": self.draft_size, "target_recall": self.target_recall,
            "target_precision": self.target_precision, "round_size": self.round_size, "final_candidates": self.final_candidates,
            "final_strength": self.final_strength,
        }


def build_dataset(cfg: SBPCJobConfig, pending, storage, dupes, run_uri: str, model_fp: str):
    """read -> validate -> SBPC generator actors (scoring on their scorer actors) -> sink."""
    from workers.sbpc_worker import SBPCGenerator, scorer_actor_class
    from workers.scorer import ScoringSettings

    where = placement(cfg)
    score = ScoringSettings(segmenter=cfg.segmenter, use_gpu=where.scorer_gpus > 0, precision=cfg.precision,
                            options=recall_options(cfg, storage))
    scorer_cls = scorer_actor_class()
    scorers = [scorer_cls.options(num_cpus=SCORER_CPUS, num_gpus=where.scorer_gpus).remote(score, storage.settings)
               for _ in range(cfg.scorer_workers)]
    ds = read_validated(cfg, pending, storage, dupes)
    settings = generation_settings(cfg, where.generator_gpus, steps=cfg.final_steps or cfg.steps)
    ds = generator_stage(ds, cfg, SBPCGenerator,
                         (settings, cfg.sbpc_args(), scorers, cfg.keep_candidates, storage.settings,
                          cfg.draft_model),
                         where.generator_gpus)
    return sink_stage(ds, cfg, run_uri, model_fp, storage)


def sbpc_statistics(storage, run_uri: str, cfg: SBPCJobConfig) -> dict:
    """FG-DM Table 3 over the run's candidates, and what the selection cost per graph."""
    cands = read_table(storage, f"{run_uri}/candidates", CANDIDATES_SCHEMA, ["id", "candidate_index", "recall"])
    per_graph: dict[str, list[tuple[int, float | None]]] = {}
    for row in cands.to_pylist():
        per_graph.setdefault(row["id"], []).append((row["candidate_index"], row["recall"]))
    recalls = [[recall for _, recall in sorted(rows)] for rows in per_graph.values()]
    meta = read_table(storage, f"{run_uri}/metadata", SBPC_METADATA_SCHEMA, ["gen_seconds", "recall", "finals_rendered"])
    seconds = [v for v in meta.column("gen_seconds").to_pylist() if v is not None]
    finals = [v for v in meta.column("finals_rendered").to_pylist() if v is not None]
    args = cfg.sbpc_args()
    mode = "naive" if not (args["draft_steps"] or cfg.draft_model) else "draft" if cfg.final_candidates == 1 else "draft-finals"
    return {
        "mode": f"adaptive-{mode}" if args["target_recall"] is not None else mode, **args,
        "draft_model": cfg.draft_model,
        **{k: v for k, v in table3_statistics(recalls).items() if k != "graphs"},
        "avg_finals_rendered": sum(finals) / len(finals) if finals else None,
        "seconds_per_graph": sum(seconds) / len(seconds) if seconds else None,
    }


def run(cfg: SBPCJobConfig) -> tuple[dict, int]:
    summary, code = generate.run(cfg, job="sbpc", build=build_dataset, statistics=sbpc_statistics)
    s = summary["sbpc"]
    if s.get("avg_max_recall") is not None:
        print(f"SBPC {s['mode']}: avg max candidate recall {s['avg_max_recall']:.3f}, "
              f"{s['avg_candidates_drawn']:.2f} candidates/graph, {s['avg_finals_rendered'] or 0:.2f} "
              f"{'full renders' if s['final_strength'] is None else 'finals finished from drafts'}/graph, "
              f"{s['seconds_per_graph'] or 0:.2f} s/graph")
    return summary, code


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(SBPCJobConfig, run, argv, "python -m jobs.sbpc")


if __name__ == "__main__":
    sys.exit(main())
