"""Run ids are one safe folder name: anything else exits 2 before a file is written or deleted."""

from __future__ import annotations

import pytest

from jobs.config import ConfigError
from jobs.generate import GenerateConfig, main
from jobs.runs import RunLayout, run_id_problem
from workers.storage import Storage

BAD_IDS = ["..", ".", "../x", "a/../../b", "/etc", "a/b", "", "x" * 129, "x" * 300, "run id", "a\\b", "ü", "a\x00b"]


@pytest.mark.parametrize("run_id", ["run-20260101-000000", "a", "A.b_c-9", "x" * 128, "..."])
def test_safe_run_ids_are_accepted(run_id):
    assert run_id_problem(run_id) is None
    assert GenerateConfig(run_id=run_id).run_id == run_id


@pytest.mark.parametrize("run_id", BAD_IDS, ids=repr)
def test_unsafe_run_ids_are_refused(run_id, tmp_path):
    assert run_id_problem(run_id)
    with pytest.raises(ConfigError, match="--run-id"):
        GenerateConfig(run_id=run_id)
    with pytest.raises(ConfigError, match="--run-id"):
        RunLayout(Storage(), str(tmp_path), run_id)


@pytest.mark.parametrize("run_id", ["..", "../victim", "x" * 300])
def test_unsafe_run_id_exits_2_on_one_line_and_touches_nothing(run_id, tmp_path, capsys):
    output = tmp_path / "parent" / "output"
    output.mkdir(parents=True)
    keep = [tmp_path / "parent" / "precious.txt", output / "old-run" / "run.json", tmp_path / "victim" / "x"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep me")
    before = sorted(p for p in tmp_path.rglob("*"))

    code = main(["--output", str(output), "--run-id", run_id, "--overwrite"])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --run-id")
    assert len(err) < 400  # the 300-character id is cut short in the message
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert all(p.read_text() == "keep me" for p in keep)
