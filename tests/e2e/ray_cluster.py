"""A private single-node Ray cluster started with the real ``ray start --head`` CLI, for end-to-end tests.

Isolation from any other Ray on the machine (another user's job, the in-process ``local_ray``
fixture, a developer's ``ray start``):

- every port is chosen free up front (GCS, dashboard, dashboard agent, runtime-env agent, metrics,
  Ray client, raylet, object manager) and workers bind random ports, so nothing collides with a
  cluster on Ray's default ports (6379, 8265, 10001, 52365, ...);
- ``--temp-dir`` is a fresh short folder, so this cluster's ``ray_current_cluster`` file is not the
  one a bare ``ray.init()`` elsewhere reads from ``/tmp/ray``: nobody joins this cluster by accident;
- token authentication is on with a token of its own (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``),
  as Ray >= 2.5x turns it on by default whenever ``~/.ray/auth_token`` exists: the test behaves the
  same on a machine with or without that file, and the CLI calls prove the token reaches them;
- teardown does **not** run ``ray stop``: that command kills every Ray process of the machine it can
  signal (it matches process names, not clusters), including other people's runs. ``ray start`` is
  launched under a new process SID (``setsid``) instead, and teardown signals exactly the processes
  with that SID plus their descendants (the job driver gets an SID of its own, under the job supervisor).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")

PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
)


def free_ports(count: int) -> list[int]:
    """Distinct ports that are free on 127.0.0.1 now (all sockets held open until every port is picked)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the cluster's processes and of the CLI calls.

    The venv's bin comes first on PATH, so ``python`` in a job's entrypoint is the interpreter that
    has the project's dependencies even when pytest was started as ``.venv/bin/python -m pytest``
    without activating the venv. No RAY_ADDRESS leaks in from the caller; no usage stats are sent.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class LocalRayCluster:
    """``ray start --head`` on 127.0.0.1 under an SID of its own; ``stop()`` ends only those processes."""

    num_cpus: int = 2
    object_store_bytes: int = 300 * 1024**2
    env_extra: dict[str, str] = field(default_factory=dict)
    auth_token: str = field(default_factory=lambda: secrets.token_hex(32))
    temp_dir: Path = field(init=False)
    ports: dict[str, int] = field(init=False)
    sid: int | None = field(init=False, default=None)
    start_output: str = field(init=False, default="")

    def auth_env(self) -> dict[str, str]:
        return {**self.env_extra, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token}

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['--dashboard-port']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['--port']}"

    def start(self, timeout: float = 90.0) -> None:
        # Short path: Ray puts Unix sockets under it (108-byte limit on the socket path).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="sgb-ray-", dir="/tmp"))
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--include-dashboard=true", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               f"--object-store-memory={self.object_store_bytes}", f"--temp-dir={self.temp_dir}",
               "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats", "--log-style=record"]
        for flag, port in self.ports.items():
            cmd.append(f"{flag}={port}")
        # setsid: every daemon `ray start` spawns inherits this SID (Ray gives
        # workers their own process group, not their own SID), which is how stop() finds them.
        proc = subprocess.Popen(cmd, env=cluster_env(self.auth_env()), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.sid = proc.pid
        try:
            self.start_output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            self.start_output = proc.communicate()[0]
            self.stop()
            raise RuntimeError(f"`ray start` did not return within {timeout:.0f}s:\n{self.start_output}") from None
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"`ray start` failed (exit {proc.returncode}):\n{self.start_output}")
        self.wait_for_dashboard(deadline=time.monotonic() + timeout)

    def dashboard_json(self, api: str, timeout: float):
        """GET a dashboard API path with this cluster's token (token auth is on), parsed as JSON."""
        request = urllib.request.Request(f"{self.dashboard_url}{api}",
                                         headers={"Authorization": f"Bearer {self.auth_token}"})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())

    def wait_for_dashboard(self, deadline: float) -> None:
        """Until the dashboard's job API answers (the job server is what ``ray job submit`` talks to)."""
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                for api in ("/api/version", "/api/jobs/"):
                    self.dashboard_json(api, timeout=2)
                return
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = e
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the dashboard at {self.dashboard_url} did not answer: {last}\n{self.start_output}")

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: processes with the `ray start` SID and all their descendants."""
        if self.sid is None:
            return []
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.sid:
                    found[p.pid] = p
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        for p in list(found.values()):
            with contextlib.suppress(psutil.Error):
                for child in p.children(recursive=True):
                    found.setdefault(child.pid, child)
        found.pop(os.getpid(), None)  # never ourselves (cannot happen: our SID differs)
        return list(found.values())

    def stop(self, grace: float = 10.0) -> list[int]:
        """SIGTERM this cluster's processes, SIGKILL what is left after ``grace`` s; remove the temp dir."""
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        if getattr(self, "temp_dir", None) is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.sid = None
        return [p.pid for p in procs]

    # ------------------------------------------------------------------------- the jobs CLI

    def cli(self, *args: str, timeout: float = 120.0, cwd: str | None = None) -> subprocess.CompletedProcess:
        """``ray <args>`` with this cluster's environment; output captured (stderr merged into stdout)."""
        return subprocess.run([RAY, *args], env=cluster_env(self.auth_env()), cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)

    def job_status(self, submission_id: str) -> str:
        """The job's status from the job server's REST API (the one ``ray job status`` prints)."""
        try:
            return self.dashboard_json(f"/api/jobs/{submission_id}", timeout=10)["status"]
        except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
            return f"UNKNOWN ({e})"

    def job_logs(self, submission_id: str) -> str:
        return self.cli("job", "logs", "--address", self.dashboard_url, submission_id, timeout=60).stdout

    def wait_for_job(self, submission_id: str, timeout: float, poll: float = 2.0) -> str:
        """Poll the job's status until it is terminal or the timeout passes; returns the last status."""
        deadline = time.monotonic() + timeout
        status = "UNKNOWN"
        while time.monotonic() < deadline:
            status = self.job_status(submission_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(poll)
        return status
