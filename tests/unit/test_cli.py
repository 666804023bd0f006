"""The command line as a user meets it: version, typos, help, config files, one-line errors that leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from jobs.cli import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own exits (--help, bad flags)
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"sgbatch {version('sgbatch')}"


def test_an_unknown_job_suggests_the_close_one(capsys):
    code, _, err = run_cli(["genrate"], capsys)
    assert code == 2 and err.strip() == "sgbatch: error: unknown job 'genrate'; did you mean 'generate'?"


@pytest.mark.parametrize("job", ["generate", "finetune", "report"])
def test_help_names_the_command_as_typed(capsys, job):
    code, out, _ = run_cli([job, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: sgbatch {job} ")


@pytest.mark.parametrize("job", ["generate", "sbpc", "finetune"])
def test_help_states_each_default_once(capsys, job):
    code, out, _ = run_cli([job, "--help"], capsys)
    flags = " ".join(out.split()).split(" --")  # help text re-wrapped, one piece per option
    assert code == 0 and len(flags) > 20
    assert [f for f in flags if f.count("(default") > 1] == []
    if job != "finetune":  # a default the doc words itself is kept, not repeated as None
        assert [f for f in flags if f.startswith("height ")][0].endswith("(default: the model's).")


def test_prepare_help_names_the_command_as_typed(capsys):
    code, out, _ = run_cli(["prepare"], capsys)
    assert code == 2 and out.startswith("usage: sgbatch prepare {")


def test_flags_are_never_abbreviated(capsys):
    code, _, err = run_cli(["generate", "--step", "5"], capsys)
    assert code == 2 and "unrecognized arguments: --step 5" in err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("steps: 5\nguidance: [3.0\n", "', line 3, column 1: expected ',' or ']', but got '<stream end>'"),
        ("steps: ten\n", "': steps: expected an integer, got 'ten' (str)"),
        ("steps: true\n", "': steps: expected an integer, got True (bool)"),
        ("output_format: jpeg\n", "': output_format: 'jpeg' is not one of ['png', 'webdataset']"),
        ("stepz: 5\n", "': unknown option(s) --stepz (did you mean --steps?); see --help"),
    ],
)
def test_config_file_problems_name_file_line_and_key(tmp_path, capsys, yaml_text, expected):
    path = tmp_path / "job.yaml"
    path.write_text(yaml_text)
    code, _, err = run_cli(["generate", "--config", str(path), "--output", str(tmp_path / "out")], capsys)
    assert code == 2
    assert one_line_error(err) == f"error: --config '{path}{expected}"
    assert not (tmp_path / "out").exists()


def test_config_file_values_are_read_as_their_fields_types(tmp_path):
    from jobs.config import parse_config
    from jobs.generate import GenerateConfig

    path = tmp_path / "job.yaml"
    path.write_text("steps: '7'\nguidance: 2\nworkers: 2\nrun_id: 2024\nheight: null\n")
    cfg = parse_config(GenerateConfig, ["--config", str(path), "--steps", "9"], "generate")
    assert (cfg.steps, cfg.guidance, cfg.workers, cfg.run_id, cfg.height) == (9, 2.0, "2", "2024", None)
    assert isinstance(cfg.guidance, float)


def test_a_stable_diffusion_folder_as_model_fails_first_and_leaves_nothing(tmp_path, capsys):
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    out = tmp_path / "out"
    code, _, err = run_cli(["generate", "--model", str(sd), "--output", str(out)], capsys)
    assert code == 2
    assert one_line_error(err).startswith(f"error: --model '{sd}' is a StableDiffusionPipeline folder, not a scene-graph")
    assert not out.exists()


def test_missing_input_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["generate", "--input", str(tmp_path / "none.parquet"), "--output", str(tmp_path / "o")],
                           capsys)
    assert code == 2 and "no input files match" in one_line_error(err)
    code, _, err = run_cli(["prepare", "sg2im", "--input", str(tmp_path / "none.json"), "--output", str(tmp_path / "p")],
                           capsys)
    assert code == 2 and one_line_error(err).startswith("error: ")


def test_the_installed_command_without_s3_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_ENDPOINT_URL="http://127.0.0.1:9",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    command = [str(Path(sys.executable).with_name("sgbatch")), "generate", "--input", "s3://sgb-data/graphs/",
               "--output", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert one_line_error(done.stderr) == ("error: --input 's3://sgb-data/graphs/': no AWS credentials found (set "
                                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an "
                                           "instance role)")
    assert not (tmp_path / "out").exists()
