"""One run at a time in a run folder: a lease file naming its holder, kept fresh by a heartbeat.

A run creates ``{run}/_lease.json`` with a conditional write (S3 ``If-None-Match: *``; locally an
exclusive create under a folder lock) before it deletes or writes anything else there, renews it
every ``timeout / 6`` seconds with a conditional overwrite, and deletes it when it ends. A second
run of the folder is refused with the holder named. A lease is abandoned when its holder's process
is gone (same machine) or its heartbeat is older than the holder's timeout (any machine): then
``--resume`` (or ``--overwrite``) takes it over, so a run can be finished after its driver was killed.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from jobs.common import RunExistsError
from workers.storage import Storage

logger = logging.getLogger("sgbatch")

DEFAULT_TIMEOUT = 60.0


class RunLockedError(RunExistsError):
    """Another run holds the folder's lease (or its lease is abandoned and --resume was not given)."""


class LeaseLostError(RuntimeError):
    """Another run took this run's lease over (its heartbeat had gone stale): this run must stop writing."""


@dataclass(frozen=True)
class Holder:
    token: str
    user: str
    host: str
    machine: str
    """Boot and process-namespace id: pids are only comparable between processes with the same one."""
    pid: int
    pid_started: float
    ray_job: str | None
    acquired: str
    heartbeat: float
    """Epoch seconds of the last renewal."""
    timeout: float

    def describe(self, now: float) -> str:
        job = f", Ray job {self.ray_job}" if self.ray_job else ""
        return (f"pid {self.pid} on host {self.host} (user {self.user}{job}), since {self.acquired}, "
                f"last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago")


def machine_id() -> str:
    """This machine's boot id and pid namespace (Linux); the host name elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def ray_job_id() -> str | None:
    """The submission id when this driver runs under ``ray job submit`` (from the job config Ray passes it)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return (config.get("metadata") or {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def process_alive(pid: int, started: float) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``started`` (not a reused pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def abandoned(holder: Holder, now: float) -> str | None:
    """Why a lease no longer protects a live run, or None while its holder may still be working."""
    if holder.machine == machine_id() and not process_alive(holder.pid, holder.pid_started):
        return f"its process (pid {holder.pid}) has ended"
    age = now - holder.heartbeat
    if age > holder.timeout:
        return f"its heartbeat stopped {age:.0f} s ago (timeout {holder.timeout:.0f} s)"
    return None


def parse_holder(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None


class RunLease:
    """The lease of one run folder, held by this process between :meth:`acquire` and :meth:`release`."""

    def __init__(self, storage: Storage, uri: str, run: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.storage = Storage(storage.settings)  # a client of its own: the heartbeat thread uses it
        self.uri = uri
        self.run = run
        self.timeout = timeout
        self.interval = timeout / 6
        self._version: str | None = None
        self._holder: Holder | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        import psutil

        now = time.time()
        if self._holder is None:
            self._holder = Holder(
                token=uuid.uuid4().hex, user=getpass.getuser(), host=socket.gethostname(), machine=machine_id(),
                pid=os.getpid(), pid_started=psutil.Process().create_time(), ray_job=ray_job_id(),
                acquired=datetime.now(timezone.utc).isoformat(timespec="seconds"), heartbeat=now,
                timeout=self.timeout)
        else:
            self._holder = Holder(**{**asdict(self._holder), "heartbeat": now})
        return json.dumps(asdict(self._holder), indent=2).encode()

    def acquire(self, take_over: bool) -> None:
        """Hold the lease, or raise RunLockedError naming who does. ``take_over``: an abandoned lease may be taken."""
        for _ in range(3):  # a lease released between our two reads is simply created again
            version = self.storage.create_new(self.uri, self._record())
            if version is not None:
                self._version = version
                break
            current = self.storage.read_versioned(self.uri)
            if current is None:
                continue
            self._take_over(current, take_over)
            break
        else:
            raise RunLockedError(f"run {self.run!r}: its lease changed hands repeatedly while this run started; retry")
        self._thread = threading.Thread(target=self._heartbeat, name="sgbatch-lease", daemon=True)
        self._thread.start()

    def _take_over(self, current: tuple[bytes, str], take_over: bool) -> None:
        now = time.time()
        holder = parse_holder(current[0])
        held_by = holder.describe(now) if holder else "an unreadable lease file"
        reason = abandoned(holder, now) if holder else "it cannot be read"
        if reason is None:
            raise RunLockedError(f"run {self.run!r} is in use by {held_by}; one run at a time per run folder "
                                 f"(its lease is taken over by --resume once the holder is gone or its "
                                 f"heartbeat is {holder.timeout:.0f} s old)")
        if not take_over:
            raise RunLockedError(f"run {self.run!r} was left by a run that stopped ({reason}; {held_by}): "
                                 f"pass --resume to finish it or --overwrite to start it again")
        version = self.storage.replace_if(self.uri, self._record(), current[1])
        if version is None:
            raise RunLockedError(f"run {self.run!r}: another run took over its abandoned lease first")
        self._version = version
        logger.warning("took over the lease of run %s: %s (%s)", self.run, reason, held_by)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                version = self.storage.replace_if(self.uri, self._record(), self._version or "")
            except Exception as err:  # noqa: BLE001 - a failed renewal is retried at the next beat
                logger.warning("could not renew the lease of %s: %s", self.run, err)
                continue
            if version is None:
                current = self.storage.read_versioned(self.uri)
                holder = parse_holder(current[0]) if current else None
                self._lost = (f"taken over by {holder.describe(time.time())}" if holder
                              else "its lease file was removed")
                logger.error("run %s: lease lost, %s", self.run, self._lost)
                return
            self._version = version

    def check(self) -> None:
        """Raise LeaseLostError once another run has taken the lease over."""
        if self._lost:
            raise LeaseLostError(f"run {self.run!r} stopped: its lease was {self._lost}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._version is not None and not self._lost:
            try:
                self.storage.delete_if(self.uri, self._version)
            except Exception as err:  # noqa: BLE001 - a lease left behind is taken over by the next --resume
                logger.warning("could not remove the lease of %s: %s", self.run, err)
        self._version = None
        folder = os.path.dirname(self.uri)
        if not self.uri.startswith("s3://") and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)  # a run that stopped before writing anything leaves no folder behind

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
