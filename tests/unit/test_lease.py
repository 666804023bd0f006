"""The run lease, locally and on S3 (moto over HTTP): one holder, refusals that name it, takeover of abandoned leases."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import psutil
import pytest

from jobs.lease import Holder, LeaseLostError, RunLease, RunLockedError, machine_id, parse_holder


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(storage, run folder URI) locally and on S3."""
    if request.param == "local":
        from workers.storage import Storage

        return Storage(), str(tmp_path / "runs" / "r1")
    bucket = request.getfixturevalue("s3_bucket")
    return bucket.storage(), bucket.uri("runs/r1")


def lease(place, timeout: float = 60.0) -> RunLease:
    storage, run = place
    return RunLease(storage, f"{run}/_lease.json", run, timeout=timeout)


def write_holder(place, holder: Holder) -> None:
    storage, run = place
    storage.write_bytes(f"{run}/_lease.json", json.dumps(asdict(holder)).encode())


def foreign_holder(**changes) -> Holder:
    """A holder on another machine whose last heartbeat was just now."""
    base = Holder(token="t-other", user="alice", host="gpu-head-7", machine="another-machine", pid=4242,
                  pid_started=1.0, ray_job="raysubmit_abc", acquired="2026-01-01T00:00:00+00:00",
                  heartbeat=time.time(), timeout=60.0)
    return replace(base, **changes)


def test_second_run_is_refused_naming_the_holder(place):
    storage, run = place
    first = lease(place)
    first.acquire(take_over=False)
    try:
        holder = parse_holder(storage.read_bytes(f"{run}/_lease.json"))
        assert holder.pid == psutil.Process().pid and holder.machine == machine_id()
        for take_over in (False, True):  # --resume cannot take a live lease either
            with pytest.raises(RunLockedError) as info:
                lease(place).acquire(take_over=take_over)
            message = str(info.value)
            assert f"pid {holder.pid} on host {holder.host}" in message and "in use" in message
    finally:
        first.release()
    assert not storage.exists(f"{run}/_lease.json")
    again = lease(place)
    again.acquire(take_over=False)  # free again once released
    again.release()


def test_live_lease_on_another_machine_is_refused(place):
    write_holder(place, foreign_holder())
    with pytest.raises(RunLockedError, match="pid 4242 on host gpu-head-7 .*Ray job raysubmit_abc"):
        lease(place).acquire(take_over=True)


def test_lease_with_a_stale_heartbeat_is_taken_over_by_resume_only(place):
    storage, run = place
    write_holder(place, foreign_holder(heartbeat=time.time() - 600))
    with pytest.raises(RunLockedError, match="--resume") as info:
        lease(place).acquire(take_over=False)
    assert "heartbeat stopped" in str(info.value)
    taker = lease(place)
    taker.acquire(take_over=True)
    try:
        assert parse_holder(storage.read_bytes(f"{run}/_lease.json")).pid == psutil.Process().pid
    finally:
        taker.release()


def test_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(place):
    storage, run = place
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    child.wait(timeout=60)
    write_holder(place, foreign_holder(machine=machine_id(), pid=child.pid, pid_started=started))
    taker = lease(place)
    taker.acquire(take_over=True)  # fresh heartbeat, but its process has ended
    try:
        assert parse_holder(storage.read_bytes(f"{run}/_lease.json")).pid == psutil.Process().pid
    finally:
        taker.release()


def test_a_reused_pid_does_not_keep_a_lease_alive(place):
    me = psutil.Process()
    write_holder(place, foreign_holder(machine=machine_id(), pid=me.pid, pid_started=me.create_time() - 3600))
    taker = lease(place)
    taker.acquire(take_over=True)
    taker.release()


def test_heartbeat_renews_and_a_takeover_is_noticed(place):
    storage, run = place
    holder = lease(place, timeout=1.2)  # beats every 0.2 s
    holder.acquire(take_over=False)
    try:
        first = parse_holder(storage.read_bytes(f"{run}/_lease.json")).heartbeat
        deadline = time.monotonic() + 30
        while parse_holder(storage.read_bytes(f"{run}/_lease.json")).heartbeat == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.1)
        holder.check()  # still ours
        write_holder(place, foreign_holder())  # another run took it over
        deadline = time.monotonic() + 30
        while holder._lost is None:
            assert time.monotonic() < deadline, "the takeover was never noticed"
            time.sleep(0.1)
        with pytest.raises(LeaseLostError, match="taken over by pid 4242"):
            holder.check()
    finally:
        holder.release()
    assert parse_holder(storage.read_bytes(f"{run}/_lease.json")).pid == 4242  # the new holder's lease stays


def test_racing_starts_of_one_run_leave_exactly_one_holder(place):
    outcomes: list = [None] * 6
    barrier = threading.Barrier(6)
    leases = [lease(place) for _ in range(6)]

    def start(i: int) -> None:
        barrier.wait()
        try:
            leases[i].acquire(take_over=True)
            outcomes[i] = "held"
        except RunLockedError:
            outcomes[i] = "refused"

    threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert outcomes.count("held") == 1 and outcomes.count("refused") == 5
    finally:
        for item in leases:
            item.release()


def test_local_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    from workers.storage import Storage

    run = tmp_path / "out" / "fresh"
    item = RunLease(Storage(), str(run / "_lease.json"), str(run))
    item.acquire(take_over=False)
    assert (run / "_lease.json").is_file()
    item.release()
    assert not run.exists()
