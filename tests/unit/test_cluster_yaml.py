"""cluster.yaml, checked offline: Ray's own schema and config checks, then the properties sgbatch relies on."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
GPU_FAMILY = re.compile(r"^(g\d|p\d)")  # g4dn, g5, g6e, p3, p4d, p5 ...


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(text) -> dict:
    return yaml.safe_load(text)


def ray_schema() -> dict:
    """The ray-schema.json shipped in the installed ray package (the one `ray up` validates with)."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations, "ray is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    commands = [c for key in keys for c in config.get(key) or []]
    for node_type in config["available_node_types"].values():
        commands += node_type.get("initialization_commands", []) + node_type.get("worker_setup_commands", [])
    return commands


def setup_commands_of(config: dict, name: str) -> list[str]:
    """The setup commands a node type runs, as Ray merges them (a type's own worker_setup_commands replace
    the shared setup_commands + worker_setup_commands)."""
    common = config.get("setup_commands") or []
    if name == config["head_node_type"]:
        return common + (config.get("head_setup_commands") or [])
    own = config["available_node_types"][name].get("worker_setup_commands")
    return own if own is not None else common + (config.get("worker_setup_commands") or [])


def head_and_gpu_workers(config: dict):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    return head, gpu


def test_matches_rays_own_schema(config):
    jsonschema.validate(config, ray_schema())


def test_passes_rays_config_preparation_and_validation(config):
    """What `ray up` does before it talks to AWS: merge with the AWS defaults, then validate_config."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:  # a private API: a ray upgrade may move it
        pytest.skip(f"ray's private config helpers moved: {e}")
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] == config["head_node_type"]
    assert prepared["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def test_aws_provider(config):
    provider = config["provider"]
    assert provider["type"] == "aws"
    assert re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", provider["region"])
    assert isinstance(provider["cache_stopped_nodes"], bool)
    assert config["auth"]["ssh_user"] == "ubuntu"
    assert config["cluster_name"] == "sgbatch"


def test_head_is_a_cpu_machine_that_takes_no_work(config):
    head, _ = head_and_gpu_workers(config)
    assert head["resources"].get("GPU", 0) == 0
    assert not GPU_FAMILY.match(head["node_config"]["InstanceType"]), "the head should not be a GPU instance"
    # Only the job drivers (0 CPUs) run on the head; tasks and actors go to the workers.
    assert head["resources"].get("CPU") == 0


def test_gpu_workers_scale_from_zero(config):
    _, gpu = head_and_gpu_workers(config)
    assert gpu, "no worker node type offers a GPU"
    for name, node_type in gpu.items():
        assert GPU_FAMILY.match(node_type["node_config"]["InstanceType"]), name
        assert node_type.get("min_workers", 0) == 0, f"{name}: idle GPU nodes should not be kept"
        assert 1 <= node_type["max_workers"] <= config["max_workers"], name
    assert config["idle_timeout_minutes"] > 0


def test_every_node_type_gets_s3_access_from_an_instance_profile(config):
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert isinstance(profile, dict), f"{name} has no IamInstanceProfile"
        assert re.fullmatch(r"arn:aws:iam::[^:]+:instance-profile/[\w+=,.@/-]+", profile.get("Arn", "")) \
            or profile.get("Name"), f"{name}: IamInstanceProfile needs an Arn or a Name"
        assert node_type["node_config"].get("ImageId"), f"{name} has no ImageId"
        assert node_type["node_config"].get("BlockDeviceMappings"), f"{name} has no disk configured"


def test_no_credentials_anywhere(config, text):
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id is in cluster.yaml"
    for word in ("aws_secret_access_key", "aws_access_key_id", "aws_session_token"):
        assert word not in text.lower(), f"{word} in cluster.yaml"
    mounts = config.get("file_mounts") or {}
    assert not any(".aws" in p for pair in mounts.items() for p in pair), "a credentials folder is mounted"


def test_repo_is_mounted_and_installed_on_every_node(config):
    mounts = config["file_mounts"]
    remote = [r for r, local in mounts.items() if (REPO / local).resolve() == REPO]
    assert remote, "file_mounts does not mount the repo ('.': run `ray up` from the repo root)"
    targets = {r.rstrip("/") for r in remote}
    editable = re.compile(r"\bpip install\b.*\s-e\s+['\"]?([^\s'\"]+)")
    for name in config["available_node_types"]:
        installed = {m.group(1).rstrip("/") for c in setup_commands_of(config, name) if (m := editable.search(c))}
        assert installed & targets, f"{name} nodes do not pip install the mounted repo"


def test_gpu_nodes_get_the_cuda_torch_and_a_ray_the_project_accepts(config):
    commands = all_commands(config)
    joined = "\n".join(commands)
    assert "constraints/cpu.txt" not in joined and "whl/cpu" not in joined, "GPU nodes would get CPU torch"
    pins = re.findall(r"ray(?:\[[^\]]*\])?==([\w.]+)", joined)
    assert pins, "ray is not pinned in the setup commands"
    ray_req = next(Requirement(r) for r in importlib.metadata.requires("sgbatch") if Requirement(r).name == "ray")
    for pin in pins:
        assert ray_req.specifier.contains(pin), f"ray=={pin} is outside the project's {ray_req}"


def test_start_commands(config):
    head = " ".join(config["head_start_ray_commands"])
    assert re.search(r"ray start --head\b", head) and "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert commands[0] == "ray stop"
