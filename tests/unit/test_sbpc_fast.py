"""sbpc --fast: the settings come from the model folder's sbpc_fast.json, and nothing may contradict them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.config import ConfigError
from jobs.sbpc import SBPCJobConfig, main
from sgmodel.draft import read_fast_settings

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "shapes-sg-diffusion"
DRAFT = ROOT / "models" / "shapes-sg-diffusion-draft"


def expected_draft_model(settings: dict) -> Path | None:
    return None if settings["draft_model"] is None else (MODEL / settings["draft_model"]).resolve()


def test_fast_takes_the_committed_models_settings():
    expected = json.loads((MODEL / "sbpc_fast.json").read_text())
    cfg = SBPCJobConfig(model=str(MODEL), fast=True)
    assert (cfg.draft_model and Path(cfg.draft_model)) == expected_draft_model(expected)
    assert (cfg.candidates, cfg.final_candidates, cfg.target_recall, cfg.final_strength) == (
        expected["candidates"], expected["final_candidates"], expected["target_recall"], expected["final_strength"])
    args = cfg.sbpc_args()
    assert args["final_strength"] == expected["final_strength"]
    assert args["final_steps"] == (expected["final_steps"] or SBPCJobConfig.steps)


def test_fast_survives_the_jobs_resolved_copy():
    """The job validates a resolved copy of its config: the settings --fast took are not flags against it."""
    for cfg in (SBPCJobConfig(fast=True), SBPCJobConfig(model=str(MODEL), fast=True)):
        resolved = cfg.resolved()
        assert resolved.draft_model == cfg.draft_model
        assert resolved.sbpc_args() == cfg.sbpc_args()


def test_fast_refuses_flags_it_chooses_and_another_candidate_count():
    with pytest.raises(ConfigError, match="drop --draft-steps, --final-candidates"):
        SBPCJobConfig(model=str(MODEL), fast=True, draft_steps=3, final_candidates=2)
    with pytest.raises(ConfigError, match="drop --steps"):
        SBPCJobConfig(model=str(MODEL), fast=True, steps=50)
    with pytest.raises(ConfigError, match="--candidates = 4: differs from the 8"):
        SBPCJobConfig(model=str(MODEL), fast=True, candidates=4)


def test_fast_refuses_a_model_without_measured_settings(tmp_path, capsys):
    model = tmp_path / "plain"
    shutil.copytree(MODEL, model, ignore=shutil.ignore_patterns("sbpc_fast.json"))
    with pytest.raises(ConfigError, match="has no sbpc_fast.json"):
        SBPCJobConfig(model=str(model), fast=True)
    assert main(["--model", str(model), "--fast", "--output", str(tmp_path / "out")]) == 2
    assert "has no sbpc_fast.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_draft_path_is_relative_to_the_model_and_its_teacher_is_checked(tmp_path):
    model = tmp_path / "other"
    shutil.copytree(MODEL, model)
    shutil.copytree(DRAFT, tmp_path / "shapes-sg-diffusion-draft")
    settings = {"draft_model": "../shapes-sg-diffusion-draft", "candidates": 8, "final_candidates": 8,
                "target_recall": 1.0, "target_precision": None, "final_strength": 0.5,
                "final_steps": None}
    (model / "sbpc_fast.json").write_text(json.dumps(settings))
    assert read_fast_settings(model)["draft_model"] == str((tmp_path / "shapes-sg-diffusion-draft").resolve())
    # the same weights: the draft's teacher fingerprint matches the copy
    assert SBPCJobConfig(model=str(model), fast=True).draft_model == str(tmp_path / "shapes-sg-diffusion-draft")
    # other weights: the draft learnt another teacher's renders and is refused
    config = model / "unet" / "config.json"
    config.write_text(config.read_text().replace("{", '{"_changed": 1,', 1))
    with pytest.raises(ConfigError, match="learnt the renders of"):
        SBPCJobConfig(model=str(model), fast=True)


def test_unknown_keys_in_the_settings_file_name_the_file(tmp_path):
    (tmp_path / "sbpc_fast.json").write_text(json.dumps({"draft_model": "d", "candidates": 8, "speed": "max"}))
    with pytest.raises(ValueError, match=r"sbpc_fast.json: unknown keys \['speed'\]"):
        read_fast_settings(tmp_path)
